"""Evidence recorders on real namespaces: a capture, the MPTCP event monitor, counter
snapshots and socket sampling around a short MPTCP transfer between two nodes.

Needs root, kernel MPTCP, mnexec, tcpdump, tshark, iproute2 (missing tools fail the test).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mininet.link import Link

from testbed.errors import RuntimeFailure
from testbed.model.counters import diff, mptcp
from testbed.runtime.evidence import Capture, MptcpMonitor, SsSampler, snapshot_counters
from testbed.runtime.ledger import NETNS_DIR, Ledger, is_alive, proc_start_time
from testbed.runtime.node import Node
from testbed.runtime.observer import summarize_pcap

pytestmark = pytest.mark.root

CLIENT_ADDR = "198.51.100.1"
SERVER_ADDR = "198.51.100.2"
PORT = 5201
NBYTES = 300_000

SERVER_CODE = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SERVER_ADDR}", {PORT}))
s.listen(1)
s.settimeout(20)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(20)
n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    n += len(d)
c.sendall(str(n).encode())
c.close()
print("received", n, flush=True)
"""

CLIENT_CODE = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
s.settimeout(20)
s.connect(("{SERVER_ADDR}", {PORT}))
time.sleep(0.4)  # let the sampler see the established connection
chunk = b"x" * 10000
for _ in range({NBYTES} // 10000):
    s.sendall(chunk)
    time.sleep(0.01)
s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode(), flush=True)
s.close()
"""


@dataclass
class Pair:
    ledger: Ledger
    client: Node
    server: Node
    out: Path


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    ledger = Ledger.create(state_dir=tmp_path / "state")
    nodes: list[Node] = []
    try:
        client = Node("cli", "client", ledger)
        nodes.append(client)
        server = Node("srv", "server", ledger)
        nodes.append(server)
        for node in nodes:
            node.sysctl(net__ipv6__conf__all__disable_ipv6=1,
                        net__ipv6__conf__default__disable_ipv6=1, net__mptcp__enabled=1)
        Link(client.mn, server.mn, intfName1="eth0", intfName2="eth0")
        for node, addr in ((client, CLIENT_ADDR), (server, SERVER_ADDR)):
            node.run(["ip", "addr", "add", f"{addr}/30", "dev", "eth0"])
            node.run(["ip", "link", "set", "eth0", "up"])
            node.run(["ip", "link", "set", "lo", "up"])
            node.run(["ip", "mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "2"])
        yield Pair(ledger, client, server, tmp_path / "evidence")
    finally:
        for node in nodes:
            node.terminate()
        ledger.release_all()
        ledger.close()
        assert not [ns for ns in NETNS_DIR.glob(f"{ledger.tag}-*")], "namespace left behind"


def _wait_for(path: Path, text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} after {timeout_s}s: "
                         f"{path.read_text() if path.exists() else '(missing)'}")


def test_evidence_around_an_mptcp_transfer(pair: Pair) -> None:
    out = pair.out
    out.mkdir(parents=True)
    before = {"cli": snapshot_counters(pair.client), "srv": snapshot_counters(pair.server)}
    assert "MPTcpExtMPCapableSYNRX" in before["srv"] and "TcpActiveOpens" in before["cli"]

    pcap = out / "path1.pcap"
    cap = Capture.start(pair.client, "eth0", pcap, "capture path1")
    mon = MptcpMonitor.start(pair.server, out / "mptcp-monitor.txt")
    started = [(p.pid, proc_start_time(p.pid)) for p in (cap.proc, mon.proc)]
    server_log = out / "server.log"
    with server_log.open("wb") as log:
        server = pair.server.popen([sys.executable, "-c", SERVER_CODE], label="test server",
                                   stdout=log, stderr=log)
    _wait_for(server_log, "ready")
    sampler = SsSampler.start(pair.client, interval_ms=50)
    try:
        res = pair.client.run([sys.executable, "-c", CLIENT_CODE], timeout=30)
    finally:
        samples = sampler.stop()
    sampler.write(out / "ss-client.json")
    assert res.stdout.strip() == str(NBYTES)
    _wait_for(server_log, f"received {NBYTES}")
    pair.server.stop(server)
    time.sleep(0.3)  # the last FIN/ACKs and CLOSED events
    cap.stop()
    cap.stop()  # harmless
    mon.stop()
    mon.stop()
    for pid, start in started:
        assert not is_alive(pid, start)
    after = {"cli": snapshot_counters(pair.client), "srv": snapshot_counters(pair.server)}

    # counters: the MPTCP handshake is seen by the server's namespace only
    srv_delta = diff(before["srv"], after["srv"])
    cli_delta = diff(before["cli"], after["cli"])
    assert mptcp(srv_delta).get("MPTcpExtMPCapableSYNRX") == 1
    assert "MPTcpExtMPCapableSYNRX" not in cli_delta
    assert cli_delta.get("TcpActiveOpens") == 1 and srv_delta.get("TcpPassiveOpens") == 1

    # capture: tcpdump flushed on SIGTERM, tshark decodes MP_CAPABLE and both keys
    assert cap.stats.get("captured", 0) > 0
    assert (out / "path1.pcap.log").read_text().count("listening on") == 1
    summary = summarize_pcap(pcap, sni="", server_addresses=[SERVER_ADDR],
                             total_app_bytes=NBYTES)
    assert summary["packets"] == cap.stats["captured"]
    assert summary["mptcp"]["mp_capable_syn"] == 1
    assert summary["mptcp"]["mp_capable"] >= 3
    assert len(summary["mptcp"]["keys"]) == 2
    assert summary["syn_destinations"] == [SERVER_ADDR]
    assert summary["payload_bytes"]["to_server"] >= NBYTES
    json.dumps(summary)

    # monitor: the server's connection was created and established, with the token that an
    # observer of the handshake derives from the server's key
    events = mon.events()
    kinds = [e["event"] for e in events]
    assert "CREATED" in kinds and "ESTABLISHED" in kinds, kinds
    established = next(e for e in events if e["event"] == "ESTABLISHED")
    assert established["token"] in summary["mptcp"]["derived_tokens"].values()
    assert established["daddr4"] == CLIENT_ADDR

    # ss samples: the MPTCP socket and its TCP subflow, while the transfer ran
    assert samples and all("error" not in s for s in samples)
    socks = [sock for s in samples for sock in s["sockets"]]
    assert any(sk["netid"] == "mptcp" and sk["peer"] == f"{SERVER_ADDR}:{PORT}"
               for sk in socks)
    assert any(sk["netid"] == "tcp" and "tcp-ulp-mptcp" in sk["info"] for sk in socks)
    written = json.loads((out / "ss-client.json").read_text())
    assert len(written["samples"]) == len(samples)


def test_capture_on_missing_interface_fails_with_tcpdump_message(pair: Pair) -> None:
    with pytest.raises(RuntimeFailure, match="tcpdump on nosuch0 exited"):
        Capture.start(pair.client, "nosuch0", pair.out / "x.pcap", "bad capture")
    assert not pair.ledger.data.processes or all(
        p.label != "bad capture" for p in pair.ledger.data.processes)


def test_sampler_is_bounded(pair: Pair) -> None:
    sampler = SsSampler.start(pair.client, interval_ms=10, max_samples=3)
    time.sleep(0.5)
    samples = sampler.stop()
    assert len(samples) == 3
    assert sampler.skipped > 0
    assert sampler.stop() == samples  # stopping twice is harmless
