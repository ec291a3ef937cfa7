"""``make vm-test``: a Debian 12 VM built from Debian packages, booted with qemu, driven over SSH.

Build (cached under ``.cache/vm/``, rebuilt when its inputs change): ``debootstrap`` of
Debian 12 with ``linux-image-amd64`` and ``openssh-server``, then the project's own
``scripts/setup.sh`` run inside the image (in a chroot, in a private mount namespace) with a
wheelhouse made on this host, so the VM never needs a network. An SSH key pair is generated
and its public half authorised for root; the image's host key is recorded at build time and
every connection checks it (never accepted on first use). The root file system becomes an
ext4 image with ``mkfs.ext4 -d`` (no loop device, no mount on the host).

Test: boots a throw-away qcow2 overlay of the image with qemu (KVM when it works here,
otherwise TCG) on user-mode networking restricted to a loopback SSH port forward
(``restrict=on``: the guest reaches nothing, and only 127.0.0.1 reaches the guest), syncs
the project into ``/vagrant``, provisions it with ``scripts/setup.sh`` and drives playbooks
through the remote driver (``testbed --host ...``), including a copy of the baseline with a
40 ms cellular delay: it needs ``sch_netem``, which Debian's kernel has as a module. qemu is
always stopped (by its PID) and the temporary files removed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed.errors import EnvironmentNotReady, RuntimeFailure, StepTimeout, TestbedError

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TESTBED_VM_CACHE", REPO / ".cache" / "vm"))
SUITE = "bookworm"
REMOTE_DIR = "/vagrant"
WHEELS_IN_VM = "/var/cache/testbed-wheels"
VM_MARKER = "/etc/mptcp-testbed-vm"
# Bump when the recipe below changes in a way the inputs' hash cannot see.
RECIPE = "3"
BASE_PACKAGES = ("linux-image-amd64", "openssh-server", "systemd-sysv", "udev", "python3",
                 "python3-venv", "sudo", "ca-certificates", "kmod", "iproute2")
BOOT_TIMEOUT_S = float(os.environ.get("TESTBED_VM_BOOT_TIMEOUT", "300"))
# Files of the project that the VM gets (the synced folder): tracked and untracked files
# that git does not ignore, minus what is local to a machine.
SYNC_EXCLUDE = (".venv/", "results/", ".cache/", ".git/", ".vagrant/")


def log(message: str) -> None:
    print(f"vm: {message}", file=sys.stderr, flush=True)


# -- inputs and cache -----------------------------------------------------------------------
def setup_packages() -> list[str]:
    """The Debian packages scripts/setup.sh installs (its PACKAGES array): one list."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    m = re.search(r"^PACKAGES=\(([^)]*)\)", text, re.M)
    if not m:
        raise RuntimeFailure("scripts/setup.sh has no PACKAGES=(...) array")
    return m.group(1).split()


def debian_mirror() -> str:
    """The first Debian mirror configured on this host (deb822 or one-line sources);
    deb.debian.org on a machine that has none (Ubuntu)."""
    env = os.environ.get("TESTBED_VM_MIRROR")
    if env:
        return env
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line and "debian" in line:
                return line.split()[1]
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if (len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]
                    and "debian" in parts[1]):
                return parts[1]
    return "http://deb.debian.org/debian"


def base_key(mirror: str) -> str:
    """Key of the debootstrapped base (the slow part): the recipe, its packages, mirror."""
    h = hashlib.sha256()
    h.update(f"{RECIPE} {SUITE} {mirror} {' '.join(BASE_PACKAGES)}".encode())
    return h.hexdigest()[:12]


