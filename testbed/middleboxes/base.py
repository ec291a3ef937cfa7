"""The middlebox plugin contract.

A middlebox kind is a small class: its parameters (typed, with defaults and allowed
values), the doctor capabilities it needs, and a jinja2 template of the firewall rules it
installs in a path's middlebox slot node. Rules are rendered in a sandbox with
StrictUndefined and applied atomically inside the node's namespace, with
``iptables-restore --noflush`` (backend ``iptables``) or ``nft -f -`` (backend ``nft``).

Every iptables rule a middlebox adds carries a comment with the middlebox's marker (the
run's tag, the path and the kind); every nft rule lives in a table of its own. Teardown
deletes exactly those, so it is idempotent and also cleans up after a failed setup.

A kind that needs a process (an NFQUEUE rewriter, a relay) starts it with
``start_worker``: it runs in the slot node, is recorded in the run's ledger and is stopped
by PID at teardown, after the rules that feed it are gone. A kind that sets
``capture_upstream`` also gets a pcap of the slot node's server-facing interface (the
per-path pcaps are taken on the client side), so the evidence shows a packet before and
after the middlebox. ``finish`` turns the middlebox's own evidence, and the measured facts,
into the report that playbooks check with ``expect: {middlebox: {kind: {field: value}}}``.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from testbed.errors import RuntimeFailure, SpecError, TestbedError
from testbed.model.params import ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.evidence import Capture
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node

BACKENDS = ("iptables", "nft")
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")
_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                            keep_trailing_newline=True)
_RULE_RE = re.compile(r"^-([AI])\s+(\S+)(\s+\d+)?(\s.*)?$")
WORKER_READY_TIMEOUT_S = 15.0


def render(template: str, context: dict[str, Any]) -> str:
    """Render a rule template in the sandbox; an undefined variable is an error."""
    try:
        return _ENV.from_string(template).render(**context)
    except TemplateError as exc:
        raise RuntimeFailure(f"middlebox rule template failed: {exc}") from None


def mark_iptables_rules(text: str, marker: str) -> str:
    """Give every ``-A``/``-I`` line of an iptables-restore document the marker comment."""
    out = []
    for line in text.splitlines():
        m = _RULE_RE.match(line.strip())
        if m:
            verb, chain, pos, rest = m.group(1), m.group(2), m.group(3) or "", m.group(4) or ""
            line = f"-{verb} {chain}{pos} -m comment --comment {marker}{rest}"
        out.append(line)
    return "\n".join(out) + "\n"


class Middlebox:
    """Base class of middlebox kinds. Subclasses set the class variables and, if the
    template needs more than the parameters and the standard variables, ``variables``."""

    kind: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[dict[str, ParamSpec]] = {}
    requires: ClassVar[frozenset[str]] = frozenset()
    backend: ClassVar[str] = "iptables"
    template: ClassVar[str] = ""
    capture_upstream: ClassVar[bool] = False

    def __init__(self, path: str, values: dict[str, Any]) -> None:
        self.path = path
        self.values = dict(values)
        self.node: Node | None = None
        self.marker = ""
        self.applied = ""
        self._tables: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self.events: list[str] = []  # what happened at run time (timers), for the evidence
        self.evidence_dir: Path | None = None  # set by the scenario before ``setup``
        self.server_address = ""
        self._workers: list[subprocess.Popen[str]] = []
        self._capture: Capture | None = None
        self.upstream_pcap: Path | None = None

    # -- validation ------------------------------------------------------------------------
    @classmethod
    def validate(cls, params: dict[str, Any], file: str, field: str) -> dict[str, Any]:
        """Check ``params`` against the kind's specs; return them with defaults filled in."""
        out = {}
        for key in params:
            if key not in cls.params:
                raise SpecError(file, f"{field}.{key}", f"not a parameter of {cls.kind}",
                                f"parameters: {', '.join(cls.params) or 'none'}")
        for name, spec in cls.params.items():
            value = params.get(name, spec.default)
            out[name] = spec.check(value, file, f"{field}.{name}")
        return out

    # -- rules -----------------------------------------------------------------------------
    def variables(self, node: Node, net: Network) -> dict[str, Any]:
        """Template variables beyond the parameters; override to add some."""
        return {}

    def render_rules(self, context: dict[str, Any], template: str | None = None) -> str:
        text = render(self.template if template is None else template, context)
        if self.backend == "iptables":
            text = mark_iptables_rules(text, self.marker)
        return text

    def context(self, node: Node, net: Network) -> dict[str, Any]:
        return {**self.values, "path": self.path, "marker": self.marker,
                "table_name": self.nft_table, **self.variables(node, net)}

    @property
    def nft_table(self) -> str:
        return re.sub(r"[^A-Za-z0-9_]", "_", self.marker)

    def setup(self, node: Node, net: Network, path: str) -> None:
        self.node = node
        self.path = path
        self.marker = f"{net.ledger.tag}-mb-{path}-{self.kind}"
        self.server_address = net.address(net.node_of_role("server").name)
        if self.capture_upstream:
            self._start_upstream_capture()
        # Processes first: a queue or a listener is ready before any rule feeds it.
        self.start_workers()
        text = self.render_rules(self.context(node, net))
        self.applied = text
        if text.strip():
            self.apply(text)

    def start_workers(self) -> None:
        """Start the kind's processes (``start_worker``); called by ``setup`` once the
        node, path, marker and server address are known, before the rules go in."""

    @classmethod
    def requirements(cls, values: dict[str, Any]) -> frozenset[str]:
        """Capabilities needed with these parameter values (default: ``requires``, which
        lists what any value may need)."""
        return cls.requires

    def apply(self, text: str) -> None:
        """Apply a rendered document (also used by timers for late rules)."""
        assert self.node is not None
        if self.backend == "nft":
            self.node.run(["nft", "-f", "-"], input=text)
            return
        self._tables |= {t[1:].strip() for t in text.splitlines() if t.startswith("*")}
        self.node.run(["iptables-restore", "-w", "5", "--noflush"], input=text)

    # -- evidence files, processes and the upstream capture ---------------------------------
    def evidence(self, suffix: str) -> Path:
        """``middlebox-<path>-<kind>-<suffix>`` in the transport's evidence directory."""
        if self.evidence_dir is None:
            raise RuntimeFailure(f"middlebox {self.kind}: no evidence directory was given")
        return self.evidence_dir / f"middlebox-{self.path}-{self.kind}-{suffix}"

    def start_worker(self, module: str, config: dict[str, Any], label: str
                     ) -> subprocess.Popen[str]:
        """Start ``python -m module '<config>'`` in the slot node and wait for its
        ``ready`` line; its stderr goes to the evidence (``<label>.log``)."""
        from testbed.runtime.worker import read_line, start_worker

        assert self.node is not None
        proc = start_worker(self.node, module, config, f"{self.marker}-{label}",
                            self.evidence(f"{label}.log"))
        self._workers.append(proc)
        line = read_line(proc, WORKER_READY_TIMEOUT_S, f"middlebox {self.kind} {label}")
        if line != "ready":
            raise RuntimeFailure(f"middlebox {self.kind} {label}: expected 'ready', got "
                                 f"{line[:200]!r}")
        return proc

    def upstream_interface(self) -> str:
        """The slot node's interface towards the server (from its routing table)."""
        assert self.node is not None
        out = self.node.run(["ip", "-o", "route", "get", self.server_address]).stdout.split()
        if "dev" not in out:
            raise RuntimeFailure(f"{self.node.name}: no route to {self.server_address}")
        return out[out.index("dev") + 1]

    def _start_upstream_capture(self) -> None:
        from testbed.runtime.evidence import Capture

        assert self.node is not None
        self.upstream_pcap = self.evidence("upstream.pcap")
        self._capture = Capture.start(self.node, self.upstream_interface(),
                                      self.upstream_pcap, f"{self.marker}-capture",
                                      bpf_filter="tcp")

    def client_side_pcap(self) -> Path | None:
        """The path's own pcap (taken on the slot node's client-facing side), if any."""
        if self.evidence_dir is None:
            return None
        pcap = self.evidence_dir / f"{self.path}.pcap"
        return pcap if pcap.exists() else None

    def stop_recording(self) -> None:
        """Stop the upstream capture (idempotent); called before the evidence is read."""
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.stop()

    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        """The middlebox's report for the verdict (``facts['middlebox'][kind]``), from its
        own evidence and the measured ``facts`` (plus ``facts['outcome']``, the client's
        outcome record); empty when it has nothing to report."""
        return {}

    def on_transfer_start(self) -> None:
        """Called just before the client starts; time-based middleboxes arm here."""

    def later(self, delay_s: float, what: str, action: Callable[[], None], *,
              after: Callable[[], bool] | None = None, poll_s: float = 0.05) -> None:
        """Run ``action`` ``delay_s`` seconds from now, or from when ``after()`` first
        returns true (polled every ``poll_s``), unless the middlebox is torn down first."""
        t0 = time.monotonic()

        def body() -> None:
            start = t0
            if after is not None:
                while True:
                    if self._stop.wait(poll_s):
                        return
                    with contextlib.suppress(TestbedError):
                        if after():
                            break
                start = time.monotonic()
                self.events.append(f"+{start - t0:.3f}s: trigger seen")
            if self._stop.wait(max(0.0, delay_s - (time.monotonic() - start))):
                return
            with self._lock:
                if self._stopped:
                    return
                try:
                    action()
                    self.events.append(f"+{time.monotonic() - t0:.3f}s: {what}: done")
                except TestbedError as exc:
                    self.events.append(f"+{time.monotonic() - t0:.3f}s: {what}: FAILED: {exc}")

        thread = threading.Thread(target=body, name=f"middlebox-{self.kind}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def rule_packets(self, table: str, chain: str) -> int:
        """Packets counted so far by this middlebox's marked rules in ``chain``."""
        assert self.node is not None
        out = self.node.run(["iptables", "-w", "5", "-t", table, "-L", chain, "-v", "-n",
                             "-x"]).stdout
        return sum(int(ln.split()[0]) for ln in out.splitlines()
                   if f"/* {self.marker} */" in ln and ln.split()[0].isdigit())

    # -- evidence --------------------------------------------------------------------------
    def report(self) -> str:
        """The rules as applied and the kernel's view of them with packet counters."""
        parts = [f"# middlebox {self.kind} on path {self.path}, node "
                 f"{self.node.name if self.node else '?'}", f"# parameters: {self.values}",
                 "# rules applied:", self.applied.rstrip()]
        if self.events:
            parts += ["# run-time events:", *self.events]
        if self.node is not None:
            if self.backend == "nft":
                res = self.node.run(["nft", "list", "ruleset"], check=False)
                parts += ["# nft list ruleset (after the transfer):", res.stdout + res.stderr]
            for table in sorted(self._tables | {"filter"} if self.backend == "iptables"
                                else ()):
                res = self.node.run(["iptables", "-w", "5", "-t", table, "-L", "-v", "-n",
                                     "-x"], check=False)
                parts += [f"# iptables -t {table} -L -v -n -x (after the transfer):",
                          res.stdout + res.stderr]
        return "\n".join(parts) + "\n"

    # -- teardown --------------------------------------------------------------------------
    def teardown(self) -> None:
        """Cancel timers, remove every rule this middlebox added. Safe to call twice, and
        after a failed or partial setup."""
        self._stop.set()
        with self._lock:
            self._stopped = True
        for thread in self._threads:
            thread.join(timeout=15)
        node = self.node
        if node is None or not self.marker:
            return
        try:
            self._remove_rules(node)
        finally:
            # After the rules: a queue or redirect without its worker must not be left.
            for proc in self._workers:
                with contextlib.suppress(Exception):
                    node.stop(proc)
            with contextlib.suppress(Exception):
                self.stop_recording()

    def _remove_rules(self, node: Node) -> None:
        if self.backend == "nft":
            if self.remaining_rules():
                node.run(["nft", "delete", "table", "inet", self.nft_table])
            return
        for table in IPTABLES_TABLES:
            for _ in range(64):  # bounded: each pass deletes one rule
                res = node.run(["iptables-save", "-t", table], check=False)
                lines = [ln for ln in res.stdout.splitlines()
                         if ln.startswith("-A ") and self.marker in shlex.split(ln)]
                if not lines:
                    break
                with contextlib.suppress(TestbedError):
                    node.run(["iptables", "-w", "5", "-t", table, "-D",
                              *shlex.split(lines[0])[1:]])
            else:
                raise RuntimeFailure(f"{node.name}: cannot remove the rules of {self.marker}")

    def running_workers(self) -> list[int]:
        """PIDs of this middlebox's processes still running (empty after teardown)."""
        return [proc.pid for proc in self._workers if proc.poll() is None]

    def remaining_rules(self) -> list[str]:
        """Rules of this middlebox still present (empty after a good teardown)."""
        if self.node is None:
            return []
        if self.backend == "nft":
            res = self.node.run(["nft", "list", "tables"], check=False)
            return [ln for ln in res.stdout.splitlines() if ln.split()[-1:] == [self.nft_table]]
        left = []
        for table in IPTABLES_TABLES:
            res = self.node.run(["iptables-save", "-t", table], check=False)
            left += [ln for ln in res.stdout.splitlines() if self.marker in ln]
        return left
