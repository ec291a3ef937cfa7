"""The middlebox playbooks, for real (M1, M2, M2d, A2): verdicts, and the evidence behind
them (counters, the middlebox's own rule counters, tshark on the per-path pcaps); every
run leaves no namespace and no rule behind. Also: teardown removes every rule it added,
is idempotent, and cleans up after a failed setup."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from testbed.errors import RuntimeFailure
from testbed.middleboxes import MIDDLEBOXES, Middlebox
from testbed.middleboxes.strip_mp_capable import StripMpCapable
from testbed.model.playbook import load_playbook
from testbed.model.result import RunResult, TransportResult
from testbed.model.topology import load_topology
from testbed.runtime.ledger import Ledger
from testbed.runtime.network import Network
from testbed.runtime.node import Node
from testbed.runtime.scenario import run_playbooks

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "playbooks"


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


def root_rules() -> str:
    return "\n".join(ln for ln in sh("iptables-save").splitlines() if not ln.startswith("#")) \
        + sh("nft", "list", "ruleset")


def run(tmp_path: Path, name: str, overrides: dict[str, Any] | None = None,
        ) -> tuple[dict[str, TransportResult], Path]:
    before = root_rules()
    pb = load_playbook(PLAYBOOKS / f"{name}.yaml", overrides or {})
    result, run_dir = run_playbooks([pb], results_root=tmp_path)
    assert isinstance(result, RunResult) and result.complete
    tag = "tb" + result.run_id.rsplit("-", 1)[-1]
    # Nothing of the run is left: no namespace, no rule in the root namespace.
    assert not [ns for ns in sh("ip", "netns", "list").split() if ns.startswith(tag)]
    assert root_rules() == before
    return result.scenarios[0].transports, run_dir


def counters(run_dir: Path, tr: TransportResult) -> dict[str, dict[str, int]]:
    data: dict[str, dict[str, int]] = json.loads((run_dir / tr.evidence["counters"]).read_text())
    return data


def mb_report(run_dir: Path, tr: TransportResult, path: str, kind: str) -> str:
    rel = tr.evidence[f"middlebox.{path}.{kind}"]
    assert rel.endswith(f"middlebox-{path}-{kind}.txt")
    return (run_dir / rel).read_text()


def rule_packets(report: str, target: str) -> int:
    """Packet counter of the (single) marked rule with ``target`` in an iptables -L -v -x."""
    hits = [int(m.group(1)) for m in re.finditer(rf"^\s*(\d+)\s+\d+\s+{target}\s.*tb\w+-mb-",
                                                   report, re.M)]
    assert len(hits) == 1, report
    return hits[0]


def syns(pcap: Path) -> list[tuple[str, bool]]:
    """(source address, carries option 30) of each SYN without ACK in the pcap."""
    out = sh("tshark", "-n", "-r", str(pcap), "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0",
             "-T", "fields", "-e", "ip.src", "-e", "tcp.option_kind")
    rows = []
    for line in out.splitlines():
        src, _, kinds = line.partition("\t")
        rows.append((src, "30" in kinds.split(",")))
    return rows


def test_m1_nat(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "m1_nat")
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
    tcp, mptcp = transports["tcp"], transports["mptcp"]
    srv = counters(run_dir, mptcp)["server"]
    # The join through the NAT was accepted by the server: two subflows, data on both.
    assert srv.get("MPTcpExtMPJoinSynRx") == 1 and srv.get("MPTcpExtMPJoinAckRx") == 1
    assert mptcp.facts["bytes_per_path"]["cell"] > 100_000
    assert mptcp.facts["bytes_per_path"]["wifi"] > 100_000
    # The NAT really rewrote the join's subflow: the MASQUERADE rule counted it (nat rules
    # see the first packet of each connection).
    assert rule_packets(mb_report(run_dir, mptcp, "cell", "nat"), "MASQUERADE") >= 1
    # Under TCP the cell path is unused: the NAT rule saw nothing.
    assert rule_packets(mb_report(run_dir, tcp, "cell", "nat"), "MASQUERADE") == 0
    # Before the NAT (the capture is on the client side) the join SYN has the client's
    # own cell address.
    cell_syns = syns(run_dir / mptcp.evidence["pcap.cell"])
    assert len(cell_syns) == 1 and cell_syns[0][0].startswith("100.64.") and cell_syns[0][1]


@pytest.mark.parametrize("direction", ["syn", "synack"])
def test_m2_strip_mp_capable(tmp_path: Path, direction: str) -> None:
    transports, run_dir = run(tmp_path, "m2_strip_mp_capable", {"direction": direction})
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
    mptcp = transports["mptcp"]
    assert mptcp.facts["fallback"] is True and mptcp.facts["subflows"] == 1
    assert mptcp.outcome is not None and mptcp.outcome["status"] == "ok"
    assert mptcp.outcome["mptcp"] and mptcp.outcome["mptcp"].get("fallback")
    c = counters(run_dir, mptcp)
    assert c["client"].get("MPTcpExtMPCapableFallbackSYNACK") == 1
    # The wifi pcap is taken on the access router's client-facing side, before the
    # firewall: the client's SYN still carries option 30 there...
    wifi_syns = syns(run_dir / mptcp.evidence["pcap.wifi"])
    assert wifi_syns and all(has30 for _src, has30 in wifi_syns)
    if direction == "syn":
        # ...but the server never received it.
        assert c["server"].get("MPTcpExtMPCapableSYNRX", 0) == 0
    else:
        # The server accepted MP_CAPABLE, its SYN/ACK lost the option, the third ACK had
        # none: the server fell back too.
        assert c["server"].get("MPTcpExtMPCapableSYNRX") == 1
        assert c["server"].get("MPTcpExtMPCapableFallbackACK") == 1
    assert rule_packets(mb_report(run_dir, mptcp, "wifi", "strip_mp_capable"),
                        "TCPOPTSTRIP") == 1
    # No join was tried on the cell path after the fallback.
    assert syns(run_dir / mptcp.evidence["pcap.cell"]) == []


def test_m2d_drop_mptcp_syn(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "m2d_drop_mptcp_syn")
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
    mptcp = transports["mptcp"]
    c = counters(run_dir, mptcp)
    assert c["client"].get("MPTcpExtMPCapableSYNTXDrop", 0) >= 1
    assert c["client"].get("MPTcpExtBlackhole", 0) >= 1
    assert c["server"].get("MPTcpExtMPCapableSYNRX", 0) == 0
    # SYNs with option 30 (the first and its retransmissions) then a plain one.
    wifi_syns = [has30 for _src, has30 in syns(run_dir / mptcp.evidence["pcap.wifi"])]
    assert len(wifi_syns) >= 2 and all(wifi_syns[:-1]) and not wifi_syns[-1]
    dropped = len(wifi_syns) - 1
    assert f"packets {dropped} " in mb_report(run_dir, mptcp, "wifi", "drop_mptcp_syn")
    # The cost: the retransmission timeouts (1 s + 2 s with the default 2 retries).
    assert mptcp.outcome is not None and mptcp.outcome["handshake_s"] >= 2.5
    tcp = transports["tcp"]
    assert tcp.outcome is not None and tcp.outcome["handshake_s"] < 1.0


def test_a2_blackhole(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "a2_blackhole")
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
    tcp, mptcp = transports["tcp"], transports["mptcp"]
    assert tcp.outcome is not None and tcp.outcome["status"] == "timeout"
    assert tcp.outcome["bytes_received"] < 4_000_000
    assert mptcp.outcome is not None and mptcp.outcome["status"] == "ok"
    assert mptcp.outcome["sha256_received"] == mptcp.outcome["sha256_expected"]
    for tr in (tcp, mptcp):
        report = mb_report(run_dir, tr, "wifi", "blackhole")
        assert "trigger seen" in report and "blackhole DROP inserted: done" in report
        assert rule_packets(report, "DROP") > 0
    # The longest stall in delivered bytes (from the pcaps): TCP's lasts from the
    # blackhole to the client's timeout; MPTCP's is much shorter, and after the blackhole
    # cell kept delivering new data.
    tcp_bh, mptcp_bh = tcp.facts["middlebox"]["blackhole"], mptcp.facts["middlebox"]["blackhole"]
    assert tcp_bh["longest_stall_ms"] >= 5000 > mptcp_bh["longest_stall_ms"]
    assert mptcp_bh["data_segments_after_blackhole"].get("cell", 0) > 100
    assert tcp_bh["data_segments_after_blackhole"].get("cell", 0) == 0
    # The rest of the transfer went over cell, after the blackhole.
    srv = counters(run_dir, mptcp)["server"]
    assert srv.get("MPTcpExtMPJoinAckRx") == 1
    assert mptcp.facts["bytes_per_path"]["cell"] > mptcp.facts["bytes_per_path"]["wifi"]


class BrokenStrip(StripMpCapable):
    """Its second table refers to a chain that does not exist: iptables-restore fails."""

    kind: ClassVar[str] = "broken_strip"
    template: ClassVar[str] = (StripMpCapable.template
                               + "*filter\n-A NO_SUCH_CHAIN -j DROP\nCOMMIT\n")


XTABLES = {f"table ip {t}" for t in ("filter", "nat", "mangle", "raw")}


def offloads(node: Node, net: Network) -> dict[str, str]:
    """``ethtool -k`` of each of the node's planned interfaces."""
    return {i.ifname: node.run(["ethtool", "-k", i.ifname]).stdout
            for i in net.plan.interfaces[node.name]}