def cache_key() -> str:
    """Key of the provisioned image: the base plus what scripts/setup.sh installs."""
    h = hashlib.sha256()
    h.update(base_key(debian_mirror()).encode())
    h.update((REPO / "setup.cfg").read_bytes())
    h.update((REPO / "scripts" / "setup.sh").read_bytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class Image:
    root: Path           # the cache directory of one built image

    @property
    def disk(self) -> Path:
        return self.root / "rootfs.ext4"

    @property
    def kernel(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd.img"

    @property
    def key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key.pub"

    @property
    def info(self) -> Path:
        return self.root / "build.json"

    def complete(self) -> bool:
        return all(p.exists() for p in (self.disk, self.kernel, self.initrd, self.key,
                                        self.host_key, self.info))


def image_for(key: str | None = None) -> Image:
    return Image(CACHE / f"debian12-{key or cache_key()}")


# -- running commands -----------------------------------------------------------------------
def run(argv: Sequence[str], *, timeout: float, quiet: bool = True,
        env: dict[str, str] | None = None, what: str = "") -> str:
    """Run a command bounded by ``timeout``; on failure raise with the tail of its output."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise StepTimeout(f"{what or argv[0]} did not finish within {timeout:.0f} s") from exc
    except FileNotFoundError as exc:
        raise EnvironmentNotReady(f"{argv[0]} is not installed: run `make setup` "
                                  "(scripts/setup.sh installs qemu and debootstrap)") from exc
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise RuntimeFailure(f"{what or ' '.join(argv[:3])} failed (exit {res.returncode}):\n"
                             f"{tail}")
    if not quiet:
        sys.stderr.write(res.stdout)
    return res.stdout


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True, timeout=60).stdout.decode()
    return sorted(f for f in out.split("\0")
                  if f and (REPO / f).is_file()
                  and not any(f.startswith(x) for x in SYNC_EXCLUDE))


def project_tar(extra: dict[str, bytes] | None = None) -> bytes:
    """The project as the VM's synced folder sees it, as an uncompressed tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in _project_files():
            tar.add(REPO / rel, arcname=rel, recursive=False)
        for rel, data in (extra or {}).items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- build ----------------------------------------------------------------------------------
def _chroot(root: Path, script: str, *, timeout: float, what: str,
            env: dict[str, str] | None = None) -> None:
    """Run a shell script in the chroot, with /proc mounted in a private mount namespace
    (the mount dies with the namespace: nothing can stay mounted on the host)."""
    inner = (f"mount -t proc proc {root}/proc && "
             f"exec chroot {root} /bin/bash -euo pipefail -c {shlex_quote(script)}")
    full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    full_env.update(env or {})
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
        timeout=timeout, env=full_env, what=what)


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def build_wheelhouse(dest: Path) -> None:
    """Wheels for every Python dependency of the project (and the build backend), made on
    this host with its own pip configuration, so that the VM installs them offline."""
    dest.mkdir(parents=True, exist_ok=True)
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True, timeout=120).stdout
    reqs = [line for line in freeze.splitlines()
            if line and not line.startswith(("-e ", "#", "mptcp-security-testbed"))]
    reqfile = dest / "requirements.txt"
    reqfile.write_text("\n".join([*reqs, "setuptools>=64", "wheel"]) + "\n")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "-w", str(dest), "-r", str(reqfile)], timeout=900, what="pip wheel")


def build(force: bool = False) -> Image:
    """Build the image for the current inputs, unless it is cached. Returns it. One build
    at a time: a second caller waits for the first and then finds the image cached."""
    img = image_for()
    if img.complete() and not force:
        return img
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if img.complete() and not force:
            return img
        return _build(img)


