"""A firewall that strips MP_CAPABLE (TCP option 30) from handshake segments.

``mode: nop`` is xt_TCPOPTSTRIP: the option's bytes become NOPs, the header keeps its
length. ``mode: remove`` is a firewall that rebuilds the header: an NFQUEUE rule hands the
SYN (and/or SYN/ACK) to a worker in the slot node (``_strip_worker``) that takes the option
out, shortens the TCP header and the IP packet and fixes both checksums. The worker logs
each rewrite, and the upstream capture shows the segment after the firewall.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.middleboxes.base import Middlebox
from testbed.model.params import ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node

WORKER = "testbed.middleboxes._strip_worker"
QUEUE_NUM = 30


def read_strip_log(path: Path | None) -> list[dict[str, Any]]:
    """The JSON lines of a strip worker's log (a torn last line is ignored)."""
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class StripMpCapable(Middlebox):
    kind = "strip_mp_capable"
    description = ("strips TCP option 30 (MPTCP) from SYN and/or SYN/ACK segments "
                   "(nop: xt_TCPOPTSTRIP replaces it by NOPs; remove: an NFQUEUE worker "
                   "takes it out and shortens the header)")
    params: ClassVar[dict[str, ParamSpec]] = {
        "mode": ParamSpec("mode", str, "nop",
                          "nop: overwrite the option with NOPs (TCPOPTSTRIP); remove: take "
                          "it out, shorten the TCP header, fix lengths and checksums "
                          "(NFQUEUE worker)", choices=("nop", "remove")),
        "direction": ParamSpec("direction", str, "syn",
                               "which handshake segments: syn (client to server), synack "
                               "(server to client) or both", choices=("syn", "synack", "both")),
    }
    # What either mode may need; ``requirements`` says what a given mode needs.
    requires = frozenset({"iptables", "tcpoptstrip", "nfqueue"})
    capture_upstream = True  # the segment after the firewall, to compare with the path pcap
    template = """\
*mangle
{% if mode == "nop" -%}
{% set target = "TCPOPTSTRIP --strip-options 30" -%}
{% else -%}
{% set target = "NFQUEUE --queue-num " ~ queue ~ " --queue-bypass" -%}
{% endif -%}
{% if direction in ("syn", "both") -%}
-A FORWARD -p tcp --tcp-flags SYN,ACK SYN -j {{ target }}
{% endif -%}
{% if direction in ("synack", "both") -%}
-A FORWARD -p tcp --tcp-flags SYN,ACK SYN,ACK -j {{ target }}
{% endif -%}
COMMIT
"""

    def variables(self, node: Node, net: Network) -> dict[str, Any]:
        return {"queue": QUEUE_NUM}

    @classmethod
    def requirements(cls, values: dict[str, Any]) -> frozenset[str]:
        return frozenset({"iptables", "tcpoptstrip" if values.get("mode") == "nop"
                          else "nfqueue"})

    def start_workers(self) -> None:
        if self.values["mode"] == "remove":
            self.start_worker(WORKER, {"queue": QUEUE_NUM, "mode": "remove",
                                       "log": str(self.evidence("rewrites.jsonl")),
                                       "server": self.server_address},
                              "worker")

    def rewrites(self) -> list[dict[str, Any]]:
        """The worker's rewrite records (empty for mode nop)."""
        if self.evidence_dir is None or self.values["mode"] != "remove":
            return []
        return [r for r in read_strip_log(self.evidence("rewrites.jsonl"))
                if r.get("event") == "strip"]

    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        if self.values["mode"] != "remove":
            return {}
        recs = self.rewrites()
        return {"rewrites": len(recs),
                "syn_rewrites": sum(r["flags"] == "S" for r in recs),
                "synack_rewrites": sum(r["flags"] == "SA" for r in recs),
                "header_bytes_removed": sum(r["hdr_len_before"] - r["hdr_len_after"]
                                            for r in recs)}
