"""``join_half_on_path``: a half-on-path attacker (its own address; it receives what is
sent to it) joins the victim connection and gets the server's SYN/ACK with its 64-bit
truncated HMAC and nonce R_B (claim H1).

That HMAC is keyed KeyB‖KeyA over R_B‖R_A; the third ACK needs HMAC(KeyA‖KeyB, R_A‖R_B),
which nothing it received yields. Its best move is to reflect what it got (the truncated
HMAC and nonce, stretched to 160 bits): the server refuses the subflow. The token comes
from the testbed's own capture, an oracle standing in for a leak.
"""

from __future__ import annotations

from typing import ClassVar

from attacks.join_stolen_token import JoinStolenToken


class JoinHalfOnPath(JoinStolenToken):
    kind: ClassVar[str] = "join_half_on_path"
    description: ClassVar[str] = ("half-on-path MP_JOIN from its own address: receives the "
                                  "SYN/ACK's truncated HMAC and nonce, reflects them in the "
                                  "third ACK: refused (H1)")
    positions: ClassVar[tuple[str, ...]] = ("half_on_path",)
    hmac_strategy: ClassVar[str] = "reflect"
