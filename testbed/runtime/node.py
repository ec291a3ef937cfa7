"""A testbed node: a Mininet host whose network namespace is also given a name
(``tb<hex>-<node>``) so that users can ``ip netns exec`` into it during a run and pyroute2
can open netlink sockets in it. Every process started in a node is registered in the run's
ledger and stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from mininet.node import Node as MininetNode

from testbed.errors import RuntimeFailure, StepTimeout
from testbed.runtime.ledger import Ledger, kill_process_group, proc_start_time

File = int | IO[Any] | None


class _Shell(MininetNode):  # type: ignore[misc]
    """A Mininet host whose shell start is split in two: ``startShell`` (called by
    Mininet's constructor) only spawns it, ``wait_ready`` waits for its prompt and
    configures it as Mininet does. Spawning every node's shell before waiting for any lets
    them start in parallel."""

    def startShell(self, mnopts: str | None = None) -> None:
        if self.shell:
            return
        # As mininet.node.Node.startShell: mnexec -c(lose fds) -d(etach) -n(ew netns),
        # prompt set to the sentinel chr(127), in a pseudo-tty.
        cmd = ["mnexec", ("-cd" if mnopts is None else mnopts) + "n", "env",
               "PS1=" + chr(127), "bash", "--norc", "--noediting", "-is",
               "mininet:" + self.name]
        self.master, self.slave = pty.openpty()
        self.shell = self._popen(cmd, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                 close_fds=False)
        self.stdin = os.fdopen(self.master, "r")
        self.stdout = self.stdin
        self.pid = self.shell.pid
        self.pollOut = select.poll()
        self.pollOut.register(self.stdout)
        self.outToNode[self.stdout.fileno()] = self
        self.inToNode[self.stdin.fileno()] = self
        self.execed = False
        self.lastCmd = None
        self.lastPid = None
        self.readbuf = ""
        self._ready = False

    def wait_ready(self, timeout_s: float, name: str) -> None:
        if self._ready:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            if self.shell.poll() is not None:
                raise RuntimeFailure(f"the shell of {name} exited ({self.shell.returncode})")
            if self.pollOut.poll(100):
                data = self.read(1024)
                if data and data[-1] == chr(127):
                    break
            if time.monotonic() > deadline:
                raise StepTimeout(f"the shell of {name} did not start within {timeout_s}s")
        self.waiting = False
        # +m: no job control notifications
        self.cmd("unset HISTFILE; stty -echo; set +m")
        self._ready = True


class Node:
    def __init__(self, name: str, role: str, ledger: Ledger, *, attach: bool = True) -> None:
        """``attach=False``: the caller names the namespace (``attach_all``), has recorded
        it in the ledger already, and calls ``ready()`` before using the node's Mininet
        shell (``Network`` does this for all nodes at once, so that the shells start in
        parallel)."""
        self.name = name
        self.role = role
        self.ledger = ledger
        self.netns = f"{ledger.tag}-{name}"
        # The Mininet shell's command line carries the namespace name, so it shows the run tag.
        self.mn = _Shell(self.netns, inNamespace=True)
        self.pid: int = self.mn.pid
        ledger.add_process(self.pid, "mininet shell", name)
        self._procs: list[subprocess.Popen[Any]] = []
        if attach:
            self.ready()
            attach_all([self])
            ledger.add_netns(self.netns)

    def ready(self, timeout_s: float = 10.0) -> None:
        """Wait until the node's Mininet shell has started (its prompt came)."""
        self.mn.wait_ready(timeout_s, self.name)

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


def _netns_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def attach_all(nodes: Sequence[Node]) -> None:
    """Name the namespaces of ``nodes`` (``ip netns attach``) with one ``ip -batch``."""
    if not nodes:
        return
    own = _netns_id(Path("/proc/self/ns/net"))
    for n in nodes:
        # Never name the orchestrator's namespace: a shell that has not yet entered its own
        # namespace would give that, and deleting the "node" would then kill every process
        # of the root namespace.
        if _netns_id(Path(f"/proc/{n.pid}/ns/net")) in (own, None):
            raise RuntimeFailure(f"the shell of {n.name} (PID {n.pid}) is not in a namespace "
                                 "of its own; refusing to name it")
    lines = "".join(f"netns attach {n.netns} {n.pid}\n" for n in nodes)
    res = subprocess.run(["ip", "-batch", "-"], input=lines, capture_output=True, text=True,
                         timeout=10 + len(nodes) / 10)
    if res.returncode != 0:
        raise RuntimeFailure(f"cannot name the namespaces of "
                             f"{', '.join(n.name for n in nodes)}: {res.stderr.strip()[:500]}")
