"""A3's plaintext control (``playbooks/a3_join_plain.yaml``): the python app with
``tls: false``. The attacker that learned both keys from its own tap capture joins
(accepted) and injects a DSS-mapped segment toward the server; without TLS, the server
APPLICATION reads the injected bytes as if the client had sent them (the client sends
nothing). Asserted from the server's own log, the attack's report and the counters; the
TLS run of the same attack (a3_join_keys, test_join_attacks.py) aborts with bad_record_mac.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.model.playbook import load_playbook
from testbed.runtime.scenario import run_playbooks

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def test_a3_plaintext_injection_reaches_the_server_app(tmp_path: Path) -> None:
    pb = load_playbook(REPO / "playbooks" / "a3_join_plain.yaml")
    assert pb.app.tls is False and "PLAINTEXT CONTROL" in pb.description
    result, run_dir = run_playbooks([pb], results_root=tmp_path)
    assert result.complete
    tr = result.scenarios[0].transports["mptcp"]
    assert tr.verdict.value == "QUALIFIED", tr.reason
    rep = tr.facts["attack"]["join_with_keys"]
    assert rep["keys_source"] == "the attacker's own tap capture"
    assert rep["accepted"] is True and rep["injected_data_acked"] is True
    assert tr.facts["counters_during_attack"]["server"]["MPTcpExtMPJoinAckRx"] == 1
    # The victim ran without TLS, and says so.
    outcome = tr.outcome
    assert outcome is not None
    assert outcome["tls_version"] is None and outcome["extra"]["plaintext"] is True
    assert outcome["status"] == "ok" and outcome["sha256_received"] == outcome["sha256_expected"]
    # The server application received exactly the injected bytes (the client sent none).
    log = (run_dir / tr.evidence["app_outcome"]).parent / "python-server.log"
    # The server logs each arrival ("received"); the connection itself may never end
    # cleanly: the injection moved the server's data sequence past the client's.
    got = [e for line in log.read_text().splitlines()
           if (e := json.loads(line)).get("event") == "received"]
    assert got and {e["peer"]["port"] for e in got} == {rep["victim_client_port"]}
    victim = got[-1]
    assert victim["plaintext"] is True
    assert victim["received_bytes"] == rep["injected_bytes"] == 64
    assert victim["received_sha256"] == rep["injected_sha256"]
    assert victim["received_head_hex"] == rep["injected_hex"]
    assert rep["victim_server_tls"] == "no_tls"
    assert rep["injected_reached_server_app"] is True
