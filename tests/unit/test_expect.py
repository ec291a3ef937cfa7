"""Expectations against measured facts, verdicts from checks, facts derived from evidence,
and the result schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.model.expect import Check, Expectation, evaluate, parse_expectations
from testbed.model.facts import MIN_PATH_BYTES, derive_facts
from testbed.model.result import (
    SCHEMA,
    RunResult,
    ScenarioResult,
    TransportResult,
    Verdict,
    verdict_from_checks,
)
from testbed.model.topology import load_topology

TOPO = load_topology("dual_path")


def expectations(**data: Any) -> list[Expectation]:
    return parse_expectations(data, "t.yaml", "expect.mptcp", TOPO)


def check_map(exps: list[Expectation], facts: dict[str, Any]) -> dict[str, bool]:
    return {c.label: c.ok for c in evaluate(exps, facts)}


# --- evaluate ----------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "measured", "ok"), [
    (2, 2, True), (2, 1, False), ("==2", 2, True), ("!=1", 2, True), ("!=1", 1, False),
    (">=2", 2, True), (">=2", 3, True), (">=2", 1, False), ("<=1", 1, True), ("<=1", 2, False),
    (">1", 2, True), (">1", 1, False), ("<2", 1, True), ("<2", 2, False), ("== -1", -1, True),
])
def test_comparisons(spec: Any, measured: int, ok: bool) -> None:
    assert check_map(expectations(subflows=spec), {"subflows": measured}) == {"subflows": ok}


@pytest.mark.parametrize("measured", [None, "2", 2.0, [2]])
def test_comparison_needs_an_integer_measurement(measured: Any) -> None:
    assert check_map(expectations(subflows=2), {"subflows": measured}) == {"subflows": False}


def test_missing_fact_fails() -> None:
    checks = evaluate(expectations(subflows=1, status="ok", fallback=False), {})
    assert [(c.label, c.measured, c.ok) for c in checks] == [
        ("subflows", None, False), ("status", None, False), ("fallback", None, False)]


def test_path_lists_are_order_insensitive() -> None:
    exps = expectations(paths_with_data=["wifi", "cell"], sni_seen_on=["wifi"],
                        keys_seen_on=[])
    facts = {"paths_with_data": ["cell", "wifi"], "sni_seen_on": ["wifi"], "keys_seen_on": []}
    assert all(check_map(exps, facts).values())
    facts["paths_with_data"] = ["wifi", "cell"]
    assert all(check_map(exps, facts).values())
    facts["paths_with_data"] = ["wifi"]
    assert check_map(exps, facts)["paths_with_data"] is False
    facts["paths_with_data"] = ["wifi", "cell", "core"]
    assert check_map(exps, facts)["paths_with_data"] is False
    facts["paths_with_data"] = "wifi,cell"
    assert check_map(exps, facts)["paths_with_data"] is False


def test_duplicate_paths_in_expectation_collapse() -> None:
    exps = expectations(paths_with_data=["wifi", "wifi"])
    assert exps[0].expected == ["wifi"]
    assert check_map(exps, {"paths_with_data": ["wifi"]}) == {"paths_with_data": True}


def test_counters_default_to_zero_when_absent() -> None:
    exps = expectations(counters={"server": {"MPTcpExtMPCapableSYNRX": 0,
                                             "MPTcpExtMPJoinAckRx": ">=1"}})
    labels = ["counters.server.MPTcpExtMPCapableSYNRX", "counters.server.MPTcpExtMPJoinAckRx"]
    # No counters at all, no counters for the node, counters without these names.
    for facts in ({}, {"counters": {}}, {"counters": {"client": {"MPTcpExtMPJoinAckRx": 5}}},
                  {"counters": {"server": {"TcpExtTCPSackRecovery": 3}}}):
        checks = evaluate(exps, facts)
        assert [(c.label, c.measured, c.ok) for c in checks] == [
            (labels[0], 0, True), (labels[1], 0, False)]
    checks = evaluate(exps, {"counters": {"server": {"MPTcpExtMPJoinAckRx": 2}}})
    assert [c.ok for c in checks] == [True, True]


def test_scalar_expectations() -> None:
    exps = expectations(status="ok", checksum_match=True, tls_version="TLSv1.3",
                        fallback=False)
    good = {"status": "ok", "checksum_match": True, "tls_version": "TLSv1.3",
            "fallback": False}
    assert all(check_map(exps, good).values())
    bad = {"status": "tls_error", "checksum_match": False, "tls_version": "TLSv1.2",
           "fallback": True}
    assert not any(check_map(exps, bad).values())
    assert check_map(expectations(fallback=False), {"fallback": None}) == {"fallback": False}


def test_check_records_expected_and_measured() -> None:
    (check,) = evaluate(expectations(subflows=">=2"), {"subflows": 1})
    assert check == Check("subflows", ">= 2", 1, False)
    assert check.to_json() == {"check": "subflows", "expected": ">= 2", "measured": 1,
                               "ok": False}
    (check,) = evaluate(expectations(paths_with_data=["wifi", "cell"]),
                        {"paths_with_data": ["wifi"]})
    assert check.expected == "[cell, wifi]"
    (check,) = evaluate(expectations(status="ok"), {"status": "ok"})
    assert check.expected == "'ok'"


# --- verdicts ----------------------------------------------------------------------------

def test_verdict_confirmed() -> None:
    checks = evaluate(expectations(subflows=2, status="ok"), {"subflows": 2, "status": "ok"})
    verdict, reason = verdict_from_checks(checks)
    assert verdict is Verdict.CONFIRMED
    assert reason == "all 2 expectations measured to hold"


def test_verdict_refuted_names_failed_checks() -> None:
    exps = expectations(status="ok", subflows=2,
                        counters={"server": {"MPTcpExtMPJoinAckRx": 1}})
    checks = evaluate(exps, {"status": "ok", "subflows": 1})
    verdict, reason = verdict_from_checks(checks)
    assert verdict is Verdict.REFUTED
    assert "subflows: expected == 2, measured 1" in reason
    assert "counters.server.MPTcpExtMPJoinAckRx: expected == 1, measured 0" in reason
    assert "status" not in reason


def test_verdict_inconclusive_without_expectations() -> None:
    verdict, reason = verdict_from_checks([])
    assert verdict is Verdict.INCONCLUSIVE
    assert "no expectation" in reason


# --- facts -------------------------------------------------------------------------------

OUTCOME = {"status": "ok", "sha256_expected": "ab" * 32, "sha256_received": "ab" * 32,
           "tls_version": "TLSv1.3", "mptcp": None}


def facts(transport: str, server: dict[str, int] | None = None,
          observers: dict[str, dict[str, Any]] | None = None, app_bytes: int = 1_000_000,
          outcome: dict[str, Any] | None = None, **nodes: dict[str, int]) -> dict[str, Any]:
    counters = {"server": server or {}, **nodes}
    return derive_facts(transport=transport, outcome=outcome or OUTCOME, counters=counters,
                        observers=observers or {}, server="server", app_bytes=app_bytes)


def test_tcp_has_one_subflow_and_no_fallback() -> None:
    f = facts("tcp", server={"MPTcpExtMPCapableSYNRX": 1, "MPTcpExtMPJoinAckRx": 1})
    assert f["subflows"] == 1 and f["fallback"] is False
    assert f["status"] == "ok" and f["checksum_match"] is True and f["tls_version"] == "TLSv1.3"


def test_mptcp_with_handshake_and_join_has_two_subflows() -> None:
    f = facts("mptcp", server={"MPTcpExtMPCapableSYNRX": 1, "MPTcpExtMPJoinAckRx": 1})
    assert f["subflows"] == 2 and f["fallback"] is False
    assert f["fallback_counters"] == {}


def test_mptcp_without_mp_capable_syn_is_fallback() -> None:
    f = facts("mptcp", server={"MPTcpExtMPJoinAckRx": 1})
    assert f["fallback"] is True and f["subflows"] == 1
    assert facts("mptcp")["fallback"] is True


def test_mptcp_fallback_counters_on_any_node() -> None:
    f = facts("mptcp", server={"MPTcpExtMPCapableSYNRX": 1, "MPTcpExtMPJoinAckRx": 1},
              client={"MPTcpExtMPCapableFallbackACK": 1, "MPTcpExtDssFallback": 0})
    assert f["fallback"] is True and f["subflows"] == 1
    assert f["fallback_counters"] == {"MPTcpExtMPCapableFallbackACK": 1}


def test_mptcp_fallback_reported_by_the_socket() -> None:
    outcome = dict(OUTCOME, mptcp={"fallback": True})
    f = facts("mptcp", server={"MPTcpExtMPCapableSYNRX": 1}, outcome=outcome)
    assert f["fallback"] is True


def test_client_view_beside_the_end_to_end_view() -> None:
    """Behind an MPTCP-to-TCP converter the server saw plain TCP (end to end: fallback,
    one subflow) while the client's MPTCP_INFO shows MPTCP with two subflows."""
    from testbed.model.matrix import describe_facts

    outcome = dict(OUTCOME, mptcp={"fallback": False, "subflows_total": 2})
    f = facts("mptcp", server={}, outcome=outcome)
    assert (f["subflows"], f["fallback"]) == (1, True)
    assert (f["client_subflows"], f["client_fallback"]) == (2, False)
    assert "1 subflow, fell back to TCP end to end, while the client's MPTCP_INFO shows " \
           "MPTCP with 2 subflows created" in describe_facts(f, "mptcp")
    # Views that agree say nothing more; no MPTCP_INFO (other apps, TCP) gives None.
    same = facts("mptcp", server={"MPTcpExtMPCapableSYNRX": 1, "MPTcpExtMPJoinAckRx": 1},
                 outcome=outcome)
    assert "client" not in describe_facts(same, "mptcp")
    assert facts("mptcp")["client_subflows"] is None
    assert facts("tcp", outcome=outcome)["client_fallback"] is None


