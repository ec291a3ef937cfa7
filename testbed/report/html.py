"""``report.html``: one self-contained page (inline CSS and SVG plots, no script, nothing
fetched) with the claims matrix, one section per claim with the measured facts and plots,
and the environment fingerprint. Evidence links are paths relative to the run directory,
shown only when the file exists inside it."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from testbed.model.matrix import (
    FLAKY,
    NOT_APPLICABLE,
    TRANSPORT_LABEL,
    TRANSPORTS,
    Cell,
    Matrix,
    Row,
)
from testbed.report import plots

VERDICT_WORDS = (
    ("CONFIRMED", "every expectation the playbook states for this transport was measured "
     "to hold"),
    ("REFUTED", "at least one expectation was measured not to hold; the reason names it"),
    ("QUALIFIED", "true only under the conditions the reason states"),
    ("INCONCLUSIVE", "the machine lacks what the scenario needs; the reason says what. "
     "Never a pass"),
    ("ERROR", "the testbed itself failed; says nothing about the claim"),
    (FLAKY, "repeated runs disagreed: the distribution is shown, never averaged"),
    (NOT_APPLICABLE, "the catalogue says the claim does not apply to this transport"),
)
EVIDENCE_ORDER = ("verdict", "pcap.wifi", "pcap.cell", "observers", "counters", "app_outcome",
                  "ss.client")
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1180px;padding:1.2em 1.6em;color:#1d2329;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;
border-bottom:2px solid #e3e8ee;padding-bottom:.2em}h3{font-size:1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.5em 0;font-size:.88em}
th,td{border:1px solid #d8dee5;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f3f6f9}code{font-size:.92em;background:#f3f6f9;padding:0 .2em}
.v{display:inline-block;padding:.05em .45em;border-radius:.3em;font-weight:600;
font-size:.82em;white-space:nowrap;color:#fff;background:#6c757d}
.v-CONFIRMED{background:#2b8a3e}.v-REFUTED{background:#c92a2a}
.v-QUALIFIED{background:#1971c2}.v-INCONCLUSIVE{background:#e67700}
.v-ERROR{background:#5c0b0b}.v-FLAKY{background:#862e9c}
.v-na,.v-NOT-RUN{background:#ced4da;color:#343a40}
.reason{color:#495057;font-size:.86em;margin-top:.2em}
.ev a,.ev span{margin-right:.45em;white-space:nowrap;font-size:.85em}
.missing{color:#adb5bd;text-decoration:line-through}
.plots{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.plots figure{margin:0}.plots svg{max-width:100%;height:auto}
.note{background:#fff4e6;border-left:4px solid #e67700;padding:.5em .8em}
.small{font-size:.85em;color:#495057}td.num{text-align:right}
#matrix td:first-child{white-space:nowrap}#matrix td.cell{width:27%}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _badge(word: str) -> str:
    css = {"n/a": "na", "NOT RUN": "NOT-RUN"}.get(word, word)
    return f'<span class="v v-{_e(css)}">{_e(word)}</span>'


class Evidence:
    """Reads a run's stored evidence; never outside the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir.resolve()

    def path(self, rel: str) -> Path | None:
        try:
            p = (self.run_dir / rel).resolve()
        except (OSError, ValueError):
            return None
        if not p.is_relative_to(self.run_dir) or not p.is_file():
            return None
        return p

    def link(self, rel: str, label: str) -> str:
        if self.path(rel) is None:
            return f'<span class="missing" title="not found in the run directory">{_e(label)}' \
                   "</span>"
        return f'<a href="{_e(quote(rel))}">{_e(label)}</a>'

    def json(self, rel: str | None) -> Any:
        p = self.path(rel) if rel else None
        if p is None:
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def text(self, rel: str) -> str:
        p = self.path(rel)
        if p is None:
            return ""
        try:
            return p.read_text(errors="replace")[:200_000]
        except OSError:
            return ""


def _evidence_links(ev: Evidence, cell: Cell, short: bool = True) -> str:
    labels = sorted(cell.evidence, key=lambda k: (EVIDENCE_ORDER.index(k)
                                                  if k in EVIDENCE_ORDER else 99, k))
    if short:
        labels = [k for k in labels if k in ("verdict", "pcap.wifi", "pcap.cell", "observers",
                                             "result", "internal_error")]
    return " ".join(ev.link(cell.evidence[k], k.removeprefix("pcap.").replace("_", " "))
                    for k in labels)


