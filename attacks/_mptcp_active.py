"""Shared machinery of the active MPTCP attacks (join_*, add_addr_forged).

``prepare()`` installs, in the attacker's own node, an iptables OUTPUT rule dropping the
RSTs its kernel would send for the handshakes it crafts (DESIGN.md §6), optionally starts
the attacker's own capture of its interface, and starts the packet worker
(``attacks.mptcp_worker``) so that scapy is loaded before the victim connects. ``ask()``
sends the worker one command and waits, bounded, for its JSON reply. ``teardown()`` stops
the worker and the capture and removes the rule (idempotent).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from testbed.errors import RuntimeFailure, StepTimeout
from testbed.model import mptcp
from testbed.runtime.attack import Attack
from testbed.runtime.mptcp_pcap import Segment, capable_handshakes, read_segments

REPO = Path(__file__).resolve().parents[1]
WORKER_READY_S = 20.0


class ActiveMptcpAttack(Attack):
    transports: ClassVar[tuple[str, ...]] = ("mptcp",)
    requires: ClassVar[frozenset[str]] = frozenset({"iptables"})
    own_capture: ClassVar[bool] = False

    worker: subprocess.Popen[str] | None = None
    _rule: list[str] | None = None
    _own: list[Segment] | None = None

    # -- steps -------------------------------------------------------------------------------
    def prepare(self) -> None:
        node = self.ctx.node
        self._rule = ["OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-m", "comment",
                      "--comment", f"{node.ledger.tag}-{self.kind}", "-j", "DROP"]
        node.run(["iptables", "-w", "5", "-A", *self._rule], timeout=15)
        if self.own_capture:
            self.record_tap()
        self.stderr_path = self.ctx.evidence("worker.log")
        self._stderr = self.stderr_path.open("w")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.worker = self.popen([sys.executable, "-m", "attacks.mptcp_worker",
                                  "--iface", self.ctx.ifname, "--address", self.ctx.address],
                                 "packet worker", stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                 cwd=str(REPO), env=env)
        ready = self._read_line(WORKER_READY_S)
        if not ready.get("ready"):
            raise RuntimeFailure(f"{self.kind}: the packet worker did not start: {ready}")

    def teardown(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            with contextlib.suppress(Exception):
                assert self.worker.stdin is not None
                self.worker.stdin.write('{"op": "quit"}\n')
                self.worker.stdin.flush()
                self.worker.wait(timeout=2)
        super().teardown()  # stops the capture too
        if self._rule is not None:
            with contextlib.suppress(Exception):
                self.ctx.node.run(["iptables", "-w", "5", "-D", *self._rule], timeout=15,
                                  check=False)
            self._rule = None
        with contextlib.suppress(Exception):
            self._stderr.close()

    # -- worker ------------------------------------------------------------------------------
    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self.worker is not None and self.worker.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StepTimeout(f"{self.kind}: the packet worker gave no answer in {timeout}s")
            ready, _w, _x = select.select([self.worker.stdout], [], [], left)
            if ready:
                line = self.worker.stdout.readline()
                if not line:
                    raise RuntimeFailure(f"{self.kind}: the packet worker exited "
                                         f"({self.worker.poll()}); see {self.stderr_path}")
                try:
                    reply: dict[str, Any] = json.loads(line)
                except json.JSONDecodeError:
                    continue  # not ours (a library printing to stdout)
                return reply

    def ask(self, cmd: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        assert self.worker is not None and self.worker.stdin is not None
        t0 = time.monotonic()
        self.worker.stdin.write(json.dumps(cmd) + "\n")
        self.worker.stdin.flush()
        reply = self._read_line(timeout)
        reply.setdefault("duration_s", round(time.monotonic() - t0, 3))
        self.ctx.say(f"{cmd['op']}: {json.dumps(reply)[:300]}")
        return reply

    # -- what the attacker can learn ---------------------------------------------------------
    def own_segments(self, fresh: bool = False) -> list[Segment]:
        """The attacker's own capture so far (read once per act unless ``fresh``)."""
        if not self.own_capture:
            return []
        if fresh or self._own is None:
            self._own = read_segments(self.pcap)
        return self._own

    def keys_from_own_capture(self) -> tuple[int, int, int] | None:
        """(client key, server key, client port) of the victim's MPTCP handshake, read from
        the attacker's OWN capture of its path (not the testbed's)."""
        for hs in capable_handshakes(self.own_segments()):
            if hs.server == self.ctx.server_address and hs.dport == self.ctx.port:
                return hs.client_key, hs.server_key, hs.sport
        return None

    def server_data_ack(self, client_port: int) -> int | None:
        """The latest data-level ACK the server sent on the victim's subflow: the data
        sequence number it expects next from the client."""
        latest = None
        for seg in self.own_segments():
            if seg.src == self.ctx.server_address and seg.dport == client_port:
                dss = seg.first(mptcp.Dss)
                if dss is not None and dss.data_ack is not None:
                    latest = dss.data_ack
        return latest

    def token_oracle(self) -> tuple[int, str] | None:
        """The server's token of the victim connection, from the testbed's OWN captures
        (an oracle standing in for a leak): a join SYN on any path carries it; else it is
        derived from the server key of the MP_CAPABLE handshake."""
        from testbed.runtime.mptcp_pcap import join_handshakes

        for path, pcap in sorted(self.ctx.victim_pcaps.items()):
            segs = read_segments(pcap)
            for join in join_handshakes(segs):
                if join.server == self.ctx.server_address:
                    return join.token, f"MP_JOIN SYN in the testbed's capture of path {path}"
        for path, pcap in sorted(self.ctx.victim_pcaps.items()):
            for hs in capable_handshakes(read_segments(pcap)):
                if hs.server == self.ctx.server_address:
                    return mptcp.token(hs.server_key), \
                        f"server key in the testbed's capture of path {path}"
        return None

    def live_server_connections(self) -> int:
        """MPTCP connections the server holds right now (its token table's live entries)."""
        res = self.ctx.server.run(["ss", "-HMn", "state", "established"], timeout=5,
                                  check=False)
        return max(1, len([line for line in res.stdout.splitlines() if line.strip()]))