def test_checksum_mismatch() -> None:
    f = facts("tcp", outcome=dict(OUTCOME, sha256_received="cd" * 32))
    assert f["checksum_match"] is False


def test_paths_with_data_threshold() -> None:
    observers = {
        "wifi": {"payload_bytes": {"c2s": 1000, "s2c": 900_000}},
        "cell": {"payload_bytes": {"s2c": 9_999}},  # just under 1 % of 1 MB
        "core": {"payload_bytes": {"s2c": 10_000}},  # exactly 1 %
        "idle": {"payload_bytes": {}},
        "none": {},
    }
    f = facts("mptcp", observers=observers, app_bytes=1_000_000)
    assert f["paths_with_data"] == ["core", "wifi"]
    assert f["bytes_per_path"] == {"wifi": 901_000, "cell": 9_999, "core": 10_000, "idle": 0,
                                   "none": 0}
    # Small transfers: the floor is MIN_PATH_BYTES, so handshakes alone never count.
    small = {"wifi": {"payload_bytes": {"s2c": MIN_PATH_BYTES}},
             "cell": {"payload_bytes": {"s2c": MIN_PATH_BYTES - 1}}}
    assert facts("mptcp", observers=small, app_bytes=10)["paths_with_data"] == ["wifi"]


def test_observer_facts() -> None:
    observers = {
        "wifi": {"sni": {"status": "full"}, "mptcp": {"keys": ["k1"]},
                 "server_addresses_seen": ["203.0.113.2"]},
        "cell": {"sni": {"status": "partial"}, "mptcp": {"keys": []},
                 "server_addresses_seen": []},
        "core": {"sni": None, "mptcp": None},
    }
    f = facts("mptcp", observers=observers)
    assert f["sni_seen_on"] == ["wifi"] and f["sni_partial_on"] == ["cell"]
    assert f["keys_seen_on"] == ["wifi"] and f["server_address_seen_on"] == ["wifi"]


