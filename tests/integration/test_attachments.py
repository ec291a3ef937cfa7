"""Attacker attachment points, for real: a tap on a path sees exactly that path's traffic
(mirrored by the access router), off-path and half-on-path hosts see none of the victim's
packets yet can reach the server from their own addresses."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.apps import APPS, AppContext
from testbed.model.attachments import attach
from testbed.model.topology import load_topology
from testbed.runtime.evidence import Capture
from testbed.runtime.ledger import Ledger
from testbed.runtime.network import Network
from testbed.runtime.observer import summarize_pcap
from testbed.runtime.pki import make_pki

pytestmark = pytest.mark.root

SNI = "www.example.test"
PAYLOAD = 2_000_000


def test_tap_off_path_and_half_on_path(tmp_path: Path) -> None:
    spec = load_topology("dual_path")
    taps = []
    attachments = {}
    for position, path in (("tap", "wifi"), ("tap", "cell"), ("off_path", None),
                           ("half_on_path", None)):
        spec, att, tap = attach(spec, position, path)
        attachments[f"{position}:{path}"] = att.node
        if tap:
            taps.append(tap)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * (PAYLOAD // 256))
    sha = hashlib.sha256(payload.read_bytes()).hexdigest()
    ledger = Ledger.create(state_dir=tmp_path / "state")
    pcaps: dict[str, Path] = {}
    try:
        with Network.up(spec, ledger, taps=taps) as net:
            captures = []
            for key, name in attachments.items():
                node = net.nodes[name]
                pcaps[key] = tmp_path / f"{name}.pcap"
                captures.append(Capture.start(node, net.plan.interfaces[name][0].ifname,
                                              pcaps[key], f"capture {name}"))
            app = APPS["python"]()
            server = net.nodes["server"]
            server_addr = net.address("server")
            ctx = AppContext(workdir=tmp_path / "app", pki=make_pki(tmp_path / "pki", SNI),
                             transport="mptcp", server_address=server_addr, port=443,
                             sni=SNI, payload=payload, payload_sha256=sha, timeout_s=30)
            ctx.workdir.mkdir()
            handle = app.start_server(server, ctx)
            try:
                outcome = app.run_client(net.nodes["client"], ctx)
            finally:
                app.stop_server(server, handle)
            # Off-path and half-on-path hosts reach the server from their own addresses.
            for key in ("off_path:None", "half_on_path:None"):
                node = net.nodes[attachments[key]]
                probe = node.run([sys.executable, "-c",
                                  "import socket,sys\ntry:\n socket.create_connection("
                                  "(sys.argv[1], 9), timeout=3)\nexcept ConnectionRefusedError:"
                                  "\n print('refused')", server_addr], timeout=10)
                assert probe.stdout.strip() == "refused", (key, probe)  # a RST came back
            for cap in captures:
                cap.stop()
        assert outcome.status == "ok", outcome.error
    finally:
        ledger.release_all()
        ledger.close()

    views = {key: summarize_pcap(pcap, sni=SNI, server_addresses=[server_addr],
                                 total_app_bytes=PAYLOAD) for key, pcap in pcaps.items()}
    wifi, cell = views["tap:wifi"], views["tap:cell"]
    assert wifi["sni"]["status"] == "full"
    assert wifi["mptcp"]["keys"], "the tap on the initial path sees the MPTCP keys"
    assert cell["sni"]["status"] == "none"
    assert cell["mptcp"]["mp_join_syn"] >= 1
    assert sum(wifi["payload_bytes"].values()) + sum(cell["payload_bytes"].values()) \
        >= PAYLOAD
    for key in ("off_path:None", "half_on_path:None"):
        view = views[key]
        assert view["sni"]["status"] == "none"
        assert not view["mptcp"]["keys"]
        # Nothing of the victim's connection: only the host's own probe to port 9.
        tshark = subprocess.run(["tshark", "-n", "-r", str(pcaps[key]), "-Y", "tcp.port == 443"],
                                capture_output=True, text=True, timeout=60, check=True)
        assert tshark.stdout.strip() == ""
