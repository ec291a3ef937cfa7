"""Verdicts and the versioned result schema (``results/<run-id>/result.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from testbed.model.expect import QUALIFIED_LABEL, Check

SCHEMA = "testbed.result/1"


class Verdict(StrEnum):
    CONFIRMED = "CONFIRMED"      # every expectation of the playbook was measured to hold
    REFUTED = "REFUTED"          # at least one expectation was measured not to hold
    QUALIFIED = "QUALIFIED"      # holds only under conditions the reason states
    INCONCLUSIVE = "INCONCLUSIVE"  # the machine lacks what the test needs (reason given)
    ERROR = "ERROR"              # the testbed itself failed; not a statement on the claim


@dataclass
class TransportResult:
    transport: str
    verdict: Verdict
    reason: str
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    outcome: dict[str, Any] | None = None
    evidence: dict[str, str] = field(default_factory=dict)  # label -> path relative to run dir
    missing: dict[str, str] = field(default_factory=dict)   # requirement -> why
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        d["checks"] = [c.to_json() for c in self.checks]
        return d


@dataclass
class ScenarioResult:
    playbook: str
    file: str
    sha256: str
    claim: str | None
    description: str
    params: dict[str, Any]
    repetition: int
    transports: dict[str, TransportResult] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"playbook": self.playbook, "file": self.file, "sha256": self.sha256,
                "claim": self.claim, "description": self.description, "params": self.params,
                "repetition": self.repetition,
                "transports": {t: r.to_json() for t, r in self.transports.items()}}


@dataclass
class RunResult:
    run_id: str
    started: str
    finished: str | None = None
    complete: bool = False
    environment: dict[str, Any] = field(default_factory=dict)
    scenarios: list[ScenarioResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "run_id": self.run_id, "started": self.started,
                "finished": self.finished, "complete": self.complete,
                "environment": self.environment,
                "scenarios": [s.to_json() for s in self.scenarios]}

    def write(self, run_dir: Path) -> None:
        tmp = run_dir / "result.json.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str))
        tmp.replace(run_dir / "result.json")
        (run_dir / "summary.md").write_text(self.summary_md())

    def summary_md(self) -> str:
        lines = [f"# Run {self.run_id}", "",
                 f"Started {self.started}, finished {self.finished or '(not finished)'}"
                 + ("" if self.complete else " — INCOMPLETE: the run was interrupted."), "",
                 "| playbook | claim | transport | verdict | reason |",
                 "|---|---|---|---|---|"]
        for s in self.scenarios:
            for t, r in s.transports.items():
                rep = f" #{s.repetition}" if s.repetition > 1 else ""
                reason = r.reason.replace("|", "\\|")
                lines.append(f"| {s.playbook}{rep} | {s.claim or '—'} | {t} | "
                             f"{r.verdict.value} | {reason} |")
        return "\n".join(lines) + "\n"


def verdict_from_checks(checks: list[Check]) -> tuple[Verdict, str]:
    """CONFIRMED when every check holds; QUALIFIED instead when the playbook states, with
    ``expect: {qualified: <condition>}``, that the claim holds only under a condition, or
    when every failed check measured a value its ``qualified_when`` lists (the condition
    comes from the measurement); REFUTED when any other check fails."""
    qualified = [c for c in checks if c.label == QUALIFIED_LABEL]
    checks = [c for c in checks if c.label != QUALIFIED_LABEL]
    failed = [c for c in checks if not c.ok]
    if not checks:
        return Verdict.INCONCLUSIVE, "the playbook states no expectation for this transport"
    refuting = [c for c in failed if not c.qualified]
    if refuting:
        return Verdict.REFUTED, "; ".join(
            f"{c.label}: expected {c.expected}, measured {c.measured!r}" for c in refuting)
    if failed:
        conditions = [c.expected for c in qualified] + [
            f"{c.qualified} ({c.label}: measured {c.measured!r}, expected {c.expected})"
            for c in failed]
        return Verdict.QUALIFIED, (f"{'; '.join(conditions)} (the other "
                                   f"{len(checks) - len(failed)} expectations measured to "
                                   "hold)")
    if qualified:
        return Verdict.QUALIFIED, (f"{qualified[0].expected} (all {len(checks)} "
                                   "expectations measured to hold)")
    return Verdict.CONFIRMED, f"all {len(checks)} expectations measured to hold"
