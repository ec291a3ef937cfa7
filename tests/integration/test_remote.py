"""The remote driver against a real OpenSSH server.

The test starts its own sshd on 127.0.0.1 and a free high port, with a host key and a
client key generated for the test, its own sshd_config (nothing of /etc/ssh is read), its
PidFile in the test's directory and UsePAM no. The "remote machine" is this machine, in
this checkout. sshd is stopped by its PID at teardown (and so are the per-connection sshd
processes it forked, found by their parent PIDs).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")

pytestmark = pytest.mark.root


@dataclass
class Sshd:
    port: int
    pid: int
    dir: Path
    client_key: Path
    host_pub: str          # "ssh-ed25519 AAAA..."
    log: Path

    def known_hosts(self, path: Path, host_pub: str | None = None,
                    name: str | None = None) -> Path:
        path.write_text(f"{name or f'[127.0.0.1]:{self.port}'} {host_pub or self.host_pub}\n")
        return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, timeout=30)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/*/stat parent PIDs)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def stop_sshd_tree(pid: int) -> None:
    """Stop sshd (by PID) and the sshd processes it forked (by PID); not their commands."""
    for p in [pid, *descendants(pid)]:
        if p == pid or _exe(p) == SSHD:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    d = tmp_path / "sshd"
    d.mkdir(mode=0o700)
    _keygen(d / "host_ed25519", "test-host")
    _keygen(d / "client_ed25519", "test-client")
    (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    config = d / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_ed25519'}",
        f"PidFile {d / 'sshd.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "AllowUsers root",
        "X11Forwarding no", "AllowTcpForwarding no", "AllowAgentForwarding no",
        "PermitTunnel no", "PrintMotd no", "Subsystem sftp internal-sftp", "LogLevel VERBOSE",
        ""]))
    made_privsep = False
    if not PRIVSEP_DIR.exists():
        PRIVSEP_DIR.mkdir(mode=0o755)
        made_privsep = True
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr
    log = d / "sshd.log"
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"sshd exited: {log.read_text()}"
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(2)
                if s.recv(64).startswith(b"SSH-2.0-"):
                    break
            assert time.monotonic() < deadline, f"sshd did not answer: {log.read_text()}"
            time.sleep(0.1)
        pub = " ".join((d / "host_ed25519.pub").read_text().split()[:2])
        yield Sshd(port=port, pid=proc.pid, dir=d, client_key=d / "client_ed25519",
                   host_pub=pub, log=log)
    finally:
        if proc.poll() is None:
            stop_sshd_tree(proc.pid)
        proc.wait(timeout=30)
        if made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()


def remote_argv(server: Sshd, known_hosts: Path, *args: str,
                key: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "testbed", "--host", "root@127.0.0.1",
            "--ssh-port", str(server.port), "--known-hosts", str(known_hosts),
            "--identity", str(key or server.client_key), "--remote-dir", str(REPO), *args]


def run_remote(server: Sshd, known_hosts: Path, *args: str, key: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(remote_argv(server, known_hosts, *args, key=key), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("testbed: ")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def assert_no_secret(server: Sshd, *texts: str) -> None:
    secret = "".join(server.client_key.read_text().splitlines()[1:-1])[:40]
    for text in texts:
        assert secret not in text.replace("\n", "")


def test_remote_doctor_succeeds(sshd: Sshd, tmp_path: Path) -> None:
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    res = run_remote(sshd, kh, "doctor")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert f"doctor on root@127.0.0.1:{sshd.port}" in res.stdout
    assert "mptcp" in res.stdout
    res_json = run_remote(sshd, kh, "doctor", "--json")
    assert res_json.returncode == 0 and '"essentials_ok": true' in res_json.stdout
    assert_no_secret(sshd, res.stdout, res.stderr, res_json.stdout, res_json.stderr)


def test_remote_run_brings_results_back(sshd: Sshd, tmp_path: Path) -> None:
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    out = tmp_path / "local-results"
    res = run_remote(sshd, kh, "run", "playbooks/baseline.yaml", "--transport", "tcp",
                     "--set", "bytes=200000", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # progress streamed line by line, prefixed with the host
    assert re.search(r"^\[127\.0\.0\.1\] \[\s*\d+\.\ds\] run ", res.stderr, re.M), res.stderr
    assert "results (copied from 127.0.0.1):" in res.stdout
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1
    assert (runs[0] / "result.json").is_file()
    assert "CONFIRMED" in res.stdout
    everything = res.stdout + res.stderr + "".join(
        p.read_text(errors="replace") for p in runs[0].rglob("*") if p.is_file()
        and p.stat().st_size < 2_000_000)
    assert_no_secret(sshd, everything)


def test_changed_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    _keygen(tmp_path / "other", "impostor")
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    kh = sshd.known_hosts(tmp_path / "known_hosts", host_pub=other)
    res = run_remote(sshd, kh, "doctor", timeout=60)
    line = assert_one_line_error(res, "host key of", "has CHANGED", "man-in-the-middle")
    assert res.returncode == 4
    assert "SHA256:" in line


def test_unknown_host_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    # known_hosts knows this key, but for port 22, not for [127.0.0.1]:PORT
    kh = sshd.known_hosts(tmp_path / "known_hosts", name="127.0.0.1")
    res = run_remote(sshd, kh, "doctor", timeout=60)
    assert_one_line_error(res, f"host key of [127.0.0.1]:{sshd.port} is unknown",
                          "never accepted on first use")
    res = run_remote(sshd, tmp_path / "missing_known_hosts", "doctor", timeout=60)
    assert_one_line_error(res, "does not exist")


def test_refused_login(sshd: Sshd, tmp_path: Path) -> None:
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    _keygen(tmp_path / "stranger", "stranger")
    res = run_remote(sshd, kh, "doctor", key=tmp_path / "stranger", timeout=60)
    assert_one_line_error(res, "refused the login as 'root'")
    assert_no_secret(sshd, res.stderr)


def test_remote_not_provisioned(sshd: Sshd, tmp_path: Path) -> None:
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    argv = remote_argv(sshd, kh, "doctor")
    argv[argv.index("--remote-dir") + 1] = str(tmp_path)
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert_one_line_error(res, "is not provisioned")
    assert res.returncode == 3


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_dropped_connection(sshd: Sshd, tmp_path: Path) -> None:
    """sshd dies in the middle of a remote run: the driver ends with one clear line, and
    nothing of the run survives on either side (processes, namespaces, ledger)."""
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    proc = subprocess.Popen(
        remote_argv(sshd, kh, "run", "playbooks/baseline.yaml", "--transport", "tcp",
                    "--out", str(tmp_path / "out")),
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert proc.stderr is not None
    tag = None
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"run \d{8}-\d{6}-([0-9a-f]{6}): ", line)
            if m:
                tag = f"tb{m.group(1)}"
            if tag and ("building" in line.lower() or len(seen) > 3):
                break
        assert tag, "".join(seen)
        # Everything sshd started for this connection, remembered with start times.
        remote_side = {p: _start_time(p) for p in descendants(sshd.pid) if _exe(p) != SSHD}
        assert remote_side, "the remote command is not running under sshd"
        stop_sshd_tree(sshd.pid)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    full = "".join(seen) + err
    print(full)
    assert "Traceback" not in full, full
    lines = [ln for ln in full.splitlines() if ln.startswith("testbed: ")]
    assert len(lines) == 1 and "lost the connection to root@127.0.0.1" in lines[0], full
    assert proc.returncode == 4
    # Remote side: the guard stops the run, which releases what it made.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        alive = {p for p, st in remote_side.items() if st and _start_time(p) == st}
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, f"left behind: {alive}"
    assert not [n for n in _netns() if n.startswith(f"{tag}-")]
    assert not Path(f"/run/testbed/{tag}.json").exists()
