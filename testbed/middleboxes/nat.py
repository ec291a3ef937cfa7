"""NAT on one path: the slot node masquerades what it forwards toward the server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from testbed.middleboxes.base import Middlebox
from testbed.model.params import ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node


class Nat(Middlebox):
    kind = "nat"
    description = ("source NAT on the path's egress toward the server (rewrites the client's "
                   "address and port)")
    params: ClassVar[dict[str, ParamSpec]] = {
        "mode": ParamSpec("mode", str, "masquerade",
                          "masquerade: the egress interface's address; snat: an explicit "
                          "--to-source of that address", choices=("masquerade", "snat")),
        "random_ports": ParamSpec("random_ports", bool, True,
                                  "--random: rewrite the source port too (randomised)"),
    }
    requires = frozenset({"iptables"})
    template = """\
*nat
{% if mode == "masquerade" -%}
-A POSTROUTING -o {{ egress }} -p tcp -j MASQUERADE{% if random_ports %} --random{% endif %}
{%- else -%}
-A POSTROUTING -o {{ egress }} -p tcp -j SNAT --to-source {{ egress_address }}\
{% if random_ports %}:1024-65535 --random{% endif %}
{%- endif %}
COMMIT
"""

    def variables(self, node: Node, net: Network) -> dict[str, Any]:
        client = net.node_of_role("client").name
        egress = [i for i in net.plan.interfaces[node.name]
                  if i.peer_node != client and i.path == self.path] or \
                 [i for i in net.plan.interfaces[node.name] if i.peer_node != client]
        return {"egress": egress[0].ifname, "egress_address": str(egress[0].address.ip)}
