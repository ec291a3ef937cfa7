"""``--jobs N``: scenario transports run N at a time, each slot a thread with a ledger of
its own. Verdicts and their order are those of a serial run, the run leaves nothing
behind, and a SIGTERM in the middle of two transfers releases both slots' networks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.model.playbook import load_playbook
from testbed.runtime.ledger import Ledger
from testbed.runtime.scenario import run_playbooks
from tests.integration.test_cleanup import BASELINE, REPO, leftovers, root_state

pytestmark = pytest.mark.root


def test_parallel_run_keeps_order_and_verdicts(tmp_path: Path) -> None:
    before = root_state()
    playbooks = [load_playbook(REPO / "playbooks" / "baseline.yaml", {"bytes": 1_000_000}),
                 load_playbook(REPO / "playbooks" / "m1_nat.yaml")]
    seen: list[str] = []
    result, run_dir = run_playbooks(playbooks, results_root=tmp_path, jobs=2,
                                    progress=seen.append)
    assert result.complete and result.environment["jobs"] == 2
    assert [s.playbook for s in result.scenarios] == ["baseline", "m1_nat"]
    for scenario in result.scenarios:
        assert list(scenario.transports) == ["tcp", "mptcp"]
        for transport, tr in scenario.transports.items():
            assert tr.verdict.value == "CONFIRMED", (scenario.playbook, transport, tr.reason)
            assert (run_dir / scenario.playbook / transport / "verdict.json").is_file()
    # Two transports really were in flight at once: a second network was built before the
    # first transport's verdict.
    builds = [i for i, m in enumerate(seen) if m.endswith("building network")]
    verdicts = [i for i, m in enumerate(seen) if "CONFIRMED in" in m]
    assert len(builds) == 4 and builds[1] < verdicts[0]
    assert not (run_dir / "INCOMPLETE").exists()
    assert root_state() == before


def test_sigterm_releases_every_slot(tmp_path: Path) -> None:
    state = tmp_path / "state"
    before = root_state()
    env = {**os.environ, "TESTBED_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed", "run", BASELINE, "--jobs", "2",
         "--set", "bytes=400000000", "--set", "timeout_s=120",
         "--out", str(tmp_path / "results")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until both slots' ledgers list a network with a running client.
    deadline = time.monotonic() + 90
    slots: list[Ledger] = []
    while time.monotonic() < deadline and len(slots) < 2:
        assert proc.poll() is None, proc.communicate()
        slots = []
        for path in state.glob("tb*.json"):
            try:
                ledger = Ledger.load(path)
            except (ValueError, OSError):
                continue
            if len(ledger.data.netns) >= 5 and any(
                    "client" in p.label for p in ledger.data.processes):
                slots.append(ledger)
        time.sleep(0.05)
    assert len(slots) == 2, "the two slots never had their transfers running at once"
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    for ledger in slots:
        assert leftovers(ledger) == {"netns": [], "processes": [], "shells": []}
    assert list(state.glob("tb*")) == []
    assert root_state() == before
