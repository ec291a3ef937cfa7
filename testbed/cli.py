"""Command line: ``testbed doctor | run | list | clean``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
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
    from testbed.model.playbook import load_playbook

    overrides = _parse_sets(args.set)
    playbooks = [load_playbook(p, overrides) for p in args.playbooks]
    _require_root()
    from testbed.runtime.scenario import run_playbooks

    transports = None if args.transport == "both" else (args.transport,)
    progress = Progress()
    result, run_dir = run_playbooks(playbooks, results_root=Path(args.out),
                                    transports=transports, progress=progress)
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
        listing["attacks"] = dict(ATTACK_KINDS)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed", description="Is TLS over MPTCP less secure than TLS over TCP? "
        "Real kernel MPTCP, real TLS peers, real packets.")
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
    p.set_defaults(func=cmd_run)

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
    args = build_parser().parse_args(argv)
    _ORCHESTRATOR_PID = os.getpid()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return int(args.func(args))
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"testbed: interrupted ({exc or 'SIGINT'}); everything the run created was "
              "released", file=sys.stderr)
        return 130
