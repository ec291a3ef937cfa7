#!/usr/bin/env python3
"""Faults: start N runs of a short playbook and kill each at a random moment, then count
what is left on the machine.

Every run is ``testbed run tests/fixtures/faults.yaml`` (an off-path attacker node, a NAT
middlebox, captures, a ~2 s MPTCP transfer, an attack during it) in its own session with a
private ledger directory. The kill moment is taken from the run's own state, never from
a clock alone: the script polls the run's ledger (namespaces, processes and their labels)
and reads its progress lines, waits for the planned phase's trigger, then waits a random
0-300 ms more and sends the signal:

- setup: the ledger exists / lists namespaces / a middlebox is being installed / the
  server is starting;
- traffic: the ledger lists the python client;
- attack: the run printed "attacking" (the attack acts on the live transfer);
- teardown: the client left the ledger / the tshark analysis started / the verdict line
  came (the run is releasing its network and writing its results).

The phase is recorded as observed at the moment of the kill (from the same state). The
signals: SIGINT to the run's process group (as Ctrl-C in a terminal), SIGTERM and SIGKILL
to its PID. Every (signal, phase) pair comes up in turn, in a seeded random order.

After SIGINT/SIGTERM the run must have cleaned up by itself (measured before anything
else runs); after SIGKILL ``testbed clean`` runs, then the same measurement. Leftovers
(``testbed.runtime.leftovers``): namespaces, /run/netns files and mounts of the run's
tag, processes (every process below the run at the kill, with its start time, the
ledger's records, ``mininet:<tag>`` shells), netfilter rules carrying the tag in the root
namespace, files /tmp/*<tag>*, the run's ledger files, and any change of the root
namespace's links, addresses, routes, rules, qdiscs, iptables and nft rulesets, MPTCP
endpoints/limits and sysctls. Results: every JSON file the run wrote parses, and the run
is marked incomplete (INCOMPLETE file, result.json complete=false) unless it finished.

    .venv/bin/python scripts/fault_injection.py                # 50 runs
    .venv/bin/python scripts/fault_injection.py -n 6 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.runtime.leftovers import (  # noqa: E402
    Proc,
    count,
    descendants,
    root_state,
    state_diff,
    tagged,
)

PLAYBOOK = REPO / "tests" / "fixtures" / "faults.yaml"
PHASES = ("setup", "traffic", "attack", "teardown")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
SETUP_TRIGGERS = ("ledger", "netns", "middlebox", "server")
TEARDOWN_TRIGGERS = ("client_done", "analysis", "verdict")
RESULT_FILES = {"result.json", "verdict.json", "counters.json", "app-outcome.json",
                "observers.json", "ss-client.json"}
RUN_BOUND_S = 300.0      # a run that reaches no trigger within this is a failure
EXIT_BOUND_S = 120.0     # SIGINT/SIGTERM: cleanup done within this (client bound is 35 s)
SETTLE_BOUND_S = 30.0    # processes of the run gone within this after exit/clean


def python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class Watched:
    """A ``testbed run`` subprocess whose progress lines and ledger are followed."""

    def __init__(self, out: Path, state: Path, extra: list[str]) -> None:
        self.state = state
        env = {**os.environ, "TESTBED_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [python(), "-m", "testbed", "run", str(PLAYBOOK), "--out", str(out), *extra],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.ledger: dict[str, Any] | None = None
        self.client_seen = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def poll_ledger(self) -> dict[str, Any] | None:
        for path in self.state.glob("tb*.json"):
            try:
                self.ledger = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        if self.client_present():
            self.client_seen = True
        return self.ledger

    def labels(self) -> list[str]:
        return [p["label"] for p in (self.ledger or {}).get("processes", [])]

    def client_present(self) -> bool:
        return any(label.endswith("client") for label in self.labels())

    def said(self, needle: str) -> bool:
        return any(needle in line for line in list(self.lines))

    def trigger(self, name: str) -> bool:
        self.poll_ledger()
        led = self.ledger or {}
        return {
            "ledger": lambda: self.ledger is not None,
            "netns": lambda: bool(led.get("netns")),
            "middlebox": lambda: self.said(": middlebox "),
            "server": lambda: self.said("server"),
            "traffic": lambda: self.client_present(),
            "attack": lambda: self.said("; attacking"),
            "client_done": lambda: self.client_seen and not self.client_present()
            and bool(led.get("netns")),
            "analysis": lambda: self.said("analysing captures"),
            "verdict": lambda: any(" in " in ln and " — " in ln and "s — " in ln
                                   for ln in list(self.lines)),
        }[name]()

    def phase_now(self) -> str:
        if self.said("analysing captures") or self.trigger("verdict"):
            return "teardown"
        if self.client_seen and not self.client_present():
            return "teardown"
        if self.said("; attacking"):
            return "attack"
        if self.client_present():
            return "traffic"
        return "setup"


def check_results(run_dir: Path | None) -> dict[str, Any]:
    """Every JSON file the run wrote parses; the run is marked incomplete unless complete."""
    if run_dir is None or not run_dir.is_dir():
        return {"run_dir": None, "intact": True, "marked": True, "problems": []}
    problems = []
    # The files the orchestrator writes (tools' own outputs, e.g. a killed client's empty
    # report, are evidence as they are).
    ours = [p for p in run_dir.rglob("*.json") if p.name in RESULT_FILES
            or p.name.startswith("attack-")]
    for path in ours:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{path.relative_to(run_dir)}: {exc}")
    problems += [f"{p.relative_to(run_dir)}: partial write left" for p in run_dir.rglob("*.tmp")]
    result = run_dir / "result.json"
    complete = False
    if result.exists():
        with contextlib.suppress(ValueError):
            complete = bool(json.loads(result.read_text()).get("complete"))
    incomplete = (run_dir / "INCOMPLETE").exists()
    marked = complete != incomplete  # exactly one: finished, or marked INCOMPLETE
    return {"run_dir": str(run_dir), "intact": not problems, "marked": marked,
            "complete": complete, "incomplete_marker": incomplete, "problems": problems}


def settle(tag: str, state: Path, procs: list[Proc]) -> dict[str, list[str]]:
    """Leftovers of ``tag``, waited for (bounded) until none are left: processes that were
    signalled take a moment to exit."""
    deadline = time.monotonic() + SETTLE_BOUND_S
    while True:
        found = tagged(tag, state_dir=state, processes=procs)
        if not count(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def clean(state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TESTBED_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
    return subprocess.run([python(), "-m", "testbed", "clean"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def one_run(i: int, sig: signal.Signals, phase: str, rng: random.Random, work: Path,
            baseline: dict[str, str], extra: list[str],
            trigger: str | None = None) -> dict[str, Any]:
    """One run killed in ``phase`` (at a random trigger of it, or ``trigger``)."""
    state = work / f"state-{i}"
    state.mkdir(parents=True, exist_ok=True)
    trig = trigger or {"setup": rng.choice(SETUP_TRIGGERS), "traffic": "traffic",
                       "attack": "attack", "teardown": rng.choice(TEARDOWN_TRIGGERS)}[phase]
    delay = rng.uniform(0.0, 0.3)
    t0 = time.monotonic()
    w = Watched(work / "results", state, extra)
    rec: dict[str, Any] = {"i": i, "signal": sig.name, "planned": phase, "trigger": trig,
                           "delay_s": round(delay, 3)}
    deadline = t0 + RUN_BOUND_S
    while not w.trigger(trig):
        if w.proc.poll() is not None:
            break
        if time.monotonic() > deadline:
            rec["error"] = f"trigger {trig} not reached within {RUN_BOUND_S:.0f}s"
            break
        time.sleep(0.01)
    if w.proc.poll() is None:
        # Random extra delay, then the signal: the state at that moment is the phase.
        end = time.monotonic() + delay
        while time.monotonic() < end and w.proc.poll() is None:
            w.poll_ledger()
            time.sleep(0.01)
    w.poll_ledger()
    tag = (w.ledger or {}).get("tag")
    if w.proc.poll() is not None or tag is None:
        rec.update(observed="finished before the kill" if w.proc.poll() is not None
                   else "no ledger", killed=False)
    else:
        procs = descendants(w.proc.pid)
        rec["observed"] = w.phase_now()
        rec["at_s"] = round(time.monotonic() - t0, 2)
        rec["killed"] = True
        if sig == signal.SIGINT:
            os.killpg(w.proc.pid, sig)       # Ctrl-C: the whole foreground group
        else:
            os.kill(w.proc.pid, sig)
    if not rec["killed"]:
        procs = []
    try:
        w.proc.wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        rec["hang"] = f"still running {EXIT_BOUND_S:.0f}s after {sig.name}; SIGKILLed"
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait(timeout=30)
    w._reader.join(timeout=10)
    rec["exit"] = w.proc.returncode
    rec["exit_s"] = round(time.monotonic() - t0, 2)
    w.poll_ledger()
    led = w.ledger or {}
    tag = led.get("tag")
    procs += [Proc(p["pid"], p["start_time"], p["label"]) for p in led.get("processes", [])]
    if tag:
        if sig == signal.SIGKILL and rec["killed"]:
            rec["before_clean"] = {k: len(v) for k, v in
                                   tagged(tag, state_dir=state, processes=procs).items() if v}
            out = clean(state)
            rec["clean"] = {"returncode": out.returncode,
                            "released": len(out.stdout.splitlines()),
                            "stderr": out.stderr.strip()[-500:]}
        found = settle(tag, state, procs)
        rec["leftovers"] = {k: v for k, v in found.items() if v}
        if found and count(found) and not (sig == signal.SIGKILL and rec["killed"]):
            out = clean(state)  # restore the machine for the next run; counted already
            rec["clean_after_leftovers"] = out.stdout.strip()[-1000:]
    else:
        rec["leftovers"] = {}
    rec["root_changes"] = state_diff(baseline, root_state())
    run_dir = Path(led["results_dir"]) if led.get("results_dir") else None
    rec["results"] = check_results(run_dir)
    rec["tag"] = tag
    rec["tail"] = w.lines[-3:]
    return rec


def plan(n: int, rng: random.Random, signals: tuple[signal.Signals, ...] = SIGNALS,
         phases: tuple[str, ...] = PHASES) -> list[tuple[signal.Signals, str]]:
    pairs = list(itertools.product(signals, phases))
    out: list[tuple[signal.Signals, str]] = []
    while len(out) < n:
        rng.shuffle(pairs)
        out += pairs
    return out[:n]


def clean_exit(r: dict[str, Any]) -> bool:
    return bool(r["exit"] == 130 or (r["results"].get("complete")
                                     and r["exit"] == -signal.Signals[r["signal"]].value))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    killed = [r for r in runs if r.get("killed")]
    soft = [r for r in killed if r["signal"] != "SIGKILL"]
    left = {k: sum(len(r["leftovers"].get(k, [])) for r in runs)
            for k in ("netns", "netns_files", "mounts", "processes", "shells", "temp_files",
                      "ledgers", "root_netfilter")}
    return {
        "runs": len(runs), "killed": len(killed),
        "by_signal_phase": {f"{s.name} {p}": sum(1 for r in killed if r["signal"] == s.name
                                                 and r["observed"] == p)
                            for s in SIGNALS for p in PHASES},
        "leftovers": left, "leftovers_total": sum(left.values()),
        "root_changes": sum(1 for r in runs if r["root_changes"]),
        "hangs": sum(1 for r in runs if r.get("hang")),
        # 130: interrupted and released; a run whose result was already complete may also
        # die of the signal itself (it came during the interpreter's exit).
        "sigint_sigterm_clean_exit": f"{sum(1 for r in soft if clean_exit(r))}/{len(soft)}",
        "results_intact": sum(1 for r in runs if r["results"]["intact"]),
        "results_marked": sum(1 for r in runs if r["results"]["marked"]),
        "errors": [r["error"] for r in runs if r.get("error")],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reliability")
    ap.add_argument("--signals", default="SIGINT,SIGTERM,SIGKILL",
                    help="comma-separated subset of SIGINT,SIGTERM,SIGKILL")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("extra", nargs="*", help="after --: extra arguments for testbed run")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    work = args.out / f"faults-{stamp}"
    work.mkdir(parents=True)
    baseline = root_state()
    doc: dict[str, Any] = {"seed": seed, "started": stamp, "cpus": os.cpu_count(),
                           "load_before": Path("/proc/loadavg").read_text().split()[:3],
                           "runs": []}
    signals = tuple(signal.Signals[x] for x in args.signals.split(","))
    phases = tuple(p for p in args.phases.split(",") if p in PHASES)
    for i, (sig, phase) in enumerate(plan(args.runs, rng, signals, phases), 1):
        rec = one_run(i, sig, phase, rng, work, baseline, args.extra)
        doc["runs"].append(rec)
        doc["summary"] = summarize(doc["runs"])
        doc["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
        (work / "faults.json").write_text(json.dumps(doc, indent=1, default=str))
        res = rec["results"]
        print(f"{i:3d} {rec['signal']:<7} planned {phase:<8} observed "
              f"{rec.get('observed', '?'):<9} exit {rec['exit']} "
              f"leftovers {count(rec['leftovers'])} root-changes {len(rec['root_changes'])} "
              f"results {'ok' if res['intact'] and res['marked'] else 'BAD'}"
              f"{' HANG' if rec.get('hang') else ''} {rec.get('error', '')}", flush=True)
    print(json.dumps(doc["summary"], indent=1))
    print(f"stored: {work / 'faults.json'}")
    s = doc["summary"]
    ok_exits, soft = s["sigint_sigterm_clean_exit"].split("/")
    bad = s["leftovers_total"] or s["root_changes"] or s["hangs"] or ok_exits != soft or \
        s["results_intact"] != s["runs"] or s["results_marked"] != s["runs"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
