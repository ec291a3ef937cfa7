"""Claim S1 for real: the S1 playbook's three clients on the dual-path network, judged from
the pcaps alone (tshark): under the split client no single-path capture holds the whole
server name, under the default client the initial path's capture does, and splitting the
writes without steering the scheduler is not enough."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.model.playbook import expand_sweeps
from testbed.model.result import Verdict
from testbed.runtime.observer import summarize_pcap
from testbed.runtime.scenario import run_playbooks

pytestmark = [pytest.mark.root, pytest.mark.slow]

PLAYBOOK = Path(__file__).resolve().parents[2] / "playbooks" / "s1_split_hello.yaml"
SNI = "www.example.test"


def _views(evidence: Path) -> dict[str, dict[str, object]]:
    """The SNI view of every capture of one scenario: the per-path pcaps and the taps'."""
    pcaps = sorted(evidence.glob("*.pcap"))
    assert {p.name for p in pcaps} >= {"wifi.pcap", "cell.pcap",
                                       "attack-tap_wifi-capture.pcap",
                                       "attack-tap_cell-capture.pcap"}
    return {p.name: summarize_pcap(p, sni=SNI, server_addresses=[],
                                   total_app_bytes=1)["sni"] for p in pcaps}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Verdict]]:
    out = tmp_path_factory.mktemp("s1")
    result, run_dir = run_playbooks(expand_sweeps(PLAYBOOK), results_root=out)
    verdicts = {s.playbook: s.transports["mptcp"].verdict for s in result.scenarios}
    return run_dir, verdicts


def _evidence(run_dir: Path, client: str) -> Path:
    return run_dir / f"s1_split_hello[client={client}]" / "mptcp"


def test_playbook_verdicts(run: tuple[Path, dict[str, Verdict]]) -> None:
    run_dir, verdicts = run
    assert verdicts == {f"s1_split_hello[client={c}]": Verdict.CONFIRMED
                        for c in ("default", "split", "split_nosteer")}, run_dir


def test_split_client_no_path_sees_the_whole_name(run: tuple[Path, dict[str, Verdict]]
                                                  ) -> None:
    evidence = _evidence(run[0], "split")
    views = _views(evidence)
    assert all(v["status"] != "full" for v in views.values()), views
    # Each path saw its half, and together they make the name.
    assert views["wifi.pcap"]["fragments_seen"] == ["www.exam"]
    assert views["cell.pcap"]["fragments_seen"] == ["ple.test"]
    assert views["attack-tap_wifi-capture.pcap"]["fragments_seen"] == ["www.exam"]
    assert views["attack-tap_cell-capture.pcap"]["fragments_seen"] == ["ple.test"]
    outcome = json.loads((evidence / "app-outcome.json").read_text())
    assert outcome["status"] == "ok"
    split = outcome["extra"]["split"]
    assert split["rest_on_second_only"] is True
    assert split["first_sni_part"] == "www.exam" and split["rest_sni_part"] == "ple.test"


def test_default_client_initial_path_sees_the_name(run: tuple[Path, dict[str, Verdict]]
                                                   ) -> None:
    views = _views(_evidence(run[0], "default"))
    assert views["wifi.pcap"]["status"] == "full"
    assert views["attack-tap_wifi-capture.pcap"]["status"] == "full"
    assert views["cell.pcap"]["status"] == "none"


def test_split_without_steering_leaks_on_the_initial_path(
        run: tuple[Path, dict[str, Verdict]]) -> None:
    evidence = _evidence(run[0], "split_nosteer")
    views = _views(evidence)
    assert views["wifi.pcap"]["status"] == "full"
    outcome = json.loads((evidence / "app-outcome.json").read_text())
    assert outcome["extra"]["split"]["rest_on_second_only"] is False
