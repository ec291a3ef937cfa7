"""``decrypt_later``: record now, decrypt later (claim P4).

A tap on a path (position ``tap``) records the path with its own capture. After the
transfer it plays the attacker who later obtains the server's private key (the run's
``pki/server.key``) and tries to decrypt the recording with tshark's private-key
decryption (``-o uat:rsa_keys:...``). Under TLS 1.3 that must fail: every key exchange is
ephemeral (EC)DHE, the server's long-term key only signs; and this testbed's server key is
an EC P-256 key, which no key-transport decryption can use at all (the report says so).

Control: the same capture, the same tshark, given the session's key log (the secrets the
victim client wrote, ``-o tls.keylog_file:``) must decrypt, proving the capture holds the
session and the tool works. Under TCP it decrypts the handshake and the application data
(whose plaintext is checked against the payload). Under MPTCP, a single path's capture
decrypts the handshake and the first records under the application keys, but the
application data records are split between the subflows and tshark (4.0) has no MPTCP
data-level reassembly: records on this path cannot be put in order, so the report counts
them honestly (often zero) and ``keylog_decrypts`` rests on the handshake.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from testbed.model.wire import payload_pattern
from testbed.runtime.attack import Attack

TSHARK_TIMEOUT_S = 120.0
# Handshake messages that TLS 1.3 sends encrypted: seeing one means a record was decrypted.
ENCRYPTED_HANDSHAKE = {"8", "11", "13", "15", "20", "4"}
HEX_LINE = re.compile(r"^[0-9a-f]{4}\s+((?:[0-9a-f]{2} ){1,16})")


def _find_server_key(evidence_dir: Path) -> Path | None:
    """The run's server key: ``<run>/pki/server.key`` (evidence is ``<run>/<name>/<t>``)."""
    for parent in list(evidence_dir.parents)[:3]:
        key = parent / "pki" / "server.key"
        if key.is_file():
            return key
    return None


def _key_type(key: Path) -> str:
    try:
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        return f"unreadable ({exc})"
    if isinstance(loaded, rsa.RSAPrivateKey):
        return f"RSA {loaded.key_size}"
    if isinstance(loaded, ec.EllipticCurvePrivateKey):
        return f"EC {loaded.curve.name}"
    return type(loaded).__name__


def tshark_tls(pcap: Path, opts: list[str]) -> dict[str, Any]:
    """Count what tshark shows of the TLS records of ``pcap`` with the given options."""
    argv = ["tshark", "-n", "-r", str(pcap), *opts, "-Y", "tls", "-T", "fields",
            "-E", "separator=|", "-e", "tls.record.opaque_type", "-e",
            "tls.record.content_type", "-e", "tls.handshake.type", "-e",
            "tls.handshake.extensions.supported_version"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=TSHARK_TIMEOUT_S,
                         check=False)
    encrypted = app_data = 0
    handshake: set[str] = set()
    versions: set[str] = set()
    for line in res.stdout.splitlines():
        cols = [*line.split("|"), "", "", ""][:4]
        encrypted += len([v for v in cols[0].split(",") if v == "23"])
        app_data += len([v for v in cols[1].split(",") if v == "23"])
        handshake |= {v for v in cols[2].split(",") if v}
        versions |= {v for v in cols[3].split(",") if v}
    decrypted_hs = sorted(handshake & ENCRYPTED_HANDSHAKE, key=int)
    return {"encrypted_records": encrypted, "app_data_records": app_data,
            "handshake_decrypted": "11" in handshake or "20" in handshake,
            "decrypted_handshake_types": decrypted_hs,
            "tls13": "0x0304" in versions,
            "tshark_exit": res.returncode}


def first_plaintext(pcap: Path, opts: list[str], limit: int = 64) -> bytes:
    """The first bytes of the first decrypted application data record (tshark ``-x``)."""
    argv = ["tshark", "-n", "-r", str(pcap), *opts, "-Y", "tls.record.content_type == 23",
            "-x"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = b""
    inside = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("Decrypted TLS"):
                inside = True
                continue
            if inside:
                m = HEX_LINE.match(line)
                if not m:
                    if out:
                        break
                    continue
                out += bytes.fromhex(m.group(1).replace(" ", ""))
                if len(out) >= limit:
                    break
    finally:
        proc.kill()
        proc.wait(timeout=10)
    return out[:limit]


class DecryptLater(Attack):
    kind: ClassVar[str] = "decrypt_later"
    description: ClassVar[str] = (
        "records a path (tap), then tries to decrypt the recording with the server's private "
        "key (tshark); control: the session key log must decrypt it")
    positions: ClassVar[tuple[str, ...]] = ("tap",)
    requires: ClassVar[frozenset[str]] = frozenset({"tcpdump", "tshark"})

    def prepare(self) -> None:
        self.record_tap()

    def finish(self) -> dict[str, Any]:
        self.stop_recording()
        ctx = self.ctx
        key = _find_server_key(ctx.evidence_dir)
        keylogs = sorted(ctx.evidence_dir.glob("*client-keylog.txt"))
        report: dict[str, Any] = {"path": ctx.attachment.path, "pcap": self.pcap.name,
                                  "server_key": str(key) if key else None,
                                  "server_key_type": _key_type(key) if key else None,
                                  "keylog": keylogs[0].name if keylogs else None}
        if key is not None:
            debug = ctx.evidence("tshark-private-key-debug.txt")
            opts = ["-o", f'uat:rsa_keys:"{key}",""', "-o", f"tls.debug_file:{debug}"]
            pk = tshark_tls(self.pcap, opts)
            reasons = sorted({m.group(0) for m in re.finditer(
                r"Cannot find [A-Z_]+, decryption impossible|[^\n]*(?:private key|RSA)"
                r"[^\n]*(?:fail|unsupported|not)[^\n]*",
                debug.read_text(errors="replace") if debug.exists() else "")})
            report.update({
                "tls13": pk["tls13"],
                "encrypted_records": pk["encrypted_records"],
                "private_key_app_data_records": pk["app_data_records"],
                "private_key_handshake_decrypted": pk["handshake_decrypted"],
                "private_key_decrypts": pk["app_data_records"] > 0 or pk["handshake_decrypted"],
                "private_key_failure": reasons[:4],
            })
        if keylogs:
            opts = ["-o", f"tls.keylog_file:{keylogs[0]}"]
            kl = tshark_tls(self.pcap, opts)
            plain = first_plaintext(self.pcap, opts) if kl["app_data_records"] else b""
            period = payload_pattern(ctx.app_bytes)
            report.update({
                "keylog_app_data_records": kl["app_data_records"],
                "keylog_handshake_decrypted": kl["handshake_decrypted"],
                "keylog_decrypted_handshake_types": kl["decrypted_handshake_types"],
                "keylog_decrypts": kl["app_data_records"] > 0 or kl["handshake_decrypted"],
                "keylog_plaintext_is_payload": (
                    plain == (period * (len(plain) // len(period) + 1))[:len(plain)]
                    if plain else None),
            })
            if ctx.transport == "mptcp":
                report["note"] = ("single-path capture of an MPTCP connection: application "
                                  "records are split between subflows and tshark has no "
                                  "MPTCP data-level reassembly")
        return report
