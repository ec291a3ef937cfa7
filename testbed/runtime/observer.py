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

Almost all of a tshark pass on a testbed capture is tshark's own start-up (~0.2 s of
dissector registration, then ~0.07 s of per-file set-up once the capture header is read);
the packets take a few tens of ms. ``PcapAnalysis`` therefore starts both passes before the
capture starts (the scenario starts them before it builds the network), each reading the
capture from a pipe (``-r -``, same options), and copies the capture file into them as
tcpdump writes it: start-up and most of the dissection happen during the transfer, at the
lowest CPU priority. Once the capture is stopped, the passes get their normal priority back,
the last bytes are copied, stdin is closed, and the same summary as ``summarize_pcap``
(which runs tshark on the file) comes out: tshark reads the same bytes in the same order.
The early processes are recorded in the run's ledger and stopped by PID; if the orchestrator
dies, their stdin reaches EOF and they exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import RuntimeFailure
from testbed.runtime.ledger import Ledger, kill_process_group, proc_start_time
from testbed.runtime.procwait import wait_exit

MIN_FRAGMENT = 4
HANDSHAKE_WINDOW = 16384  # relative sequence numbers below this are searched for the SNI
MPTCP_OPTION_KIND = "30"
SUBTYPES = {0: "mp_capable", 1: "mp_join", 2: "dss", 3: "add_addr", 4: "remove_addr",
            5: "mp_prio", 6: "mp_fail", 7: "mp_fastclose", 8: "mp_tcprst"}
TRUNCATED_MARKERS = ("cut short", "appears to be damaged or corrupt")
FOLLOW_CHUNK = 1 << 20  # bytes of the growing capture read at a time
FOLLOW_POLL_S = 0.02  # how often the pump looks for new capture bytes
# The early tsharks start while the transfer runs: a lower priority keeps their start-up
# from taking CPU from the peers on a small machine (they have the whole transfer to do it).
EARLY_NICE = 19
EOF_EXIT_S = 2.0  # how long a tshark whose stdin was closed gets to exit by itself
ORCHESTRATOR = "orchestrator"  # the ledger's node for processes of the root namespace

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


def _tshark_argv(source: str, fields: tuple[str, ...],
                 display_filter: str | None) -> list[str]:
    """The tshark command line of a pass reading ``source`` (a file, or ``-`` for stdin)."""
    exe = shutil.which("tshark")
    if exe is None:
        raise RuntimeFailure("tshark is not installed (Debian package 'tshark'); "
                             "cannot summarise the captures")
    argv = [exe, "-n", "-r", source, "--enable-heuristic", "tls_tcp",
            "-o", "tcp.desegment_tcp_streams:TRUE", "-o", "tls.desegment_ssl_records:TRUE",
            "-T", "fields", "-E", "header=n", "-E", "separator=/t", "-E", "occurrence=a",
            "-E", "aggregator=,"]
    if display_filter:
        argv += ["-Y", display_filter]
    for f in fields:
        argv += ["-e", f]
    return argv


def _tshark_rows(pcap: Path, fields: tuple[str, ...], returncode: int, stdout: bytes,
                 stderr_raw: bytes) -> _TsharkOut:
    """Parse a finished pass; a truncated capture gives a warning, other failures raise."""
    stderr = "\n".join(line for line in stderr_raw.decode(errors="replace").splitlines()
                       if "could be dangerous" not in line).strip()
    out = _TsharkOut()
    if returncode != 0:
        if any(marker in stderr for marker in TRUNCATED_MARKERS):
            out.warning = stderr  # a truncated capture: keep the packets read before the cut
        else:
            raise RuntimeFailure(f"tshark failed on {pcap} ({returncode}): {stderr[:500]}")
    for line in stdout.decode(errors="replace").splitlines():
        cells = line.split("\t")
        cells += [""] * (len(fields) - len(cells))
        out.rows.append(dict(zip(fields, cells, strict=False)))
    return out


def _tshark(pcap: Path, fields: tuple[str, ...], timeout_s: float,
            display_filter: str | None = None) -> _TsharkOut:
    argv = _tshark_argv(str(pcap), fields, display_filter)
    try:
        res = subprocess.run(argv, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"tshark took more than {timeout_s}s on {pcap}") from None
    except OSError as exc:
        raise RuntimeFailure(f"cannot run tshark: {exc}") from exc
    return _tshark_rows(pcap, fields, res.returncode, res.stdout, res.stderr)