def node_rules(node: Node) -> list[str]:
    """Every rule in the node (iptables and nft), and every nft table besides the empty
    built-in ones iptables-nft creates on first use (those stay; their rules go)."""
    ipt = [ln for ln in node.run(["iptables-save"]).stdout.splitlines() if ln.startswith("-")]
    nft = [ln.strip() for ln in node.run(["nft", "list", "ruleset"]).stdout.splitlines()]
    nft_rules = [ln for ln in nft if ln and not ln.startswith(("table ", "chain ", "type ", "}"))]
    tables = [ln for ln in node.run(["nft", "list", "tables"]).stdout.splitlines()
              if ln.strip() not in XTABLES]
    return ipt + nft_rules + tables


def test_teardown_removes_every_rule_and_is_idempotent(tmp_path: Path) -> None:
    ledger = Ledger.create(state_dir=tmp_path / "state")
    try:
        with Network.up(load_topology("dual_path"), ledger) as net:
            for path in ("wifi", "cell"):
                node = net.nodes[net.spec.middlebox_slots[path]]
                clean = node_rules(node)
                clean_offloads = offloads(node, net)
                boxes: list[Middlebox] = []
                for kind, cls in MIDDLEBOXES.items():
                    params = {"after_s": 0.0} if kind == "blackhole" else {}
                    box = cls(path, cls.validate(params, "t", "m"))
                    box.evidence_dir = tmp_path / path
                    box.evidence_dir.mkdir(exist_ok=True)
                    box.setup(node, net, path)
                    box.on_transfer_start()
                    boxes.append(box)
                assert all(b.remaining_rules() for b in boxes)
                assert clean == [] and len(node_rules(node)) >= len(boxes)
                assert offloads(node, net) != clean_offloads  # resegment turned them off
                for box in boxes:
                    box.teardown()
                    assert box.remaining_rules() == [] and box.running_workers() == []
                    box.teardown()  # idempotent
                assert node_rules(node) == clean
                assert offloads(node, net) == clean_offloads
                # A setup that fails half way leaves nothing after teardown either.
                broken = BrokenStrip(path, BrokenStrip.validate({}, "t", "m"))
                broken.evidence_dir = tmp_path / path
                with pytest.raises(RuntimeFailure):
                    broken.setup(node, net, path)
                broken.teardown()
                assert node_rules(node) == clean
                # A blackhole torn down before its trigger (no data crossed the path)
                # never inserts its DROP rule.
                late = MIDDLEBOXES["blackhole"](path, {"after_s": 0.0})
                late.evidence_dir = tmp_path / path
                late.setup(node, net, path)
                late.on_transfer_start()
                time.sleep(0.5)
                assert late.events == [] and late.rule_packets("filter", "FORWARD") == 0
                late.teardown()
                assert node_rules(node) == clean
    finally:
        ledger.release_all()
        ledger.close()


