"""The data-plane attacks for real (claims P3, P4, O1, A1): each playbook is run on real
namespaces with real kernel MPTCP, and the outcome is asserted from the evidence itself
(application outcome, counter deltas, pcaps read again with tshark), with the control
cases that prove each attack tool works.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from testbed.model.playbook import load_playbook
from testbed.model.result import TransportResult
from testbed.runtime.scenario import run_playbooks

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
MARKER = "TB-INJECTED-BY-ATTACKER|"


def run(name: str, tmp_path: Path) -> tuple[dict[str, TransportResult], Path]:
    pb = load_playbook(REPO / "playbooks" / f"{name}.yaml", {})
    result, run_dir = run_playbooks([pb], results_root=tmp_path)
    assert result.complete
    transports = result.scenarios[0].transports
    assert set(transports) == {"tcp", "mptcp"}
    for transport, tr in transports.items():
        assert tr.verdict.value == "CONFIRMED", (name, transport, tr.reason, tr.checks)
    return transports, run_dir


def tshark_count(pcap: Path, display_filter: str, opts: tuple[str, ...] = ()) -> int:
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), *opts, "-Y", display_filter,
                          "-T", "fields", "-e", "frame.number"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return len(out.split())


def report(tr: TransportResult, kind: str) -> dict[str, Any]:
    return tr.facts["attack"][kind]


def test_p3_server_address_on_both_paths_only_under_mptcp(tmp_path: Path) -> None:
    transports, run_dir = run("p3_metadata", tmp_path)
    for transport, tr in transports.items():
        server = tr.facts["attack"]["passive"]["addresses_seen"]
        assert tr.outcome is not None and tr.outcome["status"] == "ok"
        cell_pcap = run_dir / tr.evidence["attack.passive[1].attack-tap_cell-capture.pcap"]
        wifi_pcap = run_dir / tr.evidence["attack.passive.attack-tap_wifi-capture.pcap"]
        server_addr = next(a for a in server if a.startswith("203.0.113."))
        assert tshark_count(wifi_pcap, f"ip.addr == {server_addr}") > 0
        on_cell = tshark_count(cell_pcap, f"ip.addr == {server_addr}")
        joins = tshark_count(cell_pcap, "tcp.flags.syn == 1 && tcp.options.mptcp.subtype == 1")
        if transport == "tcp":
            assert on_cell == 0 and joins == 0
        else:
            assert on_cell > 0 and joins >= 1
            assert tr.facts["server_address_seen_on"] == ["cell", "wifi"]


def test_p4_private_key_fails_keylog_decrypts(tmp_path: Path) -> None:
    transports, run_dir = run("p4_decrypt", tmp_path)
    for transport, tr in transports.items():
        rep = report(tr, "decrypt_later")
        pcap = run_dir / tr.evidence["attack.decrypt_later.attack-tap_wifi-capture.pcap"]
        assert rep["tls13"] and rep["server_key_type"].startswith("EC")
        # Read the capture again, independently of the attack's own parsing.
        key = rep["server_key"]
        assert tshark_count(pcap, "tls.handshake.type == 11 || tls.record.content_type == 23",
                            ("-o", f'uat:rsa_keys:"{key}",""')) == 0
        keylog = (run_dir / tr.evidence["attack.decrypt_later"]).parent / rep["keylog"]
        assert tshark_count(pcap, "tls.handshake.type == 11",
                            ("-o", f"tls.keylog_file:{keylog}")) >= 1
        if transport == "tcp":
            assert tshark_count(pcap, "tls.record.content_type == 23",
                                ("-o", f"tls.keylog_file:{keylog}")) >= 1
            assert rep["keylog_plaintext_is_payload"] is True


def test_o1_guessed_sequence_numbers_are_dropped(tmp_path: Path) -> None:
    transports, run_dir = run("o1_inject", tmp_path)
    for transport, tr in transports.items():
        rep = report(tr, "tcp_inject")
        assert tr.outcome is not None and tr.outcome["status"] == "ok"
        assert tr.outcome["checksum_match"]
        # The forged segments crossed the client's access link while the connection was
        # open...
        wifi = run_dir / tr.evidence["pcap.wifi"]
        forged = tshark_count(wifi, f'tcp.payload contains "{MARKER}"')
        assert forged == rep["forged_on_link"] >= rep["forged_before_close"] >= 300
        # ...and the client's TCP dropped each one: beyond its window, or "old" (answered
        # with a D-SACK duplicate ACK); challenge ACKs are for RST/SYN and do not move.
        during = tr.facts["counters_during_attack"]["client"]
        drops = (during.get("TcpExtBeyondWindow", 0) + during.get("TcpExtTCPDSACKOldSent", 0)
                 + during.get("TcpExtPAWSEstab", 0))
        assert drops >= 0.95 * rep["forged_before_close"], (transport, during, rep)
        assert during.get("TcpExtBeyondWindow", 0) >= 50, during
        assert during.get("TcpExtTCPDSACKOldSent", 0) >= 50, during
        assert rep["expected_accepted"] < 1e-3
        assert rep["marker_in_received"] is False
        assert rep["received_is_payload_prefix"] is True


def test_o1_control_with_oracle_sequence_numbers_corrupts(tmp_path: Path) -> None:
    transports, run_dir = run("o1_inject_ctl", tmp_path)
    for transport, tr in transports.items():
        rep = report(tr, "tcp_inject")
        outcome = tr.outcome
        assert outcome is not None
        wifi = run_dir / tr.evidence["pcap.wifi"]
        assert tshark_count(wifi, f'tcp.payload contains "{MARKER}"') >= 1
        assert rep["marker_in_received"] is False
        assert rep["received_is_payload_prefix"] is True
        client = tr.facts["counters"]["client"]
        if transport == "tcp" or rep["victim_effect"] == "connection_aborted":
            assert outcome["status"] == "tls_error"
            assert "BAD_RECORD_MAC" in (outcome["error"] or "")
        if transport == "mptcp":
            # Inside a DSS mapping: TLS abort and MP_FASTCLOSE; outside: the subflow is
            # reset (MP_RST) and the transfer completes over the other subflow.
            assert rep["victim_effect"] in ("connection_aborted", "subflow_reset")
            assert client.get("MPTcpExtMPFastcloseTx", 0) + client.get("MPTcpExtMPRstTx", 0) >= 1
            if rep["victim_effect"] == "subflow_reset":
                assert outcome["status"] == "ok"


def test_a1_tamper_aborts_tls_under_both_transports(tmp_path: Path) -> None:
    transports, run_dir = run("a1_tamper", tmp_path)
    for transport, tr in transports.items():
        rep = report(tr, "tls_tamper")
        outcome = tr.outcome
        assert outcome is not None and outcome["status"] == "tls_error"
        assert "BAD_RECORD_MAC" in (outcome["error"] or "")
        assert outcome["bytes_received"] < outcome["bytes_expected"]
        event = rep["tampered"][0]
        assert rep["tampered_segments"] == 1
        assert event["before"] != event["after"]
        assert event["mptcp_option"] is (transport == "mptcp")
        assert rep["seen_on_path"] is True
        assert rep["received_is_payload_prefix"] is True
        log = run_dir / tr.evidence["attack.tls_tamper.attack-onpath_wifi-tampered.jsonl"]
        assert json.loads(log.read_text().splitlines()[0])["seq"] == event["seq"]
