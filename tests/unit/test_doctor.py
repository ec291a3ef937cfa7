"""Doctor logic with fakes: no root, no subprocess that touches the kernel."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from testbed.runtime import doctor
from testbed.runtime.doctor import (
    CAPABILITIES,
    ESSENTIAL,
    Check,
    DoctorReport,
    Prober,
    Ran,
    parse_release,
    render_table,
    run_bounded,
)


def make_check(name: str, ok: bool = True, detail: str = "", fix: str = "") -> Check:
    return Check(name=name, ok=ok, detail=detail or ("v1" if ok else f"{name} absent"),
                 essential=name in ESSENTIAL, fix="" if ok else (fix or f"install {name}"))


def full_report(**not_ok: str) -> DoctorReport:
    """Every capability present except those given as name=detail."""
    return DoctorReport([make_check(n, n not in not_ok, not_ok.get(n, ""))
                         for n in CAPABILITIES])


# -- DoctorReport -------------------------------------------------------------------------------
def test_capabilities_are_the_ok_checks() -> None:
    report = full_report(netem="sch_netem not available", openvswitch="no module")
    assert report.capabilities() == set(CAPABILITIES) - {"netem", "openvswitch"}


def test_missing_gives_detail_and_fix_for_each_unmet_requirement() -> None:
    report = DoctorReport([
        make_check("tbf"),
        make_check("netem", False, "sch_netem not available: tc said 'unknown'",
                   "modprobe sch_netem"),
    ])
    assert report.missing(["tbf"]) == {}
    assert report.missing(["netem", "tbf"]) == {
        "netem": "sch_netem not available: tc said 'unknown'; fix: modprobe sch_netem"}


def test_missing_names_unknown_and_unprobed_requirements() -> None:
    report = DoctorReport([make_check("tbf")])
    assert report.missing(["teleport", "htb", "tbf"]) == {
        "teleport": "unknown requirement", "htb": "not probed"}


def test_missing_accepts_a_single_name_and_any_iterable() -> None:
    report = full_report(netem="absent")
    assert list(report.missing("netem")) == ["netem"]
    assert list(report.missing(n for n in ("netem", "tbf"))) == ["netem"]


def test_missing_without_fix_is_just_the_detail() -> None:
    report = DoctorReport([Check("netem", False, "no netem", False, "")])
    assert report.missing(["netem"]) == {"netem": "no netem"}


def test_essentials_ok_when_all_present() -> None:
    assert full_report().essentials_ok()
    assert full_report(netem="absent", openvswitch="absent", nginx="absent").essentials_ok()


@pytest.mark.parametrize("name", sorted(ESSENTIAL))
def test_any_missing_essential_fails(name: str) -> None:
    assert not full_report(**{name: "absent"}).essentials_ok()


def test_essentials_not_ok_when_an_essential_check_was_not_probed() -> None:
    report = DoctorReport([c for c in full_report().checks if c.name != "tshark"])
    assert not report.essentials_ok()


def test_to_json_shape_and_round_trip() -> None:
    report = full_report(netem="sch_netem not available")
    data = report.to_json()
    assert set(data) == {"essentials_ok", "capabilities", "checks"}
    assert data["essentials_ok"] is True
    assert data["capabilities"] == sorted(set(CAPABILITIES) - {"netem"})
    assert [c["name"] for c in data["checks"]] == list(CAPABILITIES)
    netem = next(c for c in data["checks"] if c["name"] == "netem")
    assert netem == {"name": "netem", "ok": False, "detail": "sch_netem not available",
                     "essential": False, "fix": "install netem"}
    assert json.loads(json.dumps(data)) == data


def test_essential_flags_match_the_list() -> None:
    assert {"linux", "root", "mptcp", "mnexec", "nsenter", "ip", "tcpdump", "tshark"} == ESSENTIAL
    assert set(CAPABILITIES) >= ESSENTIAL


# -- render_table -------------------------------------------------------------------------------
def test_table_is_aligned_plain_text_with_fixes() -> None:
    report = full_report(netem="sch_netem not available")
    text = render_table(report)
    assert "\x1b[" not in text                     # no colour codes
    lines = text.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "ESSENTIAL", "DETAIL"]
    detail_col = lines[0].index("DETAIL")
    rows = [ln for ln in lines[1:] if ln and ln.split()[0] in CAPABILITIES]
    assert [r.split()[0] for r in rows] == list(CAPABILITIES)
    for row in rows:
        assert row[detail_col - 2: detail_col] == "  "   # detail column aligned
    netem_at = next(i for i, ln in enumerate(lines) if ln.startswith("netem "))
    assert "MISSING" in lines[netem_at]
    assert lines[netem_at + 1].strip() == "fix: install netem"
    assert lines[netem_at + 1].index("fix:") == detail_col
    assert "essentials: ok" in text


def test_table_names_missing_essentials() -> None:
    text = render_table(full_report(root="euid 1000", tshark="tshark not found on PATH"))
    assert "essentials MISSING: root, tshark" in text


# -- probes with a fake runner ---------------------------------------------------------------
class FakeRunner:
    """Answers commands by their first distinctive word; records what was asked."""

    def __init__(self, answers: dict[str, Ran]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout_s: float, stdin: str | None = None) -> Ran:
        self.calls.append(list(argv))
        for key, ran in self.answers.items():
            if key in " ".join(argv):
                return ran
        return Ran(0, "", "")


def prober(tmp_path: Path, answers: dict[str, Ran] | None = None,
           which: dict[str, str] | None = None, *, is_root: bool = True,
           release: str = "6.18.44") -> tuple[Prober, FakeRunner]:
    runner = FakeRunner(answers or {})
    paths = {"unshare": "/usr/bin/unshare", "sh": "/bin/sh", "ip": "/usr/sbin/ip",
             "tc": "/usr/sbin/tc", "iptables": "/usr/sbin/iptables", "nft": "/usr/sbin/nft",
             "dpkg-query": "/usr/bin/dpkg-query"} if which is None else which
    p = Prober(2.0, runner=runner, which=paths.get, mptcp_dir=tmp_path, is_linux=True,
               is_root=is_root, release=release)
    return p, runner


def test_qdisc_failure_reports_what_tc_said(tmp_path: Path) -> None:
    p, runner = prober(tmp_path, {"netem": Ran(2, "", "Error: Specified qdisc kind is unknown.\n")})
    c = p.qdisc("netem")
    assert not c.ok
    assert c.detail == "sch_netem not available: tc said 'Error: Specified qdisc kind is unknown.'"
    assert "CONFIG_NET_SCH_NETEM" in c.fix and "modprobe sch_netem" in c.fix
    assert runner.calls[0][:4] == ["unshare", "--net", "--", "sh"]
    assert "veth" in runner.calls[0][-1]


def test_qdisc_success_and_veth_failure(tmp_path: Path) -> None:
    p, _ = prober(tmp_path)
    assert p.qdisc("tbf").ok
    p, _ = prober(tmp_path, {"htb": Ran(doctor.VETH_FAILED, "", "Unknown device type.")})
    c = p.qdisc("htb")
    assert not c.ok and "veth" in c.detail and "Unknown device type." in c.detail


def test_timeout_is_reported_not_raised(tmp_path: Path) -> None:
    p, _ = prober(tmp_path, {"tbf": Ran(None, "", "", "timed out after 2s")})
    c = p.qdisc("tbf")
    assert not c.ok and "timed out after 2s" in c.detail


def test_namespace_probes_need_root(tmp_path: Path) -> None:
    p, runner = prober(tmp_path, is_root=False)
    for c in (p.qdisc("tbf"), p.tcpoptstrip(), p.tcpmss(), p.nfqueue(), p.nft_nat()):
        assert not c.ok and c.detail == "needs root to probe in a throwaway namespace"
    assert runner.calls == []


def test_iptables_and_nft_probes(tmp_path: Path) -> None:
    p, runner = prober(tmp_path, {"TCPOPTSTRIP": Ran(2, "", "iptables: No chain/target/match "
                                                      "by that name.")})
    c = p.tcpoptstrip()
    assert not c.ok and "No chain/target/match" in c.detail
    assert p.nfqueue().ok and p.tcpmss().ok
    assert p.nft_nat().ok
    assert ["unshare", "--net", "--", "nft", "-f", "-"] in runner.calls


def test_tool_version_first_line_then_dpkg_fallback(tmp_path: Path) -> None:
    which = {"tcpdump": "/usr/bin/tcpdump", "mnexec": "/usr/bin/mnexec",
             "mptcpize": "/usr/bin/mptcpize", "dpkg-query": "/usr/bin/dpkg-query"}
    p, _ = prober(tmp_path, {
        "tcpdump --version": Ran(0, "tcpdump version 4.99.3\nlibpcap version 1.10.3\n", ""),
        "mnexec -v": Ran(0, "", ""),
        "${Version} mininet": Ran(0, "2.3.0-1", ""),
        "${Version} mptcpize": Ran(0, "0.12-1", ""),
    }, which=which)
    assert p.tool("tcpdump").detail == "tcpdump version 4.99.3 [/usr/bin/tcpdump]"
    assert p.tool("mnexec").detail == "mininet 2.3.0-1 (Debian package) [/usr/bin/mnexec]"
    assert p.tool("mptcpize").detail == "mptcpize 0.12-1 (Debian package) [/usr/bin/mptcpize]"
    missing = p.tool("tshark")
    assert not missing.ok and missing.essential
    assert missing.detail == "tshark not found on PATH"
    assert "apt-get install tshark" in missing.fix


def test_a_slow_version_is_asked_in_the_background(tmp_path: Path) -> None:
    import threading

    release = threading.Event()
    which = {"tshark": "/usr/bin/tshark"}
    p, runner = prober(tmp_path, {"tshark --version": Ran(0, "TShark (Wireshark) 4.0.17\n", "")},
                       which=which)
    def slow(argv: list[str], timeout_s: float, stdin: str | None = None) -> Ran:
        if argv[:1] == ["/usr/bin/tshark"]:
            assert release.wait(5)
        return runner(argv, timeout_s, stdin)

    p.runner = slow
    report = p.report(later=("tshark",))
    early = report.check("tshark")
    assert early is not None and early.ok  # usable: the binary is there
    assert early.detail == "found [/usr/bin/tshark]; version being probed"
    release.set()
    settled = report.settle().check("tshark")
    assert settled is not None and settled.detail == "TShark (Wireshark) 4.0.17 [/usr/bin/tshark]"
    assert not report.pending
    # Absent, it is reported missing at once, with the fix.
    p2, _ = prober(tmp_path, {}, which={})
    absent = p2.report(later=("tshark",)).check("tshark")
    assert absent is not None and not absent.ok and "apt-get install tshark" in absent.fix


def test_broken_tool_is_not_ok(tmp_path: Path) -> None:
    p, _ = prober(tmp_path, {"ip -V": Ran(None, "", "", "cannot run /usr/sbin/ip: Exec format")},
                  which={"ip": "/usr/sbin/ip"})
    c = p.tool("ip")
    assert not c.ok and "Exec format" in c.detail


def test_mptcp_sysctl_states(tmp_path: Path) -> None:
    p, _ = prober(tmp_path / "absent")
    c = p.mptcp()
    assert not c.ok and "kernel has no MPTCP" in c.detail and "5.15" in c.fix
    (tmp_path / "enabled").write_text("0\n")
    p, _ = prober(tmp_path)
    c = p.mptcp()
    assert not c.ok and c.detail == "net.mptcp.enabled=0"
    assert c.fix == "run sysctl -w net.mptcp.enabled=1"
    (tmp_path / "enabled").write_text("1\n")
    assert p.mptcp().ok


def test_path_managers_from_available_list(tmp_path: Path) -> None:
    (tmp_path / "enabled").write_text("1\n")
    (tmp_path / "available_path_managers").write_text("kernel\n")
    p, _ = prober(tmp_path)
    pk, pu = p.path_managers()
    assert (pk.name, pk.ok, pu.name, pu.ok) == ("pm_kernel", True, "pm_userspace", False)


def test_path_managers_inferred_from_pm_type(tmp_path: Path) -> None:
    (tmp_path / "enabled").write_text("1\n")
    p, _ = prober(tmp_path)
    assert [c.ok for c in p.path_managers()] == [True, False]
    (tmp_path / "pm_type").write_text("0\n")
    assert [c.ok for c in p.path_managers()] == [True, True]


def test_kernel_release_parsing(tmp_path: Path) -> None:
    assert parse_release("6.18.44-fc-v1252") == (6, 18)
    assert parse_release("weird") is None
    p, _ = prober(tmp_path, release="5.10.0-20-amd64")
    assert not p.kernel().ok
    p, _ = prober(tmp_path, release="6.1.0-13-amd64")
    c = p.kernel()
    assert c.ok and c.detail == "6.1.0-13-amd64" and c.fix == ""


def test_report_orders_checks_and_contains_raising_probes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p, _ = prober(tmp_path, which={})

    def boom() -> Check:
        raise RuntimeError("kaput")

    monkeypatch.setattr(p, "openvswitch", boom)
    report = p.report()
    assert [c.name for c in report.checks] == list(CAPABILITIES)
    ovs = report.check("openvswitch")
    assert ovs is not None and not ovs.ok and "kaput" in ovs.detail


# -- the real bounded runner, on harmless commands ------------------------------------------
def test_run_bounded_reports_timeout_and_missing_binary() -> None:
    ran = run_bounded(["sleep", "5"], 0.2)
    assert ran.rc is None and ran.error == "timed out after 0.2s"
    ran = run_bounded(["/nonexistent/tool"], 1.0)
    assert ran.rc is None and "cannot run /nonexistent/tool" in ran.error
    ran = run_bounded(["cat"], 2.0, "hello\n")
    assert ran.ok and ran.out == "hello\n"
