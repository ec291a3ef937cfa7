"""An on-path attacker that blackholes the path: after ``after_s`` seconds of the transfer
it drops everything the slot node forwards."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from testbed.middleboxes.base import Middlebox, ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node


class Blackhole(Middlebox):
    kind = "blackhole"
    description = ("drops everything forwarded on the path, starting after_s seconds into "
                   "the transfer (iptables FORWARD DROP inserted by a timer)")
    params: ClassVar[dict[str, ParamSpec]] = {
        "after_s": ParamSpec("after_s", float, 0.5,
                             "seconds after the client starts before the path goes dark",
                             lo=0.0, hi=600.0),
    }
    requires = frozenset({"iptables"})
    template = ""  # nothing at setup: the rule arrives with the timer
    drop_template = """\
*filter
-I FORWARD 1 -j DROP
COMMIT
"""

    def setup(self, node: Node, net: Network, path: str) -> None:
        super().setup(node, net, path)
        self.applied = (f"# inserted at transfer start + {self.values['after_s']}s:\n"
                        + self.render_rules(self.context(node, net), self.drop_template))

    def on_transfer_start(self) -> None:
        rules = self.applied.split("\n", 1)[1]
        self.later(float(self.values["after_s"]), "blackhole DROP inserted",
                   lambda: self.apply(rules))
