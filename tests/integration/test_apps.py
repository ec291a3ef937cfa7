"""Real TLS 1.3 apps over kernel MPTCP and TCP between two namespaces joined by one veth.

Needs root, kernel MPTCP, mnexec and the Debian tools (nginx, curl, openssl, mptcpize).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from testbed.apps import APPS, AppContext
from testbed.model.counters import parse_proc_net
from testbed.model.outcome import AppOutcome
from testbed.runtime.ledger import NETNS_DIR, Ledger
from testbed.runtime.node import Node
from testbed.runtime.pki import make_pki

SNI = "www.testbed.example"
SERVER_ADDR = "198.51.100.2"
CLIENT_ADDR = "198.51.100.1"
PAYLOAD_BYTES = 1_000_000


# tests/conftest.py skips root tests for non-root users; this file does it too so that it
# stands alone. Anything else missing (a tool, kernel MPTCP) makes the tests fail: a broken
# machine must not pass silently.
pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def syn_rx(node: Node) -> int:
    return parse_proc_net(node.read_proc_net("netstat")).get("MPTcpExtMPCapableSYNRX", 0)


@dataclass
class Net:
    client: Node
    server: Node
    base: Path
    payload: Path
    payload_sha256: str
    ledger: Ledger

    def ctx(self, name: str, transport: str, *, sni: str = SNI, port: int = 443,
            timeout_s: float = 30.0, payload: Path | None = None) -> AppContext:
        workdir = self.base / name
        workdir.mkdir(parents=True, exist_ok=True)
        pki = make_pki(workdir / "pki", SNI)
        digest = self.payload_sha256 if payload is None else \
            hashlib.sha256(payload.read_bytes()).hexdigest()
        return AppContext(workdir=workdir, pki=pki, transport=transport,
                          server_address=SERVER_ADDR, port=port, sni=sni,
                          payload=payload or self.payload, payload_sha256=digest,
                          timeout_s=timeout_s)

    def big_payload(self) -> Path:
        path = self.base / "payload-8m.bin"
        if not path.exists():
            path.write_bytes(os.urandom(8_000_000))
        return path

    def syn_rx(self) -> int:
        return syn_rx(self.server)


def _leftovers(tag: str, marker: str) -> list[str]:
    found = [str(p) for p in NETNS_DIR.glob(f"{tag}-*")] if NETNS_DIR.is_dir() else []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if tag in cmdline or marker in cmdline:
                found.append(f"pid {proc.name}: {cmdline.strip()}")
    return found


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    from mininet.link import Link

    base = tmp_path_factory.mktemp("apps")
    ledger = Ledger.create(state_dir=base / "state")
    nodes: list[Node] = []
    try:
        client = Node("client", "client", ledger)
        nodes.append(client)
        server = Node("server", "server", ledger)
        nodes.append(server)
        Link(client.mn, server.mn, intfName1="eth0", intfName2="eth0")
        for node, addr in ((client, CLIENT_ADDR), (server, SERVER_ADDR)):
            node.run(["ip", "link", "set", "lo", "up"])
            node.run(["ip", "addr", "add", f"{addr}/30", "dev", "eth0"])
            node.run(["ip", "link", "set", "eth0", "up"])
            node.run(["ip", "mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "2"])
        payload = base / "payload.bin"
        payload.write_bytes(os.urandom(PAYLOAD_BYTES))
        digest = hashlib.sha256(payload.read_bytes()).hexdigest()
        yield Net(client, server, base, payload, digest, ledger)
    finally:
        for node in nodes:
            node.terminate()
        ledger.release_all()
        ledger.close()
    deadline = time.monotonic() + 5
    while (left := _leftovers(ledger.tag, str(base))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind: {left}"


def _transfer(net: Net, kind: str, ctx: AppContext) -> tuple[AppOutcome, int]:
    app = APPS[kind]()
    before = net.syn_rx()
    handle = app.start_server(net.server, ctx)
    try:
        outcome = app.run_client(net.client, ctx)
    finally:
        app.stop_server(net.server, handle)
    return outcome, net.syn_rx() - before


@pytest.mark.parametrize("transport", ["tcp", "mptcp"])
@pytest.mark.parametrize("kind", sorted(APPS))
def test_download(net: Net, kind: str, transport: str) -> None:
    ctx = net.ctx(f"{kind}-{transport}", transport)
    outcome, syn_rx = _transfer(net, kind, ctx)
    assert outcome.status == "ok", outcome.error
    assert outcome.tls_version == "TLSv1.3"
    assert outcome.cipher
    assert outcome.checksum_match
    assert outcome.bytes_received == PAYLOAD_BYTES
    assert outcome.handshake_s is not None and 0 < outcome.handshake_s <= outcome.duration_s
    assert AppOutcome.from_json(outcome.to_json()) == outcome
    if transport == "mptcp":
        assert syn_rx >= 1, "the server saw no MP_CAPABLE SYN"
    else:
        assert syn_rx == 0, "an MP_CAPABLE SYN reached the server under plain TCP"
    if kind == "python" and transport == "mptcp":
        assert outcome.mptcp is not None and outcome.mptcp.get("fallback") is False
        assert outcome.mptcp["bytes_received"] >= PAYLOAD_BYTES
        pairs = outcome.mptcp["subflow_addrs"]["pairs"]
        assert pairs and pairs[0]["local"]["addr"] == CLIENT_ADDR
        assert pairs[0]["remote"] == {"addr": SERVER_ADDR, "port": 443}
    if kind == "python" and transport == "tcp":
        assert outcome.mptcp is None


@pytest.mark.parametrize("kind", sorted(APPS))
def test_no_server_is_connect_failed(net: Net, kind: str) -> None:
    ctx = net.ctx(f"{kind}-refused", "tcp", port=8443, timeout_s=10.0)
    t0 = time.monotonic()
    outcome = APPS[kind]().run_client(net.client, ctx)
    assert outcome.status == "connect_failed", outcome
    assert time.monotonic() - t0 < 5.0


@pytest.mark.parametrize("kind", sorted(APPS))
def test_wrong_sni_is_tls_error(net: Net, kind: str) -> None:
    """The certificate names SNI; a client asking for another name must refuse it."""
    ctx = replace(net.ctx(f"{kind}-badsni", "tcp"), sni="other.testbed.example")
    outcome, _ = _transfer(net, kind, ctx)
    assert outcome.status == "tls_error", outcome
    assert outcome.bytes_received == 0
    assert outcome.sni == "other.testbed.example"
    if kind == "python":
        assert outcome.error and "certificate" in outcome.error


def test_python_mptcp_client_tcp_server_falls_back(net: Net) -> None:
    server_ctx = net.ctx("python-fallback", "tcp")
    client_ctx = replace(server_ctx, transport="mptcp")
    app = APPS["python"]()
    handle = app.start_server(net.server, server_ctx)
    try:
        outcome = app.run_client(net.client, client_ctx)
    finally:
        app.stop_server(net.server, handle)
    assert outcome.status == "ok", outcome.error
    assert outcome.mptcp is not None and outcome.mptcp.get("fallback") is True, outcome.mptcp


def test_python_stalled_transfer_times_out(net: Net) -> None:
    """A server that accepts but never speaks TLS: the client must give up at its bound."""
    ctx = net.ctx("python-stall", "tcp", port=9443, timeout_s=2.0)
    stall = net.server.popen(["python3", "-c",
                              "import socket,time\n"
                              "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
                              " socket.SO_REUSEADDR, 1)\n"
                              "s.bind(('0.0.0.0', 9443)); s.listen(4)\n"
                              "c=s.accept(); time.sleep(60)\n"], label="stall server")
    try:
        deadline = time.monotonic() + 10
        while not net.server.run(["ss", "-Hltn", "sport = :9443"]).stdout.strip():
            assert time.monotonic() < deadline and stall.poll() is None
            time.sleep(0.05)
        t0 = time.monotonic()
        outcome = APPS["python"]().run_client(net.client, ctx)
        assert outcome.status == "timeout", outcome
        assert time.monotonic() - t0 < 2.0 + 4.0
    finally:
        net.server.stop(stall)


@contextlib.contextmanager
def _rate_limited(node: Node, rate: str = "20mbit") -> Iterator[None]:
    """A token bucket on the node's eth0, so a transfer lasts long enough to be cut."""
    node.run(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
              "burst", "32kbit", "latency", "400ms"])
    try:
        yield
    finally:
        node.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)


