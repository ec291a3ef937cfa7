"""Transparent TCP-terminating proxies in a slot node (M4, M4c).

An iptables ``nat PREROUTING REDIRECT`` sends the app's flows (TCP to the server's address
and the app's port) to a relay process listening in the slot node
(``testbed.middleboxes._relay_worker``). The relay terminates the client's connection and
opens its own plain TCP connection to the original destination, then copies bytes both ways.
TLS is not touched: the handshake and records pass through the relay as bytes.

- ``tcp_proxy``: the relay's listener is plain TCP, so the client's MP_CAPABLE is answered
  without MPTCP (the client falls back) and the server only sees the proxy's plain SYN.
- ``mptcp_proxy``: the listener is ``IPPROTO_MPTCP`` (RFC 8803's converter idea), so the
  client gets MPTCP up to the proxy (joins are redirected to the same listener, where the
  token lookup happens) and the server plain TCP from the proxy. The proxy must sit where
  every path passes (``core`` in dual_path).

Both take an upstream capture (the server side of the box) and report the relay's JSON log.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.middleboxes.base import Middlebox
from testbed.model.params import ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node

RELAY_MODULE = "testbed.middleboxes._relay_worker"


def proxy_params(listen_port: int) -> dict[str, ParamSpec]:
    """The parameters of a proxy kind; each kind has its own default listener port, so
    both kinds can sit in one node."""
    return {
        "port": ParamSpec("port", int, 443,
                          "destination port of the flows to relay (the app's port)",
                          lo=1, hi=65535),
        "listen_port": ParamSpec("listen_port", int, listen_port,
                                 "port of the relay's listener in the slot node", lo=1024,
                                 hi=65535),
        "idle_timeout_s": ParamSpec("idle_timeout_s", float, 30.0,
                                    "a relayed connection without data for this long is "
                                    "closed (bounds the relay)", lo=1.0, hi=600.0),
        "max_connections": ParamSpec("max_connections", int, 16,
                                     "connections relayed at once; more are refused",
                                     lo=1, hi=256),
    }


class TcpProxy(Middlebox):
    kind = "tcp_proxy"
    description = ("transparent TCP-terminating proxy without MPTCP: REDIRECT of the app's "
                   "flows to a plain-TCP relay in the slot node, which connects to the "
                   "original destination (SO_ORIGINAL_DST) with plain TCP")
    mptcp_listener: ClassVar[bool] = False
    params: ClassVar[dict[str, ParamSpec]] = proxy_params(15001)
    requires = frozenset({"iptables"})
    capture_upstream = True
    template = """\
*nat
-A PREROUTING -p tcp -d {{ server }} --dport {{ port }} -j REDIRECT --to-ports {{ listen_port }}
COMMIT
"""

    def variables(self, node: Node, net: Network) -> dict[str, Any]:
        return {"server": self.server_address}

    def start_workers(self) -> None:
        self.start_worker(RELAY_MODULE, {
            "listen_port": self.values["listen_port"],
            "log": str(self.evidence("relay.jsonl")),
            "mptcp": self.mptcp_listener,
            # Used when SO_ORIGINAL_DST is refused (an MPTCP socket): the server and the
            # app's port, which is what the REDIRECT rule matched.
            "origin": f"{self.server_address}:{self.values['port']}",
            "idle_timeout_s": self.values["idle_timeout_s"],
            "max_connections": self.values["max_connections"],
        }, "relay")

    def relay_log(self) -> list[dict[str, Any]]:
        """The relay's JSON lines (empty when it logged nothing)."""
        path = self.evidence("relay.jsonl")
        if not path.is_file():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        conns = [r for r in self.relay_log() if r.get("event") == "relayed"]
        methods = sorted({str(r.get("original_dst_method")) for r in conns})
        report: dict[str, Any] = {
            "connections": len(conns),
            "refused": sum(1 for r in self.relay_log() if r.get("event") == "refused"),
            "bytes_client_to_server": sum(r["bytes_client_to_server"] for r in conns),
            "bytes_server_to_client": sum(r["bytes_server_to_client"] for r in conns),
            "original_dst_method": ",".join(methods) if methods else None,
            "close_reasons": ",".join(sorted({str(r.get("close_reason")) for r in conns})),
            "upstream_local": ",".join(sorted({str(r.get("upstream_local")) for r in conns})),
        }
        if self.mptcp_listener:
            subflows = [r.get("client_subflows_max") or 0 for r in conns]
            # The proxy's own MPTCP_INFO of the client-side connection (most subflows seen).
            report["proxy_subflows_max"] = max(subflows) if subflows else 0
            report["proxy_fallback"] = any(r.get("client_side_fallback") for r in conns)
        report.update(self.client_view())
        return report

    def client_view(self) -> dict[str, Any]:
        """The client's own MPTCP_INFO (app-outcome.json): with a proxy the generic facts
        ``subflows``/``fallback``, derived from the server's counters, describe the
        server's side only, so the client's side of the box is reported here."""
        path = self.evidence_dir / "app-outcome.json" if self.evidence_dir else None
        if path is None or not path.is_file():
            return {}
        info = json.loads(path.read_text()).get("mptcp")
        if not isinstance(info, dict):  # TCP: no MPTCP socket
            return {"client_fallback": None, "client_subflows": None}
        fallback = info.get("fallback")
        if fallback:
            subflows: Any = 1
        elif isinstance(info.get("subflows_total"), int):
            subflows = info["subflows_total"]
        elif isinstance(info.get("subflows"), int):  # before 6.10: additional ones only
            subflows = info["subflows"] + 1
        else:
            subflows = None
        return {"client_fallback": fallback, "client_subflows": subflows}


class MptcpProxy(TcpProxy):
    kind = "mptcp_proxy"
    description = ("transparent MPTCP-to-TCP converter (RFC 8803 idea): REDIRECT of the app's "
                   "flows, MP_JOINs included, to an IPPROTO_MPTCP relay; plain TCP to the "
                   "server. Put it where every path passes (dual_path: path core)")
    mptcp_listener = True
    params: ClassVar[dict[str, ParamSpec]] = proxy_params(15002)