def test_facts_feed_the_baseline_expectations() -> None:
    exps = expectations(subflows=2, fallback=False, paths_with_data=["wifi", "cell"],
                        counters={"server": {"MPTcpExtMPCapableSYNRX": 1,
                                             "MPTcpExtMPJoinAckRx": 1}})
    observers = {"wifi": {"payload_bytes": {"s2c": 600_000}},
                 "cell": {"payload_bytes": {"s2c": 400_000}}}
    f = facts("mptcp", server={"MPTcpExtMPCapableSYNRX": 1, "MPTcpExtMPJoinAckRx": 1},
              observers=observers)
    assert verdict_from_checks(evaluate(exps, f))[0] is Verdict.CONFIRMED


# --- result schema -----------------------------------------------------------------------

def run_result() -> RunResult:
    checks = evaluate(expectations(subflows=2), {"subflows": 1})
    scenario = ScenarioResult(
        playbook="baseline", file="playbooks/baseline.yaml", sha256="0" * 64, claim="P1",
        description="d", params={"app": "python"}, repetition=1,
        transports={
            "tcp": TransportResult("tcp", Verdict.CONFIRMED, "all 1 expectations hold"),
            "mptcp": TransportResult("mptcp", Verdict.REFUTED, "a | b", checks=checks,
                                     facts={"subflows": 1},
                                     evidence={"pcap.wifi": "mptcp/wifi.pcap"}),
        })
    return RunResult(run_id="r1", started="2026-01-01T00:00:00Z", scenarios=[scenario])


def test_run_result_json_schema() -> None:
    data = run_result().to_json()
    assert data["schema"] == SCHEMA == "testbed.result/1"
    assert data["run_id"] == "r1" and data["complete"] is False and data["finished"] is None
    (scenario,) = data["scenarios"]
    assert set(scenario["transports"]) == {"tcp", "mptcp"}
    mptcp = scenario["transports"]["mptcp"]
    assert mptcp["verdict"] == "REFUTED"
    assert mptcp["checks"] == [{"check": "subflows", "expected": "== 2", "measured": 1,
                                "ok": False}]
    assert json.loads(json.dumps(data)) == data  # plain JSON, nothing Python-specific


def test_summary_has_a_row_per_transport() -> None:
    result = run_result()
    md = result.summary_md()
    rows = [line for line in md.splitlines() if line.startswith("| baseline")]
    assert len(rows) == 2
    assert "| tcp | CONFIRMED |" in rows[0] and "| mptcp | REFUTED |" in rows[1]
    assert "a \\| b" in rows[1]  # a '|' in the reason cannot break the table
    assert "INCOMPLETE" in md
    result.complete, result.finished = True, "2026-01-01T00:01:00Z"
    result.scenarios[0].repetition = 2
    md = result.summary_md()
    assert "INCOMPLETE" not in md and "| baseline #2 | P1 |" in md


def test_write(tmp_path: Path) -> None:
    run_result().write(tmp_path)
    assert json.loads((tmp_path / "result.json").read_text())["schema"] == SCHEMA
    assert (tmp_path / "summary.md").read_text().startswith("# Run r1")
    assert not (tmp_path / "result.json.tmp").exists()
