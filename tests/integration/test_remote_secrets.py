"""Remote safety, credentials: neither the identity file's contents nor a key passphrase
ever appear in what a remote run prints or writes — on this side (stdout, stderr, the
results copied back) or on the remote side (the run's results directory in the remote
checkout). The whole base64 body of the key is checked in overlapping 16-character
windows, not just a prefix. An encrypted identity is refused in one line, and the
passphrase, never asked for, appears nowhere either.

Uses the test sshd of ``test_remote.py`` (its own host and client keys, port, config)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.test_remote import (  # noqa: F401  (the sshd fixture)
    REPO,
    Sshd,
    assert_one_line_error,
    run_remote,
    sshd,
)

pytestmark = pytest.mark.root

PASSPHRASE = "correct-horse-battery-staple-7d1f"


def _windows(key: Path, width: int = 16) -> list[str]:
    body = "".join(key.read_text().splitlines()[1:-1])
    return [body[i:i + width] for i in range(0, len(body) - width + 1, width // 2)]


def _text_of(tree: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in tree.rglob("*")
                   if p.is_file() and p.stat().st_size < 5_000_000)


def _assert_clean(text: str, key: Path) -> None:
    flat = text.replace("\n", "")
    leaked = [w for w in _windows(key) if w in flat]
    assert not leaked, f"{len(leaked)} pieces of the identity file found, e.g. {leaked[0]}"
    assert PASSPHRASE not in text


def test_remote_run_writes_no_credential_anywhere(sshd: Sshd, tmp_path: Path) -> None:  # noqa: F811
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    out = tmp_path / "local-results"
    res = run_remote(sshd, kh, "run", "playbooks/baseline.yaml", "--transport", "tcp",
                     "--set", "bytes=200000", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1
    remote_side = REPO / "results" / runs[0].name   # the remote checkout is this one
    assert remote_side.is_dir()
    _assert_clean(res.stdout + res.stderr + _text_of(runs[0]) + _text_of(remote_side),
                  sshd.client_key)


def test_encrypted_identity_is_refused_without_leaking(sshd: Sshd, tmp_path: Path) -> None:  # noqa: F811
    key = tmp_path / "encrypted_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-C", "enc",
                    "-f", str(key)], check=True, timeout=30)
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    res = run_remote(sshd, kh, "doctor", key=key, timeout=120)
    assert_one_line_error(res, "is encrypted")
    _assert_clean(res.stdout + res.stderr, key)
