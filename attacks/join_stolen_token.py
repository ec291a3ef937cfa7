"""``join_stolen_token``: an off-path host that knows the victim connection's token but
not its keys tries to add a subflow (claim O3).

The token comes from the testbed's own capture (``victim_pcaps``): an ORACLE standing in
for a leak (an observer of the second path sees it in the clear in the MP_JOIN SYN). The
attacker joins from its own address so that it receives the SYN/ACK, then sends the third
ACK with an HMAC computed from keys it had to guess. The server must refuse the subflow
(MPTcpExtMPJoinAckHMacFailure, a reset, no MPTcpExtMPJoinAckRx).
"""

from __future__ import annotations

from typing import Any, ClassVar

from attacks._mptcp_active import ActiveMptcpAttack


class JoinStolenToken(ActiveMptcpAttack):
    kind: ClassVar[str] = "join_stolen_token"
    description: ClassVar[str] = ("off-path MP_JOIN with the right token (from the testbed's "
                                  "capture: an oracle for a leak) and guessed keys: the "
                                  "third-ACK HMAC is wrong (O3)")
    positions: ClassVar[tuple[str, ...]] = ("off_path", "half_on_path")
    hmac_strategy: ClassVar[str] = "guessed_keys"

    result: dict[str, Any] | None = None

    def act(self) -> None:
        found = self.token_oracle()
        if found is None:
            self.result = {"error": "no token of the victim connection in the testbed's "
                                    "captures"}
            return
        tok, source = found
        reply = self.ask({"op": "join", "server": self.ctx.server_address,
                          "port": self.ctx.port, "token": tok, "hmac": self.hmac_strategy})
        reply["token_source"] = f"oracle: {source}"
        reply["keys_known"] = False
        reply["attacker_address"] = self.ctx.address
        self.result = reply

    def finish(self) -> dict[str, Any]:
        return self.result or {"error": "the attack did not act"}
