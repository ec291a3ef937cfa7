#!/usr/bin/env python3
"""Flakes: run the claims matrix K times in a row and count verdict flips per claim.

Each round is a separate ``testbed matrix --json`` process (fresh networks, as a user would
run it). Per row (scenario) and transport the script keeps the sequence of verdicts and
reports:

- ``flips``: rounds whose verdict differs from the cell's most frequent verdict (so a cell
  that is REFUTED once in 10 rounds has 1 flip, rate 0.1);
- ``changes``: how often the verdict changed from one round to the next;
- the distribution, and for every flipped round its reason (from matrix.json).

The machine's load average (1 min) is recorded before and after every round, and the
round's duration. Everything goes to ``--out/flake-<stamp>.json`` after every round (a
killed check keeps the rounds it finished); ``--table FILE`` prints the table again.

    .venv/bin/python scripts/flake_check.py                 # K=10, every claim
    .venv/bin/python scripts/flake_check.py -k 3 -- --skip P4
    .venv/bin/python scripts/flake_check.py --table results/reliability/flake-*.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = REPO / ".venv" / "bin" / "python"


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def one_round(matrix_args: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """One ``testbed matrix`` process; returns its cells (or its failure)."""
    t0 = time.monotonic()
    load0 = loadavg()
    python = str(PY) if PY.exists() else sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        res = subprocess.run([python, "-m", "testbed", "matrix", "--out", str(out), "--json",
                              *matrix_args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"matrix took more than {timeout_s:.0f}s",
                "duration_s": round(time.monotonic() - t0, 1), "load_before": load0,
                "load_after": loadavg(), "cells": {}}
    round_: dict[str, Any] = {"duration_s": round(time.monotonic() - t0, 1),
                              "load_before": load0, "load_after": loadavg(),
                              "returncode": res.returncode, "cells": {}}
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        round_.update(ok=False, error=res.stderr.strip()[-2000:])
        return round_
    # The working tree at that moment (it may change between rounds): its commit.
    round_.update(ok=True, run_dir=doc.get("run_dir"),
                  commit=(doc["matrix"].get("environment") or {}).get("git_commit"))
    for row in doc["matrix"]["claims"]:
        for transport, cell in row["cells"].items():
            verdict = cell.get("measured_verdict") or cell["verdict"]
            if verdict in ("n/a", "NOT RUN"):
                continue
            round_["cells"][f"{row['key']} [{transport}]"] = {
                "claim": row["claim"], "verdict": verdict, "reason": cell.get("reason", "")}
    return round_


def summarize(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = sorted({k for r in rounds for k in r["cells"]})
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        # Only the rounds that ran this cell (a playbook added or removed between rounds
        # is not a flip).
        present = [i for i, r in enumerate(rounds) if key in r["cells"]]
        seq = [rounds[i]["cells"][key]["verdict"] for i in present]
        counts = Counter(seq)
        modal = counts.most_common(1)[0][0]
        flipped = [present[j] for j, v in enumerate(seq) if v != modal]
        out[key] = {
            "claim": next(r["cells"][key]["claim"] for r in rounds if key in r["cells"]),
            "verdicts": seq, "distribution": dict(counts), "modal": modal,
            "flips": len(flipped),
            "changes": sum(1 for a, b in pairwise(seq) if a != b),
            "rate": round(len(flipped) / len(seq), 3) if seq else 0.0,
            "rounds": len(seq),
            "flipped_rounds": {i + 1: rounds[i]["cells"][key]["reason"] for i in flipped},
        }
    return out


def table(doc: dict[str, Any]) -> str:
    rounds = doc["rounds"]
    rounds_ok = [r for r in rounds if r.get("ok")]
    summary = summarize(rounds_ok)
    loads = [x for r in rounds for x in (r["load_before"], r["load_after"])]
    lines = [f"{len(rounds)} rounds of `testbed matrix {' '.join(doc['matrix_args'])}` "
             f"({sum(1 for r in rounds if r.get('ok'))} completed), "
             f"{sum(r['duration_s'] for r in rounds) / max(len(rounds), 1):.0f} s per round, "
             f"load average (1 min) {min(loads, default=0):.1f}-{max(loads, default=0):.1f} "
             f"on {os.cpu_count()} cores", "",
             "| scenario [transport] | claim | rounds | verdicts | flips | rate |",
             "|---|---|---|---|---|---|"]
    for key, s in summary.items():
        dist = ", ".join(f"{n}× {v}" for v, n in sorted(s["distribution"].items(),
                                                          key=lambda x: -x[1]))
        lines.append(f"| {key} | {s['claim']} | {s['rounds']} | {dist} | {s['flips']} "
                     f"| {s['rate']} |")
    flips = sum(s["flips"] for s in summary.values())
    lines += ["", f"cells: {len(summary)}, flipped cells: "
              f"{sum(1 for s in summary.values() if s['flips'])}, total flips: {flips}"]
    for key, s in summary.items():
        for i, reason in s["flipped_rounds"].items():
            verdict = rounds_ok[i - 1]["cells"][key]["verdict"]
            lines.append(f"- {key} round {i}: {verdict} — {reason[:400]}")
    for i, r in enumerate(rounds, 1):
        if not r.get("ok"):
            lines.append(f"- round {i} failed: {r.get('error', '')[:400]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", "--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reliability")
    ap.add_argument("--round-timeout", type=float, default=3600.0)
    ap.add_argument("--table", type=Path, nargs="+",
                    help="print the table of stored checks (rounds of several files are "
                         "taken together, in order) and exit")
    ap.add_argument("matrix_args", nargs="*", help="after --: arguments for testbed matrix")
    args = ap.parse_args()
    if args.table:
        docs = [json.loads(p.read_text()) for p in args.table]
        merged = {**docs[0], "rounds": [r for d in docs for r in d["rounds"]]}
        print(table(merged))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"flake-{stamp}.json"
    doc: dict[str, Any] = {"started": stamp, "matrix_args": args.matrix_args,
                           "cpus": os.cpu_count(), "rounds": []}
    for k in range(1, args.rounds + 1):
        print(f"round {k}/{args.rounds} (load {loadavg():.1f})", file=sys.stderr, flush=True)
        r = one_round(args.matrix_args, args.out / "runs", args.round_timeout)
        doc["rounds"].append(r)
        path.write_text(json.dumps(doc, indent=1))
        print(f"  {'ok' if r.get('ok') else 'FAILED'} in {r['duration_s']} s, "
              f"{len(r['cells'])} cells, load {r['load_after']:.1f}", file=sys.stderr,
              flush=True)
    print(table(doc))
    print(f"\nstored: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
