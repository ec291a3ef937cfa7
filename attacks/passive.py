"""``passive``: an observer of one path (position ``tap``) that only listens.

It records the path's traffic from the mirror its access router sends it and reports,
from that capture alone (tshark): the SNI (full / partial / none), the MPTCP keys and join
tokens it saw (and the tokens it can derive from the keys), the addresses it saw, and how
many of the transfer's bytes crossed its path. Claims P1, P2, P3.
"""

from __future__ import annotations

from typing import Any, ClassVar

from testbed.runtime.attack import Attack
from testbed.runtime.observer import summarize_pcap


class Passive(Attack):
    kind: ClassVar[str] = "passive"
    description: ClassVar[str] = ("listens on one path (tap) and reports SNI, MPTCP keys and "
                                  "tokens, addresses and bytes seen")
    positions: ClassVar[tuple[str, ...]] = ("tap",)
    requires: ClassVar[frozenset[str]] = frozenset({"tcpdump", "tshark"})

    total_bytes: int = 0

    def prepare(self) -> None:
        self.record_tap()

    def finish(self) -> dict[str, Any]:
        self.stop_recording()
        view = summarize_pcap(self.pcap, sni=self.ctx.sni,
                              server_addresses=[self.ctx.server_address],
                              total_app_bytes=self.ctx.app_bytes)
        mptcp = view.get("mptcp") or {}
        return {
            "path": self.ctx.attachment.path,
            "pcap": self.pcap.name,
            "packets": view.get("packets", 0),
            "sni": (view.get("sni") or {}).get("status", "none"),
            "sni_fragments": (view.get("sni") or {}).get("fragments_seen", []),
            "keys_seen": bool(mptcp.get("keys")),
            "keys": mptcp.get("keys", []),
            "tokens_seen": mptcp.get("tokens", []),
            "derived_tokens": mptcp.get("derived_tokens", {}),
            "join_syns": mptcp.get("mp_join_syn", 0),
            "server_address_seen": bool(view.get("server_addresses_seen")),
            "addresses_seen": view.get("addresses", []),
            "payload_bytes": sum((view.get("payload_bytes") or {}).values()),
        }
