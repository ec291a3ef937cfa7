"""``python -m testbed.bench [--quick] [--only SECTION...] [--out DIR]``: run the benchmark,
write ``<out>/<id>.json`` and ``<out>/<id>.png``, print the table. Needs root."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from testbed.bench import SCHEMA, SECTIONS, report, sections, topo
from testbed.runtime.ledger import Ledger
from testbed.runtime.scenario import _git_commit

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "results" / "bench"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testbed.bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="reduced mode (< 60 s): small sizes, baseline scenario only, short "
                        "transfers, 100 connections")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--repeats", type=int, default=None, help="repeats per figure")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("testbed.bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    quick = args.quick
    reps = args.repeats or (2 if quick else 5)
    ledger = Ledger.create()
    bench_id = ledger.data.run_id
    work = Path(f"/tmp/{ledger.tag}-bench")
    ledger.add_temp_dir(str(work))
    work.mkdir(mode=0o755)
    args.out.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "schema": SCHEMA, "id": bench_id, "quick": quick, "repeats": reps,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {"kernel": platform.release(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "git_commit": _git_commit(),
                        "load_before": _load()},
        "sections": {}, "errors": {},
    }
    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    plan = {
        "topology": lambda: topo.measure(ledger, [4, 20] if quick else [4, 20, 50, 100, 200],
                                         reps, say),
        "scenarios": lambda: sections.scenarios(work, quick, 1 if quick else 3, say),
        "fidelity": lambda: sections.fidelity(ledger, work / "fidelity",
                                              2.0 if quick else 8.0, 1 if quick else 3, say),
        "unshaped": lambda: sections.throughput(ledger, work / "unshaped", None,
                                                1.0 if quick else 5.0, 0.5, 1 if quick else 3,
                                                say),
        "many_connections": lambda: sections.many_connections(
            ledger, work / "conns", 100 if quick else 1000, say),
        "attack_rate": lambda: sections.attack_rate(ledger, work / "attack",
                                                    1.0 if quick else 5.0,
                                                    300 if quick else 3000,
                                                    1 if quick else 3, say),
    }
    try:
        for name in args.only:
            t0 = time.monotonic()
            say(f"section {name}")
            try:
                out["sections"][name] = plan[name]()
            except Exception as exc:  # one broken section must not lose the others
                out["errors"][name] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                say(f"section {name} FAILED: {exc}")
            out.setdefault("section_s", {})[name] = round(time.monotonic() - t0, 2)
    finally:
        out["environment"]["load_after"] = _load()
        out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out["targets"] = report.targets(out["sections"])
        ledger.release_all()
        ledger.close()
        path = args.out / f"{bench_id}.json"
        path.write_text(json.dumps(out, indent=1))
        png = args.out / f"{bench_id}.png"
        try:
            report.plot(out, png)
            out["plot"] = str(png)
        except Exception as exc:
            out["errors"]["plot"] = f"{type(exc).__name__}: {exc}"
        path.write_text(json.dumps(out, indent=1))
    print(report.table(out))
    print(f"\nresults: {path}\nplot:    {png}")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
