"""The option-stripping middleboxes, for real: ``strip_mp_capable`` with ``mode: remove``
(M2, the option taken out of the handshake and the header shortened) and
``strip_mptcp_after`` (M3, option 30 stripped mid-connection). Verdicts, and the evidence
behind them: counters, the worker's rewrite log, tshark on the client-side pcap and on the
middlebox's upstream pcap (the same segment before and after the middlebox)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from testbed.model.result import TransportResult
from tests.integration.test_middleboxes import counters, run, sh

pytestmark = pytest.mark.root


def segments(pcap: Path, display: str) -> list[dict[str, str]]:
    """tshark fields of the segments matching ``display`` (checksums verified)."""
    fields = ["ip.src", "tcp.srcport", "tcp.seq_raw", "tcp.ack_raw", "tcp.flags", "tcp.hdr_len",
              "tcp.option_kind", "tcp.checksum.status", "tcp.len"]
    out = sh("tshark", "-n", "-r", str(pcap), "-o", "tcp.check_checksum:TRUE", "-Y", display,
             "-T", "fields", *(x for f in fields for x in ("-e", f)))
    rows = []
    for line in out.splitlines():
        values = line.split("\t")
        rows.append(dict(zip(fields, values + [""] * (len(fields) - len(values)),
                             strict=True)))
    return rows


def has30(row: dict[str, str]) -> bool:
    return "30" in row["tcp.option_kind"].split(",")


def log(run_dir: Path, tr: TransportResult, path: str, kind: str, name: str
        ) -> list[dict[str, object]]:
    rel = tr.evidence[f"middlebox.{path}.{kind}"]
    lines = (run_dir / rel).with_name(f"middlebox-{path}-{kind}-{name}").read_text()
    return [json.loads(ln) for ln in lines.splitlines()]


@pytest.mark.parametrize("direction", ["syn", "synack"])
def test_m2_strip_remove(tmp_path: Path, direction: str) -> None:
    transports, run_dir = run(tmp_path, "m2_strip_mp_capable",
                              {"direction": direction, "mode": "remove"})
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
    mptcp, tcp = transports["mptcp"], transports["tcp"]
    assert mptcp.facts["fallback"] is True and mptcp.facts["subflows"] == 1
    c = counters(run_dir, mptcp)
    assert c["client"].get("MPTcpExtMPCapableFallbackSYNACK") == 1
    if direction == "syn":
        assert c["server"].get("MPTcpExtMPCapableSYNRX", 0) == 0
    else:
        assert c["server"].get("MPTcpExtMPCapableSYNRX") == 1
        assert c["server"].get("MPTcpExtMPCapableFallbackACK") == 1
    # The worker's log: exactly one handshake segment rewritten, 4 or 12 bytes shorter.
    rewrites = [r for r in log(run_dir, mptcp, "wifi", "strip_mp_capable", "rewrites.jsonl")
                if r["event"] == "strip"]
    flags = "S" if direction == "syn" else "SA"
    assert [r["flags"] for r in rewrites] == [flags]
    assert rewrites[0]["hdr_len_after"] < rewrites[0]["hdr_len_before"]  # type: ignore[operator]
    assert mptcp.facts["middlebox"]["strip_mp_capable"]["rewrites"] == 1
    # tshark: the same segment (same seq) before the middlebox carries option 30 (the SYN
    # crosses from the client side to upstream, the SYN/ACK the other way) ...
    display = ("tcp.flags.syn == 1 && tcp.flags.ack == "
               + ("0" if direction == "syn" else "1"))
    client_side = segments(run_dir / mptcp.evidence["pcap.wifi"], display)
    upstream = segments(run_dir / mptcp.evidence["middlebox_pcap.wifi.strip_mp_capable"],
                        display)
    assert len(client_side) == 1 and len(upstream) == 1, (client_side, upstream)
    before, after = ((client_side[0], upstream[0]) if direction == "syn"
                     else (upstream[0], client_side[0]))
    assert before["tcp.seq_raw"] == after["tcp.seq_raw"]
    # ... and after it has none, with a shorter header and a valid checksum (status 1:
    # tshark verified the worker's checksum).
    assert has30(before) and not has30(after)
    assert int(after["tcp.hdr_len"]) == rewrites[0]["hdr_len_after"]
    assert int(after["tcp.hdr_len"]) < int(before["tcp.hdr_len"])
    assert after["tcp.checksum.status"] == "1", after
    # The other options survived, in order.
    assert before["tcp.option_kind"].replace(",30", "") == after["tcp.option_kind"]
    # Under TCP the worker saw the segment, found no option 30 and left it alone.
    tcp_log = log(run_dir, tcp, "wifi", "strip_mp_capable", "rewrites.jsonl")
    assert [r for r in tcp_log if r["event"] == "strip"] == []
    assert any(r["event"] == "summary" for r in tcp_log)


def test_strip_teardown_leaves_nothing(tmp_path: Path) -> None:
    """Teardown removes the NFQUEUE rules and stops the workers of both kinds (set up
    side by side in one node: distinct queues), idempotently; a setup that fails after its
    worker started leaves no worker and no rule either."""
    from testbed.errors import RuntimeFailure
    from testbed.middleboxes.strip_after import StripMptcpAfter
    from testbed.middleboxes.strip_mp_capable import StripMpCapable
    from testbed.model.topology import load_topology
    from testbed.runtime.ledger import Ledger
    from testbed.runtime.network import Network

    class Broken(StripMptcpAfter):
        template = StripMptcpAfter.template + "*filter\n-A NO_SUCH_CHAIN -j DROP\nCOMMIT\n"

    def alive(pid: int) -> bool:
        return subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0

    ledger = Ledger.create(state_dir=tmp_path / "state")
    try:
        with Network.up(load_topology("dual_path"), ledger) as net:
            node = net.nodes[net.spec.middlebox_slots["wifi"]]
            boxes = [StripMpCapable("wifi", StripMpCapable.validate(
                         {"mode": "remove", "direction": "both"}, "t", "m")),
                     StripMptcpAfter("wifi", StripMptcpAfter.validate(
                         {"direction": "both"}, "t", "m"))]
            pids = []
            for box in boxes:
                box.evidence_dir = tmp_path
                box.setup(node, net, "wifi")
                assert len(box.running_workers()) == 1 and len(box.remaining_rules()) == 2
                pids += box.running_workers()
            mangle = node.run(["iptables-save", "-t", "mangle"]).stdout
            assert "--queue-num 30" in mangle and "--queue-num 31" in mangle
            for box in boxes:
                box.stop_recording()
                box.teardown()
                assert box.remaining_rules() == [] and box.running_workers() == []
                box.teardown()
            assert "NFQUEUE" not in node.run(["iptables-save", "-t", "mangle"]).stdout
            assert not any(alive(pid) for pid in pids)
            broken = Broken("wifi", Broken.validate({}, "t", "m"))
            broken.evidence_dir = tmp_path / "broken"
            broken.evidence_dir.mkdir()
            with pytest.raises(RuntimeFailure):
                broken.setup(node, net, "wifi")
            pids = broken.running_workers()
            assert len(pids) == 1  # the worker started before the rules failed
            broken.teardown()
            assert broken.remaining_rules() == [] and broken.running_workers() == []
            assert not alive(pids[0])
            assert "NFQUEUE" not in node.run(["iptables-save", "-t", "mangle"]).stdout
    finally:
        ledger.release_all()
        ledger.close()


SERVER = "203.0.113.2"  # the server's address in dual_path (DESIGN §7 core pool)
FALLBACK = ("MPTcpExtDssFallback", "MPTcpExtInfiniteMapTx", "MPTcpExtInfiniteMapRx")


def total(c: dict[str, dict[str, int]], *names: str) -> int:
    return sum(node.get(name, 0) for node in c.values() for name in names)


def tshark_count(pcap: Path, display: str) -> int:
    return len(sh("tshark", "-n", "-r", str(pcap), "-Y", display, "-T", "fields",
                  "-e", "frame.number").split())


def assert_class_matches_evidence(tr: TransportResult, run_dir: Path, bytes_: int) -> str:
    """The middlebox's class is the one the evidence shows, and the verdict follows it."""
    report = tr.facts["middlebox"]["strip_mptcp_after"]
    c = counters(run_dir, tr)
    out = tr.outcome
    assert out is not None
    cls = report["outcome"]
    # The report's evidence is the run's evidence.
    assert report["bytes_received"] == out["bytes_received"]
    assert report["rst_segments"]["wifi"] == tshark_count(run_dir / tr.evidence["pcap.wifi"],
                                                          "tcp.flags.reset == 1")
    for node, values in report["counters"].items():
        for name, value in values.items():
            assert c[node][name] == value
    resets = total(c, "MPTcpExtMPRstTx", "MPTcpExtMPRstRx")
    if cls == "clean_fallback":
        assert out["status"] == "ok" and out["bytes_received"] == bytes_
        assert total(c, *FALLBACK) >= 1 or (out["mptcp"] or {}).get("fallback")
        assert tr.verdict.value == "CONFIRMED", tr.reason
    elif cls == "subflow_reset_continue":
        assert out["status"] == "ok" and out["bytes_received"] == bytes_
        assert resets >= 1 or report["rst_segments"]["wifi"] >= 1
        assert c["server"].get("MPTcpExtMPJoinAckRx") == 1
        assert tr.facts["bytes_per_path"]["cell"] >= 2000
        assert tr.verdict.value == "QUALIFIED", tr.reason
        assert "another subflow" in tr.reason
    elif cls == "stall":
        assert out["status"] == "timeout" and out["bytes_received"] < bytes_
        assert tr.verdict.value == "REFUTED"
    elif cls == "corrupt":
        assert out["status"] in ("tls_error", "checksum_mismatch")
        assert tr.verdict.value == "REFUTED"
    else:
        assert cls == "abort", cls
        assert out["status"] not in ("ok", "timeout", "tls_error", "checksum_mismatch")
        assert tr.verdict.value == "REFUTED"
    return str(cls)


