"""Run identity and the ownership ledger.

Every run gets an id (``<UTC time>-<6 hex>``) and a short tag (``tb<6 hex>``) that goes into
every name it creates: namespaces ``tb<hex>-<node>``, Mininet shells ``mininet:tb<hex>-<node>``,
temporary directories. Before creating anything, the run writes a ledger file under the
state directory listing its orchestrator PID and start time; every process and namespace
is added to it as soon as it exists. ``testbed clean`` reads ledgers of runs whose
orchestrator is gone and releases exactly what they list, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.runtime.nlfast import remove_namespaces

STATE_DIR = Path(os.environ.get("TESTBED_STATE_DIR", "/run/testbed"))
NETNS_DIR = Path("/run/netns")
TAG_PREFIX = "tb"


def new_run_id() -> tuple[str, str]:
    """Return (run id, tag). The tag is unique among live ledgers (checked on create)."""
    hexpart = secrets.token_hex(3)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{hexpart}", f"{TAG_PREFIX}{hexpart}"


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone.

    Together with the PID this identifies a process: a recycled PID has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the parenthesised command name (which may hold spaces).
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_alive(pid: int, start_time: int | None) -> bool:
    now = proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


@dataclass
class ProcessRecord:
    pid: int
    start_time: int | None
    label: str
    node: str


@dataclass
class LedgerData:
    run_id: str
    tag: str
    owner_pid: int
    owner_start: int | None
    created: float
    results_dir: str = ""
    netns: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)


class Ledger:
    """The on-disk record of what one run owns. Written atomically after each change."""

    def __init__(self, data: LedgerData, path: Path) -> None:
        self.data = data
        self.path = path
        self._held = 0

    @classmethod
    def create(cls, results_dir: str = "", state_dir: Path | None = None) -> Ledger:
        state_dir = state_dir or STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for _ in range(20):
            run_id, tag = new_run_id()
            path = state_dir / f"{tag}.json"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                continue
            os.close(fd)
            me = os.getpid()
            ledger = cls(LedgerData(run_id, tag, me, proc_start_time(me), time.time(),
                                    results_dir), path)
            ledger.save()
            return ledger
        raise RuntimeError("could not allocate a unique run tag")

    @classmethod
    def load(cls, path: Path) -> Ledger:
        raw: dict[str, Any] = json.loads(path.read_text())
        raw["processes"] = [ProcessRecord(**p) for p in raw.get("processes", [])]
        return cls(LedgerData(**raw), path)

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Write the ledger once at the end of the block instead of after every change
        (for bulk additions; whatever the block adds is on disk when it exits)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held:
                self.save()

    def save(self) -> None:
        if self._held:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.data), indent=1))
        os.replace(tmp, self.path)

    @property
    def tag(self) -> str:
        return self.data.tag

    def add_netns(self, name: str) -> None:
        self.data.netns.append(name)
        self.save()

    def add_netns_many(self, names: list[str]) -> None:
        """Record namespaces (before creating them: a crash then leaves nothing unknown)."""
        self.data.netns.extend(n for n in names if n not in self.data.netns)
        self.save()

    def forget_netns(self, name: str) -> None:
        if name in self.data.netns:
            self.data.netns.remove(name)
            self.save()

    def add_process(self, pid: int, label: str, node: str) -> None:
        self.data.processes.append(ProcessRecord(pid, proc_start_time(pid), label, node))
        self.save()

    def forget_process(self, pid: int) -> None:
        self.data.processes = [p for p in self.data.processes if p.pid != pid]
        self.save()

    def add_temp_dir(self, path: str) -> None:
        self.data.temp_dirs.append(path)
        self.save()

    def owner_alive(self) -> bool:
        return is_alive(self.data.owner_pid, self.data.owner_start)

    def release_all(self) -> list[str]:
        """Release everything listed (processes, namespaces, temp dirs); return what was done."""
        done: list[str] = []
        for proc in reversed(self.data.processes):
            if kill_process_group(proc.pid, proc.start_time):
                done.append(f"stopped process {proc.pid} ({proc.label} on {proc.node})")
        self.data.processes = []
        for name in delete_netns_many(list(reversed(self.data.netns)), self.tag):
            done.append(f"deleted namespace {name}")
        self.data.netns = []
        for tmp in self.data.temp_dirs:
            if Path(tmp).exists() and self.tag in Path(tmp).name:
                shutil.rmtree(tmp, ignore_errors=True)
                done.append(f"removed {tmp}")
        self.data.temp_dirs = []
        self.save()
        return done

    def close(self) -> None:
        # The .tmp of an atomic save is left behind by a run killed in the middle of one.
        for path in (self.path, self.path.with_suffix(".tmp")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def kill_process_group(pid: int, start_time: int | None, grace_s: float = 2.0) -> bool:
    """SIGTERM then SIGKILL the process group led by ``pid``, if it is still our process.

    Processes are started in their own session, so their group id is their PID; a recycled
    PID is recognised by its different start time and left alone.
    """
    if not is_alive(pid, start_time):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not is_alive(pid, start_time) or _is_zombie(pid):
                return True
            time.sleep(0.02)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def delete_netns_many(names: list[str], tag: str) -> list[str]:
    """Delete the named namespaces ``names`` that carry ``tag`` and exist; return those.
    One scan of /proc finds the processes still in them (SIGKILLed); then each is
    unmounted and its name removed in-process (as ``ip netns delete`` does)."""
    mine = [n for n in names if n.startswith(f"{tag}-") and (NETNS_DIR / n).exists()]
    if not mine:
        return []
    # Namespaces are identified by (device, inode) of their nsfs file. The orchestrator's
    # own namespace and PID 1's are never a test namespace: a name bound to either is only
    # unmounted, and nothing in it is killed.
    protected = set()
    for path in ("/proc/self/ns/net", "/proc/1/ns/net"):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            protected.add((st.st_dev, st.st_ino))
    ids = set()
    for name in mine:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            if st.st_ino != 0 and (st.st_dev, st.st_ino) not in protected:
                ids.add((st.st_dev, st.st_ino))
    me = os.getpid()
    for entry in Path("/proc").iterdir() if ids else ():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(entry / "ns" / "net")
            if (st.st_dev, st.st_ino) in ids:
                os.kill(int(entry.name), signal.SIGKILL)
    remove_namespaces([NETNS_DIR / n for n in mine])
    return mine


def stale_ledgers(state_dir: Path | None = None) -> list[Ledger]:
    """Ledgers of runs whose orchestrator process is gone."""
    state_dir = state_dir or STATE_DIR
    found = []
    if not state_dir.is_dir():
        return found
    for path in sorted(state_dir.glob(f"{TAG_PREFIX}*.json")):
        try:
            ledger = Ledger.load(path)
        except (OSError, ValueError, TypeError):
            _drop_if_empty(path)
            continue
        if not ledger.owner_alive():
            found.append(ledger)
    return found


EMPTY_LEDGER_GRACE_S = 30.0


def _drop_if_empty(path: Path) -> None:
    """A run SIGKILLed between creating its ledger file (O_EXCL) and its first save leaves
    an empty file that owns nothing; remove it once it is clearly not being written."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_size == 0 and time.time() - st.st_mtime > EMPTY_LEDGER_GRACE_S:
            path.unlink()


def clean(state_dir: Path | None = None) -> list[str]:
    """Release what dead runs left behind. Touches only resources their ledgers list, plus
    namespaces named with a dead run's own tag (in case a crash came between creating one
    and recording it)."""
    report: list[str] = []
    for ledger in stale_ledgers(state_dir):
        if NETNS_DIR.is_dir():
            for ns in sorted(NETNS_DIR.iterdir()):
                if ns.name.startswith(f"{ledger.tag}-") and ns.name not in ledger.data.netns:
                    ledger.data.netns.append(ns.name)
        done = ledger.release_all()
        report.extend(f"{ledger.data.run_id}: {line}" for line in done)
        if ledger.data.results_dir:
            _mark_incomplete(Path(ledger.data.results_dir), ledger.data.run_id)
        ledger.close()
    return report


def _mark_incomplete(results_dir: Path, run_id: str) -> None:
    """A run killed before finishing keeps what it wrote, marked incomplete."""
    result = results_dir / "result.json"
    marker = results_dir / "INCOMPLETE"
    if results_dir.is_dir() and not (result.exists() and not marker.exists()):
        marker.write_text(f"run {run_id} was killed before it finished; "
                          "the files here are what it had written.\n")
