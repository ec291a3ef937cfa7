"""Evidence recorders that run inside a node: kernel counters, packet captures, MPTCP path
manager events and socket-state samples.

Each recorder returns from ``start`` only once it is really recording (tcpdump said it is
listening; the monitor's netlink socket has joined the MPTCP events group), so that the
step that follows cannot outrun it. Every process is started with ``Node.popen`` (its own
session, registered in the run's ledger) and stopped by PID.

``start`` is ``launch`` then ``wait_ready``, and ``stop`` may be preceded by
``request_stop``: a caller with several recorders launches them all before waiting for any,
and signals them all before waiting for any, so that their start-up and exit times overlap
instead of adding up.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from testbed.errors import RuntimeFailure, StepTimeout
from testbed.model.counters import parse_proc_net
from testbed.runtime.node import Node
from testbed.runtime.procwait import signal_group, wait_exit

READY_TIMEOUT_S = 5.0
POLL_S = 0.005  # readiness polls read a small file: cheap, and each start waits less
NETLINK_GENERIC = 16


def snapshot_counters(node: Node) -> dict[str, int]:
    """All MIB counters of the node's namespace: /proc/net/netstat and /proc/net/snmp merged.

    Read through /proc/<pid>/net of the node's shell, not with nstat: nstat keeps a history
    file that all namespaces share, so its "deltas" would mix nodes.
    """
    counters = parse_proc_net(node.read_proc_net("netstat"))
    counters.update(parse_proc_net(node.read_proc_net("snmp")))
    return counters


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


class _Recorder:
    """A process started in a node whose stderr (and maybe stdout) goes to files."""

    def __init__(self, node: Node, proc: subprocess.Popen[Any], files: list[IO[Any]]) -> None:
        self.node = node
        self.proc = proc
        self._files = files
        self._stopped = False
        self._term_sent = False
        self._launched = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return not self._stopped and self.proc.poll() is None

    def _deadline(self, timeout_s: float) -> float:
        return self._launched + timeout_s

    def request_stop(self) -> None:
        """Send SIGTERM to the process group now and return; ``stop`` then waits for the exit.
        Several recorders signalled first exit in parallel."""
        if not self._stopped and not self._term_sent:
            self._term_sent = signal_group(self.proc)

    def stop(self) -> None:
        """SIGTERM (then SIGKILL after a grace period) by PID, reap, close the files.
        Stopping twice is harmless. After ``request_stop`` it first waits for the exit the
        signal asked for (not sending SIGTERM twice)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._term_sent:
                wait_exit(self.proc, 3.0)
            self.node.stop(self.proc, grace_s=3.0)
        finally:
            for f in self._files:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Capture(_Recorder):
    """``tcpdump`` on one interface of a node, writing a pcap; its stderr goes to
    ``<pcap>.log``. Options: ``-n`` (no lookups), ``--immediate-mode`` (without it, packets
    of the last second sit in the kernel ring and are lost when tcpdump is stopped),
    ``-U`` (write each packet), ``-s 0`` (whole packets), ``-Z root`` (do not drop
    privileges: the results directory may not be writable by the tcpdump user), ``-B``
    (a 32 MiB kernel buffer: with the default 2 MiB, an unshaped veth transfer of 64 KiB GSO
    frames lost ~10% of the packets). ``stats`` after ``stop`` says what was dropped."""

    def __init__(self, node: Node, proc: subprocess.Popen[Any], files: list[IO[Any]],
                 ifname: str, pcap: Path, log: Path, label: str) -> None:
        super().__init__(node, proc, files)
        self.ifname = ifname
        self.pcap = pcap
        self.log = log
        self.label = label
        self.stats: dict[str, int] = {}

    @classmethod
    def start(cls, node: Node, ifname: str, pcap: Path, label: str, *,
              bpf_filter: str | None = None, buffer_kib: int = 32768,
              timeout_s: float = READY_TIMEOUT_S) -> Capture:
        """Start tcpdump; return once it reports listening (``launch`` + ``wait_ready``)."""
        return cls.launch(node, ifname, pcap, label, bpf_filter=bpf_filter,
                          buffer_kib=buffer_kib).wait_ready(timeout_s)

    @classmethod
    def launch(cls, node: Node, ifname: str, pcap: Path, label: str, *,
               bpf_filter: str | None = None, buffer_kib: int = 32768) -> Capture:
        """Start tcpdump and return at once: not yet recording until ``wait_ready``."""
        pcap = Path(pcap)
        pcap.parent.mkdir(parents=True, exist_ok=True)
        log = pcap.with_name(pcap.name + ".log")
        argv = ["tcpdump", "-n", "-i", ifname, "--immediate-mode", "-U", "-s", "0",
                "-B", str(buffer_kib), "-Z", "root", "-w", str(pcap)]
        if bpf_filter:
            argv.append(bpf_filter)
        logf = log.open("wb")
        try:
            proc = node.popen(argv, label=label, stderr=logf)
        except OSError as exc:
            logf.close()
            raise RuntimeFailure(f"{node.name}: cannot start tcpdump: {exc}") from exc
        return cls(node, proc, [logf], ifname, pcap, log, label)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> Capture:
        """Return once tcpdump said it is listening (``timeout_s`` counted from the launch);
        stop it and raise if it exits or the bound passes."""
        name, ifname, log = self.node.name, self.ifname, self.log
        deadline = self._deadline(timeout_s)
        while True:
            if "listening on" in _tail(log):
                return self
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeFailure(f"{name}: tcpdump on {ifname} exited "
                                     f"({self.proc.returncode}): {_tail(log)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeFailure(f"{name}: tcpdump on {ifname} did not report "
                                     f"listening within {timeout_s}s: {_tail(log)}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Stop tcpdump with SIGTERM; it writes what it has and its statistics, which are
        kept in ``stats`` (captured, received by filter, dropped by kernel)."""
        if self._stopped:
            return
        super().stop()
        for m in re.finditer(r"^(\d+) packets? (captured|received by filter|dropped by kernel)",
                             _tail(self.log, 4000), re.M):
            self.stats[m.group(2).replace(" ", "_")] = int(m.group(1))


def _netlink_sockets(pid: int) -> list[dict[str, int]]:
    """The netlink sockets of ``pid``'s namespace that belong to ``pid`` (by inode)."""
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = fd.readlink().as_posix()
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    found: list[dict[str, int]] = []
    try:
        lines = Path(f"/proc/{pid}/net/netlink").read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        cols = line.split()
        if len(cols) < 10:
            continue
        with contextlib.suppress(ValueError):
            sock = {"proto": int(cols[1]), "portid": int(cols[2]),
                    "groups": int(cols[3], 16), "inode": int(cols[9])}
            if sock["inode"] in inodes:
                found.append(sock)
    return found


class MptcpMonitor(_Recorder):
    """``ip mptcp monitor`` in a node, its output (one line per event, flushed by ip after
    each one) written to ``path``."""

    def __init__(self, node: Node, proc: subprocess.Popen[Any], files: list[IO[Any]],
                 path: Path) -> None:
        super().__init__(node, proc, files)
        self.path = path

    @classmethod
    def start(cls, node: Node, path: Path, *, label: str = "ip mptcp monitor",
              timeout_s: float = READY_TIMEOUT_S) -> MptcpMonitor:
        """Start the monitor; return once its generic-netlink socket has joined a multicast
        group (the MPTCP events group), so no event after this call is missed."""
        return cls.launch(node, path, label=label).wait_ready(timeout_s)

    @classmethod
    def launch(cls, node: Node, path: Path, *,
               label: str = "ip mptcp monitor") -> MptcpMonitor:
        """Start the monitor and return at once: events may be missed until ``wait_ready``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = path.open("wb")
        try:
            proc = node.popen(["ip", "mptcp", "monitor"], label=label, stdout=out,
                              stderr=subprocess.STDOUT)
        except OSError as exc:
            out.close()
            raise RuntimeFailure(f"{node.name}: cannot start ip mptcp monitor: {exc}") from exc
        return cls(node, proc, [out], path)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> MptcpMonitor:
        """Return once the monitor's generic-netlink socket joined a multicast group
        (``timeout_s`` counted from the launch); stop it and raise if it exits first."""
        name, path, proc = self.node.name, self.path, self.proc
        deadline = self._deadline(timeout_s)
        while True:
            socks = [s for s in _netlink_sockets(proc.pid) if s["proto"] == NETLINK_GENERIC]
            if any(s["groups"] for s in socks):
                return self
            if proc.poll() is not None:
                self.stop()
                raise RuntimeFailure(f"{name}: ip mptcp monitor exited "
                                     f"({proc.returncode}): {_tail(path)}")
            if time.monotonic() > deadline:
                # The Groups column shows only groups 1..32; a genl socket without a visible
                # group may still be subscribed to a higher one. Without any, give up.
                if socks:
                    return self
                self.stop()
                raise RuntimeFailure(f"{name}: ip mptcp monitor opened no generic "
                                     f"netlink socket within {timeout_s}s: {_tail(path)}")
            time.sleep(POLL_S)

    def events(self) -> list[dict[str, str]]:
        """The events written so far, parsed (see ``parse_monitor_events``)."""
        try:
            return parse_monitor_events(self.path.read_text(errors="replace"))
        except OSError:
            return []


_EVENT_RE = re.compile(r"^\[\s*([A-Z_]+(?: \d+)?)\s*\](.*)$")


def parse_monitor_events(text: str) -> list[dict[str, str]]:
    """Parse ``ip mptcp monitor`` lines such as
    ``[   ESTABLISHED] token=e65b0d90 remid=0 locid=0 saddr4=10.0.0.1 ... flags=2``
    into ``{"event": "ESTABLISHED", "token": "e65b0d90", ...}``. Events this iproute2 does
    not name come out as ``"UNKNOWN 15"``."""
    events: list[dict[str, str]] = []
    for line in text.splitlines():
        m = _EVENT_RE.match(line.strip())
        if not m:
            continue
        event = {"event": m.group(1)}
        for token in m.group(2).split():
            key, sep, value = token.partition("=")
            if sep:
                event[key] = value
        events.append(event)
    return events


def parse_ss(text: str) -> list[dict[str, Any]]:
    """Parse ``ss -nti`` / ``ss -Mnti`` output: one dict per socket with netid (``tcp`` when
    ss printed no Netid column), state, queues, addresses, the raw info line and its
    ``key:value`` items in ``fields`` (first occurrence of each key)."""
    sockets: list[dict[str, Any]] = []
    has_netid = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith(("Netid", "State")):
            has_netid = line.startswith("Netid")
            continue
        if line[0].isspace():
            if sockets:
                info = line.strip()
                sockets[-1]["info"] = info
                fields: dict[str, str] = {}
                for token in info.split():
                    key, sep, value = token.partition(":")
                    if sep and key and key not in fields:
                        fields[key] = value
                sockets[-1]["fields"] = fields
            continue
        cols = line.split()
        if not has_netid:
            cols.insert(0, "tcp")
        if len(cols) < 6:
            continue
        sockets.append({"netid": cols[0], "state": cols[1], "recv_q": _int(cols[2]),
                        "send_q": _int(cols[3]), "local": cols[4], "peer": cols[5],
                        "info": "", "fields": {}})
    return sockets


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


class SsSampler:
    """Samples socket state in a node every ``interval_ms`` in a background thread.

    One ``ss -Mnti`` call shows both the MPTCP sockets and their TCP subflows (``ss -nti``
    is used instead if ``-M`` fails, e.g. a kernel without MPTCP diag). Each sample is
    ``{"t": seconds since start, "time": epoch, "sockets": [...]}`` (see ``parse_ss``), or
    with ``"error"`` when the call failed or timed out. At most ``max_samples`` are kept;
    later ones are counted in ``skipped``.
    """

    def __init__(self, node: Node, interval_ms: int, max_samples: int,
                 call_timeout_s: float) -> None:
        self.node = node
        self.interval_s = interval_ms / 1000.0
        self.max_samples = max_samples
        self.call_timeout_s = call_timeout_s
        self.samples: list[dict[str, Any]] = []
        self.skipped = 0
        self._argv = ["ss", "-Mnti"]
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"ss-{node.name}",
                                        daemon=True)

    @classmethod
    def start(cls, node: Node, interval_ms: int = 100, *, max_samples: int = 3000,
              call_timeout_s: float = 2.0) -> SsSampler:
        sampler = cls(node, interval_ms, max_samples, call_timeout_s)
        sampler._thread.start()
        return sampler

    def sample_once(self) -> dict[str, Any]:
        sample: dict[str, Any] = {"t": round(time.monotonic() - self._t0, 4),
                                  "time": round(time.time(), 4), "sockets": []}
        try:
            res = self.node.run(self._argv, timeout=self.call_timeout_s, check=False)
            if res.returncode != 0 and self._argv == ["ss", "-Mnti"]:
                self._argv = ["ss", "-nti"]
                res = self.node.run(self._argv, timeout=self.call_timeout_s, check=False)
            if res.returncode != 0:
                sample["error"] = f"{' '.join(self._argv)}: {res.stderr.strip()[:300]}"
            else:
                sample["sockets"] = parse_ss(res.stdout)
        except (StepTimeout, RuntimeFailure, OSError) as exc:
            sample["error"] = str(exc)
        return sample

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            if len(self.samples) < self.max_samples:
                self.samples.append(self.sample_once())
            else:
                self.skipped += 1
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def stop(self) -> list[dict[str, Any]]:
        """Stop sampling (bounded wait for the sample in progress) and return the samples."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.call_timeout_s * 2 + 1.0)
        return list(self.samples)

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"argv": self._argv, "interval_ms": self.interval_s * 1000,
                                    "skipped": self.skipped, "samples": self.samples},
                                   indent=1))
        return path