def assert_stripped_on_the_wire(tr: TransportResult, run_dir: Path, direction: str,
                                mode: str) -> None:
    """Before the middlebox every segment of the stripped direction carries option 30;
    after it, the first segment the worker logged has none (matched by seq and ack)."""
    client_side = run_dir / tr.evidence["pcap.wifi"]
    upstream = run_dir / tr.evidence["middlebox_pcap.wifi.strip_mptcp_after"]
    before, after = (upstream, client_side) if direction == "s2c" else (client_side, upstream)
    src = f"ip.src == {SERVER}" if direction == "s2c" else f"ip.dst == {SERVER}"
    # Every segment of the direction (RSTs aside: a plain RST has no option) before the
    # middlebox carries option 30, so each one that lacks it after, lost it there.
    lacking = f"{src} && !(tcp.option_kind == 30) && tcp.flags.reset == 0"
    assert tshark_count(before, lacking) == 0
    assert tshark_count(after, lacking) >= 1
    first = next(r for r in log(run_dir, tr, "wifi", "strip_mptcp_after", "strips.jsonl")
                 if r["event"] == "strip")
    # The same bytes on both sides: a capture may hold a GRO-merged frame where the worker
    # saw the segments (NFQUEUE gets them segmented), so match the frame that contains
    # the logged segment's first byte (and has the same ack).
    def same(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        seq = int(str(first["seq"]))
        return [r for r in rows if r["tcp.ack_raw"] == str(first["ack"])
                and int(r["tcp.seq_raw"]) <= seq < int(r["tcp.seq_raw"])
                + max(int(r["tcp.len"]), 1)]

    rows_before, rows_after = same(segments(before, src)), same(segments(after, src))
    assert rows_before and all(has30(r) for r in rows_before), rows_before
    assert any(not has30(r) for r in rows_after), rows_after
    stripped = [r for r in rows_after if not has30(r)]
    if mode == "nop":  # the header keeps its length, the option's bytes are NOPs
        assert {r["tcp.hdr_len"] for r in stripped} <= {r["tcp.hdr_len"] for r in rows_before}
    else:  # removed: a shorter header, with a checksum tshark verified
        assert int(stripped[0]["tcp.hdr_len"]) == first["hdr_len_after"]
        assert int(stripped[0]["tcp.hdr_len"]) < int(rows_before[0]["tcp.hdr_len"])
        assert stripped[0]["tcp.checksum.status"] == "1", stripped[0]


@pytest.mark.parametrize("subflows, direction, mode", [
    (2, "s2c", "nop"), (1, "s2c", "nop"), (2, "c2s", "nop"), (1, "c2s", "nop"),
    (1, "s2c", "remove")])
def test_m3_strip_after(tmp_path: Path, subflows: int, direction: str, mode: str) -> None:
    bytes_ = 2_000_000
    over: dict[str, object] = {"subflows": subflows, "direction": direction, "mode": mode}
    if direction == "c2s":  # a download sends few bytes client -> server: count segments
        over |= {"after_packets": 40, "after_bytes": 0}
    transports, run_dir = run(tmp_path, "m3_strip_after", over)
    tcp, mptcp = transports["tcp"], transports["mptcp"]
    # TLS/TCP: nothing carries option 30, nothing is stripped, the transfer works.
    assert tcp.verdict.value == "CONFIRMED", (tcp.reason, tcp.checks)
    rep_tcp = tcp.facts["middlebox"]["strip_mptcp_after"]
    assert rep_tcp["outcome"] == "no_mptcp" and rep_tcp["segments_with_option"] == 0
    # TLS/MPTCP: the handshake went through (MPTCP established), then stripping started
    # in the chosen direction only, after the threshold.
    rep = mptcp.facts["middlebox"]["strip_mptcp_after"]
    c = counters(run_dir, mptcp)
    assert c["server"].get("MPTcpExtMPCapableSYNRX") == 1
    assert c["client"].get("MPTcpExtMPCapableFallbackSYNACK", 0) == 0
    assert rep["stripped"] >= 1 and rep[f"stripped_{direction}"] == rep["stripped"]
    start = rep["started"][direction]
    if direction == "s2c":
        assert start["after_payload_bytes"] >= 200_000
    else:
        assert start["after_segments"] == 40
    assert_stripped_on_the_wire(mptcp, run_dir, direction, mode)
    if subflows == 1:
        # Unambiguous: no second subflow, so nothing else could carry the connection.
        assert c["server"].get("MPTcpExtMPJoinSynRx", 0) == 0
        assert mptcp.facts["bytes_per_path"]["cell"] == 0
        assert rep["outcome"] != "subflow_reset_continue"
    else:
        assert c["server"].get("MPTcpExtMPJoinAckRx") == 1
    cls = assert_class_matches_evidence(mptcp, run_dir, bytes_)
    # Every wait is bounded: the client never ran much past its 12 s timeout.
    assert mptcp.timings["client_s"] < 20
    print(f"M3 subflows={subflows} direction={direction} mode={mode}: {cls} -> "
          f"{mptcp.verdict.value}; "
          f"{rep['evidence']}")
