"""Real TLS 1.3 applications run over kernel MPTCP or plain TCP, registered by kind."""

from __future__ import annotations

from testbed.apps.base import App, AppContext, ServerHandle
from testbed.apps.nginx_curl import NginxCurl
from testbed.apps.openssl_cli import OpensslCli
from testbed.apps.python_tls import PythonTls

APPS: dict[str, type[App]] = {cls.kind: cls for cls in (PythonTls, NginxCurl, OpensslCli)}

__all__ = ["APPS", "App", "AppContext", "ServerHandle"]
