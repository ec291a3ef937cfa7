"""The ``nginx-curl`` app: nginx (single process, TLS 1.3 only) serving the payload, curl
downloading it. Under mptcp both run through ``mptcpize run``.

nginx's configuration is rendered from a template in a sandboxed jinja2 environment into
the workdir, with everything it writes (pid, logs, temp paths) under the workdir, checked
with ``nginx -t`` before launch, and run with ``daemon off; master_process off;`` so the
PID we start is the server. curl's ``-w '%{json}'`` gives the timings (``handshake_s`` is
``time_appconnect``) and the initial connection's addresses; ``-v`` gives the TLS version
and cipher; ``SSLKEYLOGFILE`` writes the key log.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from testbed.apps.base import (
    KILL_GRACE_S,
    App,
    AppContext,
    ServerHandle,
    mptcpize,
    run_bounded,
    sha256_file,
    tail,
    wait_listening,
)
from testbed.errors import RuntimeFailure
from testbed.model.outcome import AppOutcome
from testbed.runtime.node import Node

DOC_NAME = "payload.bin"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

NGINX_TEMPLATE = """\
# Rendered by testbed.apps.nginx_curl for one run. Every path is under the run's workdir.
daemon off;
master_process off;
worker_processes 1;
pid {{ pid | q }};
error_log {{ error_log | q }} info;

events {
    worker_connections 64;
}

