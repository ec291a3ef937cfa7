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
    fields = ["ip.src", "tcp.srcport", "tcp.seq_raw", "tcp.flags", "tcp.hdr_len",
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


def test_m2_strip_remove_teardown_leaves_nothing(tmp_path: Path) -> None:
    """Teardown removes the NFQUEUE rule and stops the worker (also when set up twice)."""
    from testbed.middleboxes.strip_mp_capable import StripMpCapable
    from testbed.model.topology import load_topology
    from testbed.runtime.ledger import Ledger
    from testbed.runtime.network import Network

    ledger = Ledger.create(state_dir=tmp_path / "state")
    try:
        with Network.up(load_topology("dual_path"), ledger) as net:
            node = net.nodes[net.spec.middlebox_slots["wifi"]]
            box = StripMpCapable("wifi", StripMpCapable.validate(
                {"mode": "remove", "direction": "both"}, "t", "m"))
            box.evidence_dir = tmp_path
            box.setup(node, net, "wifi")
            pids = box.running_workers()
            assert len(pids) == 1 and len(box.remaining_rules()) == 2
            assert "NFQUEUE" in node.run(["iptables-save", "-t", "mangle"]).stdout
            box.stop_recording()
            box.teardown()
            assert box.remaining_rules() == [] and box.running_workers() == []
            assert "NFQUEUE" not in node.run(["iptables-save", "-t", "mangle"]).stdout
            box.teardown()
            with pytest.raises(subprocess.CalledProcessError):
                subprocess.run(["kill", "-0", str(pids[0])], check=True, capture_output=True)
    finally:
        ledger.release_all()
        ledger.close()
