"""What a run may leave on the machine, measured: the root namespace's state (to compare
before/after) and everything carrying one run's tag.

Used by ``scripts/fault_injection.py`` and the reliability tests. Read-only: nothing here
changes the machine.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.runtime.ledger import NETNS_DIR, proc_start_time

# The address ranges the testbed uses (topology pools must lie inside them).
TEST_RANGES = ("198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10")


def _run(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<{argv[0]} failed: {exc}>"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "<unreadable>"


def root_sysctls() -> dict[str, str]:
    """``net.ipv4.ip_forward``, every ``net.ipv4.conf.*.rp_filter`` and ``net.mptcp.*`` of
    the namespace this process is in (the root one, for the orchestrator)."""
    out = {"net.ipv4.ip_forward": _read(Path("/proc/sys/net/ipv4/ip_forward"))}
    for p in sorted(Path("/proc/sys/net/ipv4/conf").glob("*/rp_filter")):
        out[f"net.ipv4.conf.{p.parent.name}.rp_filter"] = _read(p)
    for p in sorted(Path("/proc/sys/net/mptcp").glob("*")):
        out[f"net.mptcp.{p.name}"] = _read(p)
    return out


def root_state() -> dict[str, str]:
    """The root namespace's network state that a run must not change (namespace names are
    left out: other runs on the machine add and remove theirs)."""
    links = sorted(line.split(":")[1].strip().split("@")[0]
                   for line in _run("ip", "-o", "link", "show").splitlines() if ":" in line)
    return {
        "links": "\n".join(links),
        "addresses": _run("ip", "-o", "addr", "show"),
        "routes": _run("ip", "route", "show", "table", "all"),
        "rules": _run("ip", "rule", "show"),
        "qdiscs": _run("tc", "qdisc", "show"),
        "iptables": "\n".join(line for line in _run("iptables-save").splitlines()
                              if not line.startswith("#")),
        "nft": _run("nft", "list", "ruleset"),
        "mptcp_endpoints": _run("ip", "mptcp", "endpoint", "show"),
        "mptcp_limits": _run("ip", "mptcp", "limits", "show"),
        **{f"sysctl {k}": v for k, v in root_sysctls().items()},
    }


def state_diff(before: dict[str, str], after: dict[str, str]) -> dict[str, dict[str, str]]:
    return {k: {"before": before.get(k, "")[:2000], "after": after.get(k, "")[:2000]}
            for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int | None
    what: str

    def alive(self) -> bool:
        now = proc_start_time(self.pid)
        if now is None or (self.start is not None and now != self.start):
            return False
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] != "Z"
        return False


def descendants(pid: int) -> list[Proc]:
    """Every process below ``pid`` (by parent PIDs), with its start time and command."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    kids: dict[int, list[int]] = {}
    for child, ppid in parent.items():
        kids.setdefault(ppid, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            todo.append(child)
            cmd = ""
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()[:200]
            out.append(Proc(child, proc_start_time(child), cmd))
    return out


def tagged(tag: str, *, state_dir: Path, processes: Sequence[Proc] = (),
           tmp: Path = Path("/tmp")) -> dict[str, list[str]]:
    """Everything on the machine that carries run ``tag``, plus which of ``processes``
    (recorded earlier with their start times) still run. Empty lists: nothing left."""
    netns = [n.split()[0] for n in _run("ip", "netns", "list").splitlines()
             if n.startswith(f"{tag}-")]
    files = sorted(p.name for p in NETNS_DIR.glob(f"{tag}-*")) if NETNS_DIR.is_dir() else []
    mounts = [line.split()[4] for line in _read(Path("/proc/self/mountinfo")).splitlines()
              if f"/netns/{tag}-" in line]
    alive = [f"{p.pid} {p.what}" for p in processes if p.alive()]
    shells = [line.strip() for line in _run("ps", "-eo", "pid,args").splitlines()
              if f"mininet:{tag}" in line]
    temp = sorted(str(p) for p in tmp.glob(f"*{tag}*"))
    ledgers = sorted(str(p) for p in state_dir.glob(f"{tag}.*")) if state_dir.is_dir() else []
    netfilter = [line for line in (_run("iptables-save") + _run("nft", "list", "ruleset")
                                   ).splitlines() if tag in line]
    return {"netns": netns, "netns_files": files, "mounts": mounts, "processes": alive,
            "shells": shells, "temp_files": temp, "ledgers": ledgers,
            "root_netfilter": netfilter}


def count(found: dict[str, Any]) -> int:
    return sum(len(v) for v in found.values())
