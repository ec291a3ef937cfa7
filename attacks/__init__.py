"""Attack plugins: one module per kind, registered in ``ATTACKS``.

A playbook entry ``attacks: [{kind: passive, position: tap, path: wifi, ...params}]`` is
validated by the kind's ``validate``; at run time the runner places an attacker node at the
position and drives the attack around the victim's transfer (see
``testbed.runtime.attack`` for the contract). To add a kind: write ``attacks/<kind>.py``
with a subclass of ``testbed.runtime.attack.Attack``, list it below, and add a playbook.
"""

from __future__ import annotations

from attacks.add_addr_forged import AddAddrForged
from attacks.decrypt_later import DecryptLater
from attacks.join_guessed_token import JoinGuessedToken
from attacks.join_half_on_path import JoinHalfOnPath
from attacks.join_stolen_token import JoinStolenToken
from attacks.join_with_keys import JoinWithKeys
from attacks.passive import Passive
from attacks.tcp_inject import TcpInject
from attacks.tls_tamper import TlsTamper
from testbed.runtime.attack import Attack

ATTACKS: dict[str, type[Attack]] = {cls.kind: cls for cls in (
    Passive, DecryptLater, TcpInject, TlsTamper,
    JoinGuessedToken, JoinStolenToken, JoinHalfOnPath, JoinWithKeys, AddAddrForged)}

__all__ = ["ATTACKS", "Attack"]
