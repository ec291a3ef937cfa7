"""`testbed matrix` end to end on a cheap subset (the baseline, twice), then report.html
opened in a real headless browser (Debian's chromium): the page renders, the matrix table
has one row per scenario run, the plots are there, and every evidence link resolves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


class DomSummary(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.matrix_rows: list[dict[str, str | None]] = []
        self.in_matrix = False
        self.hrefs: list[str] = []
        self.svg_plots = 0
        self.ids: set[str] = set()
        self.sections = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "table" and a.get("id") == "matrix":
            self.in_matrix = True
        if tag == "tr" and self.in_matrix and "claim-row" in (a.get("class") or ""):
            self.matrix_rows.append(a)
        if tag == "a" and a.get("href"):
            self.hrefs.append(str(a["href"]))
        if tag == "svg" and "plot" in (a.get("class") or ""):
            self.svg_plots += 1
        if tag == "section" and "claim" in (a.get("class") or ""):
            self.sections += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_matrix = False


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: run scripts/setup.sh (it installs Debian's chromium)"
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=True)


def test_matrix_end_to_end_and_report_in_a_browser(tmp_path: Path) -> None:
    out = tmp_path / "results"
    res = subprocess.run([sys.executable, "-m", "testbed", "matrix", "--only", "baseline",
                          "--repeat", "2", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    run_dirs = list(out.iterdir())
    assert len(run_dirs) == 1
    run = run_dirs[0]
    assert f"report:  {run / 'report.html'}" in res.stdout
    # Progress lines name the transport, with the elapsed time.
    assert "baseline #2/2 [TLS/MPTCP]" in res.stderr and "s] " in res.stderr
    for name in ("result.json", "matrix.json", "report.html", "report.md", "junit.xml"):
        assert (run / name).is_file(), name
    assert not (run / "INCOMPLETE").exists()

    matrix = json.loads((run / "matrix.json").read_text())
    assert matrix["selection"]["only"] == ["baseline"]
    assert [c["claim"] for c in matrix["claims"]] == ["baseline"]
    row = matrix["claims"][0]
    for transport in ("tcp", "mptcp"):
        cell = row["cells"][transport]
        assert cell["verdict"] in ("CONFIRMED", "FLAKY"), cell
        assert len(cell["attempts"]) == 2
        for attempt in cell["attempts"]:
            for rel in attempt["evidence"].values():
                assert (run / rel).is_file(), rel
    assert matrix["environment"]["kernel"]
    assert "| baseline |" in (run / "report.md").read_text()
    suite = ET.parse(run / "junit.xml").getroot().find("testsuite")
    assert suite is not None and len(suite.findall("testcase")) == 2

    # The page as a real browser builds it.
    dom = chromium(["--dump-dom", (run / "report.html").as_uri()], tmp_path / "profile1")
    page = DomSummary()
    page.feed(dom.stdout)
    assert [r.get("data-claim") for r in page.matrix_rows] == ["baseline"]
    assert page.sections == 1
    assert page.svg_plots >= 2  # bytes per path, what each observer saw (+ timeline)
    assert page.hrefs
    for href in page.hrefs:
        if href.startswith("#"):
            assert href[1:] in page.ids, href
            continue
        parsed = urlparse(href)
        assert parsed.scheme in ("", "file"), href  # nothing fetched from anywhere
        target = Path(unquote(parsed.path)) if parsed.scheme else run / unquote(href)
        assert target.is_file(), href
        assert target.resolve().is_relative_to(run.resolve()), href
    shot = tmp_path / "report.png"
    chromium(["--window-size=1280,2000", f"--screenshot={shot}",
              (run / "report.html").as_uri()], tmp_path / "profile2")
    assert shot.stat().st_size > 10_000

    # Rebuilt from the stored evidence alone: same matrix; a run compared with itself
    # shows no change.
    before = (run / "matrix.json").read_text()
    res = subprocess.run([sys.executable, "-m", "testbed", "report", str(run)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (run / "matrix.json").read_text() == before
    res = subprocess.run([sys.executable, "-m", "testbed", "diff", str(run), str(run)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "no change" in res.stdout
