"""Isolation: during a matrix (subset: baseline and M1, NAT included, both transports), a
capture on every interface of the ROOT namespace sees no packet to or from the test
ranges, and the root namespace's links, addresses, routes, rules, qdiscs, iptables and nft
rulesets, MPTCP endpoints/limits and sysctls (``net.ipv4.ip_forward``,
``net.ipv4.conf.*.rp_filter``, ``net.mptcp.*``) are the same afterwards.

The capture proves it was live for the whole run: after the matrix, one UDP datagram to
127.0.0.1 (a control, never a test address) must be in it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.runtime.leftovers import TEST_RANGES, root_state, state_diff

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
CONTROL_PORT = 9  # discard; nothing needs to listen: the datagram only has to cross lo


def _count(pcap: Path, expr: str) -> list[str]:
    out = subprocess.run(["tcpdump", "-n", "-r", str(pcap), expr], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_matrix_sends_nothing_through_the_root_namespace(tmp_path: Path) -> None:
    pcap = tmp_path / "root-any.pcap"
    ranges = " or ".join(f"net {r}" for r in TEST_RANGES)
    expr = f"({ranges}) or (host 127.0.0.1 and udp port {CONTROL_PORT})"
    before = root_state()
    dump = subprocess.Popen(["tcpdump", "-i", "any", "-n", "-U", "-w", str(pcap), expr],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        said: list[str] = []
        # Bounded by tcpdump itself: it says "listening on" once capturing, or exits (EOF).
        while not said or "listening on any" not in said[-1]:
            line = dump.stderr.readline()
            assert line, f"tcpdump exited: {''.join(said)}"
            said.append(line)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, "-m", "testbed", "matrix", "--only", "baseline",
                              "M1", "--out", str(tmp_path / "results")], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"isolation-control", ("127.0.0.1", CONTROL_PORT))
        # The control datagram reaching the file proves the capture saw the whole run.
        deadline = time.monotonic() + 60
        while not (pcap.exists() and _count(pcap, f"udp port {CONTROL_PORT}")):
            assert time.monotonic() < deadline, "the root capture never saw the control"
            time.sleep(0.2)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=60)
    leaked = _count(pcap, ranges)
    assert leaked == [], "\n".join(leaked[:20])
    assert state_diff(before, root_state()) == {}
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == \
        before["sysctl net.ipv4.ip_forward"]
