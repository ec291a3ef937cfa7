"""A testbed node: a named network namespace (``tb<hex>-<node>``, so that users can ``ip
netns exec`` into it during a run and netlink sockets can be opened in it) in which
processes run through ``nsenter``. Every process started in a node is registered in the
run's ledger and stopped by PID.

A node has no resident process: the namespaces of a network are created in-process, as
``ip netns add`` does (``nlfast.create_namespaces``). Mininet's host API is there on demand:
``node.mn`` starts a Mininet host whose shell lives in the node's namespace (for
``mininet.link.Link``, ``cmd()``, the Mininet CLI), stopped by PID with the node. Starting
a Mininet shell for every node (bash, its prompt, a command round trip: ~4 ms each) was
most of the build time of large topologies.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from mininet.node import Node as MininetNode

from testbed.errors import RuntimeFailure, StepTimeout
from testbed.runtime import nlfast
from testbed.runtime.ledger import NETNS_DIR, Ledger, kill_process_group, proc_start_time

File = int | IO[Any] | None
SHELL_START_S = 10.0


class _Shell(MininetNode):  # type: ignore[misc]
    """A Mininet host whose shell enters an existing named namespace (``netns_path``
    param) instead of creating one: as ``mininet.node.Node.startShell``, with ``nsenter``
    in place of ``mnexec -n``. Mininet's own ``popen``/``cmd`` then use ``mnexec -a PID``,
    which enters the same namespace."""

    def startShell(self, mnopts: str | None = None) -> None:
        if self.shell:
            return
        # mnexec -c(lose fds) -d(etach: own session); prompt set to the sentinel chr(127),
        # in a pseudo-tty.
        cmd = ["mnexec", mnopts or "-cd", "nsenter", f"--net={self.params['netns_path']}",
               "env", "PS1=" + chr(127), "bash", "--norc", "--noediting", "-is",
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
        deadline = time.monotonic() + SHELL_START_S
        while True:
            if self.shell.poll() is not None:
                raise RuntimeFailure(f"the Mininet shell of {self.name} exited "
                                     f"({self.shell.returncode})")
            if self.pollOut.poll(100):
                data = self.read(1024)
                if data and data[-1] == chr(127):
                    break
            if time.monotonic() > deadline:
                self.shell.kill()  # not in the ledger yet: stopped here, by its PID
                self.shell.wait()
                raise StepTimeout(f"the Mininet shell of {self.name} did not start within "
                                  f"{SHELL_START_S}s")
        self.waiting = False
        # +m: no job control notifications
        self.cmd("unset HISTFILE; stty -echo; set +m")


class Node:
    def __init__(self, name: str, role: str, ledger: Ledger, *, create: bool = True) -> None:
        """``create=False``: the caller has recorded the namespace in the ledger and
        creates it (``Network`` creates all of a network's namespaces at once)."""
        self.name = name
        self.role = role
        self.ledger = ledger
        self.netns = f"{ledger.tag}-{name}"
        self.path = NETNS_DIR / self.netns
        self._mn: _Shell | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        if create:
            ledger.add_netns(self.netns)
            create_namespaces([self], lambda _node: None)

    @property
    def mn(self) -> Any:
        """A Mininet host in this node's namespace (its shell starts on first use)."""
        if self._mn is None:
            self._check_own()
            self._mn = _Shell(self.netns, inNamespace=True, netns_path=str(self.path))
            self.ledger.add_process(self._mn.pid, "mininet shell", self.name)
        return self._mn

    def _check_own(self) -> None:
        """Refuse a name that is not a namespace of its own: bound to the orchestrator's
        namespace (or PID 1's), a process "in the node" would run in the root namespace."""
        node_ns = _netns_id(self.path)
        if node_ns is None:
            raise RuntimeFailure(f"the namespace of {self.name} ({self.path}) does not exist")
        if node_ns in _root_netns_ids():
            raise RuntimeFailure(f"{self.path} names the orchestrator's own network "
                                 f"namespace; refusing to run anything of {self.name} there")

    # -- processes -------------------------------------------------------------------------
    def _argv(self, argv: Sequence[str]) -> list[str]:
        self._check_own()
        # nsenter execs the command in place: the PID we get is the command's.
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def popen(self, argv: Sequence[str], *, label: str, stdout: File = subprocess.DEVNULL,
              stderr: File = subprocess.DEVNULL, stdin: File = subprocess.DEVNULL,
              cwd: str | Path | None = None, env: dict[str, str] | None = None,
              text: bool = False) -> subprocess.Popen[Any]:
        """Start ``argv`` in this node; it is recorded in the ledger and stopped at teardown.
        It leads a session (and process group) of its own, stopped as a group by its PID."""
        proc = subprocess.Popen(self._argv(argv), stdout=stdout, stderr=stderr, stdin=stdin,
                                cwd=cwd, env=env, text=text, start_new_session=True)
        self.ledger.add_process(proc.pid, label, self.name)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float = 10.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this node to completion, bounded by ``timeout``."""
        try:
            res = subprocess.run(self._argv(argv), capture_output=True, text=True,
                                 timeout=timeout, input=input, start_new_session=True)
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
        """Read ``/proc/net/<name>`` as seen from this node's namespace (by a thread that
        entered it: ``/proc/thread-self/net`` shows the calling thread's namespace)."""
        return nlfast.in_netns(self.path,
                               lambda: Path("/proc/thread-self/net", name).read_text())

    def sysctl(self, **values: str | int) -> None:
        """Set ``net.*`` sysctls inside this node (``net__ipv4__ip_forward=1`` style keys),
        from a thread in its namespace: /proc/sys/net shows the namespace of the thread that
        opens it, so writing from the orchestrator's thread would change the root one."""
        dotted = {k.replace("__", "."): v for k, v in values.items()}
        try:
            nlfast.in_netns(self.path, lambda: nlfast.write_sysctls(dotted))
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"{self.name}: sysctl {dotted} failed: {exc}") from exc

    def terminate(self) -> None:
        for proc in list(self._procs):
            self.stop(proc, grace_s=1.0)
        if self._mn is not None:
            pid = self._mn.pid
            with contextlib.suppress(Exception):
                self._mn.terminate()
            with contextlib.suppress(Exception):
                self.ledger.forget_process(pid)

    def __repr__(self) -> str:
        return f"Node({self.name}, netns={self.netns})"


def _netns_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _root_netns_ids() -> set[tuple[int, int] | None]:
    return {_netns_id(Path("/proc/self/ns/net")), _netns_id(Path("/proc/1/ns/net"))}


def create_namespaces(nodes: Sequence[Node], setup: Callable[[Node], Any]) -> None:
    """Create the named namespaces of ``nodes`` in-process (``nlfast.create_namespaces``,
    as ``ip netns add`` would, without a process), calling ``setup(node)`` inside each new
    namespace (sysctls, netlink sockets)."""
    by_path = {n.path: n for n in nodes}
    try:
        nlfast.create_namespaces(list(by_path), lambda p: setup(by_path[p]))
    except OSError as exc:
        raise RuntimeFailure(f"cannot create the namespaces of "
                             f"{', '.join(n.name for n in nodes)}: {exc}") from exc
