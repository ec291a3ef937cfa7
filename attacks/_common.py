"""Helpers shared by the active attack kinds: worker processes in a node, the attacker's
own RST drop rule, and reading a line from a worker with a bound."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from testbed.runtime.node import Node
from testbed.runtime.worker import REPO_ROOT, read_line, start_worker, worker_env

__all__ = ["REPO_ROOT", "iptables", "read_line", "received_check", "start_worker",
           "suppress_all", "worker_env"]
# The attacker's own kernel answers segments it did not expect with RST (DESIGN.md §6).
RST_DROP = ["OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"]


def iptables(node: Node, action: str, rule: list[str], *, check: bool = True) -> bool:
    res = node.run(["iptables", "-w", "5", action, *rule], timeout=10, check=check)
    return res.returncode == 0


@contextlib.contextmanager
def suppress_all() -> Any:
    with contextlib.suppress(Exception):
        yield


def received_check(evidence_dir: Path, app_bytes: int, marker: bytes | None = None
                   ) -> dict[str, Any]:
    """What the victim application wrote to disk (``<app>-received.bin``, written by the
    python and nginx-curl clients): is it an untouched prefix of the payload, and does it
    hold the attack's marker bytes? ``None`` values where no such file exists."""
    from testbed.model.wire import is_payload_prefix

    files = sorted(evidence_dir.glob("*-received.bin"))
    if not files:
        return {"received_file": None, "received_is_payload_prefix": None,
                "marker_in_received": None}
    path = files[0]
    out: dict[str, Any] = {"received_file": path.name,
                           "received_is_payload_prefix": is_payload_prefix(path, app_bytes)}
    if marker:
        data = path.read_bytes()
        out["marker_in_received"] = marker in data
    return out


def counter_delta(before: dict[str, int], after: dict[str, int],
                  prefixes: tuple[str, ...] = ("TcpExt", "MPTcpExt")) -> dict[str, int]:
    """Non-zero deltas of the counters whose names start with ``prefixes``."""
    keys = set(before) | set(after)
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys)
            if k.startswith(prefixes) and after.get(k, 0) != before.get(k, 0)}
