"""The claims catalogue of the reference article (ids are stable; DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    id: str
    setting: str
    tcp: str
    mptcp: str


CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("P1", "passive observer on the initial path", "sees SNI, not the data",
          "sees SNI, the MPTCP keys and token in clear, not the data"),
    Claim("P2", "passive observer on the second path only", "(no traffic there)",
          "no SNI by default; only the bytes scheduled on that path"),
    Claim("P3", "metadata: app always uses both paths", "server address seen on one path",
          "server address seen on both paths (MP_JOIN SYN)"),
    Claim("P4", "record now, decrypt later",
          "TLS 1.3 with (EC)DHE: the server's private key does not decrypt the capture", "same"),
    Claim("O1", "off-path spoofed data injection, guessed sequence numbers", "dropped",
          "dropped"),
    Claim("O2", "off-path MP_JOIN with a guessed 32-bit token", "n/a",
          "rejected (reset), victim connection intact"),
    Claim("O3", "off-path MP_JOIN with the right token but no keys", "n/a",
          "HMAC check fails, subflow refused"),
    Claim("H1", "half-on-path: own address, receives its SYN/ACK", "n/a",
          "cannot compute the HMAC: join fails"),
    Claim("A1", "on-path active: inject or modify TLS bytes",
          "TLS alert, connection aborted (DoS only)", "same"),
    Claim("A2", "on-path blocks one path", "connection dies",
          "connection continues on the other path"),
    Claim("A3", "on-path observer of the initial handshake, then active", "n/a",
          "join with captured keys is accepted; TLS turns injection into an abort"),
    Claim("M1", "NAT rewrites address/port on one path", "works", "both paths still used"),
    Claim("M2", "firewall strips MP_CAPABLE from the SYN", "works",
          "falls back to TCP, TLS works"),
    Claim("M2d", "firewall drops SYNs that carry option 30", "works",
          "retries, then plain TCP (blackhole detection)"),
    Claim("M3", "MP_CAPABLE passes, MPTCP options stripped on data", "works",
          "falls back to TCP mid-connection, connectivity kept"),
    Claim("M4", "transparent TCP-terminating proxy without MPTCP", "works",
          "no MPTCP (fallback) even though the server supports it"),
    Claim("M4c", "MPTCP-capable proxy / converter (RFC 8803 idea)", "—",
          "MPTCP on the client–proxy leg, TCP to the server"),
    Claim("M5", "payload-rewriting middlebox", "TLS detects it: abort",
          "TLS detects it; without TLS and with DSS checksum: MP_FAIL / infinite mapping"),
    Claim("S1", "mitigation: split the ClientHello across two subflows", "n/a",
          "each single-path observer sees only part of the SNI"),
)}
