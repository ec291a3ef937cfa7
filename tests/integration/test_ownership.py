"""Ownership: ``testbed clean`` releases a dead run's own resources and nothing that merely
looks like one. Planted next to a dead run's ledger:

- a foreign process named like a testbed shell (``mininet:tbdead01-client``) and one whose
  PID the dead ledger lists with another start time (a recycled PID);
- a foreign veth pair in the root namespace (down, no address) named like a testbed
  one (``tbdead01-c0``);
- a foreign namespace named like a testbed one, listed in the dead ledger but carrying
  another run's tag;
- a foreign ``/tmp/tbdead01-payload`` directory, listed in the dead ledger too.

The dead run's own namespace, process and temporary directory are released; every
foreign look-alike survives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.runtime.ledger import Ledger, proc_start_time

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
FOREIGN = "tbdead01"  # test_cleanup.py plants tbdead00-client


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def test_clean_leaves_look_alikes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    foreign_ns = f"{FOREIGN}-client"
    foreign_link = f"{FOREIGN}-c0"
    foreign_tmp = Path(f"/tmp/{FOREIGN}-payload")
    # A dead run: its ledger's owner is a process that has exited.
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = Ledger.create(state_dir=state)
    dead.data.owner_pid, dead.data.owner_start = gone.pid, 1
    own_ns = f"{dead.tag}-client"
    own_tmp = Path(f"/tmp/{dead.tag}-payload")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Foreign look-alikes.
        shell_like = subprocess.Popen(["bash", "-c", f"exec -a mininet:{foreign_ns} sleep 300"],
                                      start_new_session=True)
        recycled = subprocess.Popen(["sleep", "300"], start_new_session=True)
        procs += [shell_like, recycled]
        subprocess.run(["ip", "netns", "add", foreign_ns], check=True, timeout=30)
        subprocess.run(["ip", "link", "add", foreign_link, "type", "veth", "peer", "name",
                        f"{FOREIGN}-c1"], check=True, timeout=30)  # down, no address
        foreign_tmp.mkdir(exist_ok=True)
        (foreign_tmp / "keep.bin").write_bytes(b"not the testbed's")
        # The dead run's own resources.
        subprocess.run(["ip", "netns", "add", own_ns], check=True, timeout=30)
        own = subprocess.Popen(["ip", "netns", "exec", own_ns, "sleep", "300"],
                               start_new_session=True)
        procs.append(own)
        own_tmp.mkdir()
        (own_tmp / "payload.bin").write_bytes(b"x")
        dead.add_netns(own_ns)
        dead.add_netns(foreign_ns)                   # a name without the dead run's tag
        dead.add_process(own.pid, "python server", "server")
        dead.add_process(recycled.pid, "capture wifi", "wifi_ap")
        start = proc_start_time(recycled.pid)
        assert start is not None
        dead.data.processes[-1].start_time = start + 1   # the PID was recycled since
        dead.add_temp_dir(str(own_tmp))
        dead.add_temp_dir(str(foreign_tmp))          # not carrying the dead run's tag
        dead.save()

        env = {**os.environ, "TESTBED_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-m", "testbed", "clean"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        print(out.stdout)
        # The dead run's own resources are released...
        names = _netns()
        assert own_ns not in names
        own.wait(timeout=30)
        assert not own_tmp.exists()
        assert not dead.path.exists()
        # ... and every look-alike survives.
        assert foreign_ns in names
        assert _alive(shell_like) and _alive(recycled)
        links = subprocess.run(["ip", "-o", "link", "show", foreign_link], capture_output=True,
                               text=True, timeout=30)
        assert links.returncode == 0 and foreign_link in links.stdout
        assert (foreign_tmp / "keep.bin").read_bytes() == b"not the testbed's"
        assert FOREIGN not in out.stdout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        subprocess.run(["ip", "link", "delete", foreign_link], capture_output=True, timeout=30)
        for ns in (foreign_ns, own_ns):
            if ns in _netns():
                subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        for d in (foreign_tmp, own_tmp):
            for f in d.glob("*") if d.is_dir() else ():
                f.unlink()
            if d.is_dir():
                d.rmdir()
        dead.close()
