"""The benchmark in its reduced mode (``--quick``): it runs, and its JSON has the documented
layout (keys, medians, ratios). Targets are the benchmark's own report, not asserted here."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.bench import SCHEMA, SECTIONS
from testbed.bench.__main__ import main

pytestmark = pytest.mark.root

STATS_KEYS = {"median", "min", "max", "q1", "q3", "n", "samples"}


def _stats(s: dict[str, Any], positive: bool = True) -> None:
    assert set(s) >= STATS_KEYS, s
    assert s["n"] >= 1 and s["median"] is not None
    assert s["min"] <= s["median"] <= s["max"]
    if positive:
        assert s["median"] > 0


def test_bench_quick(tmp_path: Path) -> None:
    t0 = time.monotonic()
    code = main(["--quick", "--out", str(tmp_path)])
    elapsed = time.monotonic() - t0
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert code == 0, res.get("errors")
    assert res["schema"] == SCHEMA
    assert res["quick"] is True
    assert set(res["sections"]) == set(SECTIONS)
    assert Path(res["plot"]).is_file() and Path(res["plot"]).stat().st_size > 1000
    for key in ("kernel", "cpus", "load_before", "load_after", "git_commit"):
        assert key in res["environment"]

    topo = res["sections"]["topology"]
    assert [e["nodes"] for e in topo["sizes"]] == [4, 20]
    for entry in (*topo["sizes"], topo["dual_path"]):
        for kind in ("testbed", "ns_veth", "ns_veth_routes"):
            for k in ("up_s", "down_s", "total_s"):
                _stats(entry[kind][k])
        for kind in ("ns_veth", "ns_veth_routes"):
            _stats(entry["ratio"][kind])

    scen = res["sections"]["scenarios"]
    (baseline,) = [e for e in scen["playbooks"] if e["playbook"] == "baseline"]
    _stats(baseline["wall_s"])
    assert set(baseline["transport_s"]) == {"tcp", "mptcp"}
    assert "building network" in baseline["phases_s"]
    _stats(scen["baseline_parallel_s"])
    assert scen["parallel_jobs"] == 2 and scen["matrix_jobs"] == []  # the full run only

    fid = res["sections"]["fidelity"]
    assert fid["mtu"] == 1500 and fid["jumbo"]["mtu"] == 9000
    for run in (fid, fid["jumbo"]):
        for tr in ("tcp", "mptcp"):
            _stats(run[tr]["goodput_mbit"])
            _stats(run[tr]["wire_mbit"])
        assert 0 < run["tcp"]["fraction_of_one_path"] < 1.1
        assert 0 < run["mptcp"]["fraction_of_sum"] < 1.1
        assert 0 < run["ceiling"]["mptcp"] < run["ceiling"]["tcp"] < 1
    # Jumbo frames carry proportionally less header: a higher ceiling.
    assert fid["jumbo"]["ceiling"]["mptcp"] > fid["ceiling"]["mptcp"]
    uns = res["sections"]["unshaped"]
    assert uns["mptcp_over_tcp"] > 0

    conns = res["sections"]["many_connections"]
    assert conns["conns"] == 100
    assert 0 <= conns["success_rate"] <= 1
    assert {"p50", "p90", "p99", "max"} <= set(conns["handshake_ms"])
    assert conns["orchestrator"]["max_rss_kib"] > 0

    att = res["sections"]["attack_rate"]
    _stats(att["rawsend"]["rate_pps"])
    assert att["scapy"]["rate_pps"] > 0
    assert set(att["expected_guess_time_s"]) == {"1", "10", "100", "1000"}

    ids = {t["id"] for t in res["targets"]}
    assert {"topology.dual_path_s", "scenario.baseline_s", "scenario.baseline_parallel_s",
            "fidelity.tcp", "fidelity.mptcp", "fidelity_jumbo.tcp", "fidelity_jumbo.mptcp",
            "many_connections.success", "attack_rate.rawsend"} <= ids
    for t in res["targets"]:
        assert t["met"] in (True, False)
    print(f"bench --quick took {elapsed:.1f}s")  # reported, not asserted (loaded machines)
