"""The claims matrix: stored results (``result.json``) turned into one row per scenario of
a claim, one cell per transport, and a claim-level verdict. Pure: no file system, no
kernel; the reports and ``testbed diff`` are built from what this module returns.

Rules (README "Claims matrix"):

- a cell's verdict is the verdict of its runs when they agree; when ``repeat`` > 1 and
  they differ the cell is FLAKY and carries the distribution (never an average);
- a transport for which the catalogue (DESIGN.md §2) says the claim does not apply shows
  ``n/a`` (the measured verdict, if the playbook ran it anyway, is kept beside it);
- a row's verdict combines its applicable cells: ERROR, then FLAKY, then REFUTED, then
  INCONCLUSIVE, then QUALIFIED win over CONFIRMED; a transport that applies but was not
  run makes the row INCONCLUSIVE.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from testbed.model.claims import CLAIMS

SCHEMA = "testbed.matrix/1"
TRANSPORTS = ("tcp", "mptcp")
TRANSPORT_LABEL = {"tcp": "TLS/TCP", "mptcp": "TLS/MPTCP"}
BASELINE = "baseline"
NOT_APPLICABLE = "n/a"
NOT_RUN = "NOT RUN"
FLAKY = "FLAKY"
# Worst first: the row verdict is the first of these any applicable cell has.
SEVERITY = ("ERROR", FLAKY, "REFUTED", "INCONCLUSIVE", NOT_RUN, "QUALIFIED", "CONFIRMED")
_NA_WORDS = ("n/a", "—", "-", "")
# Figures `testbed diff` compares (besides the verdict).
FIGURES = ("status", "subflows", "fallback", "paths_with_data", "bytes_per_path",
           "sni_seen_on", "keys_seen_on", "server_address_seen_on")


def applies(claim: str | None, transport: str) -> bool:
    """False when the catalogue says the claim does not apply to the transport."""
    if claim is None or claim not in CLAIMS:
        return True
    expected = getattr(CLAIMS[claim], transport, "")
    return expected.strip() not in _NA_WORDS


def claim_key(claim: str | None) -> str:
    return claim or BASELINE


def normalize_claims(ids: list[str] | None) -> list[str]:
    """Claim ids as the catalogue spells them (``m2d`` -> ``M2d``); ``baseline`` is the
    playbook without a claim. Raises ValueError naming the known ids."""
    known = {c.lower(): c for c in (BASELINE, *CLAIMS)}
    out = []
    for raw in ids or []:
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            if part.lower() not in known:
                raise ValueError(f"unknown claim {part!r} (known: {', '.join(known.values())})")
            out.append(known[part.lower()])
    return out


def selected(claim: str | None, only: list[str], skip: list[str]) -> bool:
    key = claim_key(claim)
    return (not only or key in only) and key not in skip


# -- cells and rows ----------------------------------------------------------------------

@dataclass
class Attempt:
    """One repetition of one scenario under one transport, as stored."""

    repetition: int
    verdict: str
    reason: str
    evidence: dict[str, str]
    figures: dict[str, Any]
    seconds: float = 0.0
    checks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Cell:
    transport: str
    verdict: str              # a Verdict value, FLAKY, n/a or NOT RUN
    reason: str               # one sentence, written from the evidence
    applicable: bool = True
    flaky: bool = False
    distribution: dict[str, int] = field(default_factory=dict)
    measured_verdict: str | None = None   # for n/a cells that ran anyway
    evidence: dict[str, str] = field(default_factory=dict)   # label -> path (run dir)
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def figures(self) -> dict[str, Any]:
        return self.attempts[0].figures if self.attempts else {}


@dataclass
class Row:
    key: str                  # scenario (playbook) name, with a sweep suffix if any
    claim: str                # catalogue id, or "baseline"
    setting: str
    expected: dict[str, str]  # transport -> what the article expects
    description: str
    file: str
    params: dict[str, Any]
    cells: dict[str, Cell]
    verdict: str
    reason: str
    flaky: bool = False
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # transport -> facts
    middleboxes: list[str] = field(default_factory=list)


@dataclass
class Matrix:
    run_id: str
    started: str | None
    finished: str | None
    complete: bool
    environment: dict[str, Any]
    rows: list[Row]
    uncovered: list[str]       # catalogue claims with no row in this run
    selection: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "run_id": self.run_id, "started": self.started,
            "finished": self.finished, "complete": self.complete,
            "selection": self.selection, "uncovered": self.uncovered,
            "environment": self.environment,
            "claims": [_row_json(r) for r in self.rows],
        }

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.verdict for r in self.rows))


def _row_json(row: Row) -> dict[str, Any]:
    d = asdict(row)
    d.pop("facts")
    for t, cell in row.cells.items():
        d["cells"][t]["figures"] = cell.figures
    return d


def figures_of(facts: dict[str, Any]) -> dict[str, Any]:
    return {k: facts[k] for k in FIGURES if k in facts}


def build_matrix(result: dict[str, Any], *, selection: dict[str, Any] | None = None
                 ) -> Matrix:
    """The matrix of one stored run (``result.json`` as parsed JSON)."""
    selection = dict(selection or {})
    only = selection.get("only") or []
    skip = selection.get("skip") or []
    grouped: dict[str, list[dict[str, Any]]] = {}
    for scenario in result.get("scenarios", []):
        grouped.setdefault(scenario["playbook"], []).append(scenario)
    rows = [_build_row(name, reps) for name, reps in grouped.items()]
    order = {c: i for i, c in enumerate((BASELINE, *CLAIMS))}
    rows.sort(key=lambda r: (order.get(r.claim, len(order)), r.key))
    present = {r.claim for r in rows}
    uncovered = [c for c in CLAIMS if c not in present and selected(c, only, skip)]
    return Matrix(run_id=result.get("run_id", "?"), started=result.get("started"),
                  finished=result.get("finished"), complete=bool(result.get("complete")),
                  environment=result.get("environment") or {}, rows=rows,
                  uncovered=uncovered, selection=selection)


def _build_row(name: str, reps: list[dict[str, Any]]) -> Row:
    first = reps[0]
    claim = first.get("claim")
    key = claim_key(claim)
    cat = CLAIMS.get(claim) if claim else None
    run_transports = {t for s in reps for t in s.get("transports", {})}
    cells: dict[str, Cell] = {}
    facts: dict[str, dict[str, Any]] = {}
    for transport in (*TRANSPORTS, *sorted(run_transports - set(TRANSPORTS))):
        attempts = []
        for s in sorted(reps, key=lambda s: s.get("repetition", 1)):
            tr = s.get("transports", {}).get(transport)
            if tr is None:
                continue
            attempts.append(Attempt(
                repetition=int(s.get("repetition", 1)), verdict=str(tr.get("verdict")),
                reason=str(tr.get("reason", "")),
                evidence=_evidence(name, transport, tr, s, len(reps) > 1),
                figures=figures_of(tr.get("facts") or {}),
                seconds=float((tr.get("timings") or {}).get("total_s") or 0.0),
                checks=list(tr.get("checks") or [])))
            facts.setdefault(transport, tr.get("facts") or {})
        cells[transport] = _build_cell(claim, transport, attempts,
                                       [s.get("transports", {}).get(transport) for s in reps])
    verdict, flaky = row_verdict(list(cells.values()))
    reason = " ".join(f"{TRANSPORT_LABEL.get(t, t)}: {c.reason}" for t, c in cells.items()
                      if c.applicable and c.verdict != NOT_RUN) or \
        next((c.reason for c in cells.values()), "")
    return Row(
        key=name, claim=key, setting=cat.setting if cat else "no middlebox, no attacker",
        expected={t: getattr(cat, t) for t in TRANSPORTS} if cat else
        {"tcp": "works, one path", "mptcp": "works, both paths"},
        description=str(first.get("description", "")), file=str(first.get("file", "")),
        params=dict(first.get("params") or {}), cells=cells, verdict=verdict, reason=reason,
        flaky=flaky, facts=facts,
        middleboxes=_middleboxes(cells))


def _middleboxes(cells: dict[str, Cell]) -> list[str]:
    """``kind on path`` for each middlebox the runs recorded (evidence ``middlebox.P.K``)."""
    out: list[str] = []
    for cell in cells.values():
        for label in cell.evidence:
            parts = label.split(".", 2)
            if parts[0] == "middlebox" and len(parts) == 3:
                text = f"{parts[2]} on {parts[1]}"
                if text not in out:
                    out.append(text)
    return out


def _evidence(name: str, transport: str, tr: dict[str, Any], scenario: dict[str, Any],
              repeated: bool) -> dict[str, str]:
    evidence = {str(k): str(v) for k, v in (tr.get("evidence") or {}).items()}
    if evidence:
        directory = f"{name}/{transport}" + (f".{scenario.get('repetition', 1)}"
                                             if repeated else "")
        evidence.setdefault("verdict", f"{directory}/verdict.json")
    else:
        # Nothing was measured (INCONCLUSIVE before the start, or an early ERROR): the
        # run's record, which says why, is the evidence.
        evidence["result"] = "result.json"
    return evidence


def _build_cell(claim: str | None, transport: str, attempts: list[Attempt],
                raw: list[dict[str, Any] | None]) -> Cell:
    applicable = applies(claim, transport)
    if not attempts:
        if not applicable:
            return Cell(transport, NOT_APPLICABLE, _na_reason(claim, transport),
                        applicable=False)
        label = TRANSPORT_LABEL.get(transport, transport)
        return Cell(transport, NOT_RUN, f"The playbook does not run {label}.")
    distribution = dict(Counter(a.verdict for a in attempts))
    flaky = len(distribution) > 1
    first_raw = next(r for r in raw if r is not None)
    if flaky:
        verdict = FLAKY
        reason = ("Not unanimous over " f"{len(attempts)} runs: "
                  + ", ".join(f"{n}× {v}" for v, n in sorted(distribution.items()))
                  + "; " + "; ".join(f"run {a.repetition}: {a.verdict}" for a in attempts
                                     if a.verdict != attempts[0].verdict)[:300] + ".")
    else:
        verdict = attempts[0].verdict
        reason = sentence(verdict, str(first_raw.get("reason", "")),
                          first_raw.get("facts") or {}, transport)
    cell = Cell(transport, verdict, reason, applicable=True, flaky=flaky,
                distribution=distribution if len(attempts) > 1 else {},
                evidence=attempts[0].evidence, attempts=attempts)
    if not applicable:
        cell.measured_verdict = verdict
        cell.verdict = NOT_APPLICABLE
        cell.applicable = False
        cell.reason = f"{_na_reason(claim, transport)} (measured anyway: {verdict})"
    return cell


def _na_reason(claim: str | None, transport: str) -> str:
    return (f"The claim {claim} does not apply to {TRANSPORT_LABEL.get(transport, transport)}"
            " (DESIGN.md §2).")


def row_verdict(cells: list[Cell]) -> tuple[str, bool]:
    """The claim-level verdict of a row and whether it is flaky."""
    verdicts = [c.verdict for c in cells if c.applicable]
    flaky = any(c.flaky for c in cells if c.applicable)
    if not verdicts:
        return NOT_APPLICABLE, False
    for word in SEVERITY:
        if word in verdicts:
            return ("INCONCLUSIVE" if word == NOT_RUN else word), flaky
    return verdicts[0], flaky


# -- one sentence from the evidence ---------------------------------------------------------

def _mb(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} MB"
    if n >= 1000:
        return f"{n / 1e3:.0f} kB"
    return f"{n} B"


def describe_facts(facts: dict[str, Any], transport: str) -> str:
    """What was measured, as a clause: transfer outcome, subflows, data per path, what
    the observers saw."""
    parts = []
    status = facts.get("status")
    if status is not None:
        if status == "ok" and facts.get("checksum_match"):
            kind = facts.get("tls_version") or "application"
            parts.append(f"the {kind} transfer completed intact")
        else:
            intact = "intact" if facts.get("checksum_match") else "incomplete"
            parts.append(f"the transfer ended as '{status}' with the data {intact}")
    if transport == "mptcp" and "subflows" in facts:
        n = facts["subflows"]
        text = f"{n} subflow{'s' if n != 1 else ''}"
        if facts.get("fallback"):
            text += ", fell back to TCP"
        client_n, client_fb = facts.get("client_subflows"), facts.get("client_fallback")
        if isinstance(client_n, int) and client_fb is False and (
                facts.get("fallback") or client_n != n):
            # A middlebox terminated MPTCP: say what the client itself had.
            text += (f" end to end, while the client's MPTCP_INFO shows MPTCP with "
                     f"{client_n} subflow{'s' if client_n != 1 else ''} created")
        parts.append(text)
    per_path = facts.get("bytes_per_path") or {}
    with_data = facts.get("paths_with_data")
    if with_data is not None:
        if with_data:
            parts.append("data on " + " and ".join(
                f"{p} ({_mb(int(per_path.get(p, 0)))})" for p in with_data))
        else:
            parts.append("no path carried a significant share of the data")
    for key, what in (("sni_seen_on", "SNI"), ("keys_seen_on", "MPTCP keys")):
        seen = facts.get(key)
        if seen:
            parts.append(f"{what} visible on {'+'.join(seen)}")
    partial = facts.get("sni_partial_on")
    if partial:
        parts.append(f"partial SNI on {'+'.join(partial)}")
    return ", ".join(parts)


def sentence(verdict: str, reason: str, facts: dict[str, Any], transport: str) -> str:
    """One sentence: the verdict's reason plus what the evidence shows."""
    reason = reason.strip().rstrip(".")
    measured = describe_facts(facts, transport)
    if verdict == "CONFIRMED":
        text = "As expected" + (f": {measured}" if measured else f" ({reason})")
        if measured:
            text += f" ({reason})"
    elif verdict == "REFUTED":
        text = f"Not as expected — {reason}" + (f"; measured: {measured}" if measured else "")
    elif verdict == "QUALIFIED":
        text = f"Holds only under a condition — {reason}" + (
            f"; measured: {measured}" if measured else "")
    else:
        text = reason[:1].upper() + reason[1:] if reason else verdict
    return text + "."


