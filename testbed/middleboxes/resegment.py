"""A middlebox that changes how the byte stream is cut into segments, as access networks
and tunnels do: it clamps the MSS announced in SYN and SYN/ACK (xt_TCPMSS), so both ends
send smaller segments, and toggles the slot node's offloads (``ethtool -K``): with
``offload: disabled`` it forwards packet by packet (no GRO coalescing, no GSO/TSO
aggregation); with ``offload: enabled`` GRO coalesces what arrives and GSO splits it again on
the way out. MPTCP must survive both: DSS mappings are per segment, and a middlebox
that resegments must not make the connection fall back.

``finish`` reports, from tshark on the pcaps, the MSS the client announced (client side of
the box), the MSS the server received (upstream pcap) and the largest TCP payload seen on
each side, so a playbook checks that resegmentation really happened.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.errors import TestbedError
from testbed.middleboxes.base import Middlebox
from testbed.model.params import ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node

OFFLOADS = ("gro", "gso", "tso")
ETHTOOL_NAMES = {"gro": "generic-receive-offload", "gso": "generic-segmentation-offload",
                 "tso": "tcp-segmentation-offload"}


class Resegment(Middlebox):
    kind = "resegment"
    description = ("resegments the path's TCP flows: clamps the MSS of SYN and SYN/ACK "
                   "(iptables TCPMSS) and sets the slot node's offloads (ethtool -K)")
    params: ClassVar[dict[str, ParamSpec]] = {
        "mss": ParamSpec("mss", int, 536, "MSS written into SYN and SYN/ACK segments that "
                         "announce a larger one", lo=88, hi=65495),
        # Not off/on: YAML reads a bare `on` (e.g. from --set offload=on) as true.
        "offload": ParamSpec("offload", str, "disabled",
                             "the slot node's gro/gso/tso: disabled (forward packet by "
                             "packet), enabled (coalesce on receive, split on send) or keep",
                             choices=("disabled", "enabled", "keep")),
    }
    requires = frozenset({"iptables", "tcpmss", "ethtool", "tshark"})
    capture_upstream = True
    template = """\
*mangle
-A FORWARD -p tcp --tcp-flags SYN,RST SYN -m tcpmss --mss {{ mss + 1 }}:65535 \
 -j TCPMSS --set-mss {{ mss }}
COMMIT
"""

    def __init__(self, path: str, values: dict[str, Any]) -> None:
        super().__init__(path, values)
        self._saved: dict[str, dict[str, str]] = {}  # interface -> offload -> on/off before
        self._ifnames: list[str] = []
        self.client_address = ""

    def setup(self, node: Node, net: Network, path: str) -> None:
        super().setup(node, net, path)
        self._ifnames = [intf.ifname for intf in net.plan.interfaces[node.name]]
        self.client_address = str(net.address(net.node_of_role("client").name, path))
        if self.values["offload"] == "keep":
            return
        state = "on" if self.values["offload"] == "enabled" else "off"
        for ifname in self._ifnames:
            self._saved[ifname] = self._offloads(ifname)
            node.run(["ethtool", "-K", ifname,
                      *(x for o in OFFLOADS for x in (o, state))])
            self.events.append(f"{ifname}: {' '.join(OFFLOADS)} {state} (were "
                               f"{self._saved[ifname]})")

    def _offloads(self, ifname: str) -> dict[str, str]:
        assert self.node is not None
        out = self.node.run(["ethtool", "-k", ifname]).stdout
        state = {}
        for line in out.splitlines():
            name, _, value = line.strip().partition(": ")
            for short, long in ETHTOOL_NAMES.items():
                if name == long:
                    state[short] = value.split()[0] if value else "off"
        return state

    def _remove_rules(self, node: Node) -> None:
        try:
            super()._remove_rules(node)
        finally:
            for ifname, saved in self._saved.items():
                with contextlib.suppress(TestbedError):
                    node.run(["ethtool", "-K", ifname,
                              *(x for o, v in saved.items() for x in (o, v))])
            self._saved = {}

    def report(self) -> str:
        text = super().report()
        for ifname in self._ifnames:
            text += f"# offloads of {ifname} (after the transfer): {self._offloads(ifname)}\n"
        return text

    # -- what the pcaps show --------------------------------------------------------------
    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        """The client's SYN MSS before and after the box, and the largest payload the box
        sent toward the client, from tshark. (Upstream frames are not a measure of segment
        size: the server's GSO super-packets cross the veth whole.)"""
        client_side, upstream = self.client_side_pcap(), self.upstream_pcap
        syn = "tcp.flags.syn == 1 && tcp.flags.ack == 0"
        report: dict[str, Any] = {"mss_param": self.values["mss"]}
        if client_side is not None:
            report["syn_mss_client_side"] = _max_field(client_side, "tcp.options.mss_val", syn)
            report["max_payload_client_side"] = _max_field(
                client_side, "tcp.len", f"tcp.len > 0 && ip.dst == {self.client_address}")
        if upstream is not None:
            report["syn_mss_upstream"] = _max_field(upstream, "tcp.options.mss_val", syn)
        return report


def _max_field(pcap: Path, field: str, display_filter: str) -> int | None:
    """The largest value of ``field`` over the packets matching ``display_filter``."""
    res = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", display_filter, "-T", "fields",
                          "-e", field], capture_output=True, text=True, timeout=120,
                         check=False)
    values = [int(v) for line in res.stdout.split() for v in line.split(",") if v.isdigit()]
    return max(values) if values else None
