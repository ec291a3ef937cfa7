"""A firewall that strips MP_CAPABLE (TCP option 30) from handshake segments."""

from __future__ import annotations

from typing import ClassVar

from testbed.middleboxes.base import Middlebox, ParamSpec


class StripMpCapable(Middlebox):
    kind = "strip_mp_capable"
    description = ("strips TCP option 30 (MPTCP) from SYN and/or SYN/ACK segments "
                   "(xt_TCPOPTSTRIP: the option is replaced by NOPs)")
    params: ClassVar[dict[str, ParamSpec]] = {
        "mode": ParamSpec("mode", str, "nop",
                          "nop: overwrite the option with NOPs (TCPOPTSTRIP); remove (true "
                          "removal via NFQUEUE) is not implemented yet",
                          choices=("nop",),
                          refused=(("remove", "(true removal via NFQUEUE) is not "
                                    "implemented yet"),)),
        "direction": ParamSpec("direction", str, "syn",
                               "which handshake segments: syn (client to server), synack "
                               "(server to client) or both", choices=("syn", "synack", "both")),
    }
    requires = frozenset({"iptables", "tcpoptstrip"})
    template = """\
*mangle
{% if direction in ("syn", "both") -%}
-A FORWARD -p tcp --tcp-flags SYN,ACK SYN -j TCPOPTSTRIP --strip-options 30
{% endif -%}
{% if direction in ("synack", "both") -%}
-A FORWARD -p tcp --tcp-flags SYN,ACK SYN,ACK -j TCPOPTSTRIP --strip-options 30
{% endif -%}
COMMIT
"""
