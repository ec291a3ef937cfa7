"""A firewall that drops SYNs carrying TCP option 30 (MP_CAPABLE or MP_JOIN).

nftables' ``tcp option mptcp exists`` walks the TCP options in the kernel (nft_exthdr), so
the match does not depend on where the client's stack puts option 30 (Linux puts it after
MSS, SACK-permitted/timestamps and window scale, 40 bytes into the header, but a fixed
u32 offset would miss other layouts)."""

from __future__ import annotations

from typing import ClassVar

from testbed.middleboxes.base import Middlebox
from testbed.model.params import ParamSpec


class DropMptcpSyn(Middlebox):
    kind = "drop_mptcp_syn"
    description = "drops SYNs that carry TCP option 30 (nft tcp option mptcp exists)"
    params: ClassVar[dict[str, ParamSpec]] = {
        "direction": ParamSpec("direction", str, "syn",
                               "drop SYNs (client to server), SYN/ACKs or both",
                               choices=("syn", "synack", "both")),
    }
    requires = frozenset({"nft"})
    backend = "nft"
    template = """\
table inet {{ table_name }} {
  chain forward_hook {
    type filter hook forward priority -10; policy accept;
{% if direction in ("syn", "both") %}\
    tcp flags & (syn | ack) == syn tcp option mptcp exists counter drop
{% endif %}\
{% if direction in ("synack", "both") %}\
    tcp flags & (syn | ack) == syn | ack tcp option mptcp exists counter drop
{% endif %}\
  }
}
"""
