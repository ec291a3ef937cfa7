"""Run playbooks: for each transport, build a fresh network, start the real TLS peers,
record the evidence, derive the facts and give the verdict.

A fresh network per transport (and per repetition) keeps counters and leftover
connections of one run from polluting the next (DESIGN.md §6).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Container, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attacks import ATTACKS
from testbed.apps import APPS
from testbed.apps.base import AppContext, ServerHandle
from testbed.errors import RuntimeFailure, TestbedError
from testbed.middleboxes import MIDDLEBOXES, Middlebox
from testbed.model.attachments import Attachment, Tap, attach
from testbed.model.counters import diff
from testbed.model.expect import evaluate
from testbed.model.facts import derive_facts
from testbed.model.playbook import Playbook, PluginSpec
from testbed.model.result import (
    RunResult,
    ScenarioResult,
    TransportResult,
    Verdict,
    verdict_from_checks,
)
from testbed.model.topology import TopologySpec
from testbed.runtime import doctor
from testbed.runtime.attack import Attack, AttackContext
from testbed.runtime.evidence import Capture, MptcpMonitor, SsSampler, snapshot_counters
from testbed.runtime.ledger import Ledger
from testbed.runtime.network import Network
from testbed.runtime.node import Node
from testbed.runtime.observer import PcapAnalysis
from testbed.runtime.pki import Pki, make_pki

Progress = Callable[[str], None]
ALWAYS_REQUIRED = ("mptcp", "nsenter", "ip", "tcpdump", "tshark")
PAYLOAD_CHUNK = 1 << 20


@dataclass
class RunContext:
    run_dir: Path
    ledger: Ledger
    report: doctor.DoctorReport
    progress: Progress
    pki: Pki | None = None
    payload_dir: Path | None = None
    # The observer analyses of the transport in progress (added and closed by _measure).
    analyses: list[PcapAnalysis] = field(default_factory=list)
    analyses_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.run_dir))

    def abandon_analyses(self) -> None:
        """Make the tshark passes of the transport in progress exit now (their pipes are
        closed; thread-safe, no ledger access). For an interrupt handled in another thread
        than the slot's: tshark ignores SIGTERM while it waits on its pipe, so the ledger's
        release would otherwise wait out its grace period for each of them."""
        with self.analyses_lock:
            live = list(self.analyses)
        for analysis in live:
            analysis.abandon()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_playbooks(playbooks: list[Playbook], *, results_root: Path,
                  transports: tuple[str, ...] | None = None,
                  progress: Progress = lambda _m: None, jobs: int = 1
                  ) -> tuple[RunResult, Path]:
    """Run every playbook; write results as they come. Returns the result and its dir.

    ``jobs`` > 1 runs that many scenario transports at once (see ``_run_parallel``)."""
    ledger = Ledger.create()
    run_dir = results_root / ledger.data.run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    ledger.data.results_dir = str(run_dir.resolve())
    ledger.save()
    (run_dir / "INCOMPLETE").write_text("the run has not finished (or was interrupted)\n")
    result = RunResult(run_id=ledger.data.run_id, started=now_iso())
    report: doctor.DoctorReport | None = None
    try:
        progress(f"run {ledger.data.run_id}: probing the machine")
        # tshark's version (0.25 s, most of the probe) is asked while the run goes on.
        report = doctor.probe(later=("tshark",))
        result.environment = {**doctor.fingerprint(report), "git_commit": _git_commit(),
                              "playbooks": {p.file: p.sha256 for p in playbooks}}
        if jobs > 1:
            result.environment["jobs"] = jobs
        ctx = RunContext(run_dir, ledger, report, progress)
        result.write(run_dir)
        units: list[tuple[Playbook, str, int, str, ScenarioResult]] = []
        for pb in playbooks:
            for rep in range(1, pb.repeat + 1):
                scenario = ScenarioResult(pb.name, pb.file, pb.sha256, pb.claim,
                                          pb.description, pb.params, rep)
                result.scenarios.append(scenario)
                for transport in pb.transports:
                    if transports and transport not in transports:
                        continue
                    label = (f"{pb.claim + ' ' if pb.claim else ''}{pb.name}"
                             f"{f' #{rep}/{pb.repeat}' if pb.repeat > 1 else ''} "
                             f"[TLS/{transport.upper()}]")
                    units.append((pb, transport, rep, label, scenario))
        if jobs > 1 and len(units) > 1:
            _run_parallel(units, ctx, result, jobs)
        else:
            for pb, transport, rep, label, scenario in units:
                scenario.transports[transport] = run_transport(pb, transport, rep, ctx, label)
                result.write(run_dir)
        result.complete = True
    finally:
        with signals_held():
            try:
                if report is not None and report.pending:
                    result.environment["tools"] = doctor.fingerprint(report.settle())["tools"]
                result.finished = now_iso()
                result.write(run_dir)
                if result.complete:
                    (run_dir / "INCOMPLETE").unlink(missing_ok=True)
            finally:
                ledger.release_all()
                ledger.close()
    return result, run_dir


def _run_parallel(units: list[tuple[Playbook, str, int, str, ScenarioResult]],
                  ctx: RunContext, result: RunResult, jobs: int) -> None:
    """Run the units ``jobs`` at a time, each slot a thread with a ledger of its own (its
    own tag, so its namespaces never collide with another slot's, and ``testbed clean``
    finds them if the run dies). Results land in their scenario in playbook order.

    On an interrupt (KeyboardInterrupt in the main thread) no new unit starts, every
    slot's ledger is released (its processes stopped, its namespaces deleted, so the units
    in flight end at once, as ERROR), the slots are joined, and the interrupt goes on."""
    if ctx.pki is None:  # made once, before the slots start (as the serial run does)
        ctx.pki = make_pki(ctx.run_dir / "pki", units[0][0].app.sni)
    lock = threading.Lock()
    stop = threading.Event()
    pending = list(reversed(units))
    slots = [Ledger.create(results_dir=str(ctx.run_dir.resolve())) for _ in range(jobs)]
    contexts = {ledger.tag: RunContext(ctx.run_dir, ledger, ctx.report, ctx.progress,
                                       pki=ctx.pki) for ledger in slots}

    def slot(ledger: Ledger) -> None:
        slot_ctx = contexts[ledger.tag]
        while not stop.is_set():
            with lock:
                if not pending:
                    return
                pb, transport, rep, label, scenario = pending.pop()
            tr = run_transport(pb, transport, rep, slot_ctx, label)
            with lock:
                scenario.transports[transport] = tr
                # The transports in the playbook's order, whichever finished first.
                order = [t for t in pb.transports if t in scenario.transports]
                scenario.transports = {t: scenario.transports[t] for t in order}
                result.write(ctx.run_dir)

    threads = [threading.Thread(target=slot, args=(ledger,), name=f"slot-{ledger.tag}",
                                daemon=True) for ledger in slots]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
    except BaseException:
        stop.set()
        for slot_ctx in contexts.values():
            slot_ctx.abandon_analyses()
        for ledger in slots:
            with contextlib.suppress(Exception):
                ledger.release_all()
        for thread in threads:
            thread.join(timeout=60)
        raise
    finally:
        for ledger in slots:
            with contextlib.suppress(Exception):
                ledger.release_all()
            ledger.close()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs (the run's final release): a signal that
    arrives then is acted on once the block is done, as the handler in place before would
    have (``KeyboardInterrupt`` from the CLI's handler, the default action, or nothing if
    ignored). Without this, an interrupt landing inside the release stopped it halfway and
    the run left its namespaces and processes for ``testbed clean``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pending and sys.exc_info()[0] is None:
            handler = old[signal.Signals(pending[0])]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


def _git_commit() -> str | None:
    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    with contextlib.suppress(OSError):
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    return None


def requirements(pb: Playbook, transport: str) -> set[str]:
    needs = set(ALWAYS_REQUIRED) | pb.topology.requirements | set(pb.requires)
    needs |= APPS[pb.app.kind]().requirements(transport)
    for mb in pb.middleboxes:
        needs |= MIDDLEBOXES[mb.kind].requirements(mb.params)
    for attack in pb.attacks:
        needs |= ATTACKS[attack.kind].requires
    return needs


def run_transport(pb: Playbook, transport: str, rep: int, ctx: RunContext,
                  label: str) -> TransportResult:
    say = lambda msg: ctx.progress(f"{label}: {msg}")  # noqa: E731
    missing = ctx.report.missing(requirements(pb, transport))
    if missing:
        reason = "; ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
        say(f"INCONCLUSIVE ({reason})")
        return TransportResult(transport, Verdict.INCONCLUSIVE,
                               f"this machine lacks what the scenario needs: {reason}",
                               missing=missing)
    evidence_dir = ctx.run_dir / pb.name / (transport if pb.repeat == 1 else
                                            f"{transport}.{rep}")
    evidence_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        tr = _measure(pb, transport, ctx, evidence_dir, say)
    except TestbedError as exc:
        say(f"ERROR: {exc}")
        tr = TransportResult(transport, Verdict.ERROR, f"the testbed failed: {exc}")
    except Exception as exc:  # a testbed bug: record it, keep the run and its cleanup going
        trace = evidence_dir / "internal-error.txt"
        trace.write_text(traceback.format_exc())
        say(f"ERROR (internal): {exc!r}; traceback in {trace}")
        tr = TransportResult(transport, Verdict.ERROR,
                             f"internal testbed error {exc!r} (traceback in {ctx.rel(trace)})",
                             evidence={"internal_error": ctx.rel(trace)})
    tr.timings["total_s"] = round(time.monotonic() - t0, 3)
    (evidence_dir / "verdict.json").write_text(json.dumps(tr.to_json(), indent=2, default=str))
    say(f"{tr.verdict.value} in {tr.timings['total_s']:.1f}s — {tr.reason}")
    return tr


def _payload(ctx: RunContext, size: int) -> tuple[Path, str]:
    """A deterministic payload of ``size`` bytes in the run's temporary directory."""
    if ctx.payload_dir is None:
        ctx.payload_dir = Path(f"/tmp/{ctx.ledger.tag}-payload")
        ctx.ledger.add_temp_dir(str(ctx.payload_dir))
        ctx.payload_dir.mkdir(mode=0o755)
    path = ctx.payload_dir / f"payload-{size}.bin"
    digest = hashlib.sha256()
    if not path.exists():
        with path.open("wb") as f:
            block = hashlib.sha256(str(size).encode()).digest() * (PAYLOAD_CHUNK // 32)
            left = size
            while left:
                chunk = block[:min(left, len(block))]
                f.write(chunk)
                left -= len(chunk)
    with path.open("rb") as f:
        while chunk := f.read(PAYLOAD_CHUNK):
            digest.update(chunk)
    os.chmod(path, 0o644)
    return path, digest.hexdigest()


@contextlib.contextmanager
def _middleboxes(pb: Playbook, net: Network, evidence_dir: Path, say: Progress
                 ) -> Iterator[list[Middlebox]]:
    """Install the playbook's middleboxes in their slot nodes; remove them however the
    block ends (teardown also cleans up after a failed setup)."""
    boxes: list[Middlebox] = []
    try:
        for spec in pb.middleboxes:
            box = MIDDLEBOXES[spec.kind](spec.where, spec.params)
            box.evidence_dir = evidence_dir
            boxes.append(box)
            node = net.nodes[net.spec.middlebox_slots[spec.where]]
            say(f"middlebox {spec.kind} on {spec.where} ({node.name})")
            box.setup(node, net, spec.where)
        yield boxes
    finally:
        failures = []
        for box in reversed(boxes):
            try:
                box.teardown()
            except TestbedError as exc:
                failures.append(f"{box.kind} on {box.path}: {exc}")
        if failures and sys.exc_info()[0] is None:
            raise RuntimeFailure("middlebox teardown failed: " + "; ".join(failures))


def _middlebox_evidence(boxes: list[Middlebox], evidence_dir: Path, ctx: RunContext,
                        evidence: dict[str, str]) -> None:
    for box in boxes:
        box.stop_recording()
        if box.upstream_pcap is not None:
            evidence[f"middlebox_pcap.{box.path}.{box.kind}"] = ctx.rel(box.upstream_pcap)
        path = evidence_dir / f"middlebox-{box.path}-{box.kind}.txt"
        path.write_text(box.report())
        evidence[f"middlebox.{box.path}.{box.kind}"] = ctx.rel(path)


def _place_attackers(pb: Playbook) -> tuple[TopologySpec,
                                             list[tuple[PluginSpec, Attachment, Tap | None]]]:
    """Extend the topology with one attacker node per attack, at its position."""
    topology = pb.topology
    placed = []
    for spec in pb.attacks:
        topology, att, tap = attach(topology, spec.where, spec.params.get("path"))
        placed.append((spec, att, tap))
    return topology, placed


@contextlib.contextmanager
def _attacks(placed: list[tuple[PluginSpec, Attachment, Tap | None]], net: Network,
             transport: str, pb: Playbook, evidence_dir: Path, pcaps: dict[str, Path],
             say: Progress) -> Iterator[list[Attack]]:
    """Instantiate the attacks in their nodes; tear them all down however the block ends."""
    attacks: list[Attack] = []
    try:
        server = net.node_of_role("server")
        for spec, att, _tap in placed:
            actx = AttackContext(net=net, node=net.nodes[att.node], attachment=att,
                                 transport=transport, client=net.node_of_role("client"),
                                 server=server, server_address=net.address(server.name),
                                 port=pb.app.port, sni=pb.app.sni, app_bytes=pb.app.bytes,
                                 evidence_dir=evidence_dir,
                                 say=lambda m, k=spec.kind: say(f"attack {k}: {m}"),
                                 victim_pcaps=pcaps)
            attacks.append(ATTACKS[spec.kind](dict(spec.params), actx))
        yield attacks
    finally:
        for attack in reversed(attacks):
            with contextlib.suppress(Exception):
                attack.teardown()


SETTLE_TIMEOUT_S = 3.0


def _established_subflows(net: Network, port: int) -> int:
    client = net.node_of_role("client")
    res = client.run(["ss", "-Htn", "state", "established", f"dport = :{port}"], timeout=5,
                     check=False)
    return len([line for line in res.stdout.splitlines() if line.strip()])


def _run_with_attacks(app: Any, app_ctx: AppContext, net: Network, attacks: list[Attack],
                      say: Progress, timings: dict[str, float]
                      ) -> tuple[Any, dict[str, dict[str, int]] | None]:
    """Run the victim client in a thread; once its subflows settled, let the attacks act.

    Returns the outcome and the counters at the moment the attacks started (the baseline
    of ``counters_during_attack``: the victim's own handshakes are not in it).
    """
    client = net.node_of_role("client")
    want = 1 + len(net.plan.endpoints) if app_ctx.transport == "mptcp" else 1
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(app.run_client, client, app_ctx)
        t0 = time.monotonic()
        seen = 0
        while time.monotonic() - t0 < SETTLE_TIMEOUT_S and not future.done():
            seen = _established_subflows(net, app_ctx.port)
            if seen >= want:
                break
            time.sleep(0.02)
        timings["settle_s"] = round(time.monotonic() - t0, 3)
        say(f"victim settled with {seen} subflow(s) in {timings['settle_s']}s; attacking")
        mid = {name: snapshot_counters(node) for name, node in net.nodes.items()}
        if future.done():
            say("the victim finished before the attack could start: make the transfer longer")
        for attack in attacks:
            attack.act()
        return future.result(), mid


def report_key(kind: str, index: int, taken: Container[str]) -> str:
    """Where a plugin's report goes in the facts (``expect: {attack|middlebox: {key: ...}}``):
    its kind, or ``kind[index]`` (its position in the playbook's list) when an earlier one
    of the kind took that."""
    return kind if kind not in taken else f"{kind}[{index}]"


def _finish_attacks(attacks: list[Attack], evidence_dir: Path, ctx: RunContext,
                    evidence: dict[str, str]) -> dict[str, Any]:
    reports: dict[str, Any] = {}
    for i, attack in enumerate(attacks):
        key = report_key(attack.kind, i, reports)
        reports[key] = attack.finish()
        path = evidence_dir / f"attack-{attack.ctx.attachment.node}.json"
        path.write_text(json.dumps(reports[key], indent=1, default=str))
        evidence[f"attack.{key}"] = ctx.rel(path)
        for extra in sorted(evidence_dir.glob(f"attack-{attack.ctx.attachment.node}-*")):
            evidence[f"attack.{key}.{extra.name}"] = ctx.rel(extra)
    return reports


@contextlib.contextmanager
def _server(app: Any, node: Node, app_ctx: AppContext) -> Iterator[list[ServerHandle]]:
    """A slot for the app's server, launched within the block (``launch_server``, into the
    list): stopped when the block ends if the body has not stopped it, e.g. when the
    recorders it was launched alongside fail to start."""
    launched: list[ServerHandle] = []
    try:
        yield launched
    finally:
        for handle in launched:
            if handle.proc.poll() is None:
                with contextlib.suppress(Exception):
                    app.stop_server(node, handle)


@contextlib.contextmanager
def _recording(net: Network, evidence_dir: Path, ctx: RunContext, evidence: dict[str, str],
               analyses: dict[str, PcapAnalysis], analyse: Callable[[Path], PcapAnalysis],
               meanwhile: Callable[[], None] = lambda: None) -> Iterator[dict[str, Path]]:
    """Start one capture per path and the MPTCP monitors; stop them however the block ends.

    The recorders' start-up times overlap, and so do their exits (all are signalled before
    any is waited for). Order: the monitors start (and are waited for) first, so that they
    see the server's listener being created; then ``meanwhile`` (the server's launch: a
    listening server sends nothing) and the captures are launched, its start-up overlapping
    theirs; then the captures are waited for. Each capture's observer analysis
    (``analyses``, started by the caller before the network was built; ``analyse`` for a
    path it did not foresee; the caller closes them all) is fed the capture as it is
    written, once tcpdump records."""
    captures: list[Capture] = []
    monitors: list[MptcpMonitor] = []
    pcaps: dict[str, Path] = {}
    try:
        for role in ("client", "server"):
            for node in (n for n in net.nodes.values() if n.role == role):
                path = evidence_dir / f"mptcp-monitor-{node.name}.txt"
                monitors.append(MptcpMonitor.launch(node, path))
                evidence[f"mptcp_monitor.{node.name}"] = ctx.rel(path)
        for mon in monitors:
            mon.wait_ready()
        meanwhile()
        for link in net.spec.links:
            if not link.capture or link.path in pcaps:
                continue
            # Observe from the access-network side, as a tap on that path would.
            intf = net.plan.interface(link.b, link.a)
            pcap = evidence_dir / f"{link.path}.pcap"
            captures.append(Capture.launch(net.nodes[link.b], intf.ifname, pcap,
                                           f"capture {link.path}"))
            pcaps[link.path] = pcap
            evidence[f"pcap.{link.path}"] = ctx.rel(pcap)
        for path_name, pcap in pcaps.items():
            if path_name not in analyses or analyses[path_name].pcap != pcap:
                if path_name in analyses:
                    analyses[path_name].close()
                analyses[path_name] = analyse(pcap)
        for cap in captures:
            cap.wait_ready()
        for analysis in analyses.values():
            analysis.follow()  # feed tshark the capture as tcpdump writes it
        yield pcaps
    finally:
        recorders = (*captures, *monitors)
        for rec in recorders:
            with contextlib.suppress(Exception):
                rec.request_stop()
        for rec in recorders:
            with contextlib.suppress(Exception):
                rec.stop()


def _measure(pb: Playbook, transport: str, ctx: RunContext, evidence_dir: Path,
             say: Progress) -> TransportResult:
    """One transport of a scenario. The early tshark passes (``analyses``) are stopped by
    PID here however the measurement ends (error, interrupt, SIGTERM turned exception)."""
    analyses: dict[str, PcapAnalysis] = {}
    try:
        return _measure_with(pb, transport, ctx, evidence_dir, say, analyses)
    finally:
        for analysis in analyses.values():
            analysis.close()
        with ctx.analyses_lock:
            ctx.analyses.clear()


def _measure_with(pb: Playbook, transport: str, ctx: RunContext, evidence_dir: Path,
                  say: Progress, analyses: dict[str, PcapAnalysis]) -> TransportResult:
    if ctx.pki is None:
        ctx.pki = make_pki(ctx.run_dir / "pki", pb.app.sni)
    payload, payload_sha = _payload(ctx, pb.app.bytes)
    app = APPS[pb.app.kind]()
    evidence: dict[str, str] = {}
    timings: dict[str, float] = {}
    sysctls = {"*": dict(pb.sysctls)} if pb.sysctls else None
    say("building network")
    topology, placed = _place_attackers(pb)
    taps = [tap for _spec, _att, tap in placed if tap is not None]

    def analyse(pcap: Path) -> PcapAnalysis:
        analysis = PcapAnalysis.start(pcap, sni=pb.app.sni, ledger=ctx.ledger)
        with ctx.analyses_lock:
            ctx.analyses.append(analysis)
        return analysis

    # The observer's tshark passes start now (they need only the SNI), so that their
    # start-up, at low priority, overlaps the build, the recorders' start and the transfer.
    for path in dict.fromkeys(link.path for link in topology.links if link.capture):
        analyses[path] = analyse(evidence_dir / f"{path}.pcap")
    with Network.up(topology, ctx.ledger, sysctls=sysctls, taps=taps) as net, \
            _middleboxes(pb, net, evidence_dir, say) as boxes:
        timings["build_s"] = round(net.build_s, 3)
        client = net.node_of_role("client")
        server = net.node_of_role("server")
        server_addr = net.address(server.name)
        app_ctx = AppContext(workdir=evidence_dir, pki=ctx.pki, transport=transport,
                             server_address=server_addr, port=pb.app.port, sni=pb.app.sni,
                             payload=payload, payload_sha256=payload_sha,
                             timeout_s=pb.app.timeout_s,
                             split_client_hello=pb.app.split_client_hello,
                             split_at=pb.app.split_at, split_steer=pb.app.split_steer,
                             tls=pb.app.tls)

        def launch_server() -> None:
            # A listening server sends nothing and moves no counter: it may start while the
            # recorders get ready; it is waited for (listening) after them.
            say(f"starting {pb.app.kind} server")
            launched.append(app.launch_server(server, app_ctx))

        with _server(app, server, app_ctx) as launched, \
                _recording(net, evidence_dir, ctx, evidence, analyses, analyse,
                           launch_server) as pcaps, \
                _attacks(placed, net, transport, pb, evidence_dir, pcaps, say) as attacks:
            handle = launched[0]
            try:
                app.wait_server(server, handle)
                before = {name: snapshot_counters(node) for name, node in net.nodes.items()}
                for attack in attacks:
                    attack.prepare()
                say(f"client fetching {pb.app.bytes} bytes over {transport}")
                sampler = SsSampler.start(client)
                t1 = time.monotonic()
                for box in boxes:
                    box.on_transfer_start()
                try:
                    if attacks:
                        outcome, mid = _run_with_attacks(app, app_ctx, net, attacks, say,
                                                         timings)
                    else:
                        outcome, mid = app.run_client(client, app_ctx), None
                finally:
                    samples = sampler.stop()
                timings["client_s"] = round(time.monotonic() - t1, 3)
            finally:
                app.stop_server(server, handle)
            after = {name: snapshot_counters(node) for name, node in net.nodes.items()}
            reports = _finish_attacks(attacks, evidence_dir, ctx, evidence)
        _middlebox_evidence(boxes, evidence_dir, ctx, evidence)
        counters = {name: diff(before[name], after[name]) for name in net.nodes}
        ss_path = evidence_dir / "ss-client.json"
        ss_path.write_text(json.dumps(samples, indent=1, default=str))
        evidence["ss.client"] = ctx.rel(ss_path)
    counters_path = evidence_dir / "counters.json"
    counters_path.write_text(json.dumps(counters, indent=1, sort_keys=True))
    evidence["counters"] = ctx.rel(counters_path)
    outcome_json = outcome.to_json()
    outcome_path = evidence_dir / "app-outcome.json"
    outcome_path.write_text(json.dumps(outcome_json, indent=1))
    evidence["app_outcome"] = ctx.rel(outcome_path)

    say("analysing captures with tshark")
    # The passes have read each capture as it was written; one thread per pcap waits for
    # the last rows (separate tshark processes: both cores). The threads do not touch the
    # ledger; the passes are closed (and forgotten) in _measure.
    with ThreadPoolExecutor(max_workers=max(1, len(pcaps))) as pool:
        futures = {path: pool.submit(analyses[path].summarize, server_addresses=[server_addr],
                                     total_app_bytes=pb.app.bytes)
                   for path in pcaps}
        observers: dict[str, dict[str, Any]] = {path: f.result() for path, f in futures.items()}
    observers_path = evidence_dir / "observers.json"
    observers_path.write_text(json.dumps(observers, indent=1))
    evidence["observers"] = ctx.rel(observers_path)

    facts = derive_facts(transport=transport, outcome=outcome_json, counters=counters,
                         observers=observers, server=server.name, app_bytes=pb.app.bytes)
    mb_facts = {**facts, "outcome": outcome_json}
    mb_reports: dict[str, Any] = {}
    for i, box in enumerate(boxes):
        if report := box.finish(mb_facts):
            mb_reports[report_key(box.kind, i, mb_reports)] = report
    if mb_reports:
        facts["middlebox"] = mb_reports
    if placed:
        facts["attack"] = reports
        if mid is not None:
            facts["counters_during_attack"] = {name: diff(mid[name], after[name])
                                               for name in mid}
    checks = evaluate(pb.expect.get(transport, []), facts)
    verdict, reason = verdict_from_checks(checks)
    return TransportResult(transport, verdict, reason, checks, facts, outcome_json, evidence,
                           timings=timings)
