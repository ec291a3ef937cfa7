"""An on-path attacker that blackholes the path: ``after_s`` seconds after the connection's
first data segment (the TLS ClientHello) crossed the path, it drops everything the slot
node forwards.

The clock starts at that segment, not at the client's launch: a client process can take
longer than ``after_s`` to start on a loaded machine, and a path that goes dark before the
handshake tests something else (connection establishment, not A2's mid-transfer loss).
A counting rule (no target) sees the data segments; a thread polls its counter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from testbed.middleboxes.base import Middlebox, ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node

# A TCP segment with payload: IP + TCP headers with options are at most 120 bytes here.
DATA_MIN_LEN = 121


class Blackhole(Middlebox):
    kind = "blackhole"
    description = ("drops everything forwarded on the path, starting after_s seconds after "
                   "the first data segment crossed it (iptables FORWARD DROP, by a timer)")
    params: ClassVar[dict[str, ParamSpec]] = {
        "after_s": ParamSpec("after_s", float, 0.5,
                             "seconds after the connection's first data segment crossed the "
                             "path before the path goes dark", lo=0.0, hi=600.0),
    }
    requires = frozenset({"iptables"})
    # At setup only a counting rule (no target): it tells when data starts to flow.
    template = """\
*filter
-A FORWARD -p tcp -m length --length {{ data_min_len }}:65535
COMMIT
"""
    drop_template = """\
*filter
-I FORWARD 1 -j DROP
COMMIT
"""

    def variables(self, node: Node, net: Network) -> dict[str, int]:
        return {"data_min_len": DATA_MIN_LEN}

    def setup(self, node: Node, net: Network, path: str) -> None:
        super().setup(node, net, path)
        self._drop = self.render_rules(self.context(node, net), self.drop_template)
        self.applied += (f"# inserted {self.values['after_s']}s after the first data "
                         f"segment:\n{self._drop}")

    def on_transfer_start(self) -> None:
        self.later(float(self.values["after_s"]), "blackhole DROP inserted",
                   lambda: self.apply(self._drop),
                   after=lambda: self.rule_packets("filter", "FORWARD") > 0)