def _reset_mid_transfer(net: Net, kind: str, ctx: AppContext) -> AppOutcome:
    """Run the client; once the server has 1 MB acked, destroy the server's TCP socket(s)
    with ``ss -K`` (the kernel sends a RST to the client)."""
    app = APPS[kind]()
    result: dict[str, AppOutcome] = {}
    with _rate_limited(net.server):
        handle = app.start_server(net.server, ctx)
        try:
            client = threading.Thread(
                target=lambda: result.update(outcome=app.run_client(net.client, ctx)))
            client.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                ss = net.server.run(["ss", "-Htni", "state", "established", "sport", "= :443"],
                                    check=False).stdout
                acked = [int(v) for v in re.findall(r"bytes_acked:(\d+)", ss)]
                if acked and max(acked) > 1_000_000:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the transfer never reached 1 MB")
            net.server.run(["ss", "-K", "state", "established", "sport", "= :443"],
                           check=False)
            client.join(ctx.timeout_s + 10)
            assert not client.is_alive()
        finally:
            app.stop_server(net.server, handle)
    return result["outcome"]


@pytest.mark.parametrize("kind", sorted(APPS))
def test_tcp_reset_mid_transfer_is_aborted(net: Net, kind: str) -> None:
    ctx = net.ctx(f"{kind}-reset-tcp", "tcp", timeout_s=15.0, payload=net.big_payload())
    outcome = _reset_mid_transfer(net, kind, ctx)
    assert outcome.status == "aborted", outcome
    assert outcome.tls_version == "TLSv1.3"
    assert 1_000_000 < outcome.bytes_received < 8_000_000
    assert outcome.duration_s < 10.0
    if kind in ("python", "nginx-curl"):
        assert outcome.error and "reset" in outcome.error.lower(), outcome.error


def test_mptcp_reset_of_the_only_subflow_does_not_abort(net: Net) -> None:
    """Kernel behaviour the scenarios rely on: a RST kills a subflow, not the MPTCP
    connection (RFC 8684). With no other path the download stalls, and the client's time
    bound ends it: ``timeout``, not ``aborted`` as under TCP."""
    ctx = net.ctx("python-reset-mptcp", "mptcp", timeout_s=3.0, payload=net.big_payload())
    outcome = _reset_mid_transfer(net, "python", ctx)
    assert outcome.status == "timeout", outcome
    assert outcome.error and "transfer" in outcome.error
    assert 1_000_000 < outcome.bytes_received < 8_000_000
    assert outcome.mptcp is not None and outcome.mptcp.get("fallback") is False