def _set_nice(pid: int, nice: int) -> None:
    """Set the nice value of ``pid`` and, as it leads its own session, of its scheduler
    autogroup: with autogroups (kernel.sched_autogroup_enabled) a session's tasks share one
    weight, so the nice value of the process alone would change nothing against other
    sessions. Raising the priority back needs root (the testbed runs as root); without
    it the process just stays niced."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")


class _PipedTshark:
    """One tshark pass started before its capture is complete, reading it from stdin.

    Its own session (stopped as a group by PID), recorded in the ledger under the
    orchestrator (it runs in the root namespace and only reads the pipe). A thread (the
    pump) copies the capture file into tshark's stdin as tcpdump writes it, and collects
    tshark's output; it never touches the ledger. ``finish`` says the capture is complete:
    the pump copies what is left, closes stdin, and tshark prints its last rows and exits.
    """

    def __init__(self, pcap: Path, fields: tuple[str, ...], display_filter: str | None,
                 ledger: Ledger, label: str) -> None:
        self.pcap = pcap
        self.fields = fields
        self.ledger = ledger
        argv = _tshark_argv("-", fields, display_filter)
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise RuntimeFailure(f"cannot run tshark: {exc}") from exc
        self._start_time = proc_start_time(self.proc.pid)
        ledger.add_process(self.proc.pid, label, ORCHESTRATOR)
        _set_nice(self.proc.pid, EARLY_NICE)
        self._closed = False
        self._complete = threading.Event()  # the capture file has all its bytes
        self._stop = threading.Event()      # give up: stop copying and reading
        self._wake_r, self._wake_w = os.pipe()
        self._out = bytearray()
        self._err = bytearray()
        self._failure = ""
        self._thread = threading.Thread(target=self._pump, name=f"tshark-{pcap.name}",
                                        daemon=True)

    def follow(self) -> None:
        """Start copying the capture (as far as it is written) into tshark. Idempotent."""
        if self._thread.ident is None:
            self._thread.start()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _pump(self) -> None:
        try:
            self._copy()
        except Exception as exc:  # recorded: finish() then fails loudly
            self._failure = f"{type(exc).__name__}: {exc}"
        finally:
            # Closing stdout/stderr too: a tshark abandoned in mid-output gets EPIPE and
            # exits instead of blocking in a write (where it would ignore SIGTERM).
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()

    def _copy(self) -> None:
        """Copy the capture into tshark's stdin as it grows and collect its output, until
        tshark closed its output (after the EOF sent once the capture is complete), or
        ``abandon``."""
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        stdin = self.proc.stdin.fileno()
        outputs = {self.proc.stdout.fileno(): self._out, self.proc.stderr.fileno(): self._err}
        os.set_blocking(stdin, False)
        pending = memoryview(b"")
        offset = 0
        writing = False
        with selectors.DefaultSelector() as sel, self.pcap.open("rb") as src:
            sel.register(self._wake_r, selectors.EVENT_READ)
            for fd in outputs:
                sel.register(fd, selectors.EVENT_READ)
            while outputs and not self._stop.is_set():
                if not pending and not self.proc.stdin.closed:
                    complete = self._complete.is_set()  # before the read: then it is all
                    pending = memoryview(os.pread(src.fileno(), FOLLOW_CHUNK, offset))
                    offset += len(pending)
                    if not pending and complete:
                        self.proc.stdin.close()  # EOF: tshark finishes
                want = bool(pending) and not self.proc.stdin.closed
                if want != writing:
                    if want:
                        sel.register(stdin, selectors.EVENT_WRITE)
                    else:
                        sel.unregister(stdin)
                    writing = want
                # Waiting for the capture to grow: look again after FOLLOW_POLL_S.
                growing = not writing and not self.proc.stdin.closed
                for key, _ in sel.select(FOLLOW_POLL_S if growing else None):
                    if key.fd == self._wake_r:
                        os.read(self._wake_r, 64)
                    elif key.fd == stdin:
                        try:
                            pending = pending[os.write(stdin, pending):]
                        except BlockingIOError:
                            pass
                        except BrokenPipeError:  # tshark stopped reading: keep its output
                            pending = memoryview(b"")
                            sel.unregister(stdin)
                            writing = False
                            self.proc.stdin.close()
                    else:
                        chunk = os.read(key.fd, 65536)
                        if chunk:
                            outputs[key.fd] += chunk
                        else:
                            sel.unregister(key.fd)
                            del outputs[key.fd]

    def finish(self, timeout_s: float) -> _TsharkOut:
        """The capture is complete: let tshark read the rest, then parse what it printed."""
        self.follow()
        self.complete()
        self._thread.join(timeout_s)
        if self._thread.is_alive() or not wait_exit(self.proc, timeout_s):
            raise RuntimeFailure(f"tshark took more than {timeout_s}s on {self.pcap}")
        if self._failure or self._stop.is_set():
            raise RuntimeFailure(f"copying {self.pcap} to tshark failed: "
                                 f"{self._failure or 'abandoned'}")
        # tshark names its input in its messages (a truncated capture's warning): name the
        # file, as when it reads the file itself, so the summary is the same.
        stderr = bytes(self._err).replace(b"The standard input",
                                          f'The file "{self.pcap}"'.encode())
        return _tshark_rows(self.pcap, self.fields, self.proc.returncode or 0, bytes(self._out),
                            stderr)

    def complete(self) -> None:
        """The capture file is complete: the pump copies the rest, then closes stdin. From
        now on the run waits for this tshark, so it gets the normal priority back (a niced
        one would be starved by any other load, e.g. a parallel slot)."""
        if not self._complete.is_set() and self.proc.poll() is None:
            _set_nice(self.proc.pid, 0)
        self._complete.set()
        self._wake()

    def abandon(self) -> None:
        """Stop copying and reading (the pump closes the pipes: tshark gets EOF, or EPIPE,
        and exits). Returns at once; thread-safe, no ledger access."""
        self._stop.set()
        self._wake()

    def close(self) -> None:
        """Stop tshark if it still runs, reap it, forget it. Idempotent. Call it from the
        thread that owns the ledger (ledger writes are not thread-safe).

        tshark ignores SIGTERM while blocked in a read or write of its pipes (its handler
        only sets a flag), so it is ended by closing them (``abandon``); one still running
        after that is stopped by PID (its group)."""
        if self._closed:
            return
        self._closed = True
        self.abandon()
        if self._thread.ident is not None:
            self._thread.join(EOF_EXIT_S)
        else:  # never started: close the pipes here
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        if not wait_exit(self.proc, EOF_EXIT_S):
            kill_process_group(self.proc.pid, self._start_time, grace_s=1.0)
            wait_exit(self.proc, 1.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ledger.forget_process(self.proc.pid)


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
    return _summarize(pcap, sni, server_addresses, total_app_bytes,
                      lambda: _tshark(pcap, PASS1_FIELDS, timeout_s),
                      lambda: _tshark(pcap, PASS2_FIELDS, timeout_s,
                                      _payload_filter(sni.encode())))


class PcapAnalysis:
    """``summarize_pcap`` of a capture that is still being written, with both tshark passes
    started early and fed the capture as it grows (see the module docstring). ``start``
    before the capture starts (tshark needs only the name to search), ``follow`` once
    tcpdump is recording (the file exists), ``summarize`` after the capture stopped,
    ``close`` on every exit path (it stops whichever tshark still runs, by PID)."""

    def __init__(self, pcap: Path, *, sni: str, ledger: Ledger, timeout_s: float = 30) -> None:
        self.pcap = Path(pcap)
        self.sni = sni
        self.timeout_s = timeout_s
        self._passes: list[_PipedTshark] = []
        try:
            self._passes.append(_PipedTshark(self.pcap, PASS1_FIELDS, None, ledger,
                                             f"tshark pass 1 {self.pcap.name}"))
            if sni:  # pass 2 searches the raw bytes for the name: only with a name
                self._passes.append(_PipedTshark(self.pcap, PASS2_FIELDS,
                                                 _payload_filter(sni.encode()), ledger,
                                                 f"tshark pass 2 {self.pcap.name}"))
        except BaseException:
            self.close()
            raise

    @classmethod
    def start(cls, pcap: Path, *, sni: str, ledger: Ledger,
              timeout_s: float = 30) -> PcapAnalysis:
        return cls(pcap, sni=sni, ledger=ledger, timeout_s=timeout_s)

    def follow(self) -> None:
        """Start feeding the passes the capture file as tcpdump writes it."""
        for p in self._passes:
            p.follow()

    def summarize(self, *, server_addresses: list[str],
                  total_app_bytes: int) -> dict[str, Any]:
        """The summary of the finished capture: the same dict as ``summarize_pcap`` with
        these arguments. May run in a worker thread (it does not touch the ledger);
        ``close`` afterwards."""
        if not self.pcap.is_file():
            raise RuntimeFailure(f"no capture file {self.pcap}")
        pass1, pass2 = self._passes[0], (self._passes[1] if len(self._passes) > 1 else None)

        def second() -> _TsharkOut:
            assert pass2 is not None  # only asked for with a name to search
            return pass2.finish(self.timeout_s)

        try:
            return _summarize(self.pcap, self.sni, server_addresses, total_app_bytes,
                              lambda: pass1.finish(self.timeout_s), second)
        finally:
            for p in self._passes:  # an unneeded pass 2 ends now, not at close
                p.abandon()

    def abandon(self) -> None:
        """Make the passes exit now (their pipes are closed); returns at once, thread-safe,
        no ledger access. ``summarize`` then fails; ``close`` is still needed."""
        for p in self._passes:
            p.abandon()

    def close(self) -> None:
        """Stop the passes that still run, by PID. Idempotent; call it from the thread that
        owns the ledger."""
        for p in self._passes:
            p.abandon()  # all at once: their exits overlap
        for p in self._passes:
            p.close()


def _summarize(pcap: Path, sni: str, server_addresses: list[str], total_app_bytes: int,
               run_pass1: Callable[[], _TsharkOut],
               run_pass2: Callable[[], _TsharkOut]) -> dict[str, Any]:
    """The summary from the two passes (pass 2 is run only if pass 1 left the SNI open)."""
    servers = set(server_addresses)
    name = sni.encode()
    pass1 = run_pass1()

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
            pass2 = run_pass2()
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
