"""The payload_rewrite middlebox for real (M5): an ALG on the Wi-Fi path rewrites the 30th
server->client data segment. Asserted from evidence, not from the report alone: the
worker's JSON log, tshark on the upstream pcap (server side of the box: the original
bytes) and on the Wi-Fi pcap (client side: the changed bytes, the shifted sequence numbers
of the later segments), the client's outcome and the bytes it wrote to disk, the counters
of both ends. Every run leaves no namespace, no rule and no worker process; a worker that
cannot bind its queue leaves nothing either."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import RuntimeFailure
from testbed.middleboxes.payload_rewrite import QUEUE_NUM, PayloadRewrite
from testbed.model.result import TransportResult
from testbed.model.topology import load_topology
from testbed.model.wire import payload_pattern
from testbed.runtime.ledger import Ledger
from testbed.runtime.network import Network
from testbed.runtime.worker import REPO_ROOT, read_line, worker_env
from tests.integration.test_mb_proxy import processes_mentioning
from tests.integration.test_middleboxes import counters, node_rules, run, sh

pytestmark = pytest.mark.root

KIND = "payload_rewrite"
APP_BYTES = 1_000_000


def evidence(run_dir: Path, tr: TransportResult, suffix: str) -> Path:
    return run_dir / Path(tr.evidence["counters"]).parent / f"middlebox-wifi-{KIND}-{suffix}"


def rewrites(run_dir: Path, tr: TransportResult) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The worker's log: the rewrites, and the summary it wrote when stopped."""
    lines = [json.loads(ln) for ln in evidence(run_dir, tr, "rewrites.jsonl").read_text()
             .splitlines() if ln.strip()]
    assert lines and "summary" in lines[-1], lines[-3:]
    return [e for e in lines if "seq" in e], lines[-1]


def server_data(pcap: Path, ev: dict[str, Any]) -> list[tuple[int, bytes]]:
    """(raw seq, payload) of the server's data segments of the rewritten connection."""
    out = sh("tshark", "-n", "-r", str(pcap), "-Y",
             f"ip.dst == {ev['client']} && tcp.dstport == {ev['client_port']} && tcp.len > 0",
             "-T", "fields", "-e", "tcp.seq_raw", "-e", "tcp.payload")
    rows = []
    for line in out.splitlines():
        seq, _, data = line.partition("\t")
        rows.append((int(seq), bytes.fromhex(data.replace(":", ""))))
    return rows


def holds(segments: list[tuple[int, bytes]], pos: int, want: bytes) -> bool:
    """Some segment carries ``want`` at sequence number ``pos`` (GRO may merge segments in
    the upstream capture, so look inside)."""
    for seq, data in segments:
        at = (pos - seq) % (1 << 32)
        if at + len(want) <= len(data) and data[at:at + len(want)] == want:
            return True
    return False


def check_wire(run_dir: Path, tr: TransportResult, delta: int) -> dict[str, Any]:
    """The rewrite as the two pcaps show it; returns the first rewrite of the log."""
    events, summary = rewrites(run_dir, tr)
    first = [e for e in events if not e["retransmission"]]
    assert len(first) == 1 and first[0]["data_segment"] == 30, events
    ev = first[0]
    assert ev["segment_delta"] == delta and ev["new_len"] == ev["len"] + delta
    before = server_data(evidence(run_dir, tr, "upstream.pcap"), ev)
    after = server_data(run_dir / tr.evidence["pcap.wifi"], ev)
    old_window = bytes.fromhex(ev["window_before"])
    new_window = bytes.fromhex(ev["window_after"])
    assert old_window != new_window
    # Server side of the box: the original bytes at the original position.
    assert holds(before, (ev["seq"] + ev["window_offset"]) % (1 << 32), old_window)
    assert not holds(before, (ev["seq"] + ev["window_offset"]) % (1 << 32), new_window)
    # Client side: the changed bytes, never the original ones, at the new position.
    assert holds(after, (ev["new_seq"] + ev["window_offset"]) % (1 << 32), new_window)
    assert not holds(after, (ev["new_seq"] + ev["window_offset"]) % (1 << 32), old_window)
    if delta:
        # Every later server segment the client side saw sits delta bytes off the
        # position of the same bytes before the box; at its own position the bytes differ.
        end = (ev["new_seq"] + ev["new_len"]) % (1 << 32)
        later = [(s, d) for s, d in after if 0 <= (s - end) % (1 << 32) < 1 << 30][:50]
        assert len(later) >= 5
        for seq, data in later:
            assert holds(before, (seq - delta) % (1 << 32), data[:64])
            assert not holds(before, seq, data[:64])
        assert summary["summary"]["seq_shifted"] >= len(later)
        assert summary["summary"]["ack_shifted"] >= 1
    else:
        assert summary["summary"]["seq_shifted"] == 0
    return ev


