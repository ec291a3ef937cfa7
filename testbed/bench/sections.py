"""Sections 2-6 of the benchmark: scenario time, emulation fidelity, unshaped throughput,
many TLS-over-MPTCP connections through a NAT, MP_JOIN SYN rate."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import testbed
from testbed.apps.base import wait_listening
from testbed.bench.stats import summary
from testbed.middleboxes import MIDDLEBOXES
from testbed.model.attachments import attach
from testbed.model.counters import diff
from testbed.model.playbook import load_playbook
from testbed.model.topology import load_topology
from testbed.runtime.evidence import snapshot_counters
from testbed.runtime.ledger import Ledger
from testbed.runtime.network import Network
from testbed.runtime.node import Node
from testbed.runtime.pki import make_pki
from testbed.runtime.scenario import run_playbooks

REPO = Path(testbed.__file__).resolve().parents[1]
PLAYBOOKS = REPO / "playbooks"
PARALLEL_JOBS = 2  # the baseline has two transports: both at once
MATRIX_JOBS = (1, 2, 3)  # the whole matrix serially, then 2 and 3 transports at once
Say = Callable[[str], None]
PORT = 5201


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _peer(role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "testbed.bench.peers", role, *args]


@contextlib.contextmanager
def _started(node: Node, argv: list[str], port: int, work: Path, label: str
             ) -> Iterator[Any]:
    log = work / f"{label}.log"
    out = work / f"{label}.json"
    with log.open("ab") as err, out.open("wb") as fh:
        proc = node.popen(argv, label=f"bench {label}", stdout=fh, stderr=err, cwd=REPO,
                          env=_env())
    try:
        wait_listening(node, proc, port, log, label)
        yield proc
    finally:
        node.stop(proc)


def _run(node: Node, argv: list[str], work: Path, label: str, timeout_s: float
         ) -> dict[str, Any]:
    out, log = work / f"{label}.json", work / f"{label}.log"
    with out.open("wb") as fh, log.open("ab") as err:
        proc = node.popen(argv, label=f"bench {label}", stdout=fh, stderr=err, cwd=REPO,
                          env=_env())
        try:
            proc.wait(timeout=timeout_s)
        except Exception:
            node.stop(proc)
            raise RuntimeError(f"{label} did not finish within {timeout_s}s") from None
        node.stop(proc)
    lines = [ln for ln in out.read_text().splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"{label} exited {proc.returncode} without a result: "
                           f"{log.read_text()[-800:]}")
    data: dict[str, Any] = json.loads(lines[-1])
    return data


# -- 2. scenario time --------------------------------------------------------------------
def _phase_name(msg: str) -> str:
    msg = msg.split("]: ", 1)[-1]
    for key in ("building network", "starting", "client fetching", "analysing captures",
                "probing the machine", "middlebox", "attack", "victim settled"):
        if key in msg:
            return key
    return "verdict" if " in " in msg and "s — " in msg else msg[:40]


def scenarios(work: Path, quick: bool, repeats: int, say: Say) -> dict[str, Any]:
    names = ["baseline"] if quick else sorted(p.stem for p in PLAYBOOKS.glob("*.yaml"))
    out: dict[str, Any] = {"playbooks": []}
    total_all = 0.0
    for name in names:
        walls: list[float] = []
        per_transport: dict[str, list[float]] = {}
        waits: dict[str, list[float]] = {}
        verdicts: list[str] = []
        error = None
        reps = repeats if name == "baseline" else 1
        for _ in range(reps):
            events: list[tuple[float, str]] = []
            try:
                pb = load_playbook(PLAYBOOKS / f"{name}.yaml")
                t0 = time.monotonic()
                result, _ = run_playbooks([pb], results_root=work / "scenarios",
                                          progress=lambda m, ev=events: ev.append(
                                              (time.monotonic(), m)))
                wall = time.monotonic() - t0
            except Exception as exc:  # an invalid or broken playbook is reported, not fatal
                error = f"{type(exc).__name__}: {exc}"[:500]
                break
            walls.append(wall)
            for sc in result.scenarios:
                for tr_name, tr in sc.transports.items():
                    per_transport.setdefault(tr_name, []).append(tr.timings.get("total_s", 0))
                    verdicts.append(f"{tr_name}:{tr.verdict.value}")
            times = [t0, *(t for t, _ in events)]
            gaps: dict[str, float] = {}
            for (t_a, msg), t_b in zip(events, [*times[2:], time.monotonic()], strict=False):
                key = _phase_name(msg)
                gaps[key] = gaps.get(key, 0.0) + (t_b - t_a)
            for k, v in gaps.items():
                waits.setdefault(k, []).append(v)
        entry: dict[str, Any] = {"playbook": name, "wall_s": summary(walls),
                                 "transport_s": {k: summary(v) for k, v in per_transport.items()},
                                 "phases_s": {k: summary(v) for k, v in waits.items()},
                                 "verdicts": sorted(set(verdicts))}
        if error:
            entry["error"] = error
        if walls:
            total_all += entry["wall_s"]["median"]
            say(f"scenario {name}: {entry['wall_s']['median']:.2f}s {entry['verdicts']}")
        else:
            say(f"scenario {name}: {error}")
        out["playbooks"].append(entry)
    out["all_playbooks_s"] = round(total_all, 3)
    # The same work with two transports in flight at once (testbed run/matrix --jobs 2).
    walls = []
    for _ in range(repeats):
        pb = load_playbook(PLAYBOOKS / "baseline.yaml")
        t0 = time.monotonic()
        result, _ = run_playbooks([pb], results_root=work / "scenarios", jobs=PARALLEL_JOBS)
        walls.append(time.monotonic() - t0)
    out["baseline_parallel_s"] = summary(walls)
    say(f"scenario baseline --jobs {PARALLEL_JOBS}: {out['baseline_parallel_s']['median']:.2f}s")
    if not quick:
        from testbed.cli import matrix_playbooks

        for jobs in MATRIX_JOBS:
            t0 = time.monotonic()
            result, _ = run_playbooks(matrix_playbooks([], []), results_root=work / "matrix",
                                      jobs=jobs)
            wall = time.monotonic() - t0
            out[f"matrix_jobs{jobs}_s"] = round(wall, 3)
            out[f"matrix_jobs{jobs}_verdicts"] = sorted(
                f"{sc.playbook}:{t}:{tr.verdict.value}" for sc in result.scenarios
                for t, tr in sc.transports.items())
            say(f"matrix --jobs {jobs}: {wall:.1f}s")
    out["parallel_jobs"] = PARALLEL_JOBS
    out["matrix_jobs"] = list(MATRIX_JOBS) if not quick else []
    return out


# -- 3 + 4. throughput ---------------------------------------------------------------------
DEFAULT_MTU = 1500
JUMBO_MTU = 9000
ETHERNET_HEADER, TCP_HEADERS, DSS_OPTION = 14, 20 + 20 + 12, 28


def fidelity(ledger: Ledger, work: Path, duration: float, repeats: int,
             say: Say) -> dict[str, Any]:
    """Goodput over 2 x 50 Mbit/s at MTU 1500, and the same at MTU 9000 (``jumbo``): at
    1500 the headers alone cap MPTCP at 93.8 % of the rate, so the jumbo run is the one
    that shows whether the emulation itself delivers what it is configured for."""
    res = throughput(ledger, work / "mtu1500", 50.0, duration, 1.0, repeats, say)
    res["jumbo"] = throughput(ledger, work / "mtu9000", 50.0, duration, 1.0, repeats, say,
                              mtu=JUMBO_MTU)
    return res


def _tbf_bytes(net: Network, client: str) -> int:
    """Bytes the TBF qdiscs toward the client have sent (frames with their Ethernet
    header: what TBF meters against the rate)."""
    total = 0
    for name, node in net.nodes.items():
        for intf in net.plan.interfaces[name]:
            if intf.peer_node != client or not intf.link.rate_mbit:
                continue
            res = node.run(["tc", "-s", "-j", "qdisc", "show", "dev", intf.ifname])
            for q in json.loads(res.stdout or "[]"):
                if q.get("kind") == "tbf":
                    total += int(q.get("bytes", 0))
    return total


def throughput(ledger: Ledger, work: Path, rate_mbit: float | None, duration: float,
               warmup: float, repeats: int, say: Say, mtu: int = DEFAULT_MTU
               ) -> dict[str, Any]:
    """Goodput of TCP and MPTCP over dual_path, its access links shaped to ``rate_mbit``
    (None: unshaped), every link at ``mtu``."""
    params: dict[str, Any] = {"wifi_rate_mbit": rate_mbit, "cell_rate_mbit": rate_mbit}
    spec = load_topology("dual_path", params)
    if mtu != DEFAULT_MTU:
        spec = dataclasses.replace(spec, links=tuple(
            dataclasses.replace(link, mtu=mtu) for link in spec.links))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"rate_mbit_per_path": rate_mbit, "duration_s": duration,
                           "warmup_s": warmup, "mtu": mtu}
    samples: dict[str, dict[str, list[float]]] = {}
    with Network.up(spec, ledger) as net:
        client, server = net.node_of_role("client"), net.node_of_role("server")
        addr = net.address(server.name)
        for rep in range(repeats):
            for transport in ("tcp", "mptcp"):
                label = f"{transport}-{rep}"
                srv = _peer("bulk-server", "--transport", transport, "--port", str(PORT),
                            "--duration", str(duration + warmup))
                with _started(server, srv, PORT, work, f"bulk-server-{label}"):
                    wire0 = _tbf_bytes(net, client.name)
                    data = _run(client, _peer("bulk-client", "--transport", transport,
                                              "--connect", addr, "--port", str(PORT),
                                              "--duration", str(duration),
                                              "--warmup", str(warmup)),
                                work, f"bulk-client-{label}", duration + warmup + 20)
                    wire = _tbf_bytes(net, client.name) - wire0
                s = samples.setdefault(transport, {"goodput": [], "wire": [], "efficiency": [],
                                                   "subflows": []})
                s["goodput"].append(data["goodput_mbit"])
                if wire:
                    # Application bytes per byte metered by TBF, over the whole transfer
                    # (approximate: TBF also counts what was in flight when the client
                    # closed, which the client never read).
                    eff = data["total_bytes"] / wire
                    s["efficiency"].append(eff)
                    s["wire"].append(data["goodput_mbit"] / eff)
                s["subflows"].append(data.get("subflows") or 0)
    for transport, s in samples.items():
        res[transport] = {"goodput_mbit": summary(s["goodput"], 2),
                          "subflows": summary(s["subflows"], 0)}
        if s["wire"]:
            res[transport]["wire_mbit"] = summary(s["wire"], 2)
            res[transport]["app_bytes_per_wire_byte"] = summary(s["efficiency"], 4)
    if rate_mbit:
        res["tcp"]["fraction_of_one_path"] = round(
            res["tcp"]["goodput_mbit"]["median"] / rate_mbit, 4)
        res["mptcp"]["fraction_of_sum"] = round(
            res["mptcp"]["goodput_mbit"]["median"] / (2 * rate_mbit), 4)
        res["tcp"]["wire_fraction"] = round(res["tcp"]["wire_mbit"]["median"] / rate_mbit, 4)
        res["mptcp"]["wire_fraction"] = round(
            res["mptcp"]["wire_mbit"]["median"] / (2 * rate_mbit), 4)
        # Goodput / rate cannot exceed the application bytes per metered byte: at full-sized
        # segments TCP carries MTU - 52 of MTU + 14 bytes (Ethernet 14, IP 20, TCP 20,
        # timestamps 12: 1448 of 1514 at MTU 1500); MPTCP data segments also carry a DSS
        # option (28 bytes seen here: 1420 of 1514).
        frame = mtu + ETHERNET_HEADER
        res["ceiling"] = {"tcp": round((mtu - TCP_HEADERS) / frame, 4),
                          "mptcp": round((mtu - TCP_HEADERS - DSS_OPTION) / frame, 4)}
    else:
        res["mptcp_over_tcp"] = round(res["mptcp"]["goodput_mbit"]["median"] /
                                      res["tcp"]["goodput_mbit"]["median"], 3)
    say(f"throughput rate={rate_mbit} mtu={mtu}: "
        f"tcp {res['tcp']['goodput_mbit']['median']} Mbit/s, "
        f"mptcp {res['mptcp']['goodput_mbit']['median']} Mbit/s")
    return res


# -- 5. many connections ---------------------------------------------------------------------
def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def many_connections(ledger: Ledger, work: Path, conns: int, say: Say) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    sni = "www.example.test"
    pki = make_pki(work / "pki", sni)
    spec = load_topology("dual_path")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    rss0 = _rss_kib()
    t0 = time.monotonic()
    nat = MIDDLEBOXES["nat"]("wifi", {"mode": "masquerade", "random_ports": True})
    with Network.up(spec, ledger) as net:
        client, server = net.node_of_role("client"), net.node_of_role("server")
        addr = net.address(server.name)
        nat.setup(net.nodes[spec.middlebox_slots["wifi"]], net, "wifi")
        try:
            srv = _peer("tls-server", "--transport", "mptcp", "--port", "443",
                        "--cert", str(pki.server_cert), "--key", str(pki.server_key),
                        "--duration", "300", "--timeout", "60")
            with _started(server, srv, 443, work, "tls-server"):
                before = snapshot_counters(server)
                client_res = _run(client, _peer("tls-client", "--transport", "mptcp",
                                                "--connect", addr, "--port", "443",
                                                "--ca", str(pki.ca_cert), "--sni", sni,
                                                "--conns", str(conns), "--timeout", "60"),
                                  work, "tls-client", 180)
                after = snapshot_counters(server)
            nat_report = nat.report()
        finally:
            nat.teardown()
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    counters = diff(before, after)
    res = {
        "conns": conns, "transport": "mptcp", "tls": "TLSv1.3", "nat": "wifi (masquerade)",
        "ok": client_res["ok"], "success_rate": round(client_res["ok"] / conns, 4),
        "errors": client_res["errors"], "handshake_ms": client_res["handshake_ms"],
        "connect_ms": client_res["connect_ms"],
        "client_wall_s": client_res["wall_s"],
        "subflows_sampled": summary(client_res.get("subflows_sampled") or [], 0),
        "server_counters": {k: v for k, v in counters.items()
                            if k.startswith("MPTcpExt") and ("Capable" in k or "Join" in k)},
        "nat_rules_hit": "MASQUERADE" in nat_report,
        "client_usage": client_res["usage"],
        "orchestrator": {"cpu_s": round(ru1.ru_utime + ru1.ru_stime
                                        - ru0.ru_utime - ru0.ru_stime, 3),
                         "wall_s": round(wall, 3), "rss_kib_before": rss0,
                         "rss_kib_after": _rss_kib(), "max_rss_kib": ru1.ru_maxrss},
    }
    say(f"{conns} TLS/MPTCP connections via NAT: {res['ok']} ok, "
        f"handshake p50 {res['handshake_ms']['p50']} ms p99 {res['handshake_ms']['p99']} ms")
    return res


# -- 6. MP_JOIN SYN rate -------------------------------------------------------------------------
SCAPY_SENDER = """
import json, sys, time
from scapy.all import IP, TCP, conf, send
conf.verb = 0
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pkts = [IP(src=src, dst=dst) / TCP(sport=30000 + (i % 30000), dport=443, flags="S",
        options=[("MSS", 1460), (30, bytes([0x10, 0]) + i.to_bytes(4, "big") + b"\\x5e" * 4)])
        for i in range(n)]
