"""The baseline playbook, for real: every app kind, both transports, real kernel MPTCP.

Asserts the evidence itself (counters, per-path pcaps decoded by tshark, the application's
checksum), not only the verdict the runner derived from it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from testbed.model.playbook import load_playbook
from testbed.runtime.scenario import run_playbooks

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "playbooks" / "baseline.yaml"


def tshark_sni(pcap: Path) -> set[str]:
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", "tls.handshake.type == 1",
                          "-T", "fields", "-e", "tls.handshake.extensions_server_name"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def tshark_payload_bytes(pcap: Path) -> int:
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-T", "fields", "-e", "tcp.len"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return sum(int(x) for x in out.split() if x.isdigit())


@pytest.mark.parametrize("app", ["python", "openssl", "nginx-curl"])
def test_baseline(app: str, tmp_path: Path) -> None:
    pb = load_playbook(BASELINE, {"app": app, "bytes": 3_000_000})
    result, run_dir = run_playbooks([pb], results_root=tmp_path)
    assert result.complete
    assert not (run_dir / "INCOMPLETE").exists()
    stored = json.loads((run_dir / "result.json").read_text())
    assert stored["schema"] == "testbed.result/1"
    assert stored["environment"]["kernel"]
    transports = result.scenarios[0].transports
    assert set(transports) == {"tcp", "mptcp"}

    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (transport, tr.reason, tr.checks)
        outcome = tr.outcome
        assert outcome is not None
        assert outcome["status"] == "ok"
        assert outcome["tls_version"] == "TLSv1.3"
        assert outcome["sha256_received"] == outcome["sha256_expected"]
        assert outcome["bytes_received"] == 3_000_000

        counters = json.loads((run_dir / tr.evidence["counters"]).read_text())
        server = counters["server"]
        wifi = run_dir / tr.evidence["pcap.wifi"]
        cell = run_dir / tr.evidence["pcap.cell"]
        # The SNI crossed the initial path only, as tshark decodes it from the pcaps.
        assert tshark_sni(wifi) == {"www.example.test"}
        assert tshark_sni(cell) == set()
        wifi_bytes, cell_bytes = tshark_payload_bytes(wifi), tshark_payload_bytes(cell)
        if transport == "tcp":
            assert server.get("MPTcpExtMPCapableSYNRX", 0) == 0
            assert wifi_bytes >= 3_000_000
            assert cell_bytes == 0
        else:
            assert server.get("MPTcpExtMPCapableSYNRX", 0) == 1
            assert server.get("MPTcpExtMPJoinAckRx", 0) == 1  # two subflows
            assert wifi_bytes > 100_000 and cell_bytes > 100_000  # both paths carried data
            assert wifi_bytes + cell_bytes >= 3_000_000
            assert tr.facts["keys_seen_on"] == ["wifi"]
        if app == "python" and transport == "mptcp":
            assert outcome["mptcp"] and not outcome["mptcp"].get("fallback")


def test_netem_scenario_is_inconclusive_without_netem(tmp_path: Path) -> None:
    from testbed.runtime import doctor

    report = doctor.probe()
    pb_text = BASELINE.read_text().replace(
        "params: {wifi_rate_mbit: 50, cell_rate_mbit: 50}",
        "params: {wifi_rate_mbit: 50, cell_rate_mbit: 50, cell_delay_ms: 40}")
    path = tmp_path / "delayed.yaml"
    path.write_text(pb_text)
    pb = load_playbook(path)
    assert "netem" in pb.topology.requirements
    result, _ = run_playbooks([pb], results_root=tmp_path / "results", transports=("mptcp",))
    tr = result.scenarios[0].transports["mptcp"]
    if "netem" in report.capabilities():
        assert tr.verdict.value != "INCONCLUSIVE", tr.reason
    else:
        assert tr.verdict.value == "INCONCLUSIVE"
        assert "netem" in tr.reason and "netem" in tr.missing
