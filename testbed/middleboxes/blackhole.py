"""An on-path attacker that blackholes the path: ``after_s`` seconds after the connection's
first data segment (the TLS ClientHello) crossed the path, it drops everything the slot
node forwards.

The clock starts at that segment, not at the client's launch: a client process can take
longer than ``after_s`` to start on a loaded machine, and a path that goes dark before the
handshake tests something else (connection establishment, not A2's mid-transfer loss).
A counting rule (no target) sees the data segments; a thread polls its counter.

``finish`` reports the longest stall the client saw: the longest time without a new
server->client data byte reaching the client on any path (from the paths' pcaps, which
are taken on the client side of the routers), and how much data each path delivered after
the blackhole.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.middleboxes.base import Middlebox
from testbed.model.params import ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node

# A TCP segment with payload: IP + TCP headers with options are at most 120 bytes here.
DATA_MIN_LEN = 121


class Blackhole(Middlebox):
    kind = "blackhole"
    description = ("drops everything forwarded on the path, starting after_s seconds after "
                   "the first data segment crossed it (iptables FORWARD DROP, by a timer)")
    params: ClassVar[dict[str, ParamSpec]] = {
        "after_s": ParamSpec("after_s", float, 0.5,
                             "seconds after the connection's first data segment crossed the "
                             "path before the path goes dark", lo=0.0, hi=600.0),
    }
    requires = frozenset({"iptables", "tshark"})
    # At setup only a counting rule (no target): it tells when data starts to flow.
    template = """\
*filter
-A FORWARD -p tcp -m length --length {{ data_min_len }}:65535
COMMIT
"""
    drop_template = """\
*filter
-I FORWARD 1 -j DROP
COMMIT
"""

    def variables(self, node: Node, net: Network) -> dict[str, int]:
        return {"data_min_len": DATA_MIN_LEN}

    def setup(self, node: Node, net: Network, path: str) -> None:
        super().setup(node, net, path)
        self._drop = self.render_rules(self.context(node, net), self.drop_template)
        self.applied += (f"# inserted {self.values['after_s']}s after the first data "
                         f"segment:\n{self._drop}")

    def on_transfer_start(self) -> None:
        self.started_at = time.time()
        self.later(float(self.values["after_s"]), "blackhole DROP inserted", self._go_dark,
                   after=lambda: self.rule_packets("filter", "FORWARD") > 0)

    def _go_dark(self) -> None:
        self.apply(self._drop)
        self.dark_since = time.time()  # wall clock, to compare with pcap timestamps

    dark_since: float | None = None
    started_at: float | None = None

    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        """The longest stall in delivered bytes, and what each path delivered after the
        blackhole (first delivery of each new sequence number; retransmissions of bytes
        already delivered do not end a stall)."""
        if self.evidence_dir is None:
            return {}
        deliveries: list[tuple[float, str]] = []
        for pcap in sorted(self.evidence_dir.glob("*.pcap")):
            path = pcap.stem
            if path.startswith(("middlebox-", "attack-")):
                continue
            deliveries += [(t, path) for t in _new_data_times(pcap, self.server_address)]
        deliveries.sort()
        report: dict[str, Any] = {"blackholed": self.dark_since is not None}
        outcome = facts.get("outcome") or {}
        if (deliveries and self.started_at is not None and outcome.get("status") != "ok"
                and outcome.get("duration_s")):
            # A transfer that never finished stalled until the client gave up.
            end = self.started_at + float(outcome["duration_s"])
            deliveries.append((max(end, deliveries[-1][0]), "end"))
        if len(deliveries) >= 2:
            longest, at = max((b[0] - a[0], a[0]) for a, b in itertools.pairwise(deliveries))
            report["longest_stall_ms"] = round(longest * 1000)
            if self.dark_since is not None:
                report["stall_starts_after_blackhole_ms"] = round((at - self.dark_since)
                                                                  * 1000)
        if self.dark_since is not None:
            after: dict[str, int] = {}
            for t, path in deliveries:
                if t > self.dark_since and path != "end":
                    after[path] = after.get(path, 0) + 1
            report["data_segments_after_blackhole"] = after
        return report


def _new_data_times(pcap: Path, server: str) -> list[float]:
    """Times at which server->client segments carried sequence numbers not seen before
    on their subflow (tshark ``tcp.seq`` is relative per stream)."""
    res = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y",
                          f"ip.src == {server} && tcp.len > 0", "-T", "fields",
                          "-e", "frame.time_epoch", "-e", "tcp.stream", "-e", "tcp.seq",
                          "-e", "tcp.len"], capture_output=True, text=True, timeout=120,
                         check=False)
    top: dict[str, int] = {}
    times = []
    for line in res.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 4 or not all(parts):
            continue
        when, stream, seq, length = float(parts[0]), parts[1], int(parts[2]), int(parts[3])
        if seq + length > top.get(stream, 0):
            top[stream] = seq + length
            times.append(when)
    return times