http {
    log_format testbed '$remote_addr:$remote_port -> $server_addr:$server_port '
                       '"$request" $status $body_bytes_sent $request_time '
                       '$ssl_protocol $ssl_cipher sni=$ssl_server_name';
    access_log {{ access_log | q }} testbed;
{% for name, path in temp_paths %}
    {{ name }}_temp_path {{ path | q }};
{%- endfor %}

    default_type application/octet-stream;
    sendfile off;
    keepalive_timeout 0;
    server_tokens off;

    server {
        listen {{ port }} ssl;
        server_name {{ server_name }};
        ssl_certificate {{ cert | q }};
        ssl_certificate_key {{ key | q }};
        ssl_protocols TLSv1.3;

        location = /{{ doc }} {
            alias {{ payload | q }};
        }
        location / {
            return 404;
        }
    }
}
"""

_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\'\\$;{}#]')
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_SSL_LINE = re.compile(r"SSL connection using (\S+) / (\S+)")


def _quote(value: object) -> str:
    """An nginx string literal for a path; refuses characters nginx would interpret."""
    text = str(value)
    if _UNSAFE.search(text):
        raise RuntimeFailure(f"refusing to put {text!r} in an nginx config: it holds a quote, "
                             "backslash, '$', ';', '{', '}', '#' or a control character")
    return f'"{text}"'


_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                                     keep_trailing_newline=True)
_ENV.filters["q"] = _quote


def render_nginx_conf(*, prefix: Path, port: int, sni: str, cert: Path, key: Path,
                      payload: Path) -> str:
    server_name = sni if _HOSTNAME.match(sni) else "_"
    return _ENV.from_string(NGINX_TEMPLATE).render(
        pid=prefix / "nginx.pid", error_log=prefix / "error.log",
        access_log=prefix / "access.log",
        temp_paths=[(name, prefix / "temp" / name) for name in TEMP_PATHS],
        port=int(port), server_name=server_name, cert=cert.resolve(), key=key.resolve(),
        doc=DOC_NAME, payload=payload.resolve())


# curl exit codes (curl 7.88 man page, EXIT CODES)
CURL_STATUS: dict[int, str] = {
    0: "ok",
    7: "connect_failed",
    28: "timeout",
    18: "aborted",   # partial file: fewer bytes than Content-Length
    52: "aborted",   # empty reply
    55: "aborted",   # send failure
    56: "aborted",   # receive failure (refined below: TLS record errors are tls_error)
    **dict.fromkeys((35, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98),
                    "tls_error"),
}


def classify_curl(code: int, stderr: str) -> str:
    status = CURL_STATUS.get(code, "error")
    if code == 56:
        low = stderr.lower()
        if ("ssl routines" in low and "unexpected eof" not in low) or "alert" in low:
            status = "tls_error"
    return status


def _curl_error_line(stderr: str) -> str | None:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.startswith("curl: (")]
    return lines[-1] if lines else None


class NginxCurl(App):
    """nginx serving HTTPS, curl fetching (both through mptcpize for MPTCP)."""

    kind: ClassVar[str] = "nginx-curl"
    requires: ClassVar[frozenset[str]] = frozenset({"nginx", "curl"})
    requires_mptcp: ClassVar[frozenset[str]] = frozenset({"mptcp", "mptcpize"})

    def start_server(self, node: Node, ctx: AppContext) -> ServerHandle:
        prefix = self.file(ctx, "nginx")
        for name in TEMP_PATHS:
            (prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
        conf = self.file(ctx, "nginx.conf")
        conf.write_text(render_nginx_conf(prefix=prefix, port=ctx.port, sni=ctx.sni,
                                          cert=ctx.pki.server_cert, key=ctx.pki.server_key,
                                          payload=ctx.payload))
        base = ["nginx", "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]
        check = node.run([*base, "-t", "-q"], timeout=15.0, check=False)
        if check.returncode != 0:
            raise RuntimeFailure(f"nginx rejected its config {conf}: "
                                 f"{(check.stderr or check.stdout).strip()[:800]}")
        log = self.file(ctx, "server.log")
        with log.open("ab") as fh:
            proc = node.popen(mptcpize(base, ctx.transport), label=f"{self.kind} nginx",
                              stdout=fh, stderr=fh)
        try:
            wait_listening(node, proc, ctx.port, log, "nginx")
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"{exc}\nerror.log:\n{tail(prefix / 'error.log')}") from None
        return ServerHandle(self.kind, node.name, proc, log, ctx.port,
                            files={"conf": conf, "error_log": prefix / "error.log",
                                   "access_log": prefix / "access.log"})

    def run_client(self, node: Node, ctx: AppContext) -> AppOutcome:
        out = self.file(ctx, "received.bin")
        stdout, stderr_path = self.file(ctx, "client.json"), self.file(ctx, "client.stderr")
        if out.exists():
            out.unlink()
        argv = mptcpize(["curl", "-q", "-v", "-sS", "--http1.1", "--tlsv1.3", "--noproxy", "*",
                         "--cacert", str(ctx.pki.ca_cert),
                         "--resolve", f"{ctx.sni}:{ctx.port}:{ctx.server_address}",
                         "--max-time", f"{ctx.timeout_s:g}", "-o", str(out),
                         "-w", "%{json}\\n", f"https://{ctx.sni}:{ctx.port}/{DOC_NAME}"],
                        ctx.transport)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["SSLKEYLOGFILE"] = str(self.file(ctx, "client-keylog.txt"))
        code, elapsed = run_bounded(node, argv, label=f"{self.kind} curl",
                                    timeout_s=ctx.timeout_s + KILL_GRACE_S, stdout=stdout,
                                    stderr=stderr_path, env=env)
        stderr = stderr_path.read_text(errors="replace")
        w = _last_json(stdout)
        ssl_line = _SSL_LINE.search(stderr)
        version, cipher = (ssl_line.group(1), ssl_line.group(2)) if ssl_line else (None, None)
        appconnect = _num(w.get("time_appconnect"))
        extra: dict[str, Any] = {
            "exit_code": code,
            "http_code": w.get("http_code"),
            "local": _endpoint(w.get("local_ip"), w.get("local_port")),
            "peer": _endpoint(w.get("remote_ip"), w.get("remote_port")),
            **{k: w[k] for k in ("time_connect", "time_appconnect", "time_starttransfer",
                                 "time_total", "ssl_verify_result") if k in w},
        }
        received = out.stat().st_size if out.exists() else 0
        common: dict[str, Any] = {
            "tls_version": version, "cipher": cipher,
            "handshake_s": appconnect if appconnect else None,
            "duration_s": _num(w.get("time_total")) or elapsed,
            "bytes_received": received, "extra": extra,
        }
        if code is None:
            return self.outcome(ctx, status="timeout",
                                error=f"curl killed after {elapsed:.1f}s", **common)
        if code != 0:
            return self.outcome(ctx, status=classify_curl(code, stderr),
                                error=_curl_error_line(stderr) or f"curl exited {code}",
                                **common)
        if w.get("http_code") != 200:
            return self.outcome(ctx, status="error",
                                error=f"server answered HTTP {w.get('http_code')}", **common)
        return self.outcome(ctx, status="ok", sha256_received=sha256_file(out), **common)


def _last_json(path: Path) -> dict[str, Any]:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict):
                return data
    return {}


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return round(float(value), 6)
    return None


def _endpoint(addr: Any, port: Any) -> dict[str, Any] | None:
    if not addr:
        return None
    return {"addr": addr, "port": port}
