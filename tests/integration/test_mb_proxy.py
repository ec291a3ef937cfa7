"""The proxy middleboxes for real (M4, M4c): verdicts, and the evidence behind them
(counters per node, the client's MPTCP_INFO, the relay's JSON log, tshark on the per-path
pcaps and on the upstream pcap taken on the server side of the box). Every run leaves no
namespace, no rule and no relay process; a relay that cannot start leaves nothing either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import RuntimeFailure
from testbed.middleboxes.proxy import MptcpProxy, TcpProxy
from testbed.model.result import TransportResult
from testbed.model.topology import load_topology
from testbed.runtime.ledger import Ledger
from testbed.runtime.network import Network
from tests.integration.test_middleboxes import (
    counters,
    mb_report,
    node_rules,
    rule_packets,
    run,
    sh,
)

pytestmark = pytest.mark.root

SERVER = "203.0.113.2"


def handshake(pcap: Path) -> list[dict[str, Any]]:
    """SYN, SYN/ACK and RST segments: addresses, flags, TCP options and MPTCP subtype."""
    out = sh("tshark", "-n", "-r", str(pcap), "-Y",
             "tcp.flags.syn == 1 || tcp.flags.reset == 1", "-T", "fields", "-E",
             "separator=/t", "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.flags.syn", "-e",
             "tcp.flags.ack", "-e", "tcp.flags.reset", "-e", "tcp.option_kind", "-e",
             "tcp.options.mptcp.subtype", "-e", "tcp.options.mptcp.rst_reason")
    rows = []
    for line in out.splitlines():
        src, dst, syn, ack, rst, kinds, subtype, reason = (line.split("\t") + [""] * 8)[:8]
        rows.append({"src": src, "dst": dst, "syn": syn in ("1", "True"),
                     "ack": ack in ("1", "True"), "rst": rst in ("1", "True"),
                     "opt30": "30" in kinds.split(","), "subtype": subtype, "reason": reason})
    return rows


def option30_segments(pcap: Path) -> int:
    out = sh("tshark", "-n", "-r", str(pcap), "-Y", "tcp.option_kind == 30", "-T", "fields",
             "-e", "frame.number")
    return len(out.split())


def relay_log(run_dir: Path, tr: TransportResult, path: str, kind: str) -> list[dict[str, Any]]:
    log = run_dir / Path(tr.evidence["counters"]).parent / f"middlebox-{path}-{kind}-relay.jsonl"
    return [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]


def relayed(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if r["event"] == "relayed"]


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (the relay's config names its log)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry))
    return pids


def relay_gone(run_dir: Path, tr: TransportResult, path: str, kind: str) -> None:
    """The relay stopped cleanly at teardown (its last line) and no process is left."""
    log = relay_log(run_dir, tr, path, kind)
    assert log[0]["event"] == "listening" and log[-1] == {"event": "stopped", "open": 0}
    assert processes_mentioning(f"middlebox-{path}-{kind}-relay.jsonl") == []


def test_m4_tcp_proxy_on_the_initial_path(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "m4_tcp_proxy")
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
        relay_gone(run_dir, tr, "wifi", "tcp_proxy")
        assert tr.outcome is not None and tr.outcome["status"] == "ok"
        assert tr.outcome["tls_version"] == "TLSv1.3"
        assert tr.outcome["sha256_received"] == tr.outcome["sha256_expected"]
        # The relay carried this connection: the client's address, the original
        # destination from conntrack, every byte of the transfer.
        (conn,) = relayed(relay_log(run_dir, tr, "wifi", "tcp_proxy"))
        client = tr.outcome["extra"]["local"]
        assert conn["client"] == f"{client['addr']}:{client['port']}"
        assert conn["original_dst"] == f"{SERVER}:443"
        assert conn["original_dst_method"] == "SO_ORIGINAL_DST"
        assert conn["bytes_server_to_client"] > 2_000_000 > conn["bytes_client_to_server"] > 0
        assert conn["close_reason"] == "eof both ways"
        # Upstream, the server saw the proxy's own plain SYN, from the slot node's address.
        upstream = handshake(run_dir / tr.evidence["middlebox_pcap.wifi.tcp_proxy"])
        up_syn = [r for r in upstream if r["syn"] and not r["ack"]]
        proxy_addr = conn["upstream_local"].split(":")[0]
        assert [(r["src"], r["dst"], r["opt30"]) for r in up_syn] == [
            (proxy_addr, SERVER, False)]
        assert proxy_addr != client["addr"] and proxy_addr.startswith("198.51.100.")
        assert option30_segments(run_dir / tr.evidence["middlebox_pcap.wifi.tcp_proxy"]) == 0
        assert counters(run_dir, tr)["server"].get("MPTcpExtMPCapableSYNRX", 0) == 0
    mptcp = transports["mptcp"]
    assert mptcp.outcome is not None and mptcp.outcome["mptcp"]["fallback"] is True
    c = counters(run_dir, mptcp)
    assert c["client"].get("MPTcpExtMPCapableFallbackSYNACK") == 1
    # Client side of the box: the client's SYN carries option 30, the SYN/ACK (from the
    # relay's plain listener, in the server's name) does not.
    wifi = handshake(run_dir / mptcp.evidence["pcap.wifi"])
    syn = [r for r in wifi if r["syn"] and not r["ack"]]
    synack = [r for r in wifi if r["syn"] and r["ack"]]
    assert [(r["dst"], r["opt30"]) for r in syn] == [(SERVER, True)]
    assert [(r["src"], r["opt30"]) for r in synack] == [(SERVER, False)]
    # After the fallback no join was tried.
    assert handshake(run_dir / mptcp.evidence["pcap.cell"]) == []
    assert rule_packets(mb_report(run_dir, mptcp, "wifi", "tcp_proxy"), "REDIRECT") == 1


def test_m4_tcp_proxy_on_the_second_path(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "m4_tcp_proxy_cell")
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
        relay_gone(run_dir, tr, "cell", "tcp_proxy")
        # The relay never got a connection to relay (TCP: nothing on cell; MPTCP: the join
        # was reset while still embryonic).
        assert relayed(relay_log(run_dir, tr, "cell", "tcp_proxy")) == []
    tcp, mptcp = transports["tcp"], transports["mptcp"]
    assert rule_packets(mb_report(run_dir, tcp, "cell", "tcp_proxy"), "REDIRECT") == 0
    assert rule_packets(mb_report(run_dir, mptcp, "cell", "tcp_proxy"), "REDIRECT") == 1
    # MPTCP was negotiated end to end over wifi and stayed there.
    assert mptcp.outcome is not None and mptcp.outcome["status"] == "ok"
    assert mptcp.outcome["mptcp"]["fallback"] is False
    assert mptcp.outcome["mptcp"]["subflows_total"] == 1
    c = counters(run_dir, mptcp)
    assert c["server"].get("MPTcpExtMPCapableSYNRX") == 1
    assert c["server"].get("MPTcpExtMPJoinSynRx", 0) == 0
    assert c["client"].get("MPTcpExtMPJoinSynTx") == 1
    assert c["client"].get("MPTcpExtMPJoinSynAckRx", 0) == 0
    assert mptcp.facts["bytes_per_path"]["cell"] == 0
    # On cell: the join SYN (MP_JOIN, subtype 1), the relay's SYN/ACK without option 30,
    # then the client's reset with MP_TCPRST (subtype 8), reason 1 (MPTCP-specific error).
    cell = handshake(run_dir / mptcp.evidence["pcap.cell"])
    assert [(r["syn"], r["ack"], r["rst"], r["opt30"], r["subtype"]) for r in cell] == [
        (True, False, False, True, "1"), (True, True, False, False, ""),
        (False, True, True, True, "8")]
    assert cell[2]["reason"] in ("1", "0x01")
    assert option30_segments(run_dir / mptcp.evidence["middlebox_pcap.cell.tcp_proxy"]) == 0


def test_m4c_mptcp_proxy_on_core(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "m4c_mptcp_proxy")
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
        relay_gone(run_dir, tr, "core", "mptcp_proxy")
        assert tr.outcome is not None and tr.outcome["status"] == "ok"
        assert tr.outcome["tls_version"] == "TLSv1.3"
        assert tr.outcome["sha256_received"] == tr.outcome["sha256_expected"]
        # Server side: the relay's plain TCP, from core's server-facing address.
        up_pcap = run_dir / tr.evidence["middlebox_pcap.core.mptcp_proxy"]
        (conn,) = relayed(relay_log(run_dir, tr, "core", "mptcp_proxy"))
        proxy_addr = conn["upstream_local"].split(":")[0]
        up_syn = [r for r in handshake(up_pcap) if r["syn"] and not r["ack"]]
        assert [(r["src"], r["dst"], r["opt30"]) for r in up_syn] == [
            (proxy_addr, SERVER, False)]
        assert proxy_addr.startswith("203.0.113.") and option30_segments(up_pcap) == 0
        assert counters(run_dir, tr)["server"].get("MPTcpExtMPCapableSYNRX", 0) == 0
        assert conn["original_dst"] == f"{SERVER}:443"
        assert conn["bytes_server_to_client"] > 4_000_000
    tcp, mptcp = transports["tcp"], transports["mptcp"]
    # Plain TCP accepted by the MPTCP listener is a fallback socket: conntrack's
    # SO_ORIGINAL_DST answers. An MPTCP socket refuses it: the configured origin is used.
    (tconn,) = relayed(relay_log(run_dir, tcp, "core", "mptcp_proxy"))
    assert tconn["original_dst_method"] == "SO_ORIGINAL_DST" and tconn["client_side_fallback"]
    (mconn,) = relayed(relay_log(run_dir, mptcp, "core", "mptcp_proxy"))
    assert mconn["original_dst_method"] == "configured"
    assert mconn["original_dst_error"] in ("ENOTSUP", "EOPNOTSUPP")
    assert rule_packets(mb_report(run_dir, tcp, "core", "mptcp_proxy"), "REDIRECT") == 1
    # Both the initial SYN and the join SYN were redirected at core...
    assert rule_packets(mb_report(run_dir, mptcp, "core", "mptcp_proxy"), "REDIRECT") == 2
    # ...and ended in the same MPTCP connection at the proxy: its two subflows end on
    # core's wifi-side and cell-side addresses, from the client's two addresses.
    pairs = mconn["client_subflow_addrs"]
    assert sorted(p["remote"]["addr"][:7] for p in pairs) == ["100.64.", "198.51."]
    assert len({p["local"]["addr"] for p in pairs}) == 2
    assert all(p["local"]["port"] == 15002 for p in pairs)
    assert mconn["client_subflows_max"] == 2 and mconn["client_side_fallback"] is False
    # The client's own view: MPTCP, two subflows, data on both paths.
    info = mptcp.outcome["mptcp"] if mptcp.outcome else {}
    assert info["fallback"] is False and info["subflows_total"] == 2
    assert mptcp.facts["bytes_per_path"]["wifi"] > 100_000
    assert mptcp.facts["bytes_per_path"]["cell"] > 100_000
    c = counters(run_dir, mptcp)
    assert c["core"].get("MPTcpExtMPJoinSynRx") == 1 and c["core"].get("MPTcpExtMPJoinAckRx") == 1
    # On the client side of the box: MP_CAPABLE on wifi and MP_JOIN on cell, both answered
    # with option 30 (by the proxy, in the server's name).
    for pcap, subtype in (("pcap.wifi", "0"), ("pcap.cell", "1")):
        rows = [r for r in handshake(run_dir / mptcp.evidence[pcap]) if r["syn"]]
        assert [(r["ack"], r["opt30"], r["subtype"]) for r in rows] == [
            (False, True, subtype), (True, True, subtype)], pcap


def test_m4c_mptcp_proxy_where_one_path_does_not_pass(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "m4c_mptcp_proxy_wifi")
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
        relay_gone(run_dir, tr, "wifi", "mptcp_proxy")
        assert tr.outcome is not None and tr.outcome["status"] == "ok"
        assert tr.outcome["sha256_received"] == tr.outcome["sha256_expected"]
    mptcp = transports["mptcp"]
    (conn,) = relayed(relay_log(run_dir, mptcp, "wifi", "mptcp_proxy"))
    assert conn["client_subflows_max"] == 1 and conn["client_side_fallback"] is False
    assert mptcp.outcome is not None and mptcp.outcome["mptcp"]["subflows_total"] == 1
    c = counters(run_dir, mptcp)
    assert c["server"].get("MPTcpExtMPJoinNoTokenFound") == 1
    assert c["wifi_ap"].get("MPTcpExtMPCapableSYNRX") == 1
    # On cell: the join SYN went to the server, which answered with a reset (MP_TCPRST,
    # reason 1); no SYN/ACK.
    cell = handshake(run_dir / mptcp.evidence["pcap.cell"])
    assert [(r["src"], r["syn"], r["rst"], r["subtype"]) for r in cell] == [
        (cell[0]["src"], True, False, "1"), (SERVER, False, True, "8")]
    assert cell[0]["src"].startswith("100.64.") and cell[1]["reason"] in ("1", "0x01")
    assert mptcp.facts["bytes_per_path"]["cell"] == 0


def test_a_relay_that_cannot_start_leaves_nothing(tmp_path: Path) -> None:
    ledger = Ledger.create(state_dir=tmp_path / "state")
    try:
        with Network.up(load_topology("dual_path"), ledger) as net:
            for path, cls, other in (("wifi", TcpProxy, MptcpProxy),
                                     ("core", MptcpProxy, TcpProxy)):
                node = net.nodes[net.spec.middlebox_slots[path]]
                clean = node_rules(node)
                # The other kind holds this kind's default relay port.
                port = cls.params["listen_port"].default
                first = other(path, other.validate({"listen_port": port}, "t", "m"))
                first.evidence_dir = tmp_path / f"{path}-1"
                first.evidence_dir.mkdir()
                first.setup(node, net, path)
                assert first.remaining_rules() and first.running_workers()
                # This relay cannot bind: setup fails before any rule went in (workers
                # start first), teardown is still safe, and the first relay is untouched.
                second = cls(path, cls.validate({}, "t", "m"))
                second.evidence_dir = tmp_path / f"{path}-2"
                second.evidence_dir.mkdir()
                with pytest.raises(RuntimeFailure, match="exited"):
                    second.setup(node, net, path)
                assert second.remaining_rules() == []
                second.teardown()
                assert second.remaining_rules() == [] and second.running_workers() == []
                assert first.remaining_rules() and first.running_workers()
                workers = first.running_workers()
                first.teardown()
                first.teardown()  # idempotent
                assert first.remaining_rules() == [] and first.running_workers() == []
                assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
                assert node_rules(node) == clean
                log = first.relay_log()
                assert log[0]["event"] == "listening" and log[-1]["event"] == "stopped"
    finally:
        ledger.release_all()
        ledger.close()
