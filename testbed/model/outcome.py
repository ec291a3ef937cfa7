"""What one TLS application run produced: the application-level oracle of a scenario.

Pure data: no I/O. Every application wrapper (``testbed.apps``) returns an ``AppOutcome``;
the scenario runner stores it as JSON next to the other evidence and reads it back with
``from_json``.

Statuses (one per run, the first that applies):

- ``ok``: TLS handshake done, the whole payload received, SHA-256 matches.
- ``checksum_mismatch``: the transfer ended normally but the bytes differ from the payload
  (short, long or altered).
- ``tls_error``: the TLS layer failed: handshake failure, certificate/SNI rejection, an
  alert or a record integrity failure during the transfer.
- ``connect_failed``: the transport connection could not be opened (refused, unreachable).
- ``timeout``: the run's time bound was reached (during connect, handshake or transfer;
  ``error`` says which phase).
- ``aborted``: the connection was reset or cut after the handshake, mid-transfer.
- ``error``: anything else (the tool crashed, an unexpected exit code, bad output).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

STATUSES = ("ok", "checksum_mismatch", "tls_error", "connect_failed", "timeout", "aborted",
            "error")
TRANSPORTS = ("tcp", "mptcp")


@dataclass
class AppOutcome:
    app: str
    transport: str
    status: str
    tls_version: str | None
    cipher: str | None
    sni: str
    bytes_expected: int
    bytes_received: int
    sha256_expected: str
    sha256_received: str | None
    duration_s: float
    handshake_s: float | None
    error: str | None
    mptcp: dict[str, Any] | None
    # Not part of the runner's contract: facts an app could observe beyond the fields above
    # (initial connection's local/peer address, curl timings, close_notify seen, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r} (one of {', '.join(STATUSES)})")

    @property
    def checksum_match(self) -> bool:
        return (self.sha256_received is not None
                and self.sha256_received.lower() == self.sha256_expected.lower()
                and self.bytes_received == self.bytes_expected)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["checksum_match"] = self.checksum_match
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AppOutcome:
        """Rebuild an outcome from ``to_json`` output. Derived and unknown keys are ignored;
        a missing field or a bad status raises ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError("an app outcome must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        required = [name for name in known if name != "extra"]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"app outcome lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        for name in ("bytes_expected", "bytes_received"):
            if not isinstance(kwargs[name], int) or isinstance(kwargs[name], bool):
                raise ValueError(f"app outcome field {name} must be an integer")
        for name in ("duration_s", "handshake_s"):
            value = kwargs[name]
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)):
                raise ValueError(f"app outcome field {name} must be a number")
        if kwargs["mptcp"] is not None and not isinstance(kwargs["mptcp"], dict):
            raise ValueError("app outcome field mptcp must be an object or null")
        kwargs.setdefault("extra", {})
        if not isinstance(kwargs["extra"], dict):
            raise ValueError("app outcome field extra must be an object")
        return cls(**kwargs)


def final_status(status: str, sha256_received: str | None, sha256_expected: str,
                 bytes_received: int, bytes_expected: int) -> str:
    """A client that finished without error gets ``ok`` only if the bytes match."""
    if status != "ok":
        return status
    if (sha256_received is None or sha256_received.lower() != sha256_expected.lower()
            or bytes_received != bytes_expected):
        return "checksum_mismatch"
    return "ok"
