"""``expect: {qualified_when: {<check label>: {<measured value>: <condition>}}}``: a check
that fails with a listed measured value makes the verdict QUALIFIED with that condition (the
measurement, not the playbook, decides), any other failure still refutes, and a check that
holds is unaffected. Bad entries are refused with the field named."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.errors import SpecError
from testbed.model.expect import evaluate, parse_expectations
from testbed.model.result import Verdict, verdict_from_checks
from testbed.model.topology import load_topology

TOPO = load_topology("dual_path")
LABEL = "middlebox.strip_mptcp_after.outcome"
COND = "another subflow kept the connection; the stripped one was reset"
EXPECT: dict[str, Any] = {
    "status": "ok",
    "middlebox": {"strip_mptcp_after": {"outcome": "clean_fallback"}},
    "qualified_when": {LABEL: {"subflow_reset_continue": COND}},
}


def facts(outcome: str, status: str = "ok") -> dict[str, Any]:
    return {"status": status, "middlebox": {"strip_mptcp_after": {"outcome": outcome}}}


def verdict(data: dict[str, Any], measured: dict[str, Any]) -> tuple[Verdict, str]:
    return verdict_from_checks(evaluate(parse_expectations(data, "t.yaml", "expect.mptcp",
                                                           TOPO), measured))


def test_expected_value_confirms() -> None:
    assert verdict(EXPECT, facts("clean_fallback"))[0] is Verdict.CONFIRMED


def test_listed_measured_value_qualifies_with_its_condition() -> None:
    v, reason = verdict(EXPECT, facts("subflow_reset_continue"))
    assert v is Verdict.QUALIFIED
    assert reason.startswith(COND) and "measured 'subflow_reset_continue'" in reason
    assert "the other 1 expectations measured to hold" in reason
    check = next(c for c in evaluate(parse_expectations(EXPECT, "t", "e", TOPO),
                                 facts("subflow_reset_continue")) if c.label == LABEL)
    assert not check.ok and check.to_json()["qualified_when"] == COND


def test_unlisted_value_refutes() -> None:
    v, reason = verdict(EXPECT, facts("stall"))
    assert v is Verdict.REFUTED and "measured 'stall'" in reason and COND not in reason


def test_another_failure_still_refutes() -> None:
    v, reason = verdict(EXPECT, facts("subflow_reset_continue", status="timeout"))
    assert v is Verdict.REFUTED
    assert "status: expected 'ok', measured 'timeout'" in reason and LABEL not in reason


def test_types_must_match() -> None:
    data = {"fallback": True, "qualified_when": {"fallback": {False: "no fallback"}}}
    assert verdict(data, {"fallback": False})[0] is Verdict.QUALIFIED
    data = {"subflows": 2, "qualified_when": {"subflows": {True: "x"}}}
    assert verdict(data, {"subflows": 1})[0] is Verdict.REFUTED  # True is not 1
    data = {"subflows": 2, "qualified_when": {"subflows": {1: "one subflow"}}}
    assert verdict(data, {"subflows": 1})[0] is Verdict.QUALIFIED


def test_combines_with_qualified() -> None:
    v, reason = verdict({**EXPECT, "qualified": "only on this kernel"},
                        facts("subflow_reset_continue"))
    assert v is Verdict.QUALIFIED and reason.startswith("only on this kernel; " + COND)
    assert verdict({**EXPECT, "qualified": "x"}, facts("clean_fallback")) == (
        Verdict.QUALIFIED, "x (all 2 expectations measured to hold)")


def test_passing_checks_have_no_qualified_field() -> None:
    checks = evaluate(parse_expectations(EXPECT, "t", "e", TOPO), facts("clean_fallback"))
    assert all("qualified_when" not in c.to_json() for c in checks)


@pytest.mark.parametrize("bad, field, words", [
    ("x", "expect.mptcp.qualified_when", ["check label"]),
    ({}, "expect.mptcp.qualified_when", ["check label"]),
    ({"middlebox.other.outcome": {"a": "b"}}, "expect.mptcp.qualified_when."
     "middlebox.other.outcome", ["names no expectation", LABEL, "status"]),
    ({LABEL: "text"}, f"expect.mptcp.qualified_when.{LABEL}", ["measured value"]),
    ({LABEL: {}}, f"expect.mptcp.qualified_when.{LABEL}", ["measured value"]),
    ({LABEL: {"stall": ""}}, f"expect.mptcp.qualified_when.{LABEL}.stall", ["condition"]),
    ({LABEL: {"stall": "x" * 501}}, f"expect.mptcp.qualified_when.{LABEL}.stall",
     ["500"]),
    ({LABEL: {None: "c"}}, f"expect.mptcp.qualified_when.{LABEL}.None", ["measured value"]),
    ({"qualified": {"a": "b"}}, "expect.mptcp.qualified_when.qualified",
     ["names no expectation"]),
])
def test_bad_entries_name_the_field(bad: Any, field: str, words: list[str]) -> None:
    with pytest.raises(SpecError) as err:
        parse_expectations({**EXPECT, "qualified_when": bad}, "t.yaml", "expect.mptcp", TOPO)
    assert err.value.file == "t.yaml" and err.value.field == field
    for word in words:
        assert word in str(err.value)