def test_resegment_with_offloads_enabled(tmp_path: Path) -> None:
    """GRO/GSO on in the box and a 1000-byte MSS: still MPTCP on both paths, and the box
    forwards aggregated frames (GSO super-packets) toward the client."""
    transports, run_dir = run(tmp_path, "resegment", {"offload": "enabled", "mss": 1000})
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
    mptcp = transports["mptcp"]
    report = mptcp.facts["middlebox"]["resegment"]
    assert report["syn_mss_upstream"] == 1000 and report["max_payload_client_side"] > 1000
    assert "'gro': 'on'" in mb_report(run_dir, mptcp, "wifi", "resegment")
    assert mptcp.facts["subflows"] == 2 and mptcp.facts["fallback"] is False


def test_resegment(tmp_path: Path) -> None:
    transports, run_dir = run(tmp_path, "resegment")
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
    mptcp = transports["mptcp"]
    assert mptcp.outcome is not None and mptcp.outcome["mptcp"]["subflows"] >= 1
    assert not mptcp.outcome["mptcp"].get("fallback")
    # Independent of the middlebox's own report: the server's SYN/ACK reaches the client
    # with the clamped MSS, and every data segment the client received on Wi-Fi fits it.
    wifi = run_dir / mptcp.evidence["pcap.wifi"]
    synack_mss = sh("tshark", "-n", "-r", str(wifi), "-Y",
                    "tcp.flags.syn == 1 && tcp.flags.ack == 1", "-T", "fields",
                    "-e", "tcp.options.mss_val").split()
    assert synack_mss and set(synack_mss) == {"536"}
    sizes = [int(x) for x in sh("tshark", "-n", "-r", str(wifi), "-Y", "tcp.len > 0 && "
                                "tcp.srcport == 443", "-T", "fields", "-e", "tcp.len").split()]
    assert len(sizes) > 1000 and max(sizes) <= 536
    # The SYN left the box with MSS 536 (upstream pcap) after leaving the client with more,
    # and kept its MP_CAPABLE option: resegmenting is not stripping.
    upstream = run_dir / mptcp.evidence["middlebox_pcap.wifi.resegment"]
    rows = sh("tshark", "-n", "-r", str(upstream), "-Y", "tcp.flags.syn == 1 && "
              "tcp.flags.ack == 0", "-T", "fields", "-e", "tcp.options.mss_val",
              "-e", "tcp.option_kind").splitlines()
    assert rows and all(r.split("\t")[0] == "536" and "30" in r.split("\t")[1].split(",")
                        for r in rows)
    report = mb_report(run_dir, mptcp, "wifi", "resegment")
    assert "'gro': 'off'" in report and rule_packets(report, "TCPMSS") >= 1
