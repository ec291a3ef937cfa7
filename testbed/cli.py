"""Command line: ``testbed doctor | run | matrix | report | diff | list | clean``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from testbed import __version__
from testbed.errors import EnvironmentNotReady, SpecError, TestbedError

REPO = Path(__file__).resolve().parents[1]
PLAYBOOK_DIR = REPO / "playbooks"
DEFAULT_RESULTS = Path(os.environ.get("TESTBED_RESULTS", REPO / "results"))


_ORCHESTRATOR_PID = os.getpid()


def _interrupt(signum: int, _frame: Any) -> None:
    if os.getpid() != _ORCHESTRATOR_PID:
        # A forked helper (pyroute2 opens netns sockets in forked children) inherited this
        # handler: it must die as by default, never unwind into the orchestrator's cleanup.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    # Ignore further signals so the cleanup that the exception triggers runs to the end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError("--set", item, "expected KEY=VALUE", "e.g. --set app=openssl")
        try:
            out[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key] = value
    return out


class Progress:
    """One line per step with the elapsed time; quiet with --json on stdout."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _require_root() -> None:
    if sys.platform != "linux":
        raise EnvironmentNotReady("the testbed needs Linux with kernel MPTCP: "
                                  "run 'vagrant up' then 'make test'")
    if os.geteuid() != 0:
        raise EnvironmentNotReady("the testbed creates network namespaces and needs root: "
                                  "run it as root (sudo)")


def cmd_doctor(args: argparse.Namespace) -> int:
    from testbed.runtime import doctor

    report = doctor.probe()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(doctor.render_table(report))
    return 0 if report.essentials_ok() else 1


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.model.playbook import expand_sweeps

    overrides = _parse_sets(args.set)
    playbooks = [pb for p in args.playbooks for pb in expand_sweeps(p, overrides)]
    _require_root()
    from testbed.runtime.scenario import run_playbooks

    transports = None if args.transport == "both" else (args.transport,)
    progress = Progress()
    result, run_dir = run_playbooks(playbooks, results_root=Path(args.out),
                                    transports=transports, progress=progress,
                                    jobs=args.jobs)
    rows = [(s.playbook, t, r.verdict.value, r.reason)
            for s in result.scenarios for t, r in s.transports.items()]
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "result": result.to_json()}, default=str))
    else:
        width = max((len(r[0]) for r in rows), default=8)
        for name, transport, verdict, reason in rows:
            print(f"{name:<{width}}  {transport:<5}  {verdict:<12}  {reason}")
        print(f"results: {run_dir}")
    return 0 if all(r[2] != "ERROR" for r in rows) else 1