def check_clean(tmp_path: Path) -> None:
    """No rewriter process of this test is left (its config names the run directory)."""
    for pid in processes_mentioning(str(tmp_path)):
        with contextlib.suppress(OSError):
            assert b"_rewrite_worker" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def received(run_dir: Path, tr: TransportResult) -> bytes:
    return (run_dir / Path(tr.evidence["counters"]).parent / "python-received.bin").read_bytes()


def expected_payload() -> bytes:
    period = payload_pattern(APP_BYTES)
    return (period * (APP_BYTES // len(period) + 1))[:APP_BYTES]


@pytest.mark.parametrize("mode,delta", [("same_length", 0), ("insert", 4)])
def test_m5_tls_detects_the_rewrite(tmp_path: Path, mode: str, delta: int) -> None:
    transports, run_dir = run(tmp_path, "m5_rewrite", {"mode": mode})
    check_clean(tmp_path)
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
        assert tr.outcome is not None and tr.outcome["status"] == "tls_error"
        assert "bad record mac" in tr.outcome["error"]
        check_wire(run_dir, tr, delta)
        # Nothing forged reached the application: what it wrote is a clean prefix.
        got = received(run_dir, tr)
        assert len(got) < APP_BYTES and expected_payload().startswith(got)
    c = counters(run_dir, transports["mptcp"])
    assert c["client"].get("MPTcpExtDataCsumErr", 0) == 0  # the checksum is off here
    # Only a length change can break the DSS mapping (the client may then reset the Wi-Fi
    # subflow, if the TLS abort does not close the connection first: a race).
    if delta == 0:
        assert c["client"].get("MPTcpExtDSSCorruptionReset", 0) == 0


@pytest.mark.parametrize("mode,delta,checksum", [("same_length", 0, 0), ("insert", 4, 0),
                                                 ("delete", -4, 1)])
def test_m5_plaintext_control(tmp_path: Path, mode: str, delta: int, checksum: int) -> None:
    transports, run_dir = run(tmp_path, "m5_rewrite_plain", {"mode": mode,
                                                             "checksum": checksum})
    check_clean(tmp_path)
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
        assert tr.outcome is not None and tr.outcome["extra"].get("plaintext") is True
        assert tr.outcome["tls_version"] is None
        check_wire(run_dir, tr, delta)
    want = expected_payload()
    # TCP: the client read the rewritten stream: the payload with exactly this change.
    tcp = transports["tcp"]
    ev = rewrites(run_dir, tcp)[0][0]
    got = received(run_dir, tcp)
    assert len(got) == APP_BYTES + delta and tcp.outcome["status"] == "checksum_mismatch"
    at = next(i for i in range(len(want)) if got[i] != want[i])
    old, new = bytes.fromhex(ev["before"]), bytes.fromhex(ev["after"])
    assert got[at:at + len(new)] == new and want[at:at + len(old)] == old
    assert got[at + len(new):] == want[at + len(old):]
    assert counters(run_dir, tcp)["client"].get("MPTcpExtDataCsumErr", 0) == 0
    mptcp = transports["mptcp"]
    c = counters(run_dir, mptcp)
    got = received(run_dir, mptcp)
    assert len(got) == APP_BYTES  # MPTCP's data level keeps the length
    if checksum:
        # Detected: DataCsumErr, MP_FAIL, the Wi-Fi subflow reset; the data came again
        # over cellular: the application read the exact payload.
        assert got == want and mptcp.outcome["status"] == "ok"
        assert c["client"]["MPTcpExtDataCsumErr"] >= 1 and c["client"]["MPTcpExtMPFailTx"] >= 1
        assert c["server"]["MPTcpExtMPFailRx"] >= 1 and c["client"]["MPTcpExtMPRstTx"] >= 1
        fails = sh("tshark", "-n", "-r", str(run_dir / mptcp.evidence["pcap.wifi"]), "-Y",
                   "tcp.options.mptcp.subtype == 6", "-T", "fields", "-e", "ip.src")
        assert "198.51.100.1" in fails.split()  # the client's MP_FAIL crossed Wi-Fi
    else:
        assert got != want and mptcp.outcome["status"] == "checksum_mismatch"
        assert c["client"].get("MPTcpExtDataCsumErr", 0) == 0
        assert c["client"].get("MPTcpExtMPFailTx", 0) == 0
        if delta == 0:  # silent, exactly as TCP: the same four bytes changed
            diff = [i for i in range(len(want)) if got[i] != want[i]]
            assert len(diff) == len(ev["after"]) // 2
        else:
            assert c["client"]["MPTcpExtDSSCorruptionReset"] >= 1


def test_m5_single_subflow_stalls_after_mp_fail(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "m5_rewrite_1sf")
    check_clean(tmp_path)
    assert transports["tcp"].verdict.value == "CONFIRMED"
    mptcp = transports["mptcp"]
    assert mptcp.verdict.value == "QUALIFIED", (mptcp.reason, mptcp.checks)
    check_wire(run_dir, mptcp, 0)
    assert mptcp.facts["subflows"] == 1
    assert mptcp.outcome is not None and mptcp.outcome["status"] == "timeout"
    assert mptcp.outcome["bytes_received"] < APP_BYTES
    c = counters(run_dir, mptcp)
    assert c["client"]["MPTcpExtDataCsumErr"] >= 1 and c["client"]["MPTcpExtMPFailTx"] >= 1
    assert c["server"]["MPTcpExtInfiniteMapTx"] >= 1
    # The stall on the wire: no server data in the last half of the client's wait.
    pcap = run_dir / mptcp.evidence["pcap.wifi"]
    times = sh("tshark", "-n", "-r", str(pcap), "-Y", "ip.src == 203.0.113.2 && tcp.len > 0",
               "-T", "fields", "-e", "frame.time_relative").split()
    assert times and float(times[-1]) < 4.0


def test_teardown_and_a_worker_that_cannot_bind(tmp_path: Path) -> None:
    ledger = Ledger.create(state_dir=tmp_path / "state")
    try:
        with Network.up(load_topology("dual_path"), ledger) as net:
            node = net.nodes[net.spec.middlebox_slots["wifi"]]
            clean = node_rules(node)
            box = PayloadRewrite("wifi", PayloadRewrite.validate({"mode": "insert"}, "t", "m"))
            box.evidence_dir = tmp_path / "ok"
            box.evidence_dir.mkdir()
            box.setup(node, net, "wifi")
            assert len(box.remaining_rules()) == 2 and box.running_workers()
            assert f"--queue-num {QUEUE_NUM} --queue-bypass" in "\n".join(node_rules(node))
            workers = box.running_workers()
            box.teardown()
            box.teardown()  # idempotent
            assert box.remaining_rules() == [] and box.running_workers() == []
            assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
            assert node_rules(node) == clean
            # Stopped by SIGTERM, the worker wrote its summary.
            assert "summary" in box.log.read_text()
            # Another process holds the queue: the worker cannot bind and exits; setup
            # fails before the rules go in (workers start first); teardown is still safe.
            holder = node.popen([sys.executable, "-c",
                                 "import time; from testbed.runtime.nfqueue import Queue; "
                                 f"q = Queue({QUEUE_NUM}); print('ready', flush=True); "
                                 "time.sleep(60)"], label="queue holder",
                                stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                env=worker_env())
            try:
                assert read_line(holder, 15, "queue holder") == "ready"
                bad = PayloadRewrite("wifi", PayloadRewrite.validate({}, "t", "m"))
                bad.evidence_dir = tmp_path / "bad"
                bad.evidence_dir.mkdir()
                with pytest.raises(RuntimeFailure, match="exited"):
                    bad.setup(node, net, "wifi")
                assert bad.remaining_rules() == []
                bad.teardown()
                assert bad.remaining_rules() == [] and bad.running_workers() == []
                assert node_rules(node) == clean
                # The kernel refused the bind (EPERM: the queue belongs to another socket).
                assert "nfqueue config failed" in bad.evidence("rewriter.log").read_text()
            finally:
                node.stop(holder)
    finally:
        ledger.release_all()
        ledger.close()
