"""Summaries of repeated measurements: median with its spread."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """``{median, min, max, q1, q3, n, samples}`` of ``values`` (q1/q3: inclusive quartiles;
    with fewer than 2 values they equal the median)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0,
                "samples": []}
    med = statistics.median(vals)
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = med
    r = lambda x: round(x, digits)  # noqa: E731
    return {"median": r(med), "min": r(vals[0]), "max": r(vals[-1]), "q1": r(q1), "q3": r(q3),
            "n": len(vals), "samples": [r(v) for v in values]}


def ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Per-repeat ratios a[i]/b[i] (paired: measured back to back in the same run)."""
    return summary([x / y for x, y in zip(a, b, strict=True) if y > 0], 3)


def spread(s: dict[str, Any], unit: str = "", digits: int = 3) -> str:
    """``median [min-max]`` for tables."""
    if s.get("median") is None:
        return "-"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'])}{unit} [{f.format(s['min'])}-{f.format(s['max'])}]")