t0 = time.monotonic()
send(pkts)
dt = time.monotonic() - t0
print(json.dumps({"sent": n, "seconds": round(dt, 4), "rate_pps": round(n / dt, 1)}))
"""

ATTACK_SENDER = """
import json, os, sys
os.sched_setaffinity(0, {int(sys.argv[5])})
from attacks.mptcp_worker import Wire, op_guess
w = Wire(sys.argv[1], sys.argv[2])
n = int(sys.argv[4])
out = op_guess(w, {"server": sys.argv[3], "port": 443, "attempts": n,
                   "wait_s": 3.0 + n / 10000})
print(json.dumps(out))
"""

RAW_SENDER = """
import json, os, sys
from testbed.runtime.rawsend import flood_join
os.sched_setaffinity(0, {int(sys.argv[4])})
print(json.dumps(flood_join(sys.argv[1], sys.argv[2], 443, duration_s=float(sys.argv[3]))))
"""


def attack_rate(ledger: Ledger, work: Path, duration: float, scapy_packets: int,
                repeats: int, say: Say) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    spec, att, _tap = attach(load_topology("dual_path"), "off_path")
    pki = make_pki(work / "pki", "www.example.test")
    res: dict[str, Any] = {"position": "off_path", "duration_s": duration}
    with Network.up(spec, ledger) as net:
        attacker, server = net.nodes[att.node], net.node_of_role("server")
        src, dst = net.address(attacker.name), net.address(server.name)
        core = max(os.sched_getaffinity(0))
        srv = _peer("tls-server", "--transport", "mptcp", "--port", "443",
                    "--cert", str(pki.server_cert), "--key", str(pki.server_key),
                    "--duration", "300")
        with _started(server, srv, 443, work, "tls-server"):
            rates, received = [], []
            for rep in range(repeats):
                before = snapshot_counters(server)
                data = _run(attacker, [sys.executable, "-c", RAW_SENDER, src, dst,
                                       str(duration), str(core)],
                            work, f"rawsend-{rep}", duration + 30)
                time.sleep(0.2)
                got = diff(before, snapshot_counters(server)).get(
                    "MPTcpExtMPJoinNoTokenFound", 0)
                rates.append(data["rate_pps"])
                received.append(got / data["seconds"])
            res["rawsend"] = {"sender": "testbed.runtime.rawsend.flood_join (sendmmsg, "
                                        "batches of 256, one core)",
                              "rate_pps": summary(rates, 1),
                              "server_no_token_found_per_s": summary(received, 1)}
            before = snapshot_counters(server)
            data = _run(attacker, [sys.executable, "-c", SCAPY_SENDER, src, dst,
                                   str(scapy_packets)], work, "scapy", 120)
            got = diff(before, snapshot_counters(server)).get("MPTcpExtMPJoinNoTokenFound", 0)
            res["scapy"] = {"sender": "scapy send() of a prebuilt list (one sendto per packet)",
                            "packets": scapy_packets, "rate_pps": data["rate_pps"],
                            "server_no_token_found": got}
            # The attack's own sender (attacks.mptcp_worker op_guess, as join_guessed_token
            # uses it): rawsend batches (ports, sequences, tokens patched in place), one
            # pinned core; its rate is attempts / the send loop's time, patching included.
            if (REPO / "attacks" / "mptcp_worker.py").exists():
                iface = net.plan.interfaces[attacker.name][0].ifname
                try:
                    data = _run(attacker, [sys.executable, "-c", ATTACK_SENDER, iface, src, dst,
                                           str(max(scapy_packets * 10, 20000)), str(core)],
                                work, "join_guessed_token", 300)
                    res["join_guessed_token"] = {
                        "sender": f"attacks.mptcp_worker op_guess ({data['sender']})",
                        "attempts": data["attempts"], "rate_pps": data["rate_per_s"],
                        "resets_seen": data["resets"]}
                except Exception as exc:  # another engineer's code: report, don't fail
                    res["join_guessed_token"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            else:
                res["join_guessed_token"] = {"error": "attacks/mptcp_worker.py not in the tree"}
    rate = res["rawsend"]["rate_pps"]["median"]
    res["expected_guess_time_s"] = {str(k): round(2**32 / (rate * k), 1)
                                    for k in (1, 10, 100, 1000)}
    say(f"MP_JOIN SYNs: rawsend {rate:.0f}/s, scapy {res['scapy']['rate_pps']:.0f}/s; "
        f"one live token guessed in ~{res['expected_guess_time_s']['1'] / 3600:.1f} h")
    return res
