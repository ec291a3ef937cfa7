"""The claims matrix from recorded evidence: verdict logic, reasons, diff, and the reports
(JUnit parsed back, Markdown, the HTML page rebuilt without running anything).

Fixtures: ``tests/fixtures/matrix/run_a`` and ``run_b`` are two small stored runs
(result.json, plus observers and ss samples for run_a's baseline). run_a has a REFUTED
claim (M1), an n/a transport measured anyway (O2 over TCP), a flaky claim (A2 repeated
three times: 2× CONFIRMED, 1× REFUTED), an INCONCLUSIVE one (P4, no netem), an ERROR (M2)
and a transport a playbook did not run (M2d, MPTCP only). run_b fixes M1 and M2, breaks
the baseline's second subflow, drops O2 and adds S1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from testbed.model.matrix import (
    FLAKY,
    NOT_APPLICABLE,
    NOT_RUN,
    Matrix,
    Row,
    applies,
    build_matrix,
    diff_matrices,
    normalize_claims,
    row_verdict,
    selected,
    sentence,
)
from testbed.report import load_matrix, read_result, write_reports
from testbed.report.junit import render_junit
from testbed.report.markdown import render_markdown
from testbed.report.plots import timed_events

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "matrix"


def matrix_of(name: str) -> Matrix:
    return build_matrix(json.loads((FIXTURES / name / "result.json").read_text()))


def rows_by_key(name: str) -> dict[str, Row]:
    return {r.key: r for r in matrix_of(name).rows}


def test_rows_follow_the_catalogue_order_baseline_first() -> None:
    m = matrix_of("run_a")
    assert [r.claim for r in m.rows] == ["baseline", "P4", "O2", "A2", "M1", "M2", "M2d"]
    assert "M1" not in m.uncovered and "P1" in m.uncovered and "baseline" not in m.uncovered


def test_confirmed_row_and_its_one_sentence_reason() -> None:
    row = rows_by_key("run_a")["baseline"]
    assert row.verdict == "CONFIRMED" and not row.flaky
    mptcp = row.cells["mptcp"]
    assert mptcp.verdict == "CONFIRMED"
    reason = mptcp.reason
    assert reason.endswith(".") and "\n" not in reason
    assert "2 subflows" in reason and "SNI visible on wifi" in reason
    assert "MPTCP keys visible on wifi" in reason
    assert "data on cell" in reason and "wifi" in reason
    # Evidence paths are relative to the run directory, with the verdict file.
    assert mptcp.evidence["pcap.wifi"] == "baseline/mptcp/wifi.pcap"
    assert mptcp.evidence["verdict"] == "baseline/mptcp/verdict.json"


def test_refuted_names_the_failed_expectation_with_the_measured_value() -> None:
    row = rows_by_key("run_a")["m1_nat"]
    assert row.cells["tcp"].verdict == "CONFIRMED"
    assert row.cells["mptcp"].verdict == "REFUTED"
    assert row.verdict == "REFUTED"
    assert "subflows: expected == 2, measured 1" in row.cells["mptcp"].reason
    assert "fell back to TCP" in row.cells["mptcp"].reason


def test_transport_where_the_claim_does_not_apply_is_na_even_if_measured() -> None:
    assert not applies("O2", "tcp") and applies("O2", "mptcp") and applies("M1", "tcp")
    assert not applies("M4c", "tcp")  # "—" in the catalogue
    row = rows_by_key("run_a")["o2_guess_token"]
    tcp = row.cells["tcp"]
    assert tcp.verdict == NOT_APPLICABLE and not tcp.applicable
    assert tcp.measured_verdict == "CONFIRMED"
    assert "does not apply" in tcp.reason
    assert row.verdict == "CONFIRMED"  # decided by the applicable transport only


def test_flaky_is_marked_with_its_distribution_never_averaged() -> None:
    row = rows_by_key("run_a")["a2_blackhole"]
    cell = row.cells["mptcp"]
    assert cell.flaky and cell.verdict == FLAKY
    assert cell.distribution == {"CONFIRMED": 2, "REFUTED": 1}
    assert "run 3: REFUTED" in cell.reason
    assert [a.repetition for a in cell.attempts] == [1, 2, 3]
    assert cell.attempts[2].evidence["verdict"] == "a2_blackhole/mptcp.3/verdict.json"
    assert row.verdict == FLAKY and row.flaky
    unanimous = row.cells["tcp"]
    assert unanimous.verdict == "CONFIRMED" and not unanimous.flaky
    assert unanimous.distribution == {"CONFIRMED": 3}


def test_inconclusive_keeps_the_reason_and_points_at_the_run_record() -> None:
    row = rows_by_key("run_a")["p4_decrypt"]
    assert row.verdict == "INCONCLUSIVE"
    cell = row.cells["tcp"]
    assert "netem" in cell.reason and cell.reason.endswith(".")
    assert cell.evidence == {"result": "result.json"}


def test_error_wins_and_a_transport_not_run_is_not_a_pass() -> None:
    assert rows_by_key("run_a")["m2_strip_mpc"].verdict == "ERROR"
    row = rows_by_key("run_a")["m2d_drop_syn"]
    assert row.cells["tcp"].verdict == NOT_RUN
    assert row.verdict == "INCONCLUSIVE"


def test_row_verdict_severity_order() -> None:
    from testbed.model.matrix import Cell

    def cells(*verdicts: str) -> list[Cell]:
        return [Cell("tcp", v, "") for v in verdicts]

    assert row_verdict(cells("CONFIRMED", "CONFIRMED")) == ("CONFIRMED", False)
    assert row_verdict(cells("CONFIRMED", "QUALIFIED"))[0] == "QUALIFIED"
    assert row_verdict(cells("INCONCLUSIVE", "REFUTED"))[0] == "REFUTED"
    assert row_verdict(cells("REFUTED", "ERROR"))[0] == "ERROR"
    assert row_verdict([Cell("tcp", NOT_APPLICABLE, "", applicable=False)])[0] == \
        NOT_APPLICABLE


def test_sentence_for_each_verdict() -> None:
    facts = {"status": "timeout", "checksum_match": False, "subflows": 1, "fallback": False,
             "paths_with_data": [], "bytes_per_path": {"wifi": 100}}
    s = sentence("REFUTED", "status: expected 'ok', measured 'timeout'", facts, "mptcp")
    assert s.startswith("Not as expected") and "'timeout'" in s and s.endswith(".")
    assert "no path carried" in s
    s = sentence("INCONCLUSIVE", "this machine lacks what the scenario needs: netem: x.", {},
                 "tcp")
    assert s == "This machine lacks what the scenario needs: netem: x."


def test_claim_selection() -> None:
    assert normalize_claims(["m2d", "baseline", "P1,o2"]) == ["M2d", "baseline", "P1", "O2"]
    with pytest.raises(ValueError, match=r"unknown claim 'X9'.*known: baseline, P1"):
        normalize_claims(["X9"])
    assert selected(None, ["baseline"], [])
    assert not selected("M1", ["baseline"], [])
    assert not selected("M1", [], ["M1"])
    m = build_matrix(json.loads((FIXTURES / "run_a" / "result.json").read_text()),
                     selection={"only": ["M1", "M3"]})
    assert m.uncovered == ["M3"]


def test_diff_lists_verdict_and_figure_changes() -> None:
    a, b = matrix_of("run_a"), matrix_of("run_b")
    changes = diff_matrices(a, b)
    lines = [c.line() for c in changes]
    by = {(c.row, c.transport, c.what): c for c in changes}
    assert by[("m1_nat", "mptcp", "verdict")].before == "REFUTED"
    assert by[("m1_nat", "mptcp", "verdict")].after == "CONFIRMED"
    assert by[("m1_nat", None, "claim verdict")].after == "CONFIRMED"
    assert by[("m1_nat", "mptcp", "subflows")].before == 1
    assert by[("m1_nat", "mptcp", "fallback")].after is False
    assert ("m1_nat", "mptcp", "bytes per path") in by       # cell went from 0 to ~55 %
    assert by[("baseline", "mptcp", "subflows")].after == 1
    assert by[("m2_strip_mpc", "mptcp", "verdict")].before == "ERROR"
    assert by[("o2_guess_token", None, "scenario")].after == "absent"
    assert by[("s1_split_sni", None, "scenario")].after == "present"
    assert ("baseline", "tcp", "verdict") not in by          # unchanged cells stay quiet
    assert "M1 m1_nat TLS/MPTCP: verdict: REFUTED -> CONFIRMED" in lines
    assert diff_matrices(a, matrix_of("run_a")) == []


def test_diff_ignores_small_byte_shifts() -> None:
    a = json.loads((FIXTURES / "run_a" / "result.json").read_text())
    b = json.loads(json.dumps(a))
    facts = b["scenarios"][0]["transports"]["mptcp"]["facts"]
    wifi, cell = facts["bytes_per_path"]["wifi"], facts["bytes_per_path"]["cell"]
    facts["bytes_per_path"] = {"wifi": wifi + 300_000, "cell": cell - 300_000}  # ~7 points
    assert diff_matrices(build_matrix(a), build_matrix(b)) == []
    assert diff_matrices(build_matrix(a), build_matrix(b), bytes_tolerance=0.05)


def test_junit_parsed_back() -> None:
    m = matrix_of("run_a")
    root = ET.fromstring(render_junit(m))
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert len(cases) == 2 * len(m.rows)
    assert int(suite.get("tests", "0")) == len(cases)
    by_name = {c.get("name"): c for c in cases}
    refuted = by_name["m1_nat [TLS/MPTCP]"]
    failure = refuted.find("failure")
    assert failure is not None and "subflows: expected == 2" in failure.get("message", "")
    assert refuted.get("classname") == "claims.M1"
    skipped = by_name["p4_decrypt [TLS/TCP]"].find("skipped")
    assert skipped is not None and "netem" in skipped.get("message", "")
    assert by_name["m2_strip_mpc [TLS/MPTCP]"].find("error") is not None
    na = by_name["o2_guess_token [TLS/TCP]"].find("skipped")
    assert na is not None and na.get("message", "").startswith("not applicable")
    flaky = by_name["a2_blackhole [TLS/MPTCP]"].find("failure")
    assert flaky is not None and flaky.get("type") == FLAKY
    passed = by_name["baseline [TLS/MPTCP]"]
    assert passed.find("failure") is None and passed.find("skipped") is None
    props = {p.get("name"): p.get("value") for p in passed.iter("property")}
    assert props["evidence.pcap.wifi"] == "baseline/mptcp/wifi.pcap"
    assert int(suite.get("failures", "0")) == 2      # M1 refuted, A2 flaky
    assert int(suite.get("errors", "0")) == 1
    # INCONCLUSIVE ×2, n/a (O2 tcp), not run (M2d tcp)
    assert int(suite.get("skipped", "0")) == 4


def test_markdown_matrix() -> None:
    md = render_markdown(matrix_of("run_a"))
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| claim | setting | TLS/TCP | TLS/MPTCP | verdict")
    assert len(table) == 1 + 7
    assert any("FLAKY (2× CONFIRMED, 1× REFUTED)" in line for line in table)
    assert any("n/a (measured CONFIRMED)" in line for line in table)
    assert "no playbook in this run: P1, P2, P3" in md


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.svgs = 0
        self.ids: set[str] = set()
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "tr" and "claim-row" in (a.get("class") or ""):
            self.rows.append(a)
        if tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        if tag == "svg":
            self.svgs += 1
        for key in ("src", "href"):
            value = a.get(key) or ""
            if value.startswith(("http:", "https:", "//")):
                self.external.append(value)


def test_report_rebuilt_from_stored_evidence(tmp_path: Path) -> None:
    run = tmp_path / "run_a"
    shutil.copytree(FIXTURES / "run_a", run)
    files = write_reports(run)
    assert set(files) == {"matrix.json", "report.html", "report.md", "junit.xml"}
    assert all(p.exists() for p in files.values())
    stored = json.loads((run / "matrix.json").read_text())
    assert stored["schema"] == "testbed.matrix/1"
    a2 = next(c for c in stored["claims"] if c["key"] == "a2_blackhole")
    assert a2["flaky"] and a2["cells"]["mptcp"]["distribution"] == {"CONFIRMED": 2,
                                                                    "REFUTED": 1}
    page = _Page()
    html = (run / "report.html").read_text()
    page.feed(html)
    assert [r["data-claim"] for r in page.rows] == ["baseline", "P4", "O2", "A2", "M1",
                                                    "M2", "M2d"]
    assert page.svgs >= 3 and not page.external
    for href in page.links:
        if href.startswith("#"):
            assert href[1:] in page.ids, href
        else:
            assert (run / unquote(href)).is_file(), href
    # The pcaps are not in the fixture: named, but not linked.
    assert 'class="missing"' in html and "baseline/mptcp/wifi.pcap" not in page.links
    assert "baseline/mptcp/observers.json" in page.links
    assert "6.18.0-fixture" in html and "net.mptcp.checksum_enabled" in html
    # Rebuilding gives the same files (no timestamps, stable SVG ids).
    before = {n: p.read_bytes() for n, p in files.items()}
    write_reports(run)
    assert {n: p.read_bytes() for n, p in files.items()} == before


def test_report_refuses_a_directory_without_a_result(tmp_path: Path) -> None:
    from testbed.report import NotARunDir

    with pytest.raises(NotARunDir, match=r"no result\.json"):
        read_result(tmp_path)
    (tmp_path / "result.json").write_text('{"schema": "other/1"}')
    with pytest.raises(NotARunDir, match="not a testbed result"):
        load_matrix(tmp_path)


def test_evidence_outside_the_run_dir_is_never_linked_or_read(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    data = json.loads((FIXTURES / "run_a" / "result.json").read_text())
    data["scenarios"] = data["scenarios"][:1]
    data["scenarios"][0]["transports"]["tcp"]["evidence"] = {
        "observers": "../secret.json", "pcap.wifi": "/etc/passwd"}
    (tmp_path / "secret.json").write_text('{"wifi": {"sni": {"status": "full"}}}')
    (run / "result.json").write_text(json.dumps(data))
    write_reports(run)
    html = (run / "report.html").read_text()
    assert 'href="../secret.json"' not in html and 'href="/etc/passwd"' not in html


def test_timed_events_from_middlebox_reports() -> None:
    text = "# inserted at transfer start + 0.5s:\n-I FORWARD 1 -j DROP\n"
    assert timed_events({"wifi blackhole": text}) == [(0.5, "wifi blackhole")]
    assert timed_events({"x": "no timer"}) == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_cli_report_and_diff(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(FIXTURES / "run_a", a)
    shutil.copytree(FIXTURES / "run_b", b)
    res = _cli("report", str(a))
    assert res.returncode == 0, res.stderr
    assert (a / "report.html").exists() and "report.html" in res.stdout
    res = _cli("diff", str(a), str(b))
    assert res.returncode == 1, res.stderr
    assert "M1 m1_nat TLS/MPTCP: verdict: REFUTED -> CONFIRMED" in res.stdout
    res = _cli("diff", str(a), str(a), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["changes"] == []
    res = _cli("report", str(tmp_path))
    assert res.returncode == 2 and "no result.json" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_matrix_rejects_unknown_claims_before_needing_root() -> None:
    res = _cli("matrix", "--only", "Z1")
    assert res.returncode == 2 and "unknown claim 'Z1'" in res.stderr
    res = _cli("matrix", "--repeat", "0")
    assert res.returncode == 2 and "from 1 to 100" in res.stderr
    for command in ("matrix", "run"):
        res = _cli(command, *(["playbooks/baseline.yaml"] if command == "run" else []),
                   "--jobs", "0")
        assert res.returncode == 2 and "number of parallel jobs from 1 to 16" in res.stderr


def test_matrix_playbook_selection(tmp_path: Path) -> None:
    from testbed.cli import matrix_playbooks
    from testbed.errors import SpecError

    shutil.copy(REPO / "playbooks" / "baseline.yaml", tmp_path / "baseline.yaml")
    text = (REPO / "playbooks" / "baseline.yaml").read_text()
    (tmp_path / "m1.yaml").write_text(
        text.replace("name: baseline", "name: m1_x\nclaim: M1\nsweep: {bytes: [1000, 2000]}"))
    (tmp_path / "other.yaml").write_text(text.replace("name: baseline", "name: other"))
    (tmp_path / "broken.yaml").write_text("name: broken\nclaim: O3\napp: {kind: nope}\n")
    warnings: list[str] = []
    with pytest.raises(SpecError, match=r"broken\.yaml"):
        matrix_playbooks([], [], directory=tmp_path)
    pbs = matrix_playbooks([], ["O3"], repeat=3, directory=tmp_path, warn=warnings.append)
    assert [p.name for p in pbs] == ["baseline", "m1_x[bytes=1000]", "m1_x[bytes=2000]"]
    assert all(p.repeat == 3 for p in pbs)
    assert warnings == ["other.yaml: no claim, not part of the matrix"]
    assert [p.name for p in matrix_playbooks(["baseline"], [], directory=tmp_path)] == \
        ["baseline"]


def test_real_playbooks_all_load_for_the_matrix() -> None:
    from testbed.cli import matrix_playbooks

    pbs = matrix_playbooks([], [])
    assert any(p.name == "baseline" for p in pbs)
    assert all(p.claim or p.name == "baseline" for p in pbs)
