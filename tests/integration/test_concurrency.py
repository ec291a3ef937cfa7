"""Concurrency: four ``testbed run`` processes at once (baseline, M1, M2, M2d, both
transports, sharing one ledger directory) give the verdicts of the same playbooks run one
after the other, and nothing collides.

What proves it:
- each run allocated its own tag (``O_EXCL`` ledger files in the shared directory) and
  every namespace its ledger lists carries that tag: the sets are disjoint;
- while the runs were live, ``ip netns list`` showed the namespaces of several of them at
  the same time, and their client nodes had the SAME addresses (every run uses the same
  address plan), each in its own namespace — never in the root namespace, which holds no
  address of the test ranges;
- verdicts per playbook and transport equal those of the serial run.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.runtime.leftovers import TEST_RANGES

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = ["baseline", "m1_nat", "m2_strip_mp_capable", "m2d_drop_mptcp_syn"]
SET = ["--set", "bytes=1000000"]
RANGES = [ipaddress.ip_network(r) for r in TEST_RANGES]


def _start(names: list[str], out: Path, state: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "TESTBED_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "testbed", "run", *[f"playbooks/{n}.yaml" for n in names],
         *SET, "--out", str(out), "--json"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _verdicts(stdout: str) -> dict[tuple[str, str], str]:
    doc = json.loads(stdout)
    return {(s["playbook"], t): r["verdict"] for s in doc["result"]["scenarios"]
            for t, r in s["transports"].items()}


def _addresses(netns: str | None) -> list[str]:
    argv = ["ip", "-4", "-o", "addr", "show"] if netns is None else \
        ["ip", "-n", netns, "-4", "-o", "addr", "show"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    return sorted(line.split()[3] for line in out.splitlines() if " inet " in line)


def _in_test_ranges(cidr: str) -> bool:
    ip = ipaddress.ip_interface(cidr).ip
    return any(ip in net for net in RANGES)


def test_four_parallel_runs_match_serial_and_do_not_collide(tmp_path: Path) -> None:
    state = tmp_path / "state"
    procs = [_start([name], tmp_path / "parallel", state) for name in PLAYBOOKS]
    ledgers: dict[str, dict[str, Any]] = {}
    max_live = 0
    client_addrs: dict[str, list[str]] = {}
    root_test_addrs: list[str] = []
    deadline = time.monotonic() + 600
    # Follow the runs until all have exited (each run's own steps are bounded).
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "parallel runs did not finish"
        for path in state.glob("tb*.json"):
            try:
                ledgers.setdefault(path.stem, {"netns": set()})["netns"].update(
                    json.loads(path.read_text())["netns"])
            except (OSError, ValueError, KeyError):
                continue
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=30).stdout
        live = {tag for tag in ledgers if f"{tag}-client" in listed}
        max_live = max(max_live, len(live))
        if len(live) >= 2:
            for tag in live:
                # The fullest view of each client (a node being built has fewer addresses).
                addrs = [a for a in _addresses(f"{tag}-client") if not a.startswith("127.")]
                if len(addrs) > len(client_addrs.get(tag, [])):
                    client_addrs[tag] = addrs
            root_test_addrs += [a for a in _addresses(None) if _in_test_ranges(a)]
        time.sleep(0.05)
    outs = [p.communicate() for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    parallel: dict[tuple[str, str], str] = {}
    for out, _err in outs:
        parallel.update(_verdicts(out))

    # Names: four tags, disjoint namespace sets, each name carrying its run's tag.
    assert len(ledgers) == 4, sorted(ledgers)
    sets = [v["netns"] for v in ledgers.values()]
    for tag, v in ledgers.items():
        assert v["netns"] and all(n.startswith(f"{tag}-") for n in v["netns"]), (tag, v)
    assert len(set().union(*sets)) == sum(len(s) for s in sets)
    # Addresses: the same plan in several namespaces at once, none in the root namespace.
    print(f"max runs live at once: {max_live}; client addresses: {client_addrs}")
    assert max_live >= 2, "the runs never overlapped: nothing was tested"
    assert len(client_addrs) >= 2
    plans = {tuple(a) for a in client_addrs.values()}
    assert len(plans) == 1 and all(_in_test_ranges(a) for a in next(iter(plans))), plans
    assert root_test_addrs == []

    serial = _start(PLAYBOOKS, tmp_path / "serial", tmp_path / "state-serial")
    out, err = serial.communicate(timeout=600)
    assert serial.returncode == 0, err[-3000:]
    assert parallel == _verdicts(out)
    assert len(parallel) == 2 * len(PLAYBOOKS)
