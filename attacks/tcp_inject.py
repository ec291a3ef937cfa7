"""``tcp_inject``: an off-path attacker spoofs data segments into the victim's connection
(claim O1).

The attacker node hangs off the core router: it sees none of the victim's packets, but its
packets are not source-filtered, so it can forge segments from the server's address and
port to the client's initial-path address. The segments are built with scapy and sent by
a worker process INSIDE the attacker node (``attacks._inject``); the attacker kernel's own
RSTs are dropped with an iptables OUTPUT rule for the attack's lifetime.

Modes (parameter ``mode``):

- ``guessed`` (the claim): ``count`` segments with sequence and acknowledgment numbers
  drawn at random. The 4-tuple and the timestamp values are handed to the attacker by the
  testbed's own capture (an oracle, generous to the attacker), so the sequence numbers are
  the only thing it has to guess. Expected: every segment is dropped by the client's TCP
  (the counters say how: out-of-window data is answered with a duplicate ACK), and the
  application gets its payload intact.
- ``control``: the sequence numbers, window and freshest TSval are read from the ORACLE
  (the testbed's capture of the initial path, which an off-path attacker does not have).
  The worker tiles the range the client will accept next, so one forged segment arrives
  exactly when the client expects its bytes. It proves the injector works: the victim's
  stream is corrupted, which TLS turns into an abort (bad record MAC).

The report holds what was sent, the client's counter deltas around the injection and
whether the application's received bytes are an untouched prefix of the payload (and
hold none of the attacker's marker bytes).
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any, ClassVar

from attacks._common import (
    RST_DROP,
    counter_delta,
    iptables,
    read_line,
    received_check,
    start_worker,
)
from testbed.model.params import ParamSpec
from testbed.runtime.attack import Attack
from testbed.runtime.evidence import snapshot_counters

MARKER = b"TB-INJECTED-BY-ATTACKER|"
READY_TIMEOUT_S = 30.0   # scapy's import on a loaded 2-core machine
ACT_TIMEOUT_S = 20.0
SETTLE_AFTER_S = 0.3     # let the client answer the last forged segments


class TcpInject(Attack):
    kind: ClassVar[str] = "tcp_inject"
    description: ClassVar[str] = (
        "off-path: spoofs data segments (server -> client) into the victim connection with "
        "guessed sequence numbers, or (control) with the right ones read from the testbed's "
        "own capture")
    positions: ClassVar[tuple[str, ...]] = ("off_path",)
    requires: ClassVar[frozenset[str]] = frozenset({"iptables", "tshark"})
    params: ClassVar[dict[str, ParamSpec]] = {
        "mode": ParamSpec("mode", str, "guessed",
                          "guessed: random seq/ack; control: right seq/ack from the oracle",
                          choices=("guessed", "control")),
        "count": ParamSpec("count", int, 2000, "segments sent in guessed mode", lo=1,
                           hi=100000),
        "duration_s": ParamSpec("duration_s", float, 1.0, "stop sending after this long (the "
                                "victim's transfer must outlast it)", lo=0.1, hi=20.0),
        "size": ParamSpec("size", int, 100, "payload bytes per guessed segment", lo=1,
                          hi=1400),
        "rate_pps": ParamSpec("rate_pps", int, 1000, "guessed: sending rate (paced)", lo=1,
                              hi=100000),
        "burst": ParamSpec("burst", int, 16, "control: contiguous tiles per burst", lo=1,
                           hi=200),
        "sweep_bytes": ParamSpec("sweep_bytes", int, 96000, "control: range swept past the "
                                 "last data seen (the access router's queue)", lo=1000,
                                 hi=4000000),
        "pause_s": ParamSpec("pause_s", float, 0.02, "control: pause between bursts",
                             lo=0.0, hi=1.0),
    }

    worker: subprocess.Popen[str] | None = None
    rst_rule: bool = False

    def prepare(self) -> None:
        ctx = self.ctx
        iptables(ctx.node, "-A", RST_DROP)
        self.rst_rule = True
        primary = ctx.net.spec.primary_path
        self.oracle = ctx.victim_pcaps.get(primary)
        if self.oracle is None:
            raise RuntimeError(f"tcp_inject needs the testbed's capture of path {primary}")
        self.config = {"mode": self.values["mode"], "server": ctx.server_address,
                       "client": ctx.client_address(primary), "port": ctx.port,
                       "oracle": str(self.oracle), "count": self.values["count"],
                       "size": self.values["size"], "duration_s": self.values["duration_s"],
                       "rate_pps": self.values["rate_pps"], "burst": self.values["burst"],
                       "sweep_bytes": self.values["sweep_bytes"],
                       "pause_s": self.values["pause_s"],
                       "marker": MARKER.decode()}
        self.worker = start_worker(ctx.node, "attacks._inject", self.config,
                                   f"{self.kind} worker", ctx.evidence("worker.log"))
        self._procs.append(self.worker)
        if read_line(self.worker, READY_TIMEOUT_S, "tcp_inject worker") != "ready":
            raise RuntimeError("tcp_inject worker did not start")
        self.result: dict[str, Any] = {}
        self.client_delta: dict[str, int] = {}

    def act(self) -> None:
        assert self.worker is not None and self.worker.stdin is not None
        before = self.act_baseline = snapshot_counters(self.ctx.client)
        self.ctx.say(f"{self.values['mode']}: injecting into {self.config['client']}")
        self.worker.stdin.write("go\n")
        self.worker.stdin.flush()
        self.result = json.loads(read_line(self.worker, ACT_TIMEOUT_S, "tcp_inject worker"))
        time.sleep(SETTLE_AFTER_S)
        self.client_delta = counter_delta(before, snapshot_counters(self.ctx.client))
        self.ctx.say(f"sent {self.result.get('sent')} forged segment(s)")

    def finish(self) -> dict[str, Any]:
        d = self.client_delta
        report: dict[str, Any] = {
            "mode": self.values["mode"],
            "oracle": self.oracle.name,
            "oracle_use": ("4-tuple and timestamps" if self.values["mode"] == "guessed"
                           else "4-tuple, timestamps, sequence/ack numbers and window"),
            **self.result,
            "client_counters": d,
            "beyond_window": d.get("TcpExtBeyondWindow", 0),
            "challenge_acks": d.get("TcpExtTCPChallengeACK", 0),
            "paws_estab": d.get("TcpExtPAWSEstab", 0),
            "ack_skipped_seq": d.get("TcpExtTCPACKSkippedSeq", 0),
            "dsack_old_sent": d.get("TcpExtTCPDSACKOldSent", 0),
        }
        report.update(self._on_link(report.get("four_tuple")))
        dropped = report["beyond_window"] + report["dsack_old_sent"] + report["paws_estab"]
        report["dropped_by_tcp"] = dropped
        if self.values["mode"] == "guessed" and report.get("forged_before_close") is not None:
            # Each forged segment that reached the open connection is answered by one of
            # these drops (beyond the window, or "old": a D-SACK duplicate ACK, or PAWS).
            report["drops_account_for_forged"] = dropped >= 0.95 * report["forged_before_close"]
        if hasattr(self, "act_baseline"):
            report.update(self._effect(counter_delta(self.act_baseline,
                                                     snapshot_counters(self.ctx.client))))
        report.update(received_check(self.ctx.evidence_dir, self.ctx.app_bytes, MARKER))
        return report

    @staticmethod
    def _effect(d: dict[str, int]) -> dict[str, Any]:
        """What the client's kernel did from the injection to the end of the transfer.

        Under MPTCP a forged segment taken by a subflow either lands inside a DSS mapping
        (its bytes become connection data: TLS aborts, the client sends MP_FASTCLOSE) or
        outside any (the subflow is reset with MP_RST; the data goes on over the other
        subflow). Under TCP the TLS abort closes the socket with unread data (AbortOnClose).
        """
        if d.get("MPTcpExtMPFastcloseTx", 0) or d.get("TcpExtTCPAbortOnClose", 0) \
                or d.get("TcpExtTCPAbortOnData", 0):
            effect = "connection_aborted"
        elif d.get("MPTcpExtMPRstTx", 0):
            effect = "subflow_reset"
        else:
            effect = "none"
        return {"victim_effect": effect, "forged_bytes_taken": effect != "none",
                "counters_to_end": d}

    def _on_link(self, four_tuple: list[Any] | None) -> dict[str, Any]:
        """From the testbed's capture of the client's access link: how many forged segments
        reached it, and how many of those before the server's FIN (after it, the
        connection is closing and its drops are no longer the sequence check's)."""
        if not four_tuple:
            return {"forged_on_link": None, "forged_before_close": None}
        server, port, _client, cport = four_tuple
        conn = f"ip.src == {server} && tcp.srcport == {port} && tcp.dstport == {cport}"
        flt = f'({conn}) && (tcp.flags.fin == 1 || tcp.payload contains "{MARKER.decode()}")'
        res = subprocess.run(["tshark", "-n", "-r", str(self.oracle), "-Y", flt, "-T",
                              "fields", "-e", "tcp.flags.fin"], capture_output=True,
                             text=True, timeout=120, check=False)
        forged = before = 0
        closed = False
        for line in res.stdout.split():
            if line in ("1", "True"):
                closed = True
                continue
            forged += 1
            before += not closed
        return {"forged_on_link": forged, "forged_before_close": before}

    def teardown(self) -> None:
        super().teardown()
        if self.rst_rule:
            self.rst_rule = False
            iptables(self.ctx.node, "-D", RST_DROP, check=False)
