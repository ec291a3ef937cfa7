"""Remote driver, pure parts: argument splitting, targets, --out handling, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed import remote

REPO = Path(__file__).resolve().parents[2]


def test_split_argv() -> None:
    assert remote.split_argv(["run", "x.yaml"]) is None
    assert remote.split_argv(["--host", "h", "--ssh-port", "2222", "doctor", "--json"]) == (
        ["--host", "h", "--ssh-port", "2222"], ["doctor", "--json"])
    assert remote.split_argv(["--host=h", "run", "a.yaml", "--host", "x"]) == (
        ["--host=h"], ["run", "a.yaml", "--host", "x"])
    # --host after the command belongs to the command (not a remote invocation)
    assert remote.split_argv(["run", "--host", "h"]) is None


def test_parse_target() -> None:
    t = remote.parse_target("vagrant@127.0.0.1", 2222)
    assert (t.user, t.host, t.port) == ("vagrant", "127.0.0.1", 2222)
    assert t.known_hosts_name == "[127.0.0.1]:2222"
    assert remote.parse_target("root@box").known_hosts_name == "box"
    with pytest.raises(remote.RemoteError):
        remote.parse_target("root@")


def test_strip_out() -> None:
    assert remote._strip_out(["run", "a.yaml", "--out", "/tmp/r", "--json"]) == (
        ["run", "a.yaml", "--json"], "/tmp/r")
    assert remote._strip_out(["matrix", "--out=/x"]) == (["matrix"], "/x")
    assert remote._strip_out(["doctor"]) == (["doctor"], None)


def test_guard_command_quotes_everything() -> None:
    cmd = remote._guard_command("/my dir", ["run", "a b.yaml", "--set", "x=$(id)"])
    assert cmd.startswith("cd '/my dir' && exec .venv/bin/python -m testbed.remote_guard -- ")
    assert "'a b.yaml'" in cmd and "'x=$(id)'" in cmd


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_remote_errors_are_one_line(tmp_path: Path) -> None:
    res = _cli("--host", "root@127.0.0.1", "list")
    assert res.returncode == 4 and "Traceback" not in res.stderr
    assert res.stderr.startswith("testbed: --host runs one of run, matrix, doctor")
    # nothing listens on port 1: a clear line, no traceback
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    res = _cli("--host", "root@127.0.0.1", "--ssh-port", "1", "--known-hosts", str(kh),
               "doctor")
    assert res.returncode == 4 and "Traceback" not in res.stderr
    assert res.stderr.startswith("testbed: cannot connect to 127.0.0.1:1")
    res = _cli("--host", "root@127.0.0.1", "--known-hosts", str(tmp_path / "nope"), "doctor")
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr
