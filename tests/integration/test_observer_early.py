"""The observer's early tshark passes in a real run: they are in the run's ledger (under
the orchestrator) while the capture runs, and when the orchestrator is SIGKILLed they exit
by themselves (their stdin reaches EOF) before any ``testbed clean``. The summaries they
give are checked against ``summarize_pcap`` on the run's own pcaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.model.playbook import load_playbook
from testbed.runtime.ledger import Ledger, is_alive
from testbed.runtime.observer import ORCHESTRATOR, summarize_pcap
from testbed.runtime.scenario import run_playbooks
from tests.integration.test_cleanup import (
    BASELINE,
    REPO,
    leftovers,
    start_run,
    wait_for_traffic_phase,
)

pytestmark = pytest.mark.root


def test_orchestrator_sigkill_leaves_no_tshark(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = start_run(tmp_path, state, 400_000_000)
    ledger = wait_for_traffic_phase(state, proc)
    tsharks = [p for p in ledger.data.processes if p.label.startswith("tshark")]
    # Both passes of both paths' captures, started before the transfer, in the root ns.
    assert len(tsharks) == 4, ledger.data.processes
    assert {p.node for p in tsharks} == {ORCHESTRATOR}
    assert all(is_alive(p.pid, p.start_time) for p in tsharks)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(is_alive(p.pid, p.start_time) for p in tsharks) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in tsharks if is_alive(p.pid, p.start_time)]
    # Orphans are reaped by init; a zombie would still count as alive here.
    assert alive == [], alive
    ledger = Ledger.load(ledger.path)
    out = subprocess.run([sys.executable, "-m", "testbed", "clean"],
                         env={**os.environ, "TESTBED_STATE_DIR": str(state),
                              "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert leftovers(ledger) == {"netns": [], "processes": [], "shells": []}


def test_run_summaries_equal_file_summaries(tmp_path: Path) -> None:
    """The observers.json of a real run (early passes fed the growing capture) is what
    ``summarize_pcap`` computes from the finished pcap files afterwards."""
    pb = load_playbook(BASELINE)
    result, run_dir = run_playbooks([pb], results_root=tmp_path)
    assert result.complete
    for transport in ("tcp", "mptcp"):
        tr = result.scenarios[0].transports[transport]
        assert tr.verdict.value == "CONFIRMED", tr.reason
        observers = json.loads((run_dir / tr.evidence["observers"]).read_text())
        server = observers["wifi"]["server_addresses_seen"]
        assert server, observers["wifi"]
        for path, summary in observers.items():
            pcap = run_dir / tr.evidence[f"pcap.{path}"]
            assert summary == summarize_pcap(pcap, sni=pb.app.sni, server_addresses=server,
                                             total_app_bytes=pb.app.bytes), (transport, path)
        assert observers["wifi"]["packets"] > 100
