"""Expectations of a playbook and their evaluation against measured facts.

Facts are computed from evidence only (counters, pcaps, application outcome); see
``testbed.model.facts``. Each expectation yields a check recording what was expected and
what was measured, so a verdict always carries its reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from testbed.errors import SpecError
from testbed.model.outcome import STATUSES
from testbed.model.topology import TopologySpec

COMPARE_RE = re.compile(r"^\s*(==|!=|>=|<=|>|<)\s*(-?\d+)\s*$")
COUNTER_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{1,63}\Z")  # \Z: "$" accepts a trailing newline
PATH_LIST_KEYS = ("paths_with_data", "sni_seen_on", "keys_seen_on")
EXPECT_KEYS = ("status", "checksum_match", "tls_version", "subflows", "fallback",
               *PATH_LIST_KEYS, "counters", "counters_during_attack", "attack", "middlebox",
               "qualified", "qualified_when")
# ``qualified: <condition>``: when every other expectation holds, the verdict is QUALIFIED
# (the claim is true only under the condition stated) instead of CONFIRMED.
QUALIFIED_LABEL = "qualified"
# ``qualified_when: {<check label>: {<measured value>: <condition>}}``: a check that fails
# with one of the listed measured values makes the verdict QUALIFIED with that condition
# (the claim holds only in a weaker form the measurement itself identified), not REFUTED;
# any other failure still refutes. E.g. an outcome classified by a middlebox's report.
QUALIFIED_WHEN = "qualified_when"
CONDITION_MAX = 500
FIELD_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}\Z")


@dataclass(frozen=True)
class Expectation:
    key: str
    expected: Any  # str, bool, sorted list of paths, or (op, number)
    node: str = ""  # for counters
    counter: str = ""
    # (measured value, condition) pairs of ``qualified_when`` for this check.
    qualified_when: tuple[tuple[str | int | bool, str], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.key}.{self.node}.{self.counter}" if self.counter else self.key

    def describe(self) -> str:
        if isinstance(self.expected, tuple):
            return f"{self.expected[0]} {self.expected[1]}"
        return repr(self.expected) if not isinstance(self.expected, list) else \
            "[" + ", ".join(self.expected) + "]"


@dataclass(frozen=True)
class Check:
    label: str
    expected: str
    measured: Any
    ok: bool
    # The condition ``qualified_when`` gives for this failed check's measured value.
    qualified: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {"check": self.label, "expected": self.expected, "measured": self.measured,
               "ok": self.ok}
        if self.qualified:
            out["qualified_when"] = self.qualified
        return out


def _compare(value: Any, file: str, field: str) -> tuple[str, int]:
    if isinstance(value, bool):
        raise SpecError(file, field, f"expected a number or a comparison, got {value!r}")
    if isinstance(value, int):
        if abs(value) > 10**12:
            raise SpecError(file, field, f"{value} is out of range")
        return ("==", value)
    if isinstance(value, str):
        m = COMPARE_RE.match(value)
        if m and abs(int(m.group(2))) <= 10**12:
            return (m.group(1), int(m.group(2)))
    raise SpecError(file, field, f"{value!r} is not a number or a comparison",
                    "write e.g. 2 or '>=1' or '==0'")


def _condition(value: Any, file: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > CONDITION_MAX:
        raise SpecError(file, field, "expected the condition under which the claim holds, "
                        f"as text of at most {CONDITION_MAX} characters")
    return " ".join(value.split())


def _qualified_when(value: Any, out: list[Expectation], file: str, where: str
                    ) -> list[Expectation]:
    """Attach ``qualified_when`` entries to the expectations they name (by check label)."""
    if not isinstance(value, dict) or not value:
        raise SpecError(file, where, "expected {check label: {measured value: condition}}",
                        "e.g. {middlebox.strip_mptcp_after.outcome: "
                        "{subflow_reset_continue: 'another subflow kept the connection'}}")
    labels = {exp.label: i for i, exp in enumerate(out) if exp.key != QUALIFIED_LABEL}
    for label, cases in value.items():
        at = f"{where}.{label}"
        if label not in labels:
            raise SpecError(file, at, "names no expectation of this transport",
                            f"check labels here: {', '.join(sorted(labels)) or 'none'}")
        if not isinstance(cases, dict) or not cases:
            raise SpecError(file, at, "expected {measured value: condition}")
        pairs: list[tuple[str | int | bool, str]] = []
        for measured, text in cases.items():
            if not isinstance(measured, str | int | bool) or (
                    isinstance(measured, str) and not measured.strip()):
                raise SpecError(file, f"{at}.{measured}", "not a measured value",
                                "a text, number or true/false, as the check measures it")
            pairs.append((measured, _condition(text, file, f"{at}.{measured}")))
        exp = out[labels[label]]
        out[labels[label]] = replace(exp, qualified_when=exp.qualified_when + tuple(pairs))
    return out


def parse_expectations(data: dict[str, Any], file: str, field: str,
                       topology: TopologySpec) -> list[Expectation]:
    out: list[Expectation] = []
    paths = set(topology.paths)
    nodes = {n.name for n in topology.nodes}
    for key, value in data.items():
        where = f"{field}.{key}"
        if key not in EXPECT_KEYS:
            raise SpecError(file, where, "unknown expectation",
                            f"allowed: {', '.join(EXPECT_KEYS)}")
        if key == QUALIFIED_WHEN:
            continue  # after the loop: it refers to the other expectations
        if key == QUALIFIED_LABEL:
            out.append(Expectation(key, _condition(value, file, where)))
        elif key == "status":
            if value not in STATUSES:
                raise SpecError(file, where, f"{value!r} is not an outcome status",
                                f"allowed values: {', '.join(STATUSES)}")
            out.append(Expectation(key, value))
        elif key in ("checksum_match", "fallback"):
            if not isinstance(value, bool):
                raise SpecError(file, where, f"expected true or false, got {value!r}"[:200])
            out.append(Expectation(key, value))
        elif key == "tls_version":
            if value not in ("TLSv1.3", "TLSv1.2"):
                raise SpecError(file, where, f"{value!r} is not a TLS version",
                                "allowed values: TLSv1.3, TLSv1.2")
            out.append(Expectation(key, value))
        elif key == "subflows":
            out.append(Expectation(key, _compare(value, file, where)))
        elif key in PATH_LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise SpecError(file, where, "expected a list of paths",
                                f"e.g. [{', '.join(sorted(paths))}]")
            unknown = [p for p in value if p not in paths]
            if unknown:
                raise SpecError(file, where, f"unknown path {unknown[0]!r}",
                                f"paths of {topology.name}: {', '.join(sorted(paths))}")
            out.append(Expectation(key, sorted(set(value))))
        elif key in ("attack", "middlebox"):
            # The report of an attack or middlebox kind: {kind: {field: value}}.
            if not isinstance(value, dict):
                raise SpecError(file, where, f"expected {{{key} kind: {{field: value}}}}")
            for kind, fields in value.items():
                if not isinstance(fields, dict) or not isinstance(kind, str):
                    raise SpecError(file, f"{where}.{kind}", "expected {field: value}")
                for name, expected in fields.items():
                    at = f"{where}.{kind}.{name}"
                    if not isinstance(name, str) or not FIELD_RE.match(name):
                        raise SpecError(file, at, "not a report field name",
                                        "lower-case letters, digits and '_'")
                    if isinstance(expected, bool | str) and not (
                            isinstance(expected, str) and COMPARE_RE.match(expected)):
                        if isinstance(expected, str) and len(expected) > 200:
                            raise SpecError(file, at, "longer than 200 characters")
                        parsed: Any = expected
                    else:
                        parsed = _compare(expected, file, at)
                    out.append(Expectation(key, parsed, node=kind, counter=name))
        elif key in ("counters", "counters_during_attack"):
            if not isinstance(value, dict):
                raise SpecError(file, where, "expected {node: {Counter: comparison}}")
            for node, counters in value.items():
                if node not in nodes:
                    raise SpecError(file, f"{where}.{node}", "unknown node",
                                    f"nodes of {topology.name}: {', '.join(sorted(nodes))}")
                if not isinstance(counters, dict):
                    raise SpecError(file, f"{where}.{node}", "expected {Counter: comparison}")
                for counter, cmp in counters.items():
                    if not isinstance(counter, str) or not COUNTER_RE.match(counter):
                        raise SpecError(file, f"{where}.{node}.{counter}",
                                        "not a counter name", "e.g. MPTcpExtMPJoinAckRx")
                    out.append(Expectation(key, _compare(cmp, file, f"{where}.{node}.{counter}"),
                                           node=str(node), counter=counter))
    if QUALIFIED_WHEN in data:
        out = _qualified_when(data[QUALIFIED_WHEN], out, file, f"{field}.{QUALIFIED_WHEN}")
    return out


def _listed(measured: Any, pairs: tuple[tuple[str | int | bool, str], ...]) -> str:
    """The condition for ``measured`` (same type and value: true is not 1), or ''."""
    for value, text in pairs:
        if type(value) is type(measured) and value == measured:
            return text
    return ""


_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def evaluate(expectations: list[Expectation], facts: dict[str, Any]) -> list[Check]:
    checks = []
    for exp in expectations:
        if exp.key == QUALIFIED_LABEL:
            # Not a measurement: the condition the verdict will carry (see result.py).
            checks.append(Check(QUALIFIED_LABEL, exp.expected, None, True))
            continue
        if exp.key in ("counters", "counters_during_attack"):
            measured = facts.get(exp.key, {}).get(exp.node, {}).get(exp.counter, 0)
        elif exp.key in ("attack", "middlebox"):
            report = facts.get(exp.key, {}).get(exp.node)
            measured = None if report is None else report.get(exp.counter)
        else:
            measured = facts.get(exp.key)
        if isinstance(exp.expected, tuple):
            op, number = exp.expected
            ok = isinstance(measured, int) and _OPS[op](measured, number)
        elif isinstance(exp.expected, list):
            ok = isinstance(measured, list) and sorted(measured) == exp.expected
        else:
            ok = measured == exp.expected
        qualified = "" if ok else _listed(measured, exp.qualified_when)
        checks.append(Check(exp.label, exp.describe(), measured, ok, qualified))
    return checks
