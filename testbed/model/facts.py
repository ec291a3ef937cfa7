"""Measured facts of one scenario run, derived only from recorded evidence.

The inputs are the application outcome, per-node counter deltas and per-path observer
summaries (tshark on the pcaps); the output is a flat dict the expectations are checked
against, stored beside the verdict so anyone can recompute it.

``subflows`` and ``fallback`` are end to end: from the server's counters (joins it
accepted, whether it ever saw MP_CAPABLE) and any fallback counter of any node.
``client_subflows`` / ``client_fallback`` are the client's own MPTCP_INFO (python client
only; None otherwise): behind an MPTCP-to-TCP converter the two views differ.
"""

from __future__ import annotations

from typing import Any

FALLBACK_COUNTERS = ("MPTcpExtMPCapableFallbackACK", "MPTcpExtMPCapableFallbackSYNACK",
                     "MPTcpExtDssFallback", "MPTcpExtMPCapableDataFallback",
                     "MPTcpExtInfiniteMapTx", "MPTcpExtInfiniteMapRx")
# A path "carries data" when its capture saw at least this share of the transfer (or
# MIN_PATH_BYTES, whichever is larger): handshakes and ACKs alone do not count.
MIN_PATH_SHARE = 0.01
MIN_PATH_BYTES = 2000


def derive_facts(*, transport: str, outcome: dict[str, Any], counters: dict[str, dict[str, int]],
                 observers: dict[str, dict[str, Any]], server: str,
                 app_bytes: int) -> dict[str, Any]:
    srv = counters.get(server, {})
    mp_handshake = srv.get("MPTcpExtMPCapableSYNRX", 0) > 0
    fallback_counters = {name: value for node in counters.values()
                         for name, value in node.items() if name in FALLBACK_COUNTERS and value}
    mptcp_info = outcome.get("mptcp") or {}
    if transport == "mptcp":
        fallback = (not mp_handshake) or bool(fallback_counters) or \
            bool(mptcp_info.get("fallback"))
        joined = srv.get("MPTcpExtMPJoinAckRx", 0)
        subflows = (1 + joined) if not fallback else 1
    else:
        fallback = False
        subflows = 1
    # The client's own view (MPTCP_INFO of the python client): it differs from the
    # end-to-end view above when a middlebox terminates MPTCP (a converter, M4c).
    client_subflows = mptcp_info.get("subflows_total") if transport == "mptcp" else None
    client_fallback = mptcp_info.get("fallback") if transport == "mptcp" else None
    threshold = max(MIN_PATH_BYTES, int(app_bytes * MIN_PATH_SHARE))
    paths_with_data = sorted(
        path for path, obs in observers.items()
        if sum((obs.get("payload_bytes") or {}).values()) >= threshold)
    return {
        "status": outcome.get("status"),
        "checksum_match": outcome.get("sha256_received") == outcome.get("sha256_expected"),
        "tls_version": outcome.get("tls_version"),
        "subflows": subflows,
        "fallback": fallback,
        "client_subflows": client_subflows if isinstance(client_subflows, int) else None,
        "client_fallback": client_fallback if isinstance(client_fallback, bool) else None,
        "fallback_counters": fallback_counters,
        "paths_with_data": paths_with_data,
        "bytes_per_path": {path: sum((obs.get("payload_bytes") or {}).values())
                           for path, obs in observers.items()},
        "sni_seen_on": sorted(p for p, o in observers.items()
                              if (o.get("sni") or {}).get("status") == "full"),
        "sni_partial_on": sorted(p for p, o in observers.items()
                                 if (o.get("sni") or {}).get("status") == "partial"),
        "keys_seen_on": sorted(p for p, o in observers.items()
                               if (o.get("mptcp") or {}).get("keys")),
        "server_address_seen_on": sorted(p for p, o in observers.items()
                                         if o.get("server_addresses_seen")),
        "counters": counters,
    }
