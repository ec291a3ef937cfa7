"""A testbed node: a Mininet host whose network namespace is also given a name
(``tb<hex>-<node>``) so that users can ``ip netns exec`` into it during a run and pyroute2
can open netlink sockets in it. Every process started in a node is registered in the run's
ledger and stopped by PID.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from mininet.node import Node as MininetNode

from testbed.errors import RuntimeFailure, StepTimeout
from testbed.runtime.ledger import Ledger, kill_process_group, proc_start_time

File = int | IO[Any] | None


class Node:
    def __init__(self, name: str, role: str, ledger: Ledger) -> None:
        self.name = name
        self.role = role
        self.ledger = ledger
        self.netns = f"{ledger.tag}-{name}"
        # The Mininet shell's command line carries the namespace name, so it shows the run tag.
        self.mn = MininetNode(self.netns, inNamespace=True)
        self.pid: int = self.mn.pid
        ledger.add_process(self.pid, "mininet shell", name)
        attach = subprocess.run(["ip", "netns", "attach", self.netns, str(self.pid)],
                                capture_output=True, text=True, timeout=10)
        if attach.returncode != 0:
            raise RuntimeFailure(f"cannot name the namespace of {name}: {attach.stderr.strip()}")
        ledger.add_netns(self.netns)
        self._procs: list[subprocess.Popen[Any]] = []

    # -- processes -------------------------------------------------------------------------
    def _argv(self, argv: Sequence[str]) -> list[str]:
        # mnexec -a: enter the node's network (and mount) namespace; -d: new session, so the
        # process leads its own group and can be stopped as a group by its PID.
        return ["mnexec", "-da", str(self.pid), *argv]

    def popen(self, argv: Sequence[str], *, label: str, stdout: File = subprocess.DEVNULL,
              stderr: File = subprocess.DEVNULL, stdin: File = subprocess.DEVNULL,
              cwd: str | Path | None = None, env: dict[str, str] | None = None,
              text: bool = False) -> subprocess.Popen[Any]:
        """Start ``argv`` in this node; it is recorded in the ledger and stopped at teardown."""
        proc = subprocess.Popen(self._argv(argv), stdout=stdout, stderr=stderr, stdin=stdin,
                                cwd=cwd, env=env, text=text)
        self.ledger.add_process(proc.pid, label, self.name)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float = 10.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this node to completion, bounded by ``timeout``."""
        try:
            res = subprocess.run(self._argv(argv), capture_output=True, text=True,
                                 timeout=timeout, input=input)
        except subprocess.TimeoutExpired:
            raise StepTimeout(
                f"{self.name}: '{' '.join(argv)}' took more than {timeout}s") from None
        if check and res.returncode != 0:
            raise RuntimeFailure(f"{self.name}: '{' '.join(argv)}' failed "
                                 f"({res.returncode}): {res.stderr.strip()[:500]}")
        return res

    def stop(self, proc: subprocess.Popen[Any], grace_s: float = 2.0) -> int | None:
        """Stop a process started with ``popen`` (its whole group), and reap it."""
        if proc.poll() is None:
            kill_process_group(proc.pid, proc_start_time(proc.pid), grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        self.ledger.forget_process(proc.pid)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def read_proc_net(self, name: str) -> str:
        """Read ``/proc/net/<name>`` as seen from this node's namespace."""
        return Path(f"/proc/{self.pid}/net/{name}").read_text()

    def sysctl(self, **values: str | int) -> None:
        """Set sysctls inside this node (``net__ipv4__ip_forward=1`` style keys).

        Runs ``sysctl`` in the node: /proc/sys/net shows the namespace of the process that
        opens it, so writing from the orchestrator would change the root namespace.
        """
        args = [f"{k.replace('__', '.')}={v}" for k, v in values.items()]
        self.run(["sysctl", "-qw", *args])

    def terminate(self) -> None:
        for proc in list(self._procs):
            self.stop(proc, grace_s=1.0)
        with contextlib.suppress(Exception):
            self.mn.terminate()
        with contextlib.suppress(Exception):
            self.ledger.forget_process(self.pid)

    def __repr__(self) -> str:
        return f"Node({self.name}, netns={self.netns})"
