"""Cleanup and isolation, for real: a killed run leaves nothing once ``testbed clean`` ran,
a terminated run cleans up by itself, ``clean`` touches only what dead runs own, and a run
changes nothing in the root namespace."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.runtime.ledger import Ledger

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
BASELINE = str(REPO / "playbooks" / "baseline.yaml")


def root_state() -> dict[str, str]:
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout

    return {
        "links": run("ip", "-o", "link", "show"),
        "routes": run("ip", "route", "show", "table", "all"),
        "rules": run("ip", "rule", "show"),
        # Namespaces of other testbed runs on the machine come and go; any other must stay.
        "netns": "\n".join(n for n in run("ip", "netns", "list").splitlines()
                           if not re.match(r"tb[0-9a-f]{6}-", n)),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
        "iptables": "\n".join(line for line in run("iptables-save").splitlines()
                              if not line.startswith("#")),
        "nft": run("nft", "list", "ruleset"),
        "mptcp_endpoints": run("ip", "mptcp", "endpoint", "show"),
        "mptcp_limits": run("ip", "mptcp", "limits", "show"),
    }


def start_run(tmp_path: Path, state: Path, bytes_: int) -> subprocess.Popen[str]:
    env = {**os.environ, "TESTBED_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "testbed", "run", BASELINE, "--transport", "mptcp",
         "--set", f"bytes={bytes_}", "--out", str(tmp_path / "results")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_traffic_phase(state: Path, proc: subprocess.Popen[str], timeout: float = 60) -> Ledger:
    """Wait until the run's ledger lists its namespaces and a running capture."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for path in state.glob("tb*.json"):
            try:
                ledger = Ledger.load(path)
            except (ValueError, OSError):
                continue
            labels = [p.label for p in ledger.data.processes]
            if len(ledger.data.netns) >= 5 and any("capture" in label for label in labels) \
                    and any("server" in label for label in labels):
                return ledger
        time.sleep(0.05)
    raise AssertionError("the run never reached its traffic phase")


def leftovers(ledger: Ledger) -> dict[str, list[str]]:
    tag = ledger.tag
    netns = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                       timeout=10).stdout.split() if n.startswith(tag)]
    alive = []
    for rec in ledger.data.processes:
        try:
            stat = Path(f"/proc/{rec.pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[19]) == rec.start_time and \
                stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(f"{rec.pid} {rec.label}")
    shells = [line for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True,
                                              text=True, timeout=10).stdout.splitlines()
              if f"mininet:{tag}" in line]
    return {"netns": netns, "processes": alive, "shells": shells}


def test_sigkill_then_clean_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    before = root_state()
    proc = start_run(tmp_path, state, 400_000_000)
    ledger = wait_for_traffic_phase(state, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    ledger = Ledger.load(ledger.path)
    left = leftovers(ledger)
    # A SIGKILLed run leaves its namespaces: otherwise this test would prove nothing.
    assert left["netns"]

    env = {**os.environ, "TESTBED_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "testbed", "clean"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ledger.data.run_id in out.stdout
    assert leftovers(ledger) == {"netns": [], "processes": [], "shells": []}
    assert not ledger.path.exists()
    # What the killed run had written is kept and marked incomplete.
    run_dir = Path(ledger.data.results_dir)
    assert (run_dir / "INCOMPLETE").exists()
    assert json.loads((run_dir / "result.json").read_text())["complete"] is False
    assert root_state() == before


def test_sigterm_cleans_up_by_itself(tmp_path: Path) -> None:
    state = tmp_path / "state"
    before = root_state()
    proc = start_run(tmp_path, state, 400_000_000)
    ledger = wait_for_traffic_phase(state, proc)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert leftovers(ledger) == {"netns": [], "processes": [], "shells": []}
    assert not ledger.path.exists()
    assert root_state() == before


def test_clean_touches_only_what_dead_runs_own(tmp_path: Path) -> None:
    state = tmp_path / "state"
    foreign = "tbdead00-client"  # looks like a testbed namespace, but no ledger owns it
    live = Ledger.create(state_dir=state)  # a live run (this process) owns this one
    live_ns = f"{live.tag}-client"
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        for ns in (foreign, live_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        live.add_netns(live_ns)
        live.add_process(sleeper.pid, "look-alike", "client")
        env = {**os.environ, "TESTBED_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-m", "testbed", "clean"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               timeout=10).stdout
        assert foreign in names and live_ns in names
        assert sleeper.poll() is None
        assert live.path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        for ns in (foreign, live_ns):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)
        live.close()


def test_run_leaves_root_namespace_unchanged(tmp_path: Path) -> None:
    from testbed.model.playbook import load_playbook
    from testbed.runtime.scenario import run_playbooks

    before = root_state()
    pb = load_playbook(BASELINE, {"bytes": 500_000})
    result, _ = run_playbooks([pb], results_root=tmp_path)
    assert result.complete
    assert root_state() == before
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"