# -- evidence -> plot data ------------------------------------------------------------------

def _observer_values(obs: dict[str, Any]) -> dict[str, str]:
    sni = (obs.get("sni") or {}).get("status")
    mptcp = obs.get("mptcp") or {}
    return {
        "SNI": {"full": "yes", "partial": "partial"}.get(str(sni), "no"),
        "MPTCP keys": "yes" if mptcp.get("keys") else "no",
        "join tokens": "yes" if mptcp.get("tokens") else "no",
        "server address": "yes" if obs.get("server_addresses_seen") else "no",
    }


def _observers(ev: Evidence, row: Row) -> dict[str, dict[str, Any]]:
    out = {}
    for t, cell in row.cells.items():
        data = ev.json(cell.evidence.get("observers"))
        if isinstance(data, dict) and data:
            out[t] = {p: o for p, o in data.items() if isinstance(o, dict)}
    return out


def _series(ev: Evidence, cell: Cell, observers: dict[str, Any]
            ) -> dict[str, list[tuple[float, int]]]:
    samples = ev.json(cell.evidence.get("ss.client"))
    if not isinstance(samples, list):
        return {}
    addr_path: dict[str, str] = {}
    servers: set[str] = set()
    for path, obs in observers.items():
        servers |= set(obs.get("server_addresses_seen") or [])
        for addr in obs.get("addresses") or []:
            if addr not in servers:
                addr_path.setdefault(str(addr), path)
    series: dict[str, list[tuple[float, int]]] = {}
    for sample in samples:
        if not isinstance(sample, dict):
            continue
        per_path: dict[str, int] = {}
        for sock in sample.get("sockets") or []:
            if not isinstance(sock, dict) or sock.get("netid") != "tcp":
                continue
            local = str(sock.get("local", "")).rsplit(":", 1)[0].strip("[]")
            path = addr_path.get(local)
            received = (sock.get("fields") or {}).get("bytes_received")
            if path is None or received is None or not str(received).isdigit():
                continue
            per_path[path] = per_path.get(path, 0) + int(received)
        for path, value in per_path.items():
            series.setdefault(path, []).append((float(sample.get("t", 0.0)), value))
    return series


def _timed(ev: Evidence, cell: Cell) -> list[tuple[float, str]]:
    reports = {k.removeprefix("middlebox.").replace(".", " "): ev.text(v)
               for k, v in cell.evidence.items() if k.startswith("middlebox.")}
    return plots.timed_events(reports)


# -- sections --------------------------------------------------------------------------------

def _matrix_table(matrix: Matrix, ev: Evidence) -> str:
    head = ("<tr><th>claim</th><th>setting</th>" + "".join(
        f"<th>{TRANSPORT_LABEL[t]}</th>" for t in TRANSPORTS) + "<th>verdict</th>"
        "<th>evidence</th></tr>")
    body = []
    for row in matrix.rows:
        cells = []
        for t in TRANSPORTS:
            cell = row.cells.get(t)
            if cell is None:
                cells.append("<td>—</td>")
                continue
            extra = ""
            if cell.flaky:
                extra = " " + ", ".join(f"{n}× {v}" for v, n in sorted(
                    cell.distribution.items()))
            elif cell.measured_verdict:
                extra = f" (measured {cell.measured_verdict})"
            cells.append(f'<td class="cell" data-transport="{t}" data-verdict='
                         f'"{_e(cell.verdict)}">{_badge(cell.verdict)}{_e(extra)}'
                         f'<div class="reason">{_e(cell.reason)}</div></td>')
        flaky = " (flaky)" if row.flaky and row.verdict != FLAKY else ""
        links = "<br>".join(
            f"{TRANSPORT_LABEL.get(t, t)}: {_evidence_links(ev, c)}"
            for t, c in row.cells.items() if c.evidence)
        name = _e(row.claim) + ("" if row.key == row.claim else
                                f'<br><code class="small">{_e(row.key)}</code>')
        body.append(
            f'<tr class="claim-row" data-claim="{_e(row.claim)}" data-scenario='
            f'"{_e(row.key)}" data-verdict="{_e(row.verdict)}"><td><a href="#s-{_e(row.key)}">'
            f"{name}</a></td><td>{_e(row.setting)}</td>{''.join(cells)}"
            f"<td>{_badge(row.verdict)}{_e(flaky)}</td><td class=\"ev\">{links}</td></tr>")
    return f'<table id="matrix"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "none"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return "—" if value is None else str(value)