def cmd_list(args: argparse.Namespace) -> int:
    from testbed.apps import APPS
    from testbed.model.playbook import ATTACK_KINDS, MIDDLEBOX_KINDS, load_playbook
    from testbed.model.topology import available_topologies, load_topology

    what = args.what
    listing: dict[str, Any] = {}
    if what in ("all", "topologies"):
        listing["topologies"] = {}
        for name in available_topologies():
            spec = load_topology(name)
            listing["topologies"][name] = {
                "description": spec.description, "paths": spec.paths,
                "nodes": {n.name: n.role for n in spec.nodes}}
    if what in ("all", "apps"):
        listing["apps"] = {k: {"requires_tcp": sorted(v().requirements("tcp")),
                               "requires_mptcp": sorted(v().requirements("mptcp")),
                               "description": (v.__doc__ or v.kind).strip().splitlines()[0]}
                           for k, v in APPS.items()}
    if what in ("all", "middleboxes"):
        from testbed.middleboxes import MIDDLEBOXES

        listing["middleboxes"] = {
            k: {"description": desc,
                "requires": sorted(MIDDLEBOXES[k].requires) if k in MIDDLEBOXES else [],
                "params": ({p.name: p.describe() for p in MIDDLEBOXES[k].params.values()}
                           if k in MIDDLEBOXES else {})}
            for k, desc in MIDDLEBOX_KINDS.items()}
    if what in ("all", "attacks"):
        from attacks import ATTACKS

        listing["attacks"] = {
            k: {"description": desc,
                "positions": list(ATTACKS[k].positions) if k in ATTACKS else [],
                "transports": list(ATTACKS[k].transports) if k in ATTACKS else [],
                "requires": sorted(ATTACKS[k].requires) if k in ATTACKS else [],
                "params": ({p.name: p.describe() for p in ATTACKS[k].params.values()}
                           if k in ATTACKS else {})}
            for k, desc in ATTACK_KINDS.items()}
    if what in ("all", "playbooks"):
        listing["playbooks"] = {}
        for path in sorted(PLAYBOOK_DIR.glob("*.yaml")):
            try:
                pb = load_playbook(path)
                info = {"claim": pb.claim, "description": pb.description,
                        "transports": list(pb.transports)}
            except SpecError as exc:
                info = {"claim": None, "description": f"INVALID: {exc}"}
            listing["playbooks"][str(path.relative_to(REPO))] = info
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for section, items in listing.items():
        print(f"{section}:")
        if not items:
            print("  (none in this version)")
        for name, info in items.items():
            desc = info.get("description", "") if isinstance(info, dict) else str(info)
            print(f"  {name:<28} {desc}")
            if isinstance(info, dict) and "positions" in info:
                print(f"  {'':<28} positions: {', '.join(info['positions'])}; transports: "
                      f"{', '.join(info['transports'])}")
            if isinstance(info, dict) and "params" in info:
                print(f"  {'':<28} requires: {', '.join(info.get('requires', [])) or 'nothing'}")
                for pname, phelp in info["params"].items():
                    print(f"  {'':<28}   {pname}: {phelp}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    _require_root()
    from testbed.runtime.ledger import clean

    report = clean()
    if args.json:
        print(json.dumps({"released": report}))
    else:
        print("\n".join(report) if report else "nothing to clean: no testbed run left anything")
    return 0


def _claim_list(values: list[str], option: str) -> list[str]:
    from testbed.model.matrix import normalize_claims

    try:
        return normalize_claims(values)
    except ValueError as exc:
        raise SpecError(option, "(claims)", str(exc), "ids as in DESIGN.md §2, or baseline"
                        ) from None


def matrix_playbooks(only: list[str], skip: list[str], repeat: int | None = None,
                     directory: Path = PLAYBOOK_DIR, warn: Any = None) -> list[Any]:
    """The matrix's scenarios: every playbook of ``directory`` with a claim, and the
    baseline, sweeps expanded, filtered by claim id. A playbook that does not load stops
    the matrix unless its claim is filtered out."""
    import dataclasses

    from testbed.model.matrix import selected
    from testbed.model.playbook import expand_sweeps

    chosen = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            scenarios = expand_sweeps(path)
        except SpecError:
            claim = _raw_claim(path)
            if claim is not None and not selected(claim, only, skip):
                continue
            raise
        for pb in scenarios:
            if path.is_relative_to(REPO):  # reports name playbooks/x.yaml, not /home/...
                pb = dataclasses.replace(pb, file=str(path.relative_to(REPO)))
            if pb.claim is None and pb.name.split("[")[0] != "baseline":
                if warn:
                    warn(f"{path.name}: no claim, not part of the matrix")
                continue
            if not selected(pb.claim, only, skip):
                continue
            chosen.append(dataclasses.replace(pb, repeat=repeat) if repeat else pb)
    return chosen


def _raw_claim(path: Path) -> str | None:
    """The claim an invalid playbook names (to honour --only/--skip), if it can be read."""
    with contextlib.suppress(OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError):
        data = yaml.safe_load(path.read_text(encoding="utf-8")[:MAX_PEEK])
        if isinstance(data, dict):
            if isinstance(data.get("claim"), str):
                return str(data["claim"])
            if data.get("name") == "baseline":
                return None
        return "?"
    return "?"


MAX_PEEK = 256 * 1024


def _count_between(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer from ``lo`` to ``hi``, else a one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {what} from {lo} "
                                             f"to {hi}")
        return value
    return parse


_repeat_count = _count_between(1, 100, "runs")
_jobs_count = _count_between(1, 16, "parallel jobs")


def cmd_matrix(args: argparse.Namespace) -> int:
    from testbed.model.matrix import TRANSPORT_LABEL, TRANSPORTS
    from testbed.report import REQUEST_FILE, load_matrix, write_reports

    only = _claim_list(args.only, "--only")
    skip = _claim_list(args.skip, "--skip")
    progress = Progress()
    playbooks = matrix_playbooks(only, skip, args.repeat, warn=progress)
    if not playbooks:
        raise SpecError("--only/--skip", "(claims)", "no playbook left to run",
                        "'testbed list playbooks' shows each playbook's claim")
    _require_root()
    from testbed.runtime.scenario import run_playbooks

    progress(f"matrix: {len(playbooks)} scenarios "
             f"({', '.join(f'{p.claim or p.name}' for p in playbooks)})")
    _result, run_dir = run_playbooks(playbooks, results_root=Path(args.out),
                                     progress=progress, jobs=args.jobs)
    (run_dir / REQUEST_FILE).write_text(json.dumps(
        {"only": only, "skip": skip, "repeat": args.repeat,
         "jobs": args.jobs, "playbooks": sorted({p.file for p in playbooks})}, indent=1)
        + "\n")
    progress("writing the reports")
    files = write_reports(run_dir)
    matrix = load_matrix(run_dir)
    errors = any(c.verdict == "ERROR" or c.measured_verdict == "ERROR"
                 for r in matrix.rows for c in r.cells.values())
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "files": {k: str(v) for k, v in
                                                             files.items()},
                          "matrix": matrix.to_json()}, default=str))
        return 1 if errors else 0
    width = max((len(r.key) for r in matrix.rows), default=8)
    print(f"{'claim':<9} {'scenario':<{width}}  " + "  ".join(
        f"{TRANSPORT_LABEL[t]:<13}" for t in TRANSPORTS) + "  verdict")
    for row in matrix.rows:
        cells = "  ".join(f"{(row.cells[t].verdict if t in row.cells else '—'):<13}"
                          for t in TRANSPORTS)
        print(f"{row.claim:<9} {row.key:<{width}}  {cells}  {row.verdict}"
              + (" (flaky)" if row.flaky else ""))
    if matrix.uncovered:
        print(f"no playbook yet for: {', '.join(matrix.uncovered)}")
    print(f"results: {run_dir}")
    print(f"report:  {files['report.html']}")
    return 1 if errors else 0


