"""``expect: {qualified: <condition>}``: a claim that holds only under a condition gets the
verdict QUALIFIED (with the condition as its reason) when every measured expectation holds,
and is REFUTED like any other when one does not."""

from __future__ import annotations

import pytest

from testbed.errors import SpecError
from testbed.model.expect import evaluate, parse_expectations
from testbed.model.result import Verdict, verdict_from_checks
from testbed.model.topology import load_topology

TOPO = load_topology("dual_path")
COND = "true only for attackers that never saw the initial handshake"


def verdict(data: dict[str, object], facts: dict[str, object]) -> tuple[Verdict, str]:
    exps = parse_expectations(data, "t.yaml", "expect.mptcp", TOPO)
    return verdict_from_checks(evaluate(exps, facts))


def test_all_hold_gives_qualified_with_the_condition() -> None:
    v, reason = verdict({"qualified": f"  {COND}\n", "status": "ok",
                         "attack": {"join_with_keys": {"accepted": True}}},
                        {"status": "ok", "attack": {"join_with_keys": {"accepted": True}}})
    assert v is Verdict.QUALIFIED
    assert reason == f"{COND} (all 2 expectations measured to hold)"


def test_a_failed_expectation_still_refutes() -> None:
    v, reason = verdict({"qualified": COND, "status": "ok"}, {"status": "aborted"})
    assert v is Verdict.REFUTED
    assert "status: expected 'ok', measured 'aborted'" in reason
    assert COND not in reason


def test_qualified_alone_is_no_measurement() -> None:
    v, _ = verdict({"qualified": COND}, {})
    assert v is Verdict.INCONCLUSIVE


@pytest.mark.parametrize("bad", ["", "   ", 3, True, ["a"], "x" * 501])
def test_qualified_must_be_a_condition(bad: object) -> None:
    with pytest.raises(SpecError, match="qualified"):
        parse_expectations({"qualified": bad}, "t.yaml", "expect.mptcp", TOPO)
