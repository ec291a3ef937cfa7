"""The MPTCP join attacks against the real kernel: O2, O3, H1 and A3 playbooks, each run
through the scenario runner, asserted from the evidence itself (server/client counter
deltas, the server's ``ip mptcp monitor`` events, the application's outcome and log, the
testbed's and the attacker's pcaps), not only from the verdict.

Controls that make the refusals meaningful: ``join_with_keys`` is ACCEPTED with the same
join builder (so O3/H1 fail on the HMAC, not on a malformed packet), the stolen token gets
a SYN/ACK (so O2's resets are about the token), and ``add_addr_forged`` with a valid HMAC
is acted upon by the client (so the ignored invalid one reached it). The codec is also
checked against the HMACs the kernel itself put in the victim's join.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.model import mptcp
from testbed.model.playbook import load_playbook
from testbed.model.result import TransportResult
from testbed.runtime.mptcp_pcap import capable_handshakes, join_handshakes, read_segments
from testbed.runtime.scenario import run_playbooks

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = ("o2_join_guess", "o3_join_stolen", "h1_join_half", "a3_join_keys",
             "a3_add_addr", "a3_add_addr_bad")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TransportResult, Path]]:
    root = tmp_path_factory.mktemp("join-attacks")
    pbs = [load_playbook(REPO / "playbooks" / f"{name}.yaml") for name in PLAYBOOKS]
    result, run_dir = run_playbooks(pbs, results_root=root)
    assert result.complete
    return {s.playbook: (s.transports["mptcp"], run_dir) for s in result.scenarios}


def evidence(run: tuple[TransportResult, Path], label: str) -> Path:
    tr, run_dir = run
    return run_dir / tr.evidence[label]


def during(run: tuple[TransportResult, Path], node: str) -> dict[str, int]:
    counters: dict[str, int] = run[0].facts["counters_during_attack"][node]
    return counters


def report(run: tuple[TransportResult, Path], kind: str) -> dict[str, Any]:
    rep: dict[str, Any] = run[0].facts["attack"][kind]
    return rep


def monitor_subflows(run: tuple[TransportResult, Path], address: str) -> list[str]:
    text = evidence(run, "mptcp_monitor.server").read_text()
    return [line for line in text.splitlines()
            if "SF_ESTABLISHED" in line and f"daddr4={address} " in line]


def victim_intact(run: tuple[TransportResult, Path]) -> None:
    outcome = run[0].outcome
    assert outcome is not None
    assert outcome["status"] == "ok", outcome
    assert outcome["sha256_received"] == outcome["sha256_expected"]
    assert outcome["mptcp"]["subflows"] >= 1


def test_o2_guessed_tokens_are_all_reset(runs: dict[str, Any]) -> None:
    run = runs["o2_join_guess"]
    tr = run[0]
    assert tr.verdict.value == "CONFIRMED", tr.reason
    rep = report(run, "join_guessed_token")
    attempts = rep["attempts"]
    # Every guess: one NoTokenFound at the server, one reset (MP_TCPRST) back to the attacker.
    assert during(run, "server")["MPTcpExtMPJoinNoTokenFound"] == attempts
    assert during(run, "server").get("MPTcpExtMPJoinAckRx", 0) == 0
    assert rep["resets"] == attempts and rep["reset_reasons"] == {"0x01": attempts}
    assert rep["synacks"] == 0 and rep["hit_tokens"] == []
    # Sent with rawsend (sendmmsg batches, patched in place); every reset matched to its
    # guess by (source port, sequence).
    assert rep["sender"].startswith("testbed.runtime.rawsend")
    assert rep["answers_unmatched"] == 0
    assert rep["rate_per_s"] > 1000
    assert rep["expected_time_to_hit_s"] == pytest.approx(
        2**32 / rep["live_connections"] / rep["rate_per_s"], rel=0.01)
    victim_intact(run)
    assert not monitor_subflows(run, rep["attacker_address"])


@pytest.mark.parametrize(("playbook", "kind", "strategy"), [
    ("o3_join_stolen", "join_stolen_token", "guessed_keys"),
    ("h1_join_half", "join_half_on_path", "reflect")])
def test_right_token_without_keys_is_refused(runs: dict[str, Any], playbook: str, kind: str,
                                             strategy: str) -> None:
    run = runs[playbook]
    tr = run[0]
    assert tr.verdict.value == "CONFIRMED", tr.reason
    rep = report(run, kind)
    # Control: the token is live (the server answered with a SYN/ACK, not a reset) ...
    assert rep["synack"] is True and len(rep["synack_hmac"]) == 16
    assert rep["token_source"].startswith("oracle:")
    # ... and the wrong third-ACK HMAC is what the server refused.
    assert rep["hmac_strategy"] == strategy
    assert rep["refused"] is True and rep["refused_at"] == "third_ack"
    assert rep["mp_tcprst"] is True
    server = during(run, "server")
    assert server["MPTcpExtMPJoinSynRx"] == 1
    assert server["MPTcpExtMPJoinAckHMacFailure"] == 1
    assert server.get("MPTcpExtMPJoinAckRx", 0) == 0
    assert not monitor_subflows(run, rep["attacker_address"])
    if strategy == "reflect":
        # All the half-on-path attacker had: the SYN/ACK's truncated HMAC and nonce.
        assert rep["ack_hmac"].startswith(rep["synack_hmac"] * 2)
    victim_intact(run)


def test_a3_join_with_captured_keys_is_accepted(runs: dict[str, Any]) -> None:
    run = runs["a3_join_keys"]
    tr = run[0]
    assert tr.verdict.value == "QUALIFIED", tr.reason
    assert "never saw the initial handshake" in tr.reason
    rep = report(run, "join_with_keys")
    assert rep["keys_source"] == "the attacker's own tap capture"
    # The keys came from the attacker's own capture, which holds the MP_CAPABLE handshake.
    tap = read_segments(evidence(run, "attack.join_with_keys.attack-tap_wifi-capture.pcap"))
    (hs,) = [h for h in capable_handshakes(tap) if h.dport == 443]
    assert (f"{hs.client_key:016x}", f"{hs.server_key:016x}") == \
        (rep["client_key"], rep["server_key"])
    assert rep["token"] == f"{mptcp.token(hs.server_key):08x}"
    # The kernel's SYN/ACK HMAC verifies with the learned keys; the subflow is accepted.
    assert rep["synack_hmac_valid"] is True and rep["accepted"] is True
    assert during(run, "server")["MPTcpExtMPJoinAckRx"] == 1
    assert during(run, "server").get("MPTcpExtMPJoinAckHMacFailure", 0) == 0
    assert len(monitor_subflows(run, rep["attacker_address"])) == 1
    # The injected bytes entered the byte stream (data-ACKed) and TLS aborted on them.
    assert rep["injected_data_acked"] is True
    assert rep["victim_server_tls"] == "bad_record_mac"
    log = (run[1] / tr.evidence["app_outcome"]).parent / "python-server.log"
    assert "BAD_RECORD_MAC" in log.read_text()


def test_a3_forged_add_addr(runs: dict[str, Any]) -> None:
    valid, invalid = runs["a3_add_addr"], runs["a3_add_addr_bad"]
    assert valid[0].verdict.value == "CONFIRMED", valid[0].reason
    assert invalid[0].verdict.value == "CONFIRMED", invalid[0].reason
    good, bad = report(valid, "add_addr_forged"), report(invalid, "add_addr_forged")
    # Control: built and injected the same way, the valid one is taken by the client ...
    assert during(valid, "client")["MPTcpExtAddAddr"] >= 1
    assert good["join_syns_to_attacker"] >= 1 and good["join_token_is_servers"] is True
    # ... and the testbed's own capture of the path shows the client's join SYN to it.
    wifi = read_segments(evidence(valid, "pcap.wifi"))
    lured = [s for s in wifi if s.flags == "S" and s.dst == good["announced"]
             and s.first(mptcp.MpJoinSyn) is not None]
    assert lured
    # The invalid one moves nothing and lures nothing.
    client = during(invalid, "client")
    for counter in ("MPTcpExtAddAddr", "MPTcpExtEchoAdd", "MPTcpExtMPJoinSynTx"):
        assert client.get(counter, 0) == 0, counter
    assert bad["join_syns_to_attacker"] == 0
    wifi = read_segments(evidence(invalid, "pcap.wifi"))
    assert not [s for s in wifi if s.syn and s.dst == bad["announced"]]
    assert any(s.first(mptcp.AddAddr) is not None for s in wifi), "the forgery crossed"
    victim_intact(invalid)


def test_codec_equals_the_kernels_join_hmacs(runs: dict[str, Any]) -> None:
    """The victim's own second subflow in each run: the SYN/ACK truncated HMAC and the
    third-ACK HMAC the kernel sent equal the codec's, from the keys on the wifi path and
    the nonces on the cell path."""
    checked = 0
    for run in runs.values():
        caps = capable_handshakes(read_segments(evidence(run, "pcap.wifi")))
        joins = join_handshakes(read_segments(evidence(run, "pcap.cell")))
        (cap,) = caps
        for join in joins:
            assert join.token == mptcp.token(cap.server_key)
            assert join.server_nonce is not None and join.synack_hmac is not None
            assert join.synack_hmac == mptcp.join_synack_hmac(
                cap.server_key, cap.client_key, join.server_nonce, join.client_nonce)
            assert join.ack_hmac == mptcp.join_ack_hmac(
                cap.client_key, cap.server_key, join.client_nonce, join.server_nonce)
            checked += 1
    assert checked >= len(PLAYBOOKS)


def test_reports_are_json_files(runs: dict[str, Any]) -> None:
    for run in runs.values():
        tr = run[0]
        for label, rel in tr.evidence.items():
            if label.startswith("attack.") and rel.endswith(".json"):
                json.loads((run[1] / rel).read_text())
