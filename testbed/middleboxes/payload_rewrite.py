"""An application-level gateway that rewrites payload bytes in flight (claim M5).

Every TCP segment to or from the server that crosses the slot node is queued (NFQUEUE,
``--queue-bypass``: fail-open) to a worker (``_rewrite_worker``) that changes the
``after``-th data segment of one direction (and ``count - 1`` more): ``same_length``
replaces ``bytes`` bytes, ``insert`` adds ``bytes`` bytes, ``delete`` removes them. For the
length-changing modes it then shifts the sequence numbers of that direction and the
acknowledgement numbers and SACK blocks of the other by the running delta, retransmissions
included, as nf_conntrack's seqadj does for an FTP/SIP ALG. It knows nothing of MPTCP: the
DSS mapping and checksum are left as they were.

The report (``finish``) comes from the worker's log and the two pcaps around the box: the
upstream capture (server side of the slot) and the path's pcap (client side), so for
server->client traffic "before" is the upstream pcap and "after" the path pcap (swapped
for client->server). It also lists the MPTCP counters that show the kernel noticed
(DataCsumErr, MP_FAIL, infinite mapping, MP_RST, DSS mismatches).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from testbed.errors import SpecError
from testbed.middleboxes.base import Middlebox
from testbed.model.params import ParamSpec
from testbed.runtime.network import Network
from testbed.runtime.node import Node

QUEUE_NUM = 4343
# Counters (either end) by which MPTCP shows that it noticed a changed payload or a broken
# mapping. MP_RST and MP_FASTCLOSE are reported too but are no proof of detection: an
# application that aborts (TLS) closes its MPTCP connection with them as well.
DETECTION_COUNTERS = ("MPTcpExtDataCsumErr", "MPTcpExtMPFailTx", "MPTcpExtMPFailRx",
                      "MPTcpExtInfiniteMapTx", "MPTcpExtInfiniteMapRx",
                      "MPTcpExtDSSNotMatching", "MPTcpExtDSSCorruptionFallback",
                      "MPTcpExtDSSCorruptionReset", "MPTcpExtDSSNoMatchTCP")
CLOSE_COUNTERS = ("MPTcpExtMPRstTx", "MPTcpExtMPRstRx", "MPTcpExtMPFastcloseTx",
                  "MPTcpExtMPFastcloseRx", "MPTcpExtFallbackFailed")


class PayloadRewrite(Middlebox):
    kind = "payload_rewrite"
    description = ("ALG: rewrites payload bytes of one direction in flight (same length, "
                   "insert or delete) and shifts seq/ack/SACK as an ALG does (NFQUEUE)")
    params: ClassVar[dict[str, ParamSpec]] = {
        "mode": ParamSpec("mode", str, "same_length",
                          "same_length: replace bytes; insert / delete: change the segment's "
                          "length and shift seq/ack numbers from then on",
                          choices=("same_length", "insert", "delete")),
        "direction": ParamSpec("direction", str, "s2c",
                               "rewrite server->client (s2c) or client->server (c2s) data",
                               choices=("s2c", "c2s")),
        "after": ParamSpec("after", int, 30, "rewrite the n-th data segment of that direction "
                           "(new data, retransmissions not counted)", lo=1, hi=100000),
        "count": ParamSpec("count", int, 1, "data segments rewritten", lo=1, hi=1000),
        "bytes": ParamSpec("bytes", int, 4, "bytes replaced, inserted or deleted per segment",
                           lo=1, hi=512),
        "fill": ParamSpec("fill", str, "", "ASCII text written (repeated) by same_length and "
                          "insert; empty: same_length inverts the bytes, insert writes "
                          "'#ALG#'"),
    }
    requires = frozenset({"iptables", "nfqueue", "tshark"})
    capture_upstream = True
    log: Path
    template = """\