FACT_ROWS = (("status", "transfer status"), ("tls_version", "TLS version"),
             ("checksum_match", "data intact (SHA-256)"), ("subflows", "subflows"),
             ("fallback", "fell back to TCP"), ("fallback_counters", "fallback counters"),
             ("bytes_per_path", "payload bytes per path (pcap)"),
             ("paths_with_data", "paths that carried data"),
             ("sni_seen_on", "SNI seen (whole) on"), ("sni_partial_on", "SNI seen (part) on"),
             ("keys_seen_on", "MPTCP keys seen on"),
             ("server_address_seen_on", "server address seen on"))
MPTCP_COUNTER_PREFIXES = ("MPTcpExtMPJoin", "MPTcpExtMPCapable", "MPTcpExtAddAddr",
                          "MPTcpExtEchoAdd", "MPTcpExtMPRst", "MPTcpExtMPFastclose",
                          "MPTcpExtMPFail", "MPTcpExtDssFallback", "MPTcpExtInfiniteMap",
                          "MPTcpExtDataCsumErr", "MPTcpExtBlackhole", "TcpExtTCPChallengeACK",
                          "TcpExtBeyondWindow", "TcpExtPAWSEstab", "MPTcpExtDuplicateData")


def _facts_table(row: Row) -> str:
    transports = [t for t in row.cells if row.facts.get(t)]
    if not transports:
        return '<p class="small">No facts were measured (see the reasons above).</p>'
    out = ["<table class=\"facts\"><tr><th>measured</th>" + "".join(
        f"<th>{TRANSPORT_LABEL.get(t, t)}</th>" for t in transports) + "</tr>"]
    for key, label in FACT_ROWS:
        if not any(key in row.facts[t] for t in transports):
            continue
        out.append(f"<tr><td>{_e(label)}</td>" + "".join(
            f"<td>{_e(_fmt(row.facts[t].get(key)))}</td>" for t in transports) + "</tr>")
    names = sorted({f"{node}.{name}" for t in transports
                    for node, cs in (row.facts[t].get("counters") or {}).items()
                    if node in ("client", "server")
                    for name, v in cs.items() if v and name.startswith(MPTCP_COUNTER_PREFIXES)})
    for full in names:
        node, name = full.split(".", 1)
        out.append(f"<tr><td><code>{_e(node)} {_e(name)}</code></td>" + "".join(
            f'<td class="num">{_e((row.facts[t].get("counters") or {}).get(node, {}).get(name, 0))}'
            "</td>" for t in transports) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _checks_table(cell: Cell) -> str:
    checks = cell.attempts[0].checks if cell.attempts else []
    if not checks:
        return ""
    rows = "".join(
        f"<tr><td><code>{_e(c.get('check'))}</code></td><td>{_e(c.get('expected'))}</td>"
        f"<td>{_e(_fmt(c.get('measured')))}</td><td>{'✔' if c.get('ok') else '✘ no'}</td></tr>"
        for c in checks)
    return (f"<table class=\"checks\"><tr><th>{TRANSPORT_LABEL.get(cell.transport, '')} "
            "check</th><th>expected</th><th>measured</th><th>holds</th></tr>"
            f"{rows}</table>")


def _observer_table(observers: dict[str, dict[str, Any]]) -> str:
    rows = []
    for t, per_path in observers.items():
        for path, obs in per_path.items():
            sni = obs.get("sni") or {}
            mptcp = obs.get("mptcp") or {}
            payload = obs.get("payload_bytes") or {}
            rows.append(
                f"<tr><td>{_e(path)}</td><td>{TRANSPORT_LABEL.get(t, t)}</td>"
                f"<td>{_e(sni.get('status', '—'))} {_e(', '.join(sni.get('decoded') or []))}</td>"
                f"<td><code>{_e(_fmt(mptcp.get('keys') or []))}</code></td>"
                f"<td><code>{_e(_fmt(mptcp.get('tokens') or []))}</code></td>"
                f"<td>{_e(_fmt(obs.get('server_addresses_seen') or []))}</td>"
                f"<td>{_e(_fmt(obs.get('addresses') or []))}</td>"
                f'<td class="num">{_e(_fmt(sum(int(v) for v in payload.values())))}</td></tr>')
    if not rows:
        return ""
    return ("<table class=\"observers\"><tr><th>path observer</th><th>transport</th>"
            "<th>SNI</th><th>MPTCP keys</th><th>join tokens</th><th>server address</th>"
            "<th>addresses</th><th>payload bytes</th></tr>" + "".join(rows) + "</table>")


def _section(row: Row, ev: Evidence) -> str:
    observers = _observers(ev, row)
    parts = [f'<section class="claim" id="s-{_e(row.key)}" data-claim="{_e(row.claim)}">',
             f"<h2>{_e(row.claim)} — {_e(row.setting)} <code>{_e(row.key)}</code> "
             f"{_badge(row.verdict)}</h2>",
             "<p><b>The article expects</b>: " + "; ".join(
                 f"{TRANSPORT_LABEL[t]}: {_e(row.expected.get(t, '—'))}" for t in TRANSPORTS)
             + ".</p>",
             f"<p class=\"small\">{_e(row.description)} — playbook <code>{_e(row.file)}</code>"
             + (f", parameters <code>{_e(_fmt(row.params))}</code>" if row.params else "")
             + (f", middleboxes: {_e(', '.join(row.middleboxes))}" if row.middleboxes else "")
             + ".</p>"]
    parts.append("<table class=\"cells\"><tr><th>transport</th><th>verdict</th><th>reason "
                 "(from the evidence)</th><th>evidence</th></tr>")
    for t, cell in row.cells.items():
        parts.append(f"<tr><td>{TRANSPORT_LABEL.get(t, t)}</td><td>{_badge(cell.verdict)}"
                     f"</td><td>{_e(cell.reason)}</td><td class=\"ev\">"
                     f"{_evidence_links(ev, cell, short=False)}</td></tr>")
    parts.append("</table>")
    for cell in row.cells.values():
        if len(cell.attempts) > 1:
            parts.append(f"<h3>{TRANSPORT_LABEL.get(cell.transport)}: "
                         f"{len(cell.attempts)} runs</h3><table><tr><th>run</th><th>verdict"
                         "</th><th>reason</th><th>evidence</th></tr>" + "".join(
                             f"<tr><td>{a.repetition}</td><td>{_badge(a.verdict)}</td>"
                             f"<td>{_e(a.reason)}</td><td class=\"ev\">"
                             + ev.link(a.evidence.get("verdict", "result.json"), "verdict")
                             + "</td></tr>" for a in cell.attempts) + "</table>")
    parts.append("<h3>Measured facts</h3>" + _facts_table(row))
    checks = "".join(_checks_table(c) for c in row.cells.values())
    if checks:
        parts.append("<h3>Checks</h3>" + checks)
    figures = []
    per_path = {t: {str(p): int(v) for p, v in (row.facts[t].get("bytes_per_path") or {}
                                                 ).items()}
                for t in row.cells if row.facts.get(t, {}).get("bytes_per_path")}
    svg = plots.bytes_per_path(per_path, f"{row.claim}: payload bytes per path")
    if svg:
        figures.append(svg)
    grid = {t: {p: _observer_values(o) for p, o in per.items()} for t, per in observers.items()}
    svg = plots.observer_grid(grid, f"{row.claim}: what each single-path observer saw "
                              "(red: seen in clear)")
    if svg:
        figures.append(svg)
    series = {t: _series(ev, c, observers.get(t, {})) for t, c in row.cells.items()}
    events = {t: _timed(ev, c) for t, c in row.cells.items()}
    svg = plots.timeline(series, f"{row.claim}: bytes received per path over time", events)
    if svg:
        figures.append(svg)
    if figures:
        parts.append("<h3>Plots</h3><div class=\"plots\">" + "".join(
            f"<figure>{f}</figure>" for f in figures) + "</div>")
    table = _observer_table(observers)
    if table:
        parts.append("<h3>What each single-path observer saw (tshark on the path's pcap)"
                     "</h3>" + table)
    parts.append("</section>")
    return "\n".join(parts)


def _overview(matrix: Matrix) -> str:
    out = []
    boxes = []
    for row in matrix.rows:
        cell = row.cells.get("mptcp")
        if not row.middleboxes or cell is None or not cell.attempts:
            continue
        f = cell.figures
        status = str(f.get("status"))
        outcome = ("failed" if status != "ok" else
                   "fell back to TCP" if f.get("fallback") else "MPTCP kept")
        boxes.append({"label": f"{row.claim} {', '.join(row.middleboxes)}",
                      "subflows": int(f.get("subflows") or 0), "outcome": outcome,
                      "status": status})
    svg = plots.fallback_outcomes(boxes, "Fallback outcome per middlebox (TLS/MPTCP)")
    if svg:
        out.append("<h3>Middleboxes: fallback outcomes</h3>"
                   f'<div class="plots"><figure>{svg}</figure></div>')
    joins = [(row.key if row.key == row.claim else f"{row.claim} {row.key}",
              (row.facts.get("mptcp", {}).get("counters") or {}).get("server", {}))
             for row in matrix.rows if row.facts.get("mptcp")]
    svg = plots.join_outcomes(joins, "MP_JOIN attempts and outcomes (server)")
    if svg:
        out.append("<h3>Join attempts and their outcomes</h3>"
                   f'<div class="plots"><figure>{svg}</figure></div>')
    return "\n".join(out)


def _environment(matrix: Matrix) -> str:
    env = matrix.environment
    simple = [("kernel", env.get("kernel")), ("machine", env.get("machine")),
              ("python", env.get("python")), ("git commit", env.get("git_commit")),
              ("capabilities", ", ".join(env.get("capabilities") or []))]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in simple)
    for title, key in (("sysctl", "sysctls"), ("tool", "tools"), ("playbook sha256",
                                                                   "playbooks")):
        for name, value in (env.get(key) or {}).items():
            rows += f"<tr><th>{_e(title)} <code>{_e(name)}</code></th><td>{_e(value)}</td></tr>"
    extra = {k: v for k, v in env.items() if k not in (
        "kernel", "machine", "python", "git_commit", "capabilities", "sysctls", "tools",
        "playbooks")}
    for name, value in extra.items():
        rows += f"<tr><th>{_e(name)}</th><td>{_e(_fmt(value))}</td></tr>"
    return f'<table id="environment">{rows}</table>'


