"""The doctor on this machine: real probes in throwaway namespaces.

Kernel features are checked against an independent source (the kernel's own config, or the
module tree), so the test holds both here (no sch_netem, no openvswitch) and on a stock
Debian kernel that has them as modules.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.runtime.doctor import (
    CAPABILITIES,
    DoctorReport,
    fingerprint,
    kernel_config_value,
    probe,
    render_table,
)

pytestmark = pytest.mark.root


def _lines(argv: list[str]) -> set[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
    return {ln.split()[0] for ln in res.stdout.splitlines() if ln.strip()}


def _kernel_has(option: str, module: str) -> bool:
    """Whether the kernel can provide a feature, judged without the doctor's probes."""
    if Path(f"/sys/module/{module}").exists():
        return True
    config = kernel_config_value(option)
    if config == "y":
        return True
    if config == "n":
        return False
    # Built as a module, or no readable config: the module tree decides.
    res = subprocess.run(["modinfo", module], capture_output=True, timeout=10)
    return res.returncode == 0


@dataclass
class Probed:
    report: DoctorReport
    netns_before: set[str]
    netns_after: set[str]
    links_before: set[str]
    links_after: set[str]


@pytest.fixture(scope="module")
def probed() -> Probed:
    netns_before = _lines(["ip", "netns", "list"])
    links_before = _lines(["ip", "-o", "-br", "link", "show"])
    report = probe()
    return Probed(report, netns_before, _lines(["ip", "netns", "list"]),
                  links_before, _lines(["ip", "-o", "-br", "link", "show"]))


def test_every_capability_is_reported(probed: Probed) -> None:
    report = probed.report
    assert isinstance(report, DoctorReport)
    assert [c.name for c in report.checks] == list(CAPABILITIES)
    for c in report.checks:
        assert c.detail, c
        assert bool(c.fix) != c.ok, c


def test_essentials_and_mptcp(probed: Probed) -> None:
    report = probed.report
    assert report.essentials_ok(), render_table(report)
    for name in ("linux", "root", "mptcp", "kernel", "pm_kernel", "tcpdump", "tshark",
                 "mnexec", "ip"):
        assert name in report.capabilities(), report.missing([name])
    mptcp = report.check("mptcp")
    assert mptcp is not None and mptcp.detail == "net.mptcp.enabled=1"


def test_tbf_and_htb_work(probed: Probed) -> None:
    report = probed.report
    assert report.missing(["tbf", "htb"]) == {}


def test_netem_matches_the_kernel(probed: Probed) -> None:
    report = probed.report
    netem = report.check("netem")
    assert netem is not None
    assert netem.ok == _kernel_has("CONFIG_NET_SCH_NETEM", "sch_netem"), netem
    if not netem.ok:   # the case on the project's development machine
        assert netem.detail.startswith("sch_netem not available: tc said '"), netem.detail
        assert "netem" in report.missing(["netem"])["netem"]
        assert netem.fix


def test_openvswitch_matches_the_kernel(probed: Probed) -> None:
    report = probed.report
    ovs = report.check("openvswitch")
    assert ovs is not None
    assert ovs.ok == _kernel_has("CONFIG_OPENVSWITCH", "openvswitch"), ovs
    if not ovs.ok:
        assert ovs.detail and ovs.fix


def test_probing_leaves_nothing_behind(probed: Probed) -> None:
    assert probed.netns_after - probed.netns_before == set(), "probing left namespaces"
    assert probed.links_after - probed.links_before == set(), "probing left root links"
    assert not any(name.startswith("tbp") for name in probed.links_after)


def test_fingerprint_and_json(probed: Probed) -> None:
    report = probed.report
    fp = fingerprint(report)
    assert fp["sysctls"]["net.mptcp.enabled"] == "1"
    assert fp["kernel"] == report.check("kernel").detail  # type: ignore[union-attr]
    assert fp["tools"]["tshark"].startswith("TShark")
    json.dumps(fp)
    json.dumps(report.to_json())
