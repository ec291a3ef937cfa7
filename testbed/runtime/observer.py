"""What a passive observer of one path could learn, computed only from that path's pcap with
tshark (``tshark -n -T fields``; no name resolution).

Two tshark passes:

1. every packet, header fields only: addresses, TCP flags and lengths, the MPTCP option
   fields and the SNI that the TLS dissector decoded (TCP and TLS reassembly are on, and the
   TLS heuristic is enabled so that any port is decoded);
2. the raw bytes (``tcp.payload`` and ``tcp.reassembled.data``) of the segments that could
   hold the server name: the first 16 KiB of every subflow direction, where handshakes
   live, plus any segment that contains a 4-byte piece of the name. This keeps the output
   small however large the transfer.

tshark 4.0 field names used (checked on captures from this kernel): MPTCP options are
``tcp.options.mptcp.subtype`` (0 MP_CAPABLE, 1 MP_JOIN, 2 DSS, 3 ADD_ADDR, 4 REMOVE_ADDR,
5 MP_PRIO, 6 MP_FAIL, 7 MP_FASTCLOSE, 8 MP_TCPRST), ``.sendkey`` / ``.recvkey`` (64-bit
keys, printed in decimal), ``.recvtok`` (token in an MP_JOIN SYN, decimal), ``.rst_reason``,
``.ipv4`` / ``.ipv6`` (ADD_ADDR address), ``.echo``; the TCP option kinds are in
``tcp.option_kind`` (30 = MPTCP); the SNI is ``tls.handshake.extensions_server_name``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import RuntimeFailure

MIN_FRAGMENT = 4
HANDSHAKE_WINDOW = 16384  # relative sequence numbers below this are searched for the SNI
MPTCP_OPTION_KIND = "30"
SUBTYPES = {0: "mp_capable", 1: "mp_join", 2: "dss", 3: "add_addr", 4: "remove_addr",
            5: "mp_prio", 6: "mp_fail", 7: "mp_fastclose", 8: "mp_tcprst"}
TRUNCATED_MARKERS = ("cut short", "appears to be damaged or corrupt")

PASS1_FIELDS = (
    "frame.number", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "icmp.type", "icmpv6.type",
    "tcp.stream", "tcp.flags", "tcp.len", "tcp.option_kind", "tcp.options.mptcp.subtype",
    "tcp.options.mptcp.sendkey", "tcp.options.mptcp.recvkey", "tcp.options.mptcp.recvtok",
    "tcp.options.mptcp.rst_reason", "tcp.options.mptcp.ipv4", "tcp.options.mptcp.ipv6",
    "tls.handshake.extensions_server_name",
)
PASS2_FIELDS = (
    "frame.number", "tcp.stream", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.seq",
    "tcp.len", "tcp.payload", "tcp.reassembled.data",
)
TCP_SYN = 0x02
TCP_ACK = 0x10


# -- pure helpers ----------------------------------------------------------------------------
def token_of_key(key: int) -> int:
    """MPTCP token: the most significant 32 bits of SHA-256 of the 64-bit key (RFC 8684)."""
    return int.from_bytes(hashlib.sha256(key.to_bytes(8, "big")).digest()[:4], "big")


def sni_fragments(payload: bytes, name: bytes, min_len: int = MIN_FRAGMENT) -> list[bytes]:
    """Pieces of ``name`` in one segment's ``payload`` that a split of the name across
    segments or subflows would leave there.

    Returns ``[name]`` when the whole name is present. Otherwise a piece counts only where a
    cut can be: a prefix of the name that ends the payload, a suffix of the name that starts
    it, or the whole payload when it lies inside the name; each at least ``min_len`` bytes.
    Requiring the cut keeps chance matches in ciphertext out (4 bytes anywhere in a large
    transfer would otherwise match by accident).
    """
    if not name or not payload:
        return []
    if name in payload:
        return [name]
    found: list[bytes] = []
    for n in range(min(len(name), len(payload)) - 1, min_len - 1, -1):
        if payload.endswith(name[:n]):
            found.append(name[:n])
            break
    for n in range(min(len(name), len(payload)) - 1, min_len - 1, -1):
        if payload.startswith(name[-n:]):
            found.append(name[-n:])
            break
    if len(payload) >= min_len and payload in name and payload not in found:
        found.append(payload)
    return found


def _grams(name: bytes, n: int = MIN_FRAGMENT) -> list[bytes]:
    if len(name) <= n:
        return [name] if name else []
    return sorted({name[i:i + n] for i in range(len(name) - n + 1)})


def _payload_filter(name: bytes) -> str:
    clauses = [f"tcp.seq < {HANDSHAKE_WINDOW}"]
    clauses += [f"tcp.payload contains {g.hex(':')}" for g in _grams(name)]
    return f"tcp.len > 0 && !icmp && !icmpv6 && ({' || '.join(clauses)})"


def _values(cell: str) -> list[str]:
    return [v for v in cell.split(",") if v] if cell else []


def _int(text: str) -> int | None:
    text = text.strip()
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None


# -- tshark ----------------------------------------------------------------------------------
@dataclass
class _TsharkOut:
    rows: list[dict[str, str]] = field(default_factory=list)
    warning: str = ""


def _tshark(pcap: Path, fields: tuple[str, ...], timeout_s: float,
            display_filter: str | None = None) -> _TsharkOut:
    exe = shutil.which("tshark")
    if exe is None:
        raise RuntimeFailure("tshark is not installed (Debian package 'tshark'); "
                             "cannot summarise the captures")
    argv = [exe, "-n", "-r", str(pcap), "--enable-heuristic", "tls_tcp",
            "-o", "tcp.desegment_tcp_streams:TRUE", "-o", "tls.desegment_ssl_records:TRUE",
            "-T", "fields", "-E", "header=n", "-E", "separator=/t", "-E", "occurrence=a",
            "-E", "aggregator=,"]
    if display_filter:
        argv += ["-Y", display_filter]
    for f in fields:
        argv += ["-e", f]
    try:
        res = subprocess.run(argv, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"tshark took more than {timeout_s}s on {pcap}") from None
    except OSError as exc:
        raise RuntimeFailure(f"cannot run tshark: {exc}") from exc
    stderr = "\n".join(line for line in res.stderr.decode(errors="replace").splitlines()
                       if "could be dangerous" not in line).strip()
    out = _TsharkOut()
    if res.returncode != 0:
        if any(marker in stderr for marker in TRUNCATED_MARKERS):
            out.warning = stderr  # a truncated capture: keep the packets read before the cut
        else:
            raise RuntimeFailure(f"tshark failed on {pcap} ({res.returncode}): {stderr[:500]}")
    for line in res.stdout.decode(errors="replace").splitlines():
        cells = line.split("\t")
        cells += [""] * (len(fields) - len(cells))
        out.rows.append(dict(zip(fields, cells, strict=False)))
    return out


# -- summary ---------------------------------------------------------------------------------
def summarize_pcap(pcap: Path, *, sni: str, server_addresses: list[str], total_app_bytes: int,
                   timeout_s: float = 30) -> dict[str, Any]:
    """Summarise what an observer holding ``pcap`` saw. JSON-serialisable; see the module
    docstring for how. Raises RuntimeFailure when tshark is missing, fails or times out, or
    the file does not exist; an empty or truncated capture is summarised, not an error.

    ``payload_bytes`` are TCP payload bytes on the wire (retransmissions count again), so
    ``bytes_seen_ratio`` (from_server / total_app_bytes) also counts TLS overhead.
    """
    pcap = Path(pcap)
    if not pcap.is_file():
        raise RuntimeFailure(f"no capture file {pcap}")
    servers = set(server_addresses)
    name = sni.encode()
    pass1 = _tshark(pcap, PASS1_FIELDS, timeout_s)

    addresses: set[str] = set()
    syn_dsts: set[str] = set()
    advertised: set[str] = set()
    decoded: list[str] = []
    keys: list[int] = []
    tokens: list[int] = []
    subtypes: Counter[str] = Counter()
    counts = Counter({k: 0 for k in ("mp_capable", "mp_capable_syn", "mp_join_syn", "dss",
                                     "option30_packets", "mp_tcprst", "mp_fail", "add_addr")})
    rst_reasons: set[int] = set()
    to_server = from_server = 0

    for row in pass1.rows:
        srcs = _values(row["ip.src"]) + _values(row["ipv6.src"])
        dsts = _values(row["ip.dst"]) + _values(row["ipv6.dst"])
        addresses.update(srcs, dsts)
        for n in _values(row["tls.handshake.extensions_server_name"]):
            if n not in decoded:
                decoded.append(n)
        if row["icmp.type"] or row["icmpv6.type"] or not row["tcp.flags"]:
            continue  # not TCP, or a TCP header quoted inside an ICMP error
        flags = _int(_values(row["tcp.flags"])[0]) or 0
        src, dst = (srcs[0] if srcs else ""), (dsts[0] if dsts else "")
        syn_only = bool(flags & TCP_SYN) and not flags & TCP_ACK
        if syn_only and dst:
            syn_dsts.add(dst)
        length = _int((_values(row["tcp.len"]) or ["0"])[0]) or 0
        if dst in servers:
            to_server += length
        if src in servers:
            from_server += length
        if MPTCP_OPTION_KIND not in _values(row["tcp.option_kind"]):
            continue
        counts["option30_packets"] += 1
        kinds = {_int(v) for v in _values(row["tcp.options.mptcp.subtype"])}
        for k in kinds:
            subtypes[SUBTYPES.get(k, str(k)) if k is not None else "?"] += 1
        counts["mp_capable"] += 0 in kinds
        counts["mp_capable_syn"] += 0 in kinds and syn_only
        counts["mp_join_syn"] += 1 in kinds and syn_only
        counts["dss"] += 2 in kinds
        counts["add_addr"] += 3 in kinds
        counts["mp_fail"] += 6 in kinds
        counts["mp_tcprst"] += 8 in kinds
        for col in ("tcp.options.mptcp.sendkey", "tcp.options.mptcp.recvkey"):
            for v in _values(row[col]):
                key = _int(v)
                if key is not None and key not in keys:
                    keys.append(key)
        if 1 in kinds and syn_only:
            for v in _values(row["tcp.options.mptcp.recvtok"]):
                tok = _int(v)
                if tok is not None and tok not in tokens:
                    tokens.append(tok)
        for v in _values(row["tcp.options.mptcp.rst_reason"]):
            reason = _int(v)
            if reason is not None:
                rst_reasons.add(reason)
        advertised.update(_values(row["tcp.options.mptcp.ipv4"]))
        advertised.update(_values(row["tcp.options.mptcp.ipv6"]))

    sni_status, fragments, found_in = "none", [], None
    if name:
        if sni in decoded:
            sni_status, found_in = "full", "tls"
        if pass1.rows and sni_status != "full":
            pass2 = _tshark(pcap, PASS2_FIELDS, timeout_s, _payload_filter(name))
            whole, pieces = _search_payloads(pass2.rows, name)
            if whole:
                sni_status, found_in = "full", "payload"
            elif pieces:
                sni_status, found_in = "partial", "payload"
                fragments = pieces

    derived = {f"{k:016x}": f"{token_of_key(k):08x}" for k in keys}
    token_hex = [f"{t:08x}" for t in tokens]
    return {
        "pcap": str(pcap),
        "packets": len(pass1.rows),
        "warning": pass1.warning or None,
        "sni": {"name": sni, "status": sni_status, "decoded": decoded,
                "fragments_seen": fragments, "found_in": found_in},
        "mptcp": {
            **dict(counts),
            "keys": [f"{k:016x}" for k in keys],
            "tokens": token_hex,
            "derived_tokens": derived,
            "tokens_derivable_from_keys": sorted(set(token_hex) & set(derived.values())),
            "subtypes": dict(sorted(subtypes.items())),
            "rst_reasons": sorted(rst_reasons),
            "advertised_addresses": sorted(advertised),
        },
        "addresses": sorted(addresses),
        "server_addresses_seen": sorted(addresses & servers),
        "syn_destinations": sorted(syn_dsts),
        "payload_bytes": {"to_server": to_server, "from_server": from_server},
        "bytes_seen_ratio": (round(from_server / total_app_bytes, 4)
                             if total_app_bytes > 0 else None),
    }


def _search_payloads(rows: list[dict[str, str]], name: bytes) -> tuple[bool, list[str]]:
    """Search the pass-2 rows: is the whole name in a segment, in tshark's reassembled data,
    or in a run of contiguous segments of one direction? Otherwise, which pieces are seen?"""
    pieces: list[bytes] = []
    runs: dict[tuple[str, str, str], list[tuple[int, bytes]]] = {}
    for row in rows:
        for col in ("tcp.reassembled.data", "tcp.payload"):
            for hexdata in _values(row[col]):
                try:
                    data = bytes.fromhex(hexdata.replace(":", ""))
                except ValueError:
                    continue
                if name in data:
                    return True, []
                if col == "tcp.payload":
                    pieces += [p for p in sni_fragments(data, name) if p not in pieces]
        payload = _values(row["tcp.payload"])
        seq = _int((_values(row["tcp.seq"]) or [""])[0])
        if payload and seq is not None:
            src = (_values(row["ip.src"]) + _values(row["ipv6.src"]) or [""])[0]
            dst = (_values(row["ip.dst"]) + _values(row["ipv6.dst"]) or [""])[0]
            try:
                data = bytes.fromhex(payload[0].replace(":", ""))
            except ValueError:
                continue
            runs.setdefault((row["tcp.stream"], src, dst), []).append((seq, data))
    for segments in runs.values():
        for run in _contiguous(segments):
            if name in run:
                return True, []
    pieces.sort(key=lambda p: (-len(p), p))
    return False, [p.decode("ascii", errors="replace") for p in pieces]


def _contiguous(segments: list[tuple[int, bytes]]) -> list[bytes]:
    """Join segments (seq, data) of one direction into runs without gaps (overlaps from
    retransmissions are trimmed)."""
    runs: list[bytes] = []
    current = b""
    end: int | None = None
    for seq, data in sorted(segments):
        if end is not None and seq <= end:
            current += data[end - seq:]
            end = max(end, seq + len(data))
        else:
            if current:
                runs.append(current)
            current, end = data, seq + len(data)
    if current:
        runs.append(current)
    return runs