# -- diff ----------------------------------------------------------------------------------

@dataclass
class Change:
    row: str
    claim: str
    transport: str | None
    what: str
    before: Any
    after: Any

    def line(self) -> str:
        where = f"{self.claim} {self.row}" + (
            f" {TRANSPORT_LABEL.get(self.transport, self.transport)}" if self.transport else "")
        return f"{where}: {self.what}: {_fmt(self.before)} -> {_fmt(self.after)}"


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.0%}" if value <= 1 else f"{value:g}"
    return str(value)


def _shares(per_path: dict[str, Any]) -> dict[str, float]:
    total = sum(int(v) for v in per_path.values()) or 1
    return {p: int(v) / total for p, v in sorted(per_path.items())}


def _values(cell: Cell, key: str) -> Any:
    """A figure over the cell's runs: the value when all runs agree, else the sorted list
    of distinct values."""
    seen: list[Any] = []
    for a in cell.attempts:
        v = a.figures.get(key)
        if v not in seen:
            seen.append(v)
    if not seen:
        return None
    return seen[0] if len(seen) == 1 else sorted(seen, key=repr)


def diff_matrices(a: Matrix, b: Matrix, *, bytes_tolerance: float = 0.2) -> list[Change]:
    """What changed from run ``a`` to run ``b``: rows that appeared or disappeared, row and
    cell verdicts, flakiness, and the key figures (status, subflows, fallback, paths with
    data, and each path's share of the bytes when it moved by more than
    ``bytes_tolerance``, or a path started or stopped carrying bytes)."""
    changes: list[Change] = []
    rows_a = {r.key: r for r in a.rows}
    rows_b = {r.key: r for r in b.rows}
    for key in [*rows_a, *(k for k in rows_b if k not in rows_a)]:
        ra, rb = rows_a.get(key), rows_b.get(key)
        if ra is None or rb is None:
            present = rb if ra is None else ra
            assert present is not None
            changes.append(Change(key, present.claim, None, "scenario",
                                  "absent" if ra is None else "present",
                                  "present" if ra is None else "absent"))
            continue
        if ra.verdict != rb.verdict:
            changes.append(Change(key, ra.claim, None, "claim verdict", ra.verdict, rb.verdict))
        for t in [*ra.cells, *(t for t in rb.cells if t not in ra.cells)]:
            ca, cb = ra.cells.get(t), rb.cells.get(t)
            if ca is None or cb is None:
                continue
            if ca.verdict != cb.verdict:
                changes.append(Change(key, ra.claim, t, "verdict", ca.verdict, cb.verdict))
            if ca.measured_verdict != cb.measured_verdict:
                changes.append(Change(key, ra.claim, t, "measured verdict (n/a)",
                                      ca.measured_verdict, cb.measured_verdict))
            for fig in ("status", "subflows", "fallback", "paths_with_data"):
                va, vb = _values(ca, fig), _values(cb, fig)
                if va != vb and not (va is None or vb is None):
                    changes.append(Change(key, ra.claim, t, fig, va, vb))
            sa = _shares(ca.figures.get("bytes_per_path") or {})
            sb = _shares(cb.figures.get("bytes_per_path") or {})
            moved = any(abs(sa.get(p, 0.0) - sb.get(p, 0.0)) > bytes_tolerance or
                        (sa.get(p, 0.0) == 0) != (sb.get(p, 0.0) == 0)
                        for p in set(sa) | set(sb))
            if moved:
                changes.append(Change(key, ra.claim, t, "bytes per path",
                                      ca.figures.get("bytes_per_path"),
                                      cb.figures.get("bytes_per_path")))
    return changes
