"""Python worker processes inside a node: ``python -m <module> '<json config>'`` with the
repository on ``PYTHONPATH``, stdin/stdout as text pipes, and a bounded read of the
worker's next line (workers print ``ready`` once they hold their sockets or queues).

Used by the attack kinds, the middleboxes that need a process (NFQUEUE rewriters, relays)
and the python TLS peers.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import testbed
from testbed.errors import RuntimeFailure, StepTimeout
from testbed.runtime.node import Node

REPO_ROOT = Path(testbed.__file__).resolve().parents[1]


def worker_env() -> dict[str, str]:
    """The environment of a worker: the repository importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH"))
                                        if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_worker(node: Node, module: str, config: dict[str, Any], label: str,
                 stderr: Path) -> subprocess.Popen[str]:
    """``python -m <module> '<json>'`` in ``node`` with stdin/stdout as text pipes."""
    with stderr.open("ab") as err:
        return node.popen([sys.executable, "-m", module, json.dumps(config)], label=label,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                          cwd=REPO_ROOT, env=worker_env(), text=True)


def read_line(proc: subprocess.Popen[str], timeout_s: float, what: str) -> str:
    """The worker's next stdout line, within ``timeout_s``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepTimeout(f"{what}: no answer within {timeout_s}s")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeFailure(f"{what}: the worker exited ({proc.poll()})")
            return line.strip()
