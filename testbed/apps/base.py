"""The application interface: a TLS 1.3 server and client pair run over TCP or kernel MPTCP.

An ``App`` starts its server in one node, runs its client in another and turns what the
client saw into an ``AppOutcome``. Every process runs through ``Node.popen`` (own session,
recorded in the ledger, stopped by PID); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from testbed.errors import RuntimeFailure
from testbed.model.outcome import TRANSPORTS, AppOutcome, final_status
from testbed.runtime.node import Node
from testbed.runtime.pki import Pki
from testbed.runtime.procwait import signal_group, wait_exit

LISTEN_TIMEOUT_S = 30.0  # an upper bound on a state wait: slow machines (TCG VMs) need it
# A listener poll reads two /proc files (no process is started), so it can be frequent.
POLL_INTERVAL_S = 0.005
TCP_LISTEN = 0x0A  # the "st" column of /proc/net/tcp{,6}
KILL_GRACE_S = 5.0  # beyond ctx.timeout_s, before a client is killed by PID
SERVER_STOP_GRACE_S = 2.0  # a server's exit after SIGTERM (node.stop's own grace)


@dataclass
class AppContext:
    workdir: Path          # evidence dir for this scenario+transport
    pki: Pki
    transport: str         # "tcp" | "mptcp"
    server_address: str    # IPv4 of the server node
    port: int
    sni: str
    payload: Path          # the file the server sends to the client
    payload_sha256: str
    timeout_s: float       # bound for the whole client run
    # Claim S1 (python client only): split the ClientHello across two subflows.
    split_client_hello: bool = False
    split_at: int | str = "sni_middle"  # byte offset in the ClientHello, or sni_middle
    split_steer: str = "mp_prio"        # "none": split the writes only (a control)
    # False (python app only): the payload over the bare socket, no TLS: a plaintext
    # control showing what TLS protects against (a3_join_plain).
    tls: bool = True

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {self.transport!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")

    @property
    def payload_bytes(self) -> int:
        return self.payload.stat().st_size


@dataclass
class ServerHandle:
    app: str
    node: str
    proc: subprocess.Popen[Any]
    log: Path
    port: int
    files: dict[str, Path] = field(default_factory=dict)
    returncode: int | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def listening_ports(table: str) -> set[int]:
    """The local ports of the LISTEN sockets in a /proc/net/tcp or tcp6 table."""
    ports: set[int] = set()
    for line in table.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 4:
            continue
        with contextlib.suppress(ValueError):
            if int(cols[3], 16) == TCP_LISTEN:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def is_listening(node: Node, port: int) -> bool:
    """Whether a TCP or MPTCP socket listens on ``port`` (any address, v4 or v6) in the node.

    Read from the node's /proc/net/tcp{,6} rather than with ``ss`` in the node: no process
    per poll. An MPTCP listener shows there too (as its in-kernel TCP listener)."""
    for table in ("tcp", "tcp6"):
        try:
            text = node.read_proc_net(table)
        except OSError:  # no tcp6 table with IPv6 disabled
            continue
        if port in listening_ports(text):
            return True
    return False


def wait_listening(node: Node, proc: subprocess.Popen[Any], port: int, log: Path,
                   what: str, timeout_s: float = LISTEN_TIMEOUT_S) -> None:
    """Return once ``port`` has a listener in ``node``; raise with the server's log tail if
    the server exits first or the bound passes (the server is stopped then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            code = proc.returncode
            node.stop(proc)
            raise RuntimeFailure(f"{what} on {node.name} exited ({code}) before listening on "
                                 f"port {port}; log {log}:\n{tail(log)}")
        if is_listening(node, port):
            return
        if time.monotonic() > deadline:
            node.stop(proc)
            raise RuntimeFailure(f"{what} on {node.name} did not listen on port {port} within "
                                 f"{timeout_s:.0f}s; log {log}:\n{tail(log)}")
        time.sleep(POLL_INTERVAL_S)


def run_bounded(node: Node, argv: list[str], *, label: str, timeout_s: float, stdout: Path,
                stderr: Path, stdin: bytes | None = None, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> tuple[int | None, float]:
    """Run ``argv`` in ``node`` with stdout/stderr to files; kill it by PID if it outlives
    ``timeout_s``. Returns (exit code or None if it had to be killed, elapsed seconds)."""
    t0 = time.monotonic()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = node.popen(argv, label=label, stdout=out, stderr=err,
                          stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                          env=env, cwd=cwd)
        killed = False
        try:
            if stdin is not None and proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(stdin)
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                killed = True
        finally:
            node.stop(proc)
    return (None if killed else proc.returncode), time.monotonic() - t0


class App(ABC):
    kind: ClassVar[str]
    requires: ClassVar[frozenset[str]]          # doctor capability names, any transport
    requires_mptcp: ClassVar[frozenset[str]] = frozenset()  # extra ones under mptcp

    @classmethod
    def requirements(cls, transport: str) -> set[str]:
        needs = set(cls.requires)
        if transport == "mptcp":
            needs |= cls.requires_mptcp
        return needs

    @abstractmethod
    def start_server(self, node: Node, ctx: AppContext) -> ServerHandle:
        """Start the server in ``node``; return once it listens on ``ctx.port``."""

    def launch_server(self, node: Node, ctx: AppContext) -> ServerHandle:
        """Start the server without waiting for it to listen (``wait_server`` does), so the
        caller can overlap its start-up with other waits. By default ``start_server``: an
        app that does not split the two has its server listening on return."""
        return self.start_server(node, ctx)

    def wait_server(self, node: Node, handle: ServerHandle) -> None:  # noqa: B027 - no-op
        """Return once the server of ``launch_server`` listens (nothing to do by default)."""

    @abstractmethod
    def run_client(self, node: Node, ctx: AppContext) -> AppOutcome:
        """Download the payload from the server; bounded by ``ctx.timeout_s``."""

    def stop_server(self, node: Node, handle: ServerHandle) -> None:
        """SIGTERM the server's group and wait for its exit (woken by it, not by a poll
        tick); ``node.stop`` then reaps it, or escalates if it did not exit in time."""
        if signal_group(handle.proc):
            wait_exit(handle.proc, SERVER_STOP_GRACE_S)
        handle.returncode = node.stop(handle.proc)

    # -- helpers for subclasses --------------------------------------------------------------
    def file(self, ctx: AppContext, name: str) -> Path:
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        return ctx.workdir / f"{self.kind}-{name}"

    def outcome(self, ctx: AppContext, *, status: str, tls_version: str | None = None,
                cipher: str | None = None, bytes_received: int = 0,
                sha256_received: str | None = None, duration_s: float = 0.0,
                handshake_s: float | None = None, error: str | None = None,
                mptcp: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> AppOutcome:
        expected = ctx.payload_bytes
        extra = extra or {}
        status = final_status(status, sha256_received, ctx.payload_sha256, bytes_received,
                              expected)
        if status == "checksum_mismatch" and extra.get("close_notify") is False:
            # TCP closed without TLS close_notify and the bytes are not all there: the
            # connection was cut mid-transfer (curl reports this as exit 18/56).
            status = "aborted"
            how = ("reset (TCP state CLOSE)" if extra.get("tcp_state_at_eof") == "CLOSE"
                   else "closed")
            error = error or (f"connection {how} without TLS close_notify after "
                              f"{bytes_received} of {expected} bytes")
        if status == "checksum_mismatch" and error is None:
            error = (f"received {bytes_received} bytes with SHA-256 {sha256_received}; "
                     f"expected {expected} bytes with {ctx.payload_sha256}")
        return AppOutcome(
            app=self.kind, transport=ctx.transport, status=status, tls_version=tls_version,
            cipher=cipher, sni=ctx.sni, bytes_expected=expected, bytes_received=bytes_received,
            sha256_expected=ctx.payload_sha256, sha256_received=sha256_received,
            duration_s=round(duration_s, 6), handshake_s=handshake_s, error=error, mptcp=mptcp,
            extra=extra)


def mptcpize(argv: list[str], transport: str) -> list[str]:
    """Wrap an unmodified program so its TCP sockets become MPTCP ones (LD_PRELOAD)."""
    return ["mptcpize", "run", *argv] if transport == "mptcp" else argv


__all__ = ["App", "AppContext", "ServerHandle", "mptcpize", "run_bounded", "sha256_file",
           "tail", "wait_listening"]
