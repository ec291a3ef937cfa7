"""The ``openssl`` app: ``openssl s_server -WWW`` and ``openssl s_client``, TLS 1.3 only.

The server serves the payload as ``GET /<name>`` from a directory in the workdir that holds
only a link to it; the client sends the request on stdin and writes what it receives to a
file, from which the HTTP header is stripped before hashing. Under mptcp both run through
``mptcpize run``. ``handshake_s`` is the time from starting the client process to the
``CONNECTION ESTABLISHED`` line on its stderr (includes process start-up, a few ms).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any, ClassVar

from testbed.apps.base import (
    KILL_GRACE_S,
    App,
    AppContext,
    ServerHandle,
    mptcpize,
    tail,
    wait_listening,
)
from testbed.model.outcome import AppOutcome
from testbed.runtime.node import Node

DOC_NAME = "payload.bin"
_PROTO_RE = re.compile(r"^Protocol version:\s*(\S+)", re.M)
_CIPHER_RE = re.compile(r"^Ciphersuite:\s*(\S+)", re.M)
_STATUS_RE = re.compile(rb"^HTTP/1\.[01] (\d{3})")


def _docroot(ctx: AppContext, workdir_file: Path) -> Path:
    """A directory holding only ``payload.bin`` (a symlink to the payload, or a copy)."""
    root = workdir_file
    root.mkdir(parents=True, exist_ok=True)
    doc = root / DOC_NAME
    if doc.is_symlink() or doc.exists():
        doc.unlink()
    try:
        doc.symlink_to(ctx.payload.resolve())
    except OSError:
        shutil.copyfile(ctx.payload, doc)
    return root


def classify_failure(stderr: str, handshake_done: bool) -> tuple[str, str]:
    """Status and a short reason for an s_client run that did not end cleanly."""
    low = stderr.lower()
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    reason = next((ln for ln in lines if ln.startswith(("connect:errno", "verify error"))),
                  None)
    reason = reason or next((ln for ln in lines if "error" in ln.lower()),
                            lines[-1] if lines else "no diagnostics")
    if not handshake_done:
        if ("connect:errno" in low or "bio_connect" in low or "connection refused" in low
                or "no route to host" in low or "network is unreachable" in low):
            return "connect_failed", reason
        return "tls_error", reason
    if "ssl routines" in low or "alert" in low or "bad record mac" in low:
        return "tls_error", reason
    if "errno=104" in low or "connection reset" in low or "errno=32" in low:
        return "aborted", reason
    return "aborted", reason


def strip_http(body: bytes) -> tuple[int | None, bytes]:
    """(HTTP status, entity) of an HTTP/1.0 response; (None, raw) if there is no header."""
    end = body.find(b"\r\n\r\n")
    match = _STATUS_RE.match(body)
    if end < 0 or match is None:
        return None, body
    return int(match.group(1)), body[end + 4:]


class OpensslCli(App):
    """openssl s_server -WWW and s_client (through mptcpize for MPTCP)."""

    kind: ClassVar[str] = "openssl"
    requires: ClassVar[frozenset[str]] = frozenset({"openssl"})
    requires_mptcp: ClassVar[frozenset[str]] = frozenset({"mptcp", "mptcpize"})

    def start_server(self, node: Node, ctx: AppContext) -> ServerHandle:
        log = self.file(ctx, "server.log")
        root = _docroot(ctx, self.file(ctx, "www"))
        argv = mptcpize(["openssl", "s_server", "-4", "-tls1_3", "-WWW",
                         "-accept", str(ctx.port),
                         "-cert", str(ctx.pki.server_cert), "-key", str(ctx.pki.server_key),
                         "-keylogfile", str(self.file(ctx, "server-keylog.txt"))],
                        ctx.transport)
        with log.open("ab") as fh:
            proc = node.popen(argv, label=f"{self.kind} server", stdout=fh, stderr=fh,
                              cwd=root)
        wait_listening(node, proc, ctx.port, log, f"{self.kind} s_server")
        return ServerHandle(self.kind, node.name, proc, log, ctx.port, files={"www": root})

    def run_client(self, node: Node, ctx: AppContext) -> AppOutcome:
        raw_out = self.file(ctx, "client-raw.bin")
        err_path = self.file(ctx, "client.stderr")
        argv = mptcpize(["openssl", "s_client", "-4", "-tls1_3",
                         "-connect", f"{ctx.server_address}:{ctx.port}",
                         "-servername", ctx.sni, "-verify_hostname", ctx.sni,
                         "-CAfile", str(ctx.pki.ca_cert), "-verify_return_error",
                         "-brief", "-ign_eof",
                         "-keylogfile", str(self.file(ctx, "client-keylog.txt"))],
                        ctx.transport)
        request = f"GET /{DOC_NAME} HTTP/1.0\r\n\r\n".encode()
        established: list[float] = []
        t0 = time.monotonic()
        killed = False
        with raw_out.open("wb") as out, err_path.open("wb") as err_file:
            proc = node.popen(argv, label=f"{self.kind} client", stdout=out,
                              stderr=subprocess.PIPE, stdin=subprocess.PIPE)
            reader = threading.Thread(target=_pump_stderr,
                                      args=(proc.stderr, err_file, t0, established),
                                      daemon=True)
            reader.start()
            try:
                if proc.stdin is not None:
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.write(request)
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.close()
                try:
                    proc.wait(timeout=ctx.timeout_s)
                except subprocess.TimeoutExpired:
                    killed = True
            finally:
                node.stop(proc)
                reader.join(timeout=KILL_GRACE_S)
        elapsed = time.monotonic() - t0
        stderr = err_path.read_text(errors="replace")
        version = _match(_PROTO_RE, stderr)
        cipher = _match(_CIPHER_RE, stderr)
        handshake_s = round(established[0], 6) if established else None
        hs_done = handshake_s is not None
        common: dict[str, Any] = {"tls_version": version, "cipher": cipher,
                                  "handshake_s": handshake_s, "duration_s": elapsed}
        extra: dict[str, Any] = {"exit_code": None if killed else proc.returncode,
                 "handshake_s_method": "client process start to CONNECTION ESTABLISHED"}
        if killed:
            phase = "transfer" if hs_done else "connect or handshake"
            received = len(strip_http(raw_out.read_bytes())[1]) if hs_done else 0
            return self.outcome(ctx, status="timeout", extra=extra, bytes_received=received,
                                error=f"s_client killed after {elapsed:.1f}s during {phase}",
                                **common)
        # FIN without close_notify after the handshake: a truncation that the bytes judge.
        ragged = hs_done and "unexpected eof" in stderr.lower()
        if ragged:
            extra["close_notify"] = False
        if not ragged and (proc.returncode != 0 or not hs_done):
            status, reason = classify_failure(stderr, hs_done)
            received = raw_out.stat().st_size if hs_done else 0
            return self.outcome(ctx, status=status, error=reason, extra=extra,
                                bytes_received=received, **common)
        http_status, body = strip_http(raw_out.read_bytes())
        extra["http_status"] = http_status
        if http_status != 200:
            status = "aborted" if ragged and http_status is None else "error"
            return self.outcome(ctx, status=status, extra=extra, bytes_received=len(body),
                                error=f"server answered HTTP {http_status} (stderr: "
                                      f"{tail(err_path, 3)})", **common)
        return self.outcome(ctx, status="ok", bytes_received=len(body),
                            sha256_received=hashlib.sha256(body).hexdigest(), extra=extra,
                            **common)


def _match(pattern: re.Pattern[str], text: str) -> str | None:
    m = pattern.search(text)
    return m.group(1) if m else None


def _pump_stderr(stream: IO[bytes] | None, sink: IO[bytes], t0: float,
                 established: list[float]) -> None:
    """Copy the client's stderr to its file, noting when the handshake completed."""
    if stream is None:
        return
    for line in iter(stream.readline, b""):
        if not established and line.startswith(b"CONNECTION ESTABLISHED"):
            established.append(time.monotonic() - t0)
        sink.write(line)
    sink.flush()
