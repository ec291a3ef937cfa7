"""The VM path: the Vagrantfile validates, and a real Debian 12 VM runs the playbooks.

``test_vm_runs_netem_scenario`` is ``make vm-test`` as a test: it uses the image cached in
.cache/vm/ when its inputs have not changed and builds it otherwise (measured here: about
4 minutes cold, see README "The VM"), boots it with qemu (KVM when it works, otherwise
TCG), and drives the baseline and a copy of it with a 40 ms cellular delay through the
remote driver. The delay needs sch_netem, which this host's kernel lacks (the scenario is
INCONCLUSIVE here) and Debian's kernel has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VM_MARKER = Path("/etc/mptcp-testbed-vm")


def _vagrant_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "HOME": str(tmp_path), "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot-vagrant"), "VAGRANT_CWD": str(REPO),
           "VAGRANT_CHECKPOINT_DISABLE": "1", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def test_vagrantfile_validates(tmp_path: Path) -> None:
    if VM_MARKER.exists():
        pytest.skip("inside the testbed VM: vagrant is a host tool and is not installed here")
    if shutil.which("vagrant") is None:
        pytest.skip("cannot run `vagrant validate`: vagrant is not installed (scripts/setup.sh"
                    " installs it where the package sources have it: Debian 12 does, Ubuntu "
                    "24.04 does not; take it from HashiCorp's repository there)")
    res = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env=_vagrant_env(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout
    plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True,
                             timeout=120, env=_vagrant_env(tmp_path)).stdout
    if "vagrant-libvirt" not in plugins:
        return
    # With the libvirt plugin, its provider block is checked too, for both drivers.
    for driver in ("kvm", "qemu"):
        res = subprocess.run(["vagrant", "validate"], cwd=REPO, capture_output=True,
                             text=True, timeout=120,
                             env=_vagrant_env(tmp_path, VAGRANT_DEFAULT_PROVIDER="libvirt",
                                              TESTBED_LIBVIRT_DRIVER=driver))
        assert res.returncode == 0, f"driver {driver}: {res.stdout}{res.stderr}"


@pytest.mark.root
@pytest.mark.slow
def test_vm_runs_netem_scenario(tmp_path: Path) -> None:
    if VM_MARKER.exists():
        pytest.skip("inside the testbed VM: the VM test boots a VM and does not nest")
    from testbed import vm
    from testbed.model.playbook import load_playbook
    from testbed.runtime import doctor

    # Here: the delayed copy of the baseline needs netem, which this kernel may lack.
    netem_copy = tmp_path / "baseline_netem.yaml"
    netem_copy.write_bytes(vm.netem_playbook())
    assert "netem" in load_playbook(netem_copy).topology.requirements
    netem_here = "netem" in doctor.probe().capabilities()

    out = tmp_path / "results"
    # Under TCG a python peer takes seconds to start: the client gets a wide bound.
    report = vm.vm_test(out, sets=("bytes=1000000", "timeout_s=180"))
    print(report)
    verdicts = report["verdicts"]
    assert set(verdicts) == {"baseline/tcp", "baseline/mptcp", "baseline_netem/tcp",
                             "baseline_netem/mptcp"}, verdicts
    # In the VM everything runs: nothing is INCONCLUSIVE for want of netem, nothing ERRORs.
    for name, verdict in verdicts.items():
        assert verdict not in ("INCONCLUSIVE", "ERROR"), (name, report["reasons"][name])
    assert verdicts["baseline/mptcp"] == "CONFIRMED", report["reasons"]
    assert verdicts["baseline/tcp"] == "CONFIRMED", report["reasons"]
    # The results came back to this host.
    local = Path(report["local_results"])
    assert local.is_relative_to(out) and (local / "result.json").is_file()
    # Nothing of the VM is left: qemu was stopped by PID, the overlay removed.
    assert not list(vm.CACHE.glob("run-*")), list(vm.CACHE.glob("run-*"))
    assert not (report["pid"] and Path(f"/proc/{report['pid']}").exists())
    if not netem_here:
        print("netem is missing on this host: the delayed scenario ran only in the VM")