def cmd_report(args: argparse.Namespace) -> int:
    from testbed.report import write_reports

    files = write_reports(Path(args.run_dir))
    if args.json:
        print(json.dumps({k: str(v) for k, v in files.items()}))
    else:
        for name, path in files.items():
            print(f"{name:<12} {path}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from testbed.model.matrix import diff_matrices
    from testbed.report import load_matrix

    a, b = load_matrix(Path(args.run_a)), load_matrix(Path(args.run_b))
    changes = diff_matrices(a, b, bytes_tolerance=args.bytes_tolerance)
    if args.json:
        print(json.dumps({"a": a.run_id, "b": b.run_id, "changes": [
            {"scenario": c.row, "claim": c.claim, "transport": c.transport, "what": c.what,
             "before": c.before, "after": c.after} for c in changes]}, default=str))
    elif changes:
        print(f"{len(changes)} change(s) from {a.run_id} to {b.run_id}:")
        for c in changes:
            print(f"  {c.line()}")
    else:
        print(f"no change in verdicts or key figures from {a.run_id} to {b.run_id}")
    return 1 if changes else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed", description="Is TLS over MPTCP less secure than TLS over TCP? "
        "Real kernel MPTCP, real TLS peers, real packets.",
        epilog="remote: testbed --host [USER@]HOST [--ssh-port N] [--known-hosts FILE] "
        "[--identity FILE] [--remote-dir DIR] run|matrix|doctor ... runs the command in the "
        "project checkout of a remote machine or VM and copies the results back "
        "(testbed/remote.py)")
    parser.add_argument("--version", action="version", version=f"testbed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="probe what this machine can run")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("run", help="run playbooks and record evidence and verdicts")
    p.add_argument("playbooks", nargs="+", metavar="PLAYBOOK")
    p.add_argument("--transport", choices=("tcp", "mptcp", "both"), default="both")
    p.add_argument("--out", default=str(DEFAULT_RESULTS),
                   help="results root; each run writes <out>/<run-id>/ (default: results/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a playbook parameter (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--jobs", default=1, metavar="N", type=_jobs_count,
                   help="run N scenario transports at once, each in its own network "
                   "(default 1: one after the other; timing-sensitive scenarios share "
                   "the CPU then)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("matrix", help="run every claim's playbook (and the baseline) under "
                       "both transports; write the claims matrix and its reports")
    p.add_argument("--only", nargs="+", default=[], metavar="CLAIM",
                   help="run only these claims (ids of DESIGN.md §2, or baseline)")
    p.add_argument("--skip", nargs="+", default=[], metavar="CLAIM",
                   help="leave these claims out")
    p.add_argument("--repeat", default=None, metavar="N",
                   type=_repeat_count, help="run each scenario N times (overrides the "
                   "playbooks' repeat); verdicts that differ are reported as FLAKY")
    p.add_argument("--out", default=str(DEFAULT_RESULTS),
                   help="results root; the run writes <out>/<run-id>/ (default: results/)")
    p.add_argument("--json", action="store_true", help="print the matrix as JSON")
    p.add_argument("--jobs", default=1, metavar="N", type=_jobs_count,
                   help="run N scenario transports at once, each in its own network "
                   "(default 1: one after the other; timing-sensitive scenarios share "
                   "the CPU then)")
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("report", help="rebuild matrix.json, report.html, report.md and "
                       "junit.xml of a run from its stored evidence (runs nothing)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("diff", help="claims whose verdict or key figures changed between "
                       "two runs (exit 1 when something changed)")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--bytes-tolerance", type=float, default=0.2, metavar="SHARE",
                   help="report a path's share of the bytes only when it moved by more "
                   "than this (default 0.2)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("list", help="list topologies, apps, middleboxes, attacks, playbooks")
    p.add_argument("what", nargs="?", default="all",
                   choices=("all", "topologies", "apps", "middleboxes", "attacks", "playbooks"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("clean", help="release what killed testbed runs left behind "
                       "(and nothing else)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_clean)
    return parser


def main(argv: list[str] | None = None) -> int:
    global _ORCHESTRATOR_PID
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--host" or a.startswith("--host=") for a in argv):
        return _main_remote(argv)
    args = build_parser().parse_args(argv)
    _ORCHESTRATOR_PID = os.getpid()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    return _one_line_errors(lambda: int(args.func(args)),
                            "everything the run created was released")


def _one_line_errors(command: Callable[[], int], on_interrupt: str) -> int:
    """Run ``command``; report a testbed error, an OS error or an interruption in one line
    on stderr (never a traceback) with its exit status."""
    try:
        return command()
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"testbed: interrupted ({exc or 'SIGINT'}); {on_interrupt}", file=sys.stderr)
        return 130


def _main_remote(argv: list[str]) -> int:
    """``testbed --host ...``: the same command on a remote machine (testbed/remote.py)."""
    from testbed import remote

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)

    def command() -> int:
        if remote.split_argv(argv) is None:
            raise remote.RemoteError("--host must come before the command, e.g. "
                                     "testbed --host vagrant@127.0.0.1 doctor")
        return remote.main(argv)

    return _one_line_errors(command, "the remote run stops and releases what it made when "
                            "its SSH session closes")