*filter
-A FORWARD -p tcp -s {{ server }} -j NFQUEUE --queue-num {{ queue }} --queue-bypass
-A FORWARD -p tcp -d {{ server }} -j NFQUEUE --queue-num {{ queue }} --queue-bypass
COMMIT
"""

    @classmethod
    def validate(cls, params: dict[str, Any], file: str, field: str) -> dict[str, Any]:
        out = super().validate(params, file, field)
        fill = out["fill"]
        if not fill.isascii() or not fill.isprintable() or len(fill) > 512:
            raise SpecError(file, f"{field}.fill", f"{fill[:40]!r} is not printable ASCII "
                            "of at most 512 characters", "e.g. fill: EVIL")
        return out

    def variables(self, node: Node, net: Network) -> dict[str, Any]:
        return {"server": self.server_address, "queue": QUEUE_NUM}

    def start_workers(self) -> None:
        self.log = self.evidence("rewrites.jsonl")
        self.log.write_text("")
        self.start_worker("testbed.middleboxes._rewrite_worker", {
            "queue": QUEUE_NUM, "server": self.server_address,
            "direction": self.values["direction"], "mode": self.values["mode"],
            "after": self.values["after"], "count": self.values["count"],
            "bytes": self.values["bytes"], "fill_hex": self.values["fill"].encode().hex(),
            "log": str(self.log)}, "rewriter")

    # -- the report ------------------------------------------------------------------------
    def _pcaps(self) -> tuple[Path | None, Path | None]:
        """(before the box, after the box) for the rewritten direction."""
        path_pcap = self.evidence_dir / f"{self.path}.pcap" if self.evidence_dir else None
        path_pcap = path_pcap if path_pcap is not None and path_pcap.exists() else None
        if self.values["direction"] == "s2c":
            return self.upstream_pcap, path_pcap
        return path_pcap, self.upstream_pcap

    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        # Runs after teardown: the worker was stopped (SIGTERM) and wrote its summary.
        lines = [json.loads(ln) for ln in self.log.read_text().splitlines() if ln.strip()]
        events = [e for e in lines if "seq" in e]
        summary = next((e for e in lines if "summary" in e), {})
        firsts = [e for e in events if not e["retransmission"]]
        before, after = self._pcaps()
        counters = facts.get("counters", {})
        signals = _counters(counters, DETECTION_COUNTERS)
        stats = summary.get("summary", {})
        return {
            "direction": self.values["direction"],
            "mode": self.values["mode"],
            "rewritten_segments": len(firsts),
            "rewritten_copies": len(events),
            "length_delta": sum(e["segment_delta"] for e in firsts),
            "seq_shifted_packets": stats.get("seq_shifted"),
            "ack_shifted_packets": stats.get("ack_shifted"),
            "sack_edges_shifted": stats.get("sack_shifted"),
            "df_cleared": stats.get("df_cleared"),
            "errors": [e["error"] for e in lines if "error" in e][:5],
            "seen_before": _bytes_seen(before, events, "window_before", "seq"),
            "seen_after": _bytes_seen(after, events, "window_after", "new_seq"),
            # The original bytes at the rewritten position after the box: must be false.
            "original_seen_after": _bytes_seen(after, events, "window_before", "new_seq"),
            "shifted_segments_seen": _shift_seen(before, after, firsts),
            "mptcp_signals": signals,
            "mptcp_detected": bool(signals),
            "mptcp_resets": _counters(counters, CLOSE_COUNTERS),
            "rewrites": events[:20],
        }


def _counters(counters: dict[str, dict[str, int]], names: tuple[str, ...]) -> dict[str, int]:
    """The non-zero deltas of ``names`` as ``{"node.Counter": delta}``."""
    return {f"{node}.{name}": value for node, values in sorted(counters.items())
            for name, value in sorted(values.items()) if name in names and value}


def _stream_bytes(pcap: Path, client: str, port: int, direction: str
                  ) -> list[tuple[int, bytes]]:
    """(seq, payload) of every segment with payload of one TCP connection and direction
    in ``pcap`` (the upstream capture sees GRO-merged packets: one may span several)."""
    end = "dst" if direction == "s2c" else "src"
    res = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y",
                          f"ip.{end} == {client} && tcp.{end}port == {port} && tcp.len > 0",
                          "-T", "fields", "-e", "tcp.seq_raw", "-e", "tcp.payload"],
                         capture_output=True, text=True, timeout=120, check=False)
    out = []
    for line in res.stdout.splitlines():
        seq, _, data = line.partition("\t")
        if seq.strip().isdigit() and data.strip():
            out.append((int(seq), bytes.fromhex(data.strip().replace(":", ""))))
    return out


def _bytes_seen(pcap: Path | None, events: list[dict[str, Any]], window: str, seq: str
                ) -> bool | None:
    """Whether ``pcap`` carries, for some rewrite, the logged ``window`` of bytes (the
    change with up to 8 unchanged bytes on each side) at its stream position ``seq`` +
    ``window_offset``: the original on the wire before the box, the changed bytes after."""
    if pcap is None or not events:
        return None
    cache: dict[tuple[str, int], list[tuple[int, bytes]]] = {}
    for ev in events:
        key = (ev["client"], ev["client_port"])
        if key not in cache:
            cache[key] = _stream_bytes(pcap, *key, ev["direction"])
        want = bytes.fromhex(ev[window])
        pos = (ev[seq] + ev["window_offset"]) % (1 << 32)
        if _find(cache[key], pos, want):
            return True
    return False


def _find(stream: list[tuple[int, bytes]], pos: int, want: bytes) -> bool:
    """Whether some segment of ``stream`` holds ``want`` at sequence number ``pos``."""
    for start, data in stream:
        at = (pos - start) % (1 << 32)
        if at + len(want) <= len(data) and data[at:at + len(want)] == want:
            return True
    return False


def _shift_seen(before: Path | None, after: Path | None, firsts: list[dict[str, Any]]
                ) -> dict[str, int] | None:
    """For a length-changing rewrite, the ALG's shift on the wire: of the (up to 100)
    segments of the rewritten connection that the after-pcap has past the rewritten one,
    how many carry the before-pcap's bytes from ``seq - delta`` (``shifted``) and how many
    those from ``seq`` itself (``unshifted``). None when no length changed."""
    if before is None or after is None or not firsts or not any(
            e["segment_delta"] for e in firsts):
        return None
    from testbed.model.wire import seq_after

    ev = firsts[0]
    delta = ev["delta"]
    end = (ev["new_seq"] + ev["new_len"]) % (1 << 32)
    old = _stream_bytes(before, ev["client"], ev["client_port"], ev["direction"])
    new = _stream_bytes(after, ev["client"], ev["client_port"], ev["direction"])
    later = [(s, d) for s, d in new if s == end or seq_after(s, end)][:100]
    shifted = sum(_find(old, (s - delta) % (1 << 32), d[:64]) for s, d in later)
    unshifted = sum(_find(old, s, d[:64]) for s, d in later)
    return {"checked": len(later), "shifted": shifted, "unshifted": unshifted}
