"""The ``python`` app: Python's ``ssl`` over a socket opened with IPPROTO_MPTCP or TCP.

The only app that sees the kernel's MPTCP view from inside the connection
(``MPTCP_INFO``, ``MPTCP_SUBFLOW_ADDRS``, the fallback marker). Both peers are
``testbed.peers.pyssl_peer`` run in the nodes with the orchestrator's interpreter.
"""

from __future__ import annotations

import json
import sys
from typing import Any, ClassVar

from testbed.apps.base import (
    KILL_GRACE_S,
    App,
    AppContext,
    ServerHandle,
    run_bounded,
    tail,
    wait_listening,
)
from testbed.model.outcome import AppOutcome
from testbed.runtime.node import Node
from testbed.runtime.worker import REPO_ROOT, worker_env

CLIENT_FIELDS = ("status", "tls_version", "cipher", "bytes_received", "sha256_received",
                 "duration_s", "handshake_s", "error", "mptcp", "extra")


def _peer(role: str) -> list[str]:
    return [sys.executable, "-m", "testbed.peers.pyssl_peer", role]


class PythonTls(App):
    """Python's ssl over an IPPROTO_MPTCP (or TCP) socket; reports MPTCP_INFO and subflows."""

    kind: ClassVar[str] = "python"
    requires: ClassVar[frozenset[str]] = frozenset()  # the orchestrator's own Python
    requires_mptcp: ClassVar[frozenset[str]] = frozenset({"mptcp"})

    def start_server(self, node: Node, ctx: AppContext) -> ServerHandle:
        handle = self.launch_server(node, ctx)
        self.wait_server(node, handle)
        return handle

    def launch_server(self, node: Node, ctx: AppContext) -> ServerHandle:
        log = self.file(ctx, "server.log")
        argv = [*_peer("server"), "--transport", ctx.transport, "--port", str(ctx.port),
                "--cert", str(ctx.pki.server_cert), "--key", str(ctx.pki.server_key),
                "--payload", str(ctx.payload),
                "--keylog", str(self.file(ctx, "server-keylog.txt")),
                "--io-timeout", str(max(ctx.timeout_s, 5.0))]
        if not ctx.tls:
            argv.append("--no-tls")
        with log.open("ab") as fh:
            proc = node.popen(argv, label=f"{self.kind} server", stdout=fh, stderr=fh,
                              cwd=REPO_ROOT, env=worker_env())
        return ServerHandle(self.kind, node.name, proc, log, ctx.port)

    def wait_server(self, node: Node, handle: ServerHandle) -> None:
        wait_listening(node, handle.proc, handle.port, handle.log, f"{self.kind} server")

    def run_client(self, node: Node, ctx: AppContext) -> AppOutcome:
        stdout, stderr = self.file(ctx, "client.json"), self.file(ctx, "client.stderr")
        received = self.file(ctx, "received.bin")
        argv = [*_peer("client"), "--transport", ctx.transport, "--connect",
                ctx.server_address, "--port", str(ctx.port), "--sni", ctx.sni,
                "--ca", str(ctx.pki.ca_cert), "--out", str(received),
                "--keylog", str(self.file(ctx, "client-keylog.txt")),
                "--timeout", str(ctx.timeout_s)]
        if not ctx.tls:
            argv.append("--no-tls")
        if ctx.split_client_hello:
            argv += ["--split-client-hello", "--split-at", str(ctx.split_at),
                     "--split-steer", ctx.split_steer]
        code, elapsed = run_bounded(node, argv, label=f"{self.kind} client",
                                    timeout_s=ctx.timeout_s + KILL_GRACE_S, stdout=stdout,
                                    stderr=stderr, env=worker_env(), cwd=REPO_ROOT)
        if code is None:
            return self.outcome(ctx, status="timeout", duration_s=elapsed,
                                error=f"client killed after {elapsed:.1f}s "
                                      f"(bound {ctx.timeout_s}s + {KILL_GRACE_S}s grace)")
        lines = [ln for ln in stdout.read_text(errors="replace").splitlines() if ln.strip()]
        try:
            data: dict[str, Any] = json.loads(lines[-1])
            fields = {k: data[k] for k in CLIENT_FIELDS}
        except (IndexError, ValueError, KeyError, TypeError):
            return self.outcome(ctx, status="error", duration_s=elapsed,
                                error=f"client exited {code} without a result line; "
                                      f"stderr:\n{tail(stderr)}")
        return self.outcome(ctx, **fields)
