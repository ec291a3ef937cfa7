"""The command line as a user meets it: clear one-line errors, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_bad_playbook_gives_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntopology: {name: dual_path}\napp: {kind: curl}\n")
    res = run_cli("run", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith(f"testbed: {bad}: app.kind: 'curl' is not allowed")
    assert "python, nginx-curl, openssl" in res.stderr


def test_missing_playbook_and_undeclared_parameter() -> None:
    res = run_cli("run", "/nonexistent/playbook.yaml")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot read" in res.stderr
    res = run_cli("run", "playbooks/baseline.yaml", "--set", "nope=1")
    assert res.returncode == 2 and "params.nope" in res.stderr
    assert "declared parameters: app, bytes, timeout_s" in res.stderr


def test_list_json_names_everything() -> None:
    res = run_cli("list", "--json")
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    assert "dual_path" in listing["topologies"]
    assert set(listing["apps"]) == {"python", "nginx-curl", "openssl"}
    assert listing["apps"]["nginx-curl"]["requires_mptcp"] == ["curl", "mptcp", "mptcpize",
                                                               "nginx"]
    assert "playbooks/baseline.yaml" in listing["playbooks"]
    assert not listing["playbooks"]["playbooks/baseline.yaml"]["description"].startswith(
        "INVALID")
