"""The attack plugin contract and the context attacks run in.

An attack kind is a class in the top-level ``attacks/`` package. The scenario runner
places its attacker node at the playbook's ``position`` (``testbed.model.attachments``),
then drives it through four steps around the victim's real TLS transfer:

1. ``prepare()``: before the victim connects (start the attacker's own capture, install
   the attacker's own firewall rules...).
2. ``act()``: once the victim's connection is established and its subflows have settled,
   while the transfer is running. Active attacks send their packets here. Bounded.
3. ``finish() -> dict``: after the victim finished (or was stopped). Returns the attack's
   report: what it tried, what it learned, what happened, as JSON-able data. It becomes
   ``facts["attack"][<kind>]`` and can be checked with ``expect: {attack: ...}``.
4. ``teardown()``: always, idempotent: stops everything the attack started.

The victim's fate is judged independently by the runner (application outcome, counters).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.errors import SpecError
from testbed.model.attachments import Attachment
from testbed.model.params import ParamSpec
from testbed.runtime.evidence import Capture

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node


@dataclass
class AttackContext:
    net: Network
    node: Node                      # the attacker's own node
    attachment: Attachment
    transport: str                  # victim transport: "tcp" | "mptcp"
    client: Node
    server: Node
    server_address: str
    port: int
    sni: str
    app_bytes: int
    evidence_dir: Path
    say: Callable[[str], None]
    victim_pcaps: dict[str, Path] = field(default_factory=dict)  # the testbed's own captures

    @property
    def ifname(self) -> str:
        """The attacker node's (only) interface."""
        return self.net.plan.interfaces[self.node.name][0].ifname

    @property
    def address(self) -> str:
        return str(self.net.plan.interfaces[self.node.name][0].address.ip)

    def client_address(self, path: str) -> str:
        return self.net.address(self.client.name, path)

    def evidence(self, name: str) -> Path:
        return self.evidence_dir / f"attack-{self.attachment.node}-{name}"


class Attack:
    """Base class of attack kinds; subclasses set the class variables and the steps."""

    kind: ClassVar[str]
    description: ClassVar[str]
    positions: ClassVar[tuple[str, ...]]
    transports: ClassVar[tuple[str, ...]] = ("tcp", "mptcp")  # where the attack applies
    params: ClassVar[dict[str, ParamSpec]] = {}
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, values: dict[str, Any], ctx: AttackContext) -> None:
        self.values = values
        self.ctx = ctx
        self._procs: list[subprocess.Popen[Any]] = []
        self.capture: Capture | None = None

    @classmethod
    def validate(cls, params: dict[str, Any], file: str, field: str) -> dict[str, Any]:
        """Check the kind's parameters (``path`` is the attachment's, checked elsewhere)."""
        out = {}
        for key in params:
            if key != "path" and key not in cls.params:
                raise SpecError(file, f"{field}.{key}", f"not a parameter of {cls.kind}",
                                f"parameters: {', '.join(['path', *cls.params])}")
        for name, spec in cls.params.items():
            out[name] = spec.check(params.get(name, spec.default), file, f"{field}.{name}")
        if "path" in params:
            out["path"] = params["path"]
        return out

    def prepare(self) -> None:
        """Before the victim connects."""

    def act(self) -> None:
        """While the victim's transfer runs, its subflows settled."""

    def finish(self) -> dict[str, Any]:
        """After the victim finished: the attack's report."""
        return {}

    def record_tap(self) -> Path:
        """Start the attacker's own capture of its interface (evidence ``capture.pcap``,
        in ``self.pcap``); stopped by ``stop_recording`` or at the latest by ``teardown``."""
        self.pcap = self.ctx.evidence("capture.pcap")
        self.capture = Capture.start(self.ctx.node, self.ctx.ifname, self.pcap,
                                     f"{self.kind} capture")
        return self.pcap

    def stop_recording(self) -> None:
        """Stop the capture of ``record_tap`` (safe to call again, or without one)."""
        if self.capture is not None:
            self.capture.stop()

    def teardown(self) -> None:
        self.stop_recording()
        for proc in self._procs:
            with contextlib.suppress(Exception):
                self.ctx.node.stop(proc)
        self._procs.clear()

    def popen(self, argv: list[str], label: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the attacker node; stopped by ``teardown``."""
        proc = self.ctx.node.popen(argv, label=f"{self.kind}: {label}", **kw)
        self._procs.append(proc)
        return proc