def _build(img: Image) -> Image:
    for tool in ("debootstrap", "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "ssh-keygen",
                 "unshare"):
        if shutil.which(tool) is None:
            raise EnvironmentNotReady(f"{tool} is missing: run `make setup` "
                                      "(scripts/setup.sh installs it)")
    if os.geteuid() != 0:
        raise EnvironmentNotReady("building the VM image needs root (debootstrap, chroot)")
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
    try:
        root = work / "root"
        mirror = debian_mirror()
        base = CACHE / f"base-{base_key(mirror)}.tar"
        if base.exists():
            # Only what scripts/setup.sh installs changed: start from the cached base.
            log(f"building the image from the cached Debian 12 base {base.name}")
            root.mkdir()
            run(["tar", "-x", "-p", "--numeric-owner", "--xattrs", "-f", str(base),
                 "-C", str(root)], timeout=600, what="unpacking the base")
            timings["base_unpack_s"] = round(time.monotonic() - t0, 1)
        else:
            log(f"building a Debian 12 image from {mirror} (cold cache: a few minutes)")
            # In a private mount namespace: debootstrap mounts /proc (and more) in the
            # target, and a killed debootstrap would leave them mounted on the host.
            run(["unshare", "--mount", "--propagation", "private", "debootstrap",
                 "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 SUITE, str(root), mirror], timeout=1200, what="debootstrap")
            timings["debootstrap_s"] = round(time.monotonic() - t0, 1)
            log(f"debootstrap done in {timings['debootstrap_s']} s")
            for old in CACHE.glob("base-*.tar"):
                old.unlink()
            partial = base.with_suffix(".partial")
            run(["tar", "-c", "--numeric-owner", "--xattrs", "-f", str(partial),
                 "-C", str(root), "."], timeout=600, what="saving the base")
            partial.rename(base)

        t1 = time.monotonic()
        build_wheelhouse(root / WHEELS_IN_VM.lstrip("/"))
        timings["wheels_s"] = round(time.monotonic() - t1, 1)

        _configure(root, mirror, work)
        t2 = time.monotonic()
        # The project's one installation path, inside the image: Debian packages from the
        # mirror (the chroot shares this host's network while building), Python packages
        # from the wheelhouse only.
        tar = project_tar()
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tf.extractall(root / REMOTE_DIR.lstrip("/"), filter="data")
        _chroot(root, f"cd {REMOTE_DIR} && bash scripts/setup.sh && apt-get clean",
                timeout=1800, what="scripts/setup.sh in the image",
                env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS_IN_VM})
        timings["setup_s"] = round(time.monotonic() - t2, 1)
        log(f"scripts/setup.sh in the image done in {timings['setup_s']} s")

        out = work / "image"
        out.mkdir()
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise RuntimeFailure("the image has no kernel or initrd in /boot")
        shutil.copy2(kernels[-1], out / "vmlinuz")
        shutil.copy2(initrds[-1], out / "initrd.img")
        shutil.copy2(work / "id_ed25519", out / "id_ed25519")
        shutil.copy2(work / "id_ed25519.pub", out / "id_ed25519.pub")
        shutil.copy2(root / "etc/ssh/ssh_host_ed25519_key.pub", out / "ssh_host_ed25519_key.pub")
        t3 = time.monotonic()
        used_mib = int(run(["du", "-sm", str(root)], timeout=300).split()[0])
        size_mib = used_mib + 2048
        run(["mkfs.ext4", "-q", "-F", "-L", "testbed-root", "-d", str(root),
             str(out / "rootfs.ext4"), f"{size_mib}M"], timeout=900, what="mkfs.ext4 -d")
        timings["mkfs_s"] = round(time.monotonic() - t3, 1)
        timings["total_s"] = round(time.monotonic() - t0, 1)
        (out / "build.json").write_text(json.dumps({
            "key": img.root.name, "mirror": mirror, "suite": SUITE,
            "kernel": kernels[-1].name, "timings": timings,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
        if img.root.exists():
            shutil.rmtree(img.root)
        out.rename(img.root)
        log(f"image built in {timings['total_s']} s: {img.root}")
        _prune(keep=img.root)
        return img
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _configure(root: Path, mirror: str, work: Path) -> None:
    etc = root / "etc"
    (etc / "hostname").write_text("mptcp-testbed\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 mptcp-testbed\n")
    (etc / "fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / VM_MARKER.lstrip("/")).write_text("built by testbed/vm.py: the testbed VM\n")
    (etc / "apt/sources.list").write_text(
        f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n")
    net = etc / "systemd/network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "80-dhcp.network").write_text("[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n")
    wants = etc / "systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "systemd-networkd.service"
    if not link.exists():
        link.symlink_to("/lib/systemd/system/systemd-networkd.service")
    (etc / "ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (etc / "ssh/sshd_config.d/testbed.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUseDNS no\n")
    # The client key: generated here, its public half authorised for root.
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testbed-vm",
         "-f", str(work / "id_ed25519")], timeout=30)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text((work / "id_ed25519.pub").read_text())
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    # Host keys: fresh ones for this image (debootstrap's postinst made some; make sure).
    for old in (etc / "ssh").glob("ssh_host_*"):
        old.unlink()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mptcp-testbed-vm",
         "-f", str(etc / "ssh/ssh_host_ed25519_key")], timeout=30)
    # Serial console login is not needed; keep boot lean.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                 "fstrim.timer"):
        with contextlib.suppress(FileNotFoundError):
            (etc / "systemd/system/timers.target.wants" / unit).unlink()


def _prune(keep: Path) -> None:
    for old in CACHE.glob("debian12-*"):
        if old != keep and old.is_dir():
            log(f"removing the outdated image {old.name}")
            shutil.rmtree(old, ignore_errors=True)


# -- boot -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kvm_works(img: Image, timeout: float = 8.0) -> bool:
    """Whether KVM runs a guest here: boot the kernel with KVM and no root file system and
    look for its first console lines (a broken KVM prints nothing or fails to start)."""
    if os.environ.get("TESTBED_VM_ACCEL") in ("tcg", "kvm"):
        return os.environ["TESTBED_VM_ACCEL"] == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256",
             "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
             "-kernel", str(img.kernel), "-append", "console=ttyS0 panic=-1",
             "-serial", f"file:{console}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if b"Linux version" in (console.read_bytes() if console.exists() else b""):
                    return True
                time.sleep(0.5)
            return b"Linux version" in (console.read_bytes() if console.exists() else b"")
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a process this module started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class Booted:
    port: int
    known_hosts: Path
    identity: Path
    accel: str
    boot_s: float
    console: Path
    pid: int


@contextlib.contextmanager
def boot(img: Image, *, memory_mib: int = 3072, cpus: int = 2) -> Iterator[Booted]:
    """Boot a throw-away overlay of ``img``; yield once SSH answers with the recorded host
    key; always stop qemu (by PID) and remove the overlay."""
    from testbed import remote

    with tempfile.TemporaryDirectory(prefix="run-", dir=CACHE) as tmp_s:
        tmp = Path(tmp_s)
        overlay = tmp / "overlay.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img.disk),
             str(overlay)], timeout=60, what="qemu-img create")
        port = free_port()
        known_hosts = tmp / "known_hosts"
        key_type, key_b64 = img.host_key.read_text().split()[:2]
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")
        accel = "kvm" if kvm_works(img) else "tcg"
        console = tmp / "console.log"
        argv = ["qemu-system-x86_64",
                "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
                "-cpu", "host" if accel == "kvm" else "max",
                "-smp", str(cpus), "-m", str(memory_mib),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(img.kernel), "-initrd", str(img.initrd),
                "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1",
                "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
                "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", "virtio-net-pci,netdev=n0",
                "-serial", f"file:{console}"]
        log(f"booting the VM with {accel.upper()} (ssh on 127.0.0.1:{port})")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(tmp / "qemu.err", "wb"))  # noqa: SIM115
        try:
            opts = remote.SSHOptions(known_hosts=known_hosts, identity=img.key)
            target = remote.Target(user="root", host="127.0.0.1", port=port)
            deadline = t0 + BOOT_TIMEOUT_S
            last = ""
            while True:
                if proc.poll() is not None:
                    raise RuntimeFailure(f"qemu exited with {proc.returncode}: "
                                         f"{(tmp / 'qemu.err').read_text().strip()[-500:]}")
                try:
                    with remote.RemoteSession(target, opts) as s:
                        s.run("true", timeout=30)
                    break
                except (remote.HostKeyUnknown, remote.HostKeyChanged, remote.LoginRefused):
                    raise
                except remote.RemoteError as exc:
                    # Not up yet: refused, no banner, or (booting under TCG on a busy
                    # machine) sshd too slow to open a session in time.
                    last = str(exc)
                if time.monotonic() > deadline:
                    tail = console.read_text(errors="replace").strip().splitlines()[-5:]
                    raise StepTimeout(f"the VM did not answer SSH within {BOOT_TIMEOUT_S:.0f}"
                                      f" s ({last}); console: {' | '.join(tail)}")
                time.sleep(2)
            boot_s = round(time.monotonic() - t0, 1)
            log(f"the VM answers SSH after {boot_s} s")
            yield Booted(port=port, known_hosts=known_hosts, identity=img.key, accel=accel,
                         boot_s=boot_s, console=console, pid=proc.pid)
        finally:
            _stop(proc)
            log("the VM is stopped")


# -- the test -------------------------------------------------------------------------------
def netem_playbook() -> bytes:
    """playbooks/baseline.yaml with a 40 ms delay on the cellular link (needs sch_netem)."""
    data: dict[str, Any] = yaml.safe_load((REPO / "playbooks" / "baseline.yaml").read_text())
    data["name"] = "baseline_netem"
    data["description"] = "baseline with a 40 ms delay on the cellular path (needs netem)"
    data.setdefault("topology", {}).setdefault("params", {})["cell_delay_ms"] = 40
    return yaml.safe_dump(data, sort_keys=False).encode()


NETEM_PLAYBOOK = ".vm-test/baseline_netem.yaml"


def vm_test(out: Path, *, playbooks: Sequence[str] = ("playbooks/baseline.yaml",
                                                       NETEM_PLAYBOOK),
            sets: Sequence[str] = ()) -> dict[str, Any]:
    """Build (or reuse) the image, boot it, sync, provision, run the playbooks through the
    remote driver, and return timings and verdicts."""
    from testbed import remote

    t0 = time.monotonic()
    img = image_for()
    cold = not img.complete()
    img = build()
    build_s = round(time.monotonic() - t0, 1)
    report: dict[str, Any] = {"image": str(img.root), "cold_build": cold, "build_s": build_s}
    with boot(img) as vm:
        report.update(accel=vm.accel, boot_s=vm.boot_s, pid=vm.pid)
        target = remote.Target(user="root", host="127.0.0.1", port=vm.port)
        opts = remote.SSHOptions(known_hosts=vm.known_hosts, identity=vm.identity)
        t1 = time.monotonic()
        with remote.RemoteSession(target, opts) as s:
            log(f"syncing the project into {REMOTE_DIR}")
            remote.sync_tree(s, project_tar({NETEM_PLAYBOOK: netem_playbook()}), REMOTE_DIR)
            # Under TCG, tools start slowly (tshark takes several seconds): give doctor's
            # probes more time in every later SSH session (pam_env reads /etc/environment).
            s.run("grep -q '^TESTBED_DOCTOR_TIMEOUT=' /etc/environment || "
                  "echo TESTBED_DOCTOR_TIMEOUT=60 >> /etc/environment", timeout=60)
            log("provisioning with scripts/setup.sh")
            rc = s.run(f"cd {REMOTE_DIR} && PIP_NO_INDEX=1 PIP_FIND_LINKS={WHEELS_IN_VM} "
                       "bash scripts/setup.sh", timeout=1200,
                       on_stdout=remote.prefixed("vm"), on_stderr=remote.prefixed("vm"))
            if rc != 0:
                raise RuntimeFailure(f"scripts/setup.sh failed in the VM (exit {rc})")
        report["provision_s"] = round(time.monotonic() - t1, 1)
        t2 = time.monotonic()
        argv = ["--host", "root@127.0.0.1", "--ssh-port", str(vm.port),
                "--known-hosts", str(vm.known_hosts), "--identity", str(vm.identity),
                "--remote-dir", REMOTE_DIR, "run", *playbooks, "--out", str(out), "--json"]
        for s_ in sets:
            argv += ["--set", s_]
        log("testbed " + " ".join(argv))
        proc = subprocess.run([sys.executable, "-m", "testbed", *argv], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, timeout=3600)
        report["run_s"] = round(time.monotonic() - t2, 1)
        report["run_exit"] = proc.returncode
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeFailure(f"the remote run printed no result (exit {proc.returncode})")
        result = json.loads(lines[-1])
        report["verdicts"] = {f"{s['playbook']}/{t}": r["verdict"]
                              for s in result["result"]["scenarios"]
                              for t, r in s["transports"].items()}
        report["reasons"] = {f"{s['playbook']}/{t}": r.get("reason", "")
                             for s in result["result"]["scenarios"]
                             for t, r in s["transports"].items()}
        report["local_results"] = result.get("local_run_dir", "")
    report["total_s"] = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.vm", description=__doc__.split(
        "\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build", help="build the image (cached under .cache/vm/)")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("test", help="build if needed, boot, provision, run playbooks")
    p.add_argument("--out", default=str(REPO / "results"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("playbooks", nargs="*")
    args = parser.parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    try:
        if args.cmd == "build":
            img = build(force=args.force)
            print(img.info.read_text())
            return 0
        report = vm_test(Path(args.out), sets=args.set,
                         **({"playbooks": args.playbooks} if args.playbooks else {}))
        print(json.dumps(report, indent=2))
        bad = {k: v for k, v in report["verdicts"].items()
               if v in ("ERROR", "INCONCLUSIVE")}
        if bad:
            print(f"vm-test: FAILED: {bad}", file=sys.stderr)
            return 1
        print(f"vm-test: passed in {report['total_s']} s (build {report['build_s']} s, "
              f"boot {report['boot_s']} s with {report['accel'].upper()})", file=sys.stderr)
        return 0
    except TestbedError as exc:
        print(f"vm-test: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vm-test: interrupted; the VM is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
