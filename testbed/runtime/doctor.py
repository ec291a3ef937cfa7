"""What this machine can do: a typed report of capabilities, each probed for real.

Every check has a stable capability key (scenarios declare their requirements with these
names), an ``ok`` flag, a detail (a version string, or why it is missing) and, when it is
missing, how to fix it. Kernel features that could be compiled out (qdiscs, netfilter
targets, NAT) are probed by really configuring them inside a throwaway network namespace
made with ``unshare --net``: the namespace dies with the probe process, so nothing can be
left behind in the root namespace. Every probe is bounded by a timeout and reports its
failure instead of raising.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# Stable capability keys, in the order the report lists them.
CAPABILITIES: tuple[str, ...] = (
    "linux", "root", "kernel", "mptcp", "pm_kernel", "pm_userspace",
    "netem", "tbf", "htb", "tcpoptstrip", "tcpmss", "nfqueue", "nft_nat", "openvswitch",
    "mnexec", "nsenter", "tcpdump", "tshark", "nginx", "openssl", "curl", "mptcpize",
    "iptables", "nft", "ip", "ethtool",
)
# Without these the testbed cannot run at all.
ESSENTIAL: frozenset[str] = frozenset(
    {"linux", "root", "mptcp", "mnexec", "nsenter", "ip", "tcpdump", "tshark"})

MPTCP_SYSCTL_DIR = Path("/proc/sys/net/mptcp")
MIN_KERNEL = (5, 15)
USERSPACE_PM_KERNEL = (5, 19)
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
VM_HINT = "use the project VM (`vagrant up`: Debian's stock kernel has it)"
SETUP_HINT = "run `make setup` (scripts/setup.sh)"
MAX_DETAIL = 240


@dataclass
class Check:
    name: str          # capability key
    ok: bool
    detail: str        # version string or reason
    essential: bool    # essential => testbed cannot run without it
    fix: str           # how to fix when not ok ("" when ok)


@dataclass
class DoctorReport:
    checks: list[Check]
    # Checks still being probed in the background (``probe(later=...)``): name -> future.
    pending: dict[str, Future[Check]] = field(default_factory=dict, repr=False,
                                               compare=False)

    def settle(self) -> DoctorReport:
        """Wait for the checks probed in the background and put them in place."""
        for name, fut in list(self.pending.items()):
            done = fut.result()
            self.checks = [done if c.name == name else c for c in self.checks]
            del self.pending[name]
        return self

    def check(self, name: str) -> Check | None:
        """The check named ``name``, or None when the report has none."""
        for c in self.checks:
            if c.name == name:
                return c
        return None

    def capabilities(self) -> set[str]:
        """Names of the checks that passed."""
        return {c.name for c in self.checks if c.ok}

    def missing(self, requirements: Iterable[str]) -> dict[str, str]:
        """Requirement -> reason for each requirement this machine does not meet.

        The reason is the check's detail followed by its fix. A name that is not a
        capability key gives "unknown requirement"; a known key that this report did not
        probe gives "not probed".
        """
        if isinstance(requirements, str):
            requirements = [requirements]
        out: dict[str, str] = {}
        for req in requirements:
            c = self.check(req)
            if c is None:
                out[req] = "not probed" if req in CAPABILITIES else "unknown requirement"
            elif not c.ok:
                out[req] = _reason(c)
        return out

    def essentials_ok(self) -> bool:
        """True when every essential check is present and passed."""
        return (all(c.ok for c in self.checks if c.essential)
                and all((c := self.check(n)) is not None and c.ok for n in ESSENTIAL))

    def to_json(self) -> dict[str, Any]:
        return {
            "essentials_ok": self.essentials_ok(),
            "capabilities": sorted(self.capabilities()),
            "checks": [asdict(c) for c in self.checks],
        }


def _reason(c: Check) -> str:
    return f"{c.detail}; fix: {c.fix}" if c.fix else c.detail


# -- running commands, bounded ---------------------------------------------------------------
@dataclass
class Ran:
    """Outcome of one bounded command: rc is None when it could not run or timed out."""

    rc: int | None
    out: str
    err: str
    error: str = ""   # why it did not run to completion ("" when it did)

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def says(self) -> str:
        """What went wrong or what the command said, on one line."""
        said = _one_line(self.err) or _one_line(self.out)
        if self.error:
            return f"{self.error} ({said})" if said else self.error
        return said or f"exit status {self.rc}"


Runner = Callable[[Sequence[str], float, str | None], Ran]


def run_bounded(argv: Sequence[str], timeout_s: float, stdin: str | None = None) -> Ran:
    """Run ``argv`` in its own process group; kill that group if it outlives ``timeout_s``."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE if stdin is not None
                                else subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=True, env=env)
    except OSError as exc:
        return Ran(None, "", "", f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # The group is the one we just created for this child; its PID is its PGID.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out = err = ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            out, err = proc.communicate(timeout=1.0)
        return Ran(None, out or "", err or "", f"timed out after {timeout_s:g}s")
    return Ran(proc.returncode, out, err)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return _one_line(line)
    return ""


def parse_release(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release such as "6.18.44-fc-v1252"; None if unparsable."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


# -- the tools ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolSpec:
    binary: str
    version_argv: tuple[str, ...] | None   # None: the tool has no version option
    package: str                            # Debian package that ships it


TOOLS: dict[str, ToolSpec] = {
    "mnexec": ToolSpec("mnexec", ("-v",), "mininet"),
    "nsenter": ToolSpec("nsenter", ("--version",), "util-linux"),
    "tcpdump": ToolSpec("tcpdump", ("--version",), "tcpdump"),
    "tshark": ToolSpec("tshark", ("--version",), "tshark"),
    "nginx": ToolSpec("nginx", ("-v",), "nginx-light"),
    "openssl": ToolSpec("openssl", ("version",), "openssl"),
    "curl": ToolSpec("curl", ("--version",), "curl"),
    "mptcpize": ToolSpec("mptcpize", None, "mptcpize"),
    "iptables": ToolSpec("iptables", ("--version",), "iptables"),
    "nft": ToolSpec("nft", ("--version",), "nftables"),
    "ip": ToolSpec("ip", ("-V",), "iproute2"),
    "ethtool": ToolSpec("ethtool", ("--version",), "ethtool"),
}

# Kernel features probed by configuring them in a throwaway namespace.
QDISC_ARGS: dict[str, str] = {
    "netem": "netem delay 10ms",
    "tbf": "tbf rate 1mbit burst 32kb latency 50ms",
    "htb": "handle 1: htb default 10",
}
# Feature -> (kernel config option, module to load).
KERNEL_FEATURE: dict[str, tuple[str, str]] = {
    "netem": ("CONFIG_NET_SCH_NETEM", "sch_netem"),
    "tbf": ("CONFIG_NET_SCH_TBF", "sch_tbf"),
    "htb": ("CONFIG_NET_SCH_HTB", "sch_htb"),
    "tcpoptstrip": ("CONFIG_NETFILTER_XT_TARGET_TCPOPTSTRIP", "xt_TCPOPTSTRIP"),
    "tcpmss": ("CONFIG_NETFILTER_XT_TARGET_TCPMSS", "xt_TCPMSS"),
    "nfqueue": ("CONFIG_NETFILTER_XT_TARGET_NFQUEUE", "xt_NFQUEUE"),
    "nft_nat": ("CONFIG_NFT_NAT, CONFIG_NFT_MASQ", "nft_masq"),
    "openvswitch": ("CONFIG_OPENVSWITCH", "openvswitch"),
}
VETH_FAILED = 90   # exit status of the qdisc probe script when the veth pair cannot be made
NFT_NAT_RULESET = """table ip tbprobe {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    masquerade
  }
}
"""


class Prober:
    """Runs the probes. The collaborators can be replaced by fakes in unit tests."""

    def __init__(self, timeout_s: float = 5.0, *, runner: Runner = run_bounded,
                 which: Callable[[str], str | None] = shutil.which,
                 mptcp_dir: Path = MPTCP_SYSCTL_DIR, is_linux: bool | None = None,
                 is_root: bool | None = None, release: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.runner = runner
        self.which = which
        self.mptcp_dir = mptcp_dir
        self.is_linux = sys.platform.startswith("linux") if is_linux is None else is_linux
        if is_root is None:
            is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self.is_root = is_root
        self.release = platform.release() if release is None else release

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Ran:
        return self.runner(argv, self.timeout_s, stdin)

    @staticmethod
    def check(name: str, ok: bool, detail: str, fix: str = "") -> Check:
        return Check(name=name, ok=ok, detail=detail, essential=name in ESSENTIAL,
                     fix="" if ok else fix)

    # -- basics --------------------------------------------------------------------------
    def linux(self) -> Check:
        return self.check("linux", self.is_linux, platform.system() or sys.platform,
                          "the testbed needs Linux: use `vagrant up`, then `make test` in the VM")

    def root(self) -> Check:
        uid = os.geteuid() if hasattr(os, "geteuid") else -1
        return self.check("root", self.is_root, f"euid {uid}",
                          "run as root (sudo make test)")

    def kernel(self) -> Check:
        if not self.is_linux:
            return self.check("kernel", False, "not Linux", "use `vagrant up`")
        ver = parse_release(self.release)
        if ver is None:
            return self.check("kernel", False, f"cannot parse kernel release {self.release!r}",
                              "use a kernel >= 5.15 or `vagrant up`")
        if ver < MIN_KERNEL:
            return self.check("kernel", False,
                              f"{self.release} is older than 5.15 (first with usable MPTCP v1)",
                              "use a kernel >= 5.15 or `vagrant up`")
        return self.check("kernel", True, self.release)

    def _sysctl(self, name: str) -> str | None:
        try:
            return (self.mptcp_dir / name).read_text().strip()
        except OSError:
            return None

    def mptcp(self) -> Check:
        value = self._sysctl("enabled")
        if value is None:
            return self.check("mptcp", False,
                              f"kernel has no MPTCP ({self.mptcp_dir / 'enabled'} missing)",
                              "use a kernel >= 5.15 built with CONFIG_MPTCP=y, or `vagrant up`")
        if value != "1":
            return self.check("mptcp", False, f"net.mptcp.enabled={value}",
                              "run sysctl -w net.mptcp.enabled=1")
        return self.check("mptcp", True, "net.mptcp.enabled=1")

    def path_managers(self) -> list[Check]:
        available = self._sysctl("available_path_managers")
        if available is not None:
            names = available.split()
            detail = f"available_path_managers: {available or '(empty)'}"
            return [self.check(f"pm_{pm}", pm in names, detail,
                               f"this kernel has no {pm} path manager: use a newer kernel "
                               f"or `vagrant up`") for pm in ("kernel", "userspace")]
        if self._sysctl("pm_type") is not None:
            detail = "net.mptcp.pm_type present: kernel (0) and userspace (1) path managers"
            return [self.check("pm_kernel", True, detail),
                    self.check("pm_userspace", True, detail)]
        if self._sysctl("enabled") is not None:
            return [self.check("pm_kernel", True, "in-kernel path manager (no net.mptcp.pm_type)"),
                    self.check("pm_userspace", False,
                               "no net.mptcp.pm_type: kernel predates the userspace path "
                               "manager (5.19)", "use a kernel >= 5.19 or `vagrant up`")]
        fix = "use a kernel with MPTCP (>= 5.15) or `vagrant up`"
        return [self.check("pm_kernel", False, "no MPTCP in this kernel", fix),
                self.check("pm_userspace", False, "no MPTCP in this kernel", fix)]

    # -- tools ---------------------------------------------------------------------------
    def _dpkg_version(self, package: str) -> str | None:
        if self.which("dpkg-query") is None:
            return None
        res = self.run(["dpkg-query", "-W", "-f=${Version}", package])
        version = _first_line(res.out) if res.ok else ""
        return version or None

    def tool(self, name: str) -> Check:
        spec = TOOLS[name]
        install = f"apt-get install {spec.package} ({SETUP_HINT})"
        path = self.which(spec.binary)
        if path is None:
            for d in SBIN_DIRS:
                candidate = Path(d) / spec.binary
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return self.check(name, False, f"{candidate} exists but {d} is not on PATH",
                                      f"add {d} to PATH")
            return self.check(name, False, f"{spec.binary} not found on PATH", install)
        version = ""
        if spec.version_argv is not None:
            res = self.run([path, *spec.version_argv])
            if res.rc is None or (res.rc != 0 and not (res.out or res.err).strip()):
                return self.check(name, False, f"{path} found but `{spec.binary} "
                                  f"{' '.join(spec.version_argv)}` failed: {res.says()}",
                                  f"reinstall it: apt-get install --reinstall {spec.package}")
            version = _first_line(res.out) or _first_line(res.err)
        if not version:
            pkg_version = self._dpkg_version(spec.package)
            version = (f"{spec.package} {pkg_version} (Debian package)" if pkg_version
                       else "version unknown")
        return self.check(name, True, f"{version} [{path}]")

    # -- kernel features, in a throwaway namespace --------------------------------------------
    def _netns_precondition(self, name: str, needs: Sequence[str]) -> Check | None:
        """A not-ok check when the namespace probe cannot even be attempted, else None."""
        fix_vm = f"run on Linux as root, or {VM_HINT}"
        if not self.is_linux:
            return self.check(name, False, "not Linux", fix_vm)
        if not self.is_root:
            return self.check(name, False, "needs root to probe in a throwaway namespace",
                              "run as root (sudo make doctor)")
        for tool in ("unshare", *needs):
            if self.which(tool) is None:
                return self.check(name, False, f"cannot probe: {tool} not found on PATH",
                                  f"install {tool} ({SETUP_HINT})")
        return None

    def _feature_fix(self, name: str, what: str) -> str:
        config, module = KERNEL_FEATURE[name]
        return (f"this kernel lacks {what} ({config}): `modprobe {module}` if it is built "
                f"as a module, else {VM_HINT}")

    def qdisc(self, name: str) -> Check:
        pre = self._netns_precondition(name, ("ip", "tc", "sh"))
        if pre is not None:
            return pre
        script = (f"ip link add tbp0 type veth peer name tbp1 || exit {VETH_FAILED}\n"
                  f"ip link set tbp0 up || exit {VETH_FAILED}\n"
                  f"exec tc qdisc add dev tbp0 root {QDISC_ARGS[name]}\n")
        res = self.run(["unshare", "--net", "--", "sh", "-c", script])
        if res.ok:
            return self.check(name, True, f"sch_{name}: qdisc accepted on a veth")
        if res.rc == VETH_FAILED:
            return self.check(name, False, "cannot probe: no veth pair in a throwaway "
                              f"namespace: {res.says()}", "use a kernel with CONFIG_VETH")
        if res.rc is None:
            return self.check(name, False, f"sch_{name} probe did not finish: {res.says()}",
                              "rerun `testbed doctor`; check that tc and unshare work")
        return self.check(name, False, f"sch_{name} not available: tc said '{res.says()}'",
                          self._feature_fix(name, f"the {name} qdisc"))

    def iptables_target(self, name: str, rule: Sequence[str], what: str) -> Check:
        pre = self._netns_precondition(name, ("iptables",))
        if pre is not None:
            return pre
        res = self.run(["unshare", "--net", "--", "iptables", "-w", "2", *rule])
        if res.ok:
            return self.check(name, True, f"{what} accepted by iptables")
        if res.rc is None:
            return self.check(name, False, f"{what} probe did not finish: {res.says()}",
                              "rerun `testbed doctor`")
        return self.check(name, False, f"{what} not available: iptables said '{res.says()}'",
                          self._feature_fix(name, what))

    def tcpoptstrip(self) -> Check:
        return self.iptables_target(
            "tcpoptstrip", ["-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "-j",
                            "TCPOPTSTRIP", "--strip-options", "30"], "TCPOPTSTRIP")

    def tcpmss(self) -> Check:
        return self.iptables_target(
            "tcpmss", ["-t", "mangle", "-A", "FORWARD", "-p", "tcp", "--tcp-flags", "SYN,RST",
                       "SYN", "-j", "TCPMSS", "--set-mss", "536"], "TCPMSS")

    def nfqueue(self) -> Check:
        return self.iptables_target(
            "nfqueue", ["-t", "mangle", "-A", "FORWARD", "-p", "tcp", "-j", "NFQUEUE",
                        "--queue-num", "0"], "NFQUEUE")

    def nft_nat(self) -> Check:
        pre = self._netns_precondition("nft_nat", ("nft",))
        if pre is not None:
            return pre
        res = self.run(["unshare", "--net", "--", "nft", "-f", "-"], NFT_NAT_RULESET)
        if res.ok:
            return self.check("nft_nat", True, "nft nat chain with masquerade accepted")
        if res.rc is None:
            return self.check("nft_nat", False, f"nft probe did not finish: {res.says()}",
                              "rerun `testbed doctor`")
        return self.check("nft_nat", False, f"nft NAT not available: nft said '{res.says()}'",
                          self._feature_fix("nft_nat", "nftables NAT/masquerade"))

    def openvswitch(self) -> Check:
        fix = f"Open vSwitch needs a kernel with CONFIG_OPENVSWITCH: {VM_HINT}"
        if not self.is_linux:
            return self.check("openvswitch", False, "not Linux", fix)
        if Path("/sys/module/openvswitch").exists():
            return self.check("openvswitch", True, "module loaded")
        if self.which("modinfo") is not None:
            res = self.run(["modinfo", "-F", "filename", "openvswitch"])
            if res.ok and res.out.strip():
                return self.check("openvswitch", True, f"module available: {_first_line(res.out)}")
            said = res.says()
        else:
            said = "modinfo not found"
        config = kernel_config_value("CONFIG_OPENVSWITCH", self.release)
        if config == "y":
            return self.check("openvswitch", True, "built into the kernel (CONFIG_OPENVSWITCH=y)")
        if config == "n":
            return self.check("openvswitch", False,
                              "not in this kernel (CONFIG_OPENVSWITCH is not set)", fix)
        return self.check("openvswitch", False,
                          f"openvswitch module not loaded and not found: modinfo said '{said}'",
                          fix)

    # -- all of them ---------------------------------------------------------------------
    def probes(self) -> list[tuple[tuple[str, ...], Callable[[], list[Check]]]]:
        """(names it reports, probe) pairs; each probe returns the checks of its names."""
        def one(f: Callable[[], Check]) -> Callable[[], list[Check]]:
            return lambda: [f()]

        items: list[tuple[tuple[str, ...], Callable[[], list[Check]]]] = [
            (("linux",), one(self.linux)),
            (("root",), one(self.root)),
            (("kernel",), one(self.kernel)),
            (("mptcp",), one(self.mptcp)),
            (("pm_kernel", "pm_userspace"), self.path_managers),
            (("tcpoptstrip",), one(self.tcpoptstrip)),
            (("tcpmss",), one(self.tcpmss)),
            (("nfqueue",), one(self.nfqueue)),
            (("nft_nat",), one(self.nft_nat)),
            (("openvswitch",), one(self.openvswitch)),
        ]
        items += [((q,), one(partial(self.qdisc, q))) for q in QDISC_ARGS]
        items += [((t,), one(partial(self.tool, t))) for t in TOOLS]
        return items

    def found(self, name: str) -> Check:
        """A tool's check without its version: where the binary is (``tool`` completes it)."""
        path = self.which(TOOLS[name].binary)
        if path is None:
            return self.tool(name)  # says why, and how to fix it
        return self.check(name, True, f"found [{path}]; version being probed")

    def report(self, workers: int = 8, later: Collection[str] = ()) -> DoctorReport:
        items = [(names, (lambda n=names[0]: [self.found(n)]) if names[0] in later else f)
                 for names, f in self.probes()]
        by_name: dict[str, Check] = {}

        def guarded(names: tuple[str, ...], f: Callable[[], list[Check]]) -> list[Check]:
            try:
                return f()
            except Exception as exc:  # a probe reports why it failed; it never raises
                return [self.check(n, False, f"probe failed: {type(exc).__name__}: {exc}",
                                   "report this as a testbed bug") for n in names]

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(guarded, names, f) for names, f in items]
            for fut in futures:
                for c in fut.result():
                    by_name[c.name] = c
        order = {n: i for i, n in enumerate(CAPABILITIES)}
        report = DoctorReport(sorted(by_name.values(), key=lambda c: order.get(c.name, 999)))
        if later:
            background = ThreadPoolExecutor(max_workers=len(later),
                                            thread_name_prefix="doctor")
            report.pending = {
                n: background.submit(lambda n=n: guarded((n,), lambda: [self.tool(n)])[0])
                for n in later if n in TOOLS}
            background.shutdown(wait=False)
        return report


def kernel_config_value(option: str, release: str | None = None) -> str | None:
    """Value of a kernel config option from /proc/config.gz or /boot/config-<release>.

    "y", "m" (or the option's value), "n" when the config says it is not set, None when
    no config is readable or the option does not appear in it.
    """
    release = release or platform.release()
    text = None
    with contextlib.suppress(OSError, EOFError):
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode(errors="replace")
    if text is None:
        with contextlib.suppress(OSError):
            text = Path(f"/boot/config-{release}").read_text(errors="replace")
    if text is None:
        return None
    m = re.search(rf"^{re.escape(option)}=(\S+)$", text, re.MULTILINE)
    if m:
        return m.group(1)
    if re.search(rf"^# {re.escape(option)} is not set$", text, re.MULTILINE):
        return "n"
    return None


def probe(timeout_s: float | None = None, *, later: Collection[str] = ()) -> DoctorReport:
    """Probe this machine. Each probe is bounded by ``timeout_s`` (default 5 s, or
    $TESTBED_DOCTOR_TIMEOUT: a VM under software emulation needs more); none raises.

    ``later``: tools whose version is asked in the background (``tshark --version`` takes
    0.25 s, five times the rest of the probe): their checks only say where the binary is
    until ``report.settle()``."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("TESTBED_DOCTOR_TIMEOUT", "5"))
    return Prober(timeout_s).report(later=later)


def render_table(report: DoctorReport) -> str:
    """A plain-text table, aligned, without colours; fixes on an indented line below."""
    header = ("CHECK", "STATUS", "ESSENTIAL", "DETAIL")
    rows = [(c.name, "ok" if c.ok else "MISSING", "yes" if c.essential else "", c.detail)
            for c in report.checks]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    indent = sum(widths) + 3 * 2

    def line(cells: tuple[str, str, str, str]) -> str:
        left = "  ".join(cell.ljust(w) for cell, w in zip(cells[:3], widths, strict=True))
        return f"{left}  {cells[3]}"

    out = [line(header)]
    for c, row in zip(report.checks, rows, strict=True):
        out.append(line(row).rstrip())
        if not c.ok and c.fix:
            out.append(" " * indent + f"fix: {c.fix}")
    ok_count = sum(c.ok for c in report.checks)
    out.append("")
    out.append(f"{ok_count}/{len(report.checks)} checks ok")
    if report.essentials_ok():
        out.append("essentials: ok, the testbed can run here")
    else:
        absent = sorted(n for n in ESSENTIAL if (c := report.check(n)) is None or not c.ok)
        out.append(f"essentials MISSING: {', '.join(absent)}: the testbed cannot run here")
    return "\n".join(out) + "\n"


def fingerprint(report: DoctorReport | None = None) -> dict[str, Any]:
    """What a result must record about the machine it was measured on.

    Kernel release, every net.mptcp.* sysctl, tool versions and capabilities (from
    ``report``, probed now when not given) and the Python version.
    """
    if report is None:
        report = probe()
    sysctls: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for f in sorted(MPTCP_SYSCTL_DIR.iterdir()):
            with contextlib.suppress(OSError):
                sysctls[f"net.mptcp.{f.name}"] = f.read_text().strip()
    tools: dict[str, str | None] = {}
    for name in TOOLS:
        c = report.check(name)
        tools[name] = c.detail if c is not None and c.ok else None
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "sysctls": sysctls,
        "tools": tools,
        "capabilities": sorted(report.capabilities()),
        "python": platform.python_version(),
    }
