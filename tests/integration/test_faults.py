"""Faults, reduced: six runs of the short playbook killed at moments taken from their own
state (two per signal, over setup, traffic, attack and teardown), three at a time.
After SIGINT/SIGTERM the run has released everything by itself; after SIGKILL
``testbed clean`` has. Nothing of any run is left, the root namespace is unchanged, and
what the runs wrote is intact and marked incomplete unless they finished.

The full figure (50 kills) comes from ``scripts/fault_injection.py``, which this test
drives with a fixed plan."""

from __future__ import annotations

import importlib.util
import random
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fault_injection",
                                               REPO / "scripts" / "fault_injection.py")
assert _spec is not None and _spec.loader is not None
fi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fi)

# Teardown at "client_done" (the network is still up): the later triggers may come after
# the run's last step, and a run that finished before its signal tests nothing.
PLAN = [(signal.SIGINT, "setup", "netns"), (signal.SIGTERM, "traffic", None),
        (signal.SIGKILL, "attack", None), (signal.SIGINT, "attack", None),
        (signal.SIGTERM, "teardown", "client_done"), (signal.SIGKILL, "setup", "middlebox")]


def test_killed_runs_leave_nothing(tmp_path: Path) -> None:
    baseline = fi.root_state()

    def one(i: int) -> dict[str, Any]:
        sig, phase, trigger = PLAN[i]
        return fi.one_run(i + 1, sig, phase, random.Random(i), tmp_path, baseline, [],
                          trigger)

    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = list(pool.map(one, range(len(PLAN))))
    for r in runs:
        print(r["i"], r["signal"], r["planned"], r.get("observed"), r["exit"],
              r.get("before_clean"), r["leftovers"], r["results"])
    for r in runs:
        label = f"run {r['i']} ({r['signal']} in {r.get('observed')})"
        assert not r.get("error") and not r.get("hang"), (label, r)
        assert r["killed"], (label, r["tail"])
        assert r["leftovers"] == {}, (label, r["leftovers"])
        assert r["root_changes"] == {}, (label, r["root_changes"])
        assert r["results"]["intact"] and r["results"]["marked"], (label, r["results"])
        if r["signal"] == "SIGKILL":
            assert r["clean"]["returncode"] == 0, (label, r["clean"])
        else:
            assert fi.clean_exit(r), (label, r["exit"], r["tail"])
    # A SIGKILL before the end leaves debris that only clean removes: otherwise the test
    # proves nothing about clean.
    assert any(r.get("before_clean") for r in runs if r["signal"] == "SIGKILL")
    assert len({r["observed"] for r in runs}) >= 3, [r["observed"] for r in runs]