def render_html(matrix: Matrix, run_dir: Path) -> str:
    ev = Evidence(run_dir)
    env = matrix.environment
    counts = matrix.counts()
    summary = ", ".join(f"{n} {_badge(v)}" for v, n in sorted(counts.items()))
    notes = []
    if not matrix.complete:
        notes.append("This run is INCOMPLETE: it was interrupted; the rows below are what "
                     "it finished.")
    flaky = [r.key for r in matrix.rows if r.flaky]
    if flaky:
        notes.append("Flaky (repeated runs disagreed): " + ", ".join(flaky) + ".")
    selection = matrix.selection
    chosen = []
    for key in ("only", "skip"):
        if selection.get(key):
            chosen.append(f"--{key} {' '.join(selection[key])}")
    if selection.get("repeat"):
        chosen.append(f"--repeat {selection['repeat']}")
    legend = "".join(f"<tr><td>{_badge(w)}</td><td>{_e(m)}</td></tr>" for w, m in VERDICT_WORDS)
    doc = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Claims matrix — run {_e(matrix.run_id)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Is TLS over MPTCP less secure than TLS over TCP? — claims matrix</h1>",
        f'<p class="small">Run <code>{_e(matrix.run_id)}</code>, {_e(matrix.started)} → '
        f"{_e(matrix.finished or 'not finished')}; kernel <code>{_e(env.get('kernel'))}"
        f"</code>, commit <code>{_e(str(env.get('git_commit') or '?')[:12])}</code>"
        + (f"; {_e(' '.join(chosen))}" if chosen else "") + f". {summary}</p>",
        *(f'<p class="note">{_e(n)}</p>' for n in notes),
        "<h2>Matrix</h2>",
        "<p class=\"small\">One row per scenario of a claim (DESIGN.md §2 ids); each cell is "
        "the verdict for that transport with a one-sentence reason written from the "
        "evidence. Click a claim for its measured facts and plots.</p>",
        _matrix_table(matrix, ev),
    ]
    if matrix.uncovered:
        doc.append(f"<p class=\"small\">Claims of the catalogue with no playbook in this run: "
                   f"{_e(', '.join(matrix.uncovered))}.</p>")
    doc += [f'<table class="legend">{legend}</table>',
            "<p class=\"ev\">Files: " + " ".join(ev.link(n, n) for n in (
                "result.json", "matrix.json", "report.md", "junit.xml", "summary.md"))
            + "</p>"]
    overview = _overview(matrix)
    if overview:
        doc += ["<h2>Across claims</h2>", overview]
    doc += [_section(row, ev) for row in matrix.rows]
    doc += ["<h2 id=\"env\">Environment fingerprint</h2>", _environment(matrix),
            "</body></html>"]
    return "\n".join(doc) + "\n"
