"""Targets, the printed table and the plot of a benchmark result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.bench.stats import spread

OVERHEAD_MAX = 1.5
DUAL_PATH_MAX_S = 0.3
BASELINE_SCENARIO_MAX_S = 2.0
MATRIX_MAX_S = 90.0
FIDELITY_MIN = 0.95
ATTACK_MIN_PPS = 20_000


def _t(tid: str, what: str, target: str, measured: Any, met: bool | None) -> dict[str, Any]:
    return {"id": tid, "what": what, "target": target, "measured": measured, "met": met}


def targets(sec: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    topo = sec.get("topology")
    if topo:
        for e in topo["sizes"]:
            r = e["ratio"]["ns_veth"]["median"]
            out.append(_t(f"topology.overhead.{e['nodes']}",
                          f"testbed up+down / plain ip (namespaces + veths), {e['nodes']} nodes",
                          f"<= {OVERHEAD_MAX}", r, r is not None and r <= OVERHEAD_MAX))
        d = topo["dual_path"]["testbed"]["total_s"]["median"]
        out.append(_t("topology.dual_path_s", "dual_path up+down (s)",
                      f"< {DUAL_PATH_MAX_S}", d, d < DUAL_PATH_MAX_S))
    scen = sec.get("scenarios")
    if scen:
        for e in scen["playbooks"]:
            if e["playbook"] == "baseline" and e["wall_s"]["median"] is not None:
                w = e["wall_s"]["median"]
                out.append(_t("scenario.baseline_s", "baseline playbook, both transports (s)",
                              f"< {BASELINE_SCENARIO_MAX_S}", w, w < BASELINE_SCENARIO_MAX_S))
        par = scen.get("baseline_parallel_s")
        if par and par["median"] is not None:
            w = par["median"]
            out.append(_t("scenario.baseline_parallel_s", "baseline playbook, both transports, "
                          f"--jobs {scen['parallel_jobs']} (s)", f"< {BASELINE_SCENARIO_MAX_S}",
                          w, w < BASELINE_SCENARIO_MAX_S))
        for jobs in scen.get("matrix_jobs") or ():
            wall = scen.get(f"matrix_jobs{jobs}_s")
            if wall is not None:
                out.append(_t(f"scenario.matrix_jobs{jobs}_s", f"whole claims matrix, --jobs "
                              f"{jobs} (s)", f"< {MATRIX_MAX_S}", wall, wall < MATRIX_MAX_S))
    fid = sec.get("fidelity")
    for tid, f in (("fidelity", fid), ("fidelity_jumbo", (fid or {}).get("jumbo"))):
        if not f:
            continue
        t, m = f["tcp"]["fraction_of_one_path"], f["mptcp"]["fraction_of_sum"]
        mtu = f.get("mtu", 1500)
        out.append(_t(f"{tid}.tcp", f"TCP goodput / one path's rate, MTU {mtu}",
                      f">= {FIDELITY_MIN}", t, t >= FIDELITY_MIN))
        out.append(_t(f"{tid}.mptcp", f"MPTCP goodput / sum of the rates, MTU {mtu} "
                      f"(headers allow {f['ceiling']['mptcp']:.1%})",
                      f">= {FIDELITY_MIN}", m, m >= FIDELITY_MIN))
    mc = sec.get("many_connections")
    if mc:
        out.append(_t("many_connections.success", f"{mc['conns']} TLS/MPTCP via NAT: success",
                      "== 1.0", mc["success_rate"], mc["success_rate"] == 1.0))
    ar = sec.get("attack_rate")
    if ar:
        r = ar["rawsend"]["rate_pps"]["median"]
        out.append(_t("attack_rate.rawsend", "MP_JOIN SYNs/s, one core (rawsend)",
                      f">= {ATTACK_MIN_PPS}", r, r >= ATTACK_MIN_PPS))
    return out


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    sec = res["sections"]
    if "topology" in sec:
        for e in [*sec["topology"]["sizes"], {**sec["topology"]["dual_path"], "dual": True}]:
            name = "dual_path" if e.get("dual") else f"chain {e['nodes']}"
            rows.append((f"topology {name} up+down", spread(e["testbed"]["total_s"], " s"),
                         f"ns_veth {spread(e['ns_veth']['total_s'], ' s')} "
                         f"x{e['ratio']['ns_veth']['median']}; +routes "
                         f"{spread(e['ns_veth_routes']['total_s'], ' s')} "
                         f"x{e['ratio']['ns_veth_routes']['median']}"))
    if "scenarios" in sec:
        for e in sec["scenarios"]["playbooks"]:
            rows.append((f"scenario {e['playbook']}", spread(e["wall_s"], " s", 2),
                         e.get("error", "") or " ".join(e["verdicts"])))
        rows.append(("scenario all playbooks", f"{sec['scenarios']['all_playbooks_s']} s", ""))
        scen = sec["scenarios"]
        if scen.get("baseline_parallel_s"):
            rows.append((f"scenario baseline --jobs {scen['parallel_jobs']}",
                         spread(scen["baseline_parallel_s"], " s", 2), ""))
        for jobs in scen.get("matrix_jobs") or ():
            if f"matrix_jobs{jobs}_s" in scen:
                verdicts = scen[f"matrix_jobs{jobs}_verdicts"]
                same = ("" if jobs == 1 else "; the same as --jobs 1"
                        if verdicts == scen.get("matrix_jobs1_verdicts")
                        else "; DIFFERENT from --jobs 1")
                rows.append((f"claims matrix --jobs {jobs}", f"{scen[f'matrix_jobs{jobs}_s']} s",
                             f"{len(verdicts)} verdicts{same}"))
    runs = [(key, sec[key]) for key in ("fidelity", "unshaped") if key in sec]
    if "jumbo" in sec.get("fidelity", {}):
        runs.insert(1, ("fidelity MTU 9000", sec["fidelity"]["jumbo"]))
    for key, f in runs:
        if f:
            for tr in ("tcp", "mptcp"):
                extra = ""
                if f.get("rate_mbit_per_path"):
                    frac = f[tr].get("fraction_of_one_path", f[tr].get("fraction_of_sum"))
                    extra = (f"{frac:.1%} of rate; headers allow at most "
                             f"{f['ceiling'][tr]:.1%} (full-size segments)")
                rows.append((f"{key} {tr} goodput", spread(f[tr]["goodput_mbit"], " Mbit/s", 1),
                             extra))
    if "many_connections" in sec:
        m = sec["many_connections"]
        h = m["handshake_ms"]
        rows.append((f"{m['conns']} TLS/MPTCP conns via NAT",
                     f"{m['success_rate']:.1%} ok",
                     f"handshake p50 {h['p50']} p90 {h['p90']} p99 {h['p99']} ms; "
                     f"orchestrator {m['orchestrator']['cpu_s']} s CPU, "
                     f"{m['orchestrator']['max_rss_kib'] // 1024} MiB max RSS"))
    if "attack_rate" in sec:
        a = sec["attack_rate"]
        rows.append(("MP_JOIN SYN rate (rawsend)", spread(a["rawsend"]["rate_pps"], "/s", 0),
                     f"scapy {a['scapy']['rate_pps']:.0f}/s; join_guessed_token's sender "
                     f"{a.get('join_guessed_token', {}).get('rate_pps', '-')}/s; 1 live token: "
                     f"{a['expected_guess_time_s']['1'] / 3600:.1f} h"))
    w = max((len(r[0]) for r in rows), default=10)
    v = max((len(r[1]) for r in rows), default=10)
    lines = [f"{'figure':<{w}}  {'median [min-max]':<{v}}  notes", "-" * (w + v + 40)]
    lines += [f"{a:<{w}}  {b:<{v}}  {c}" for a, b, c in rows]
    lines.append("")
    lines.append("targets:")
    for t in res.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        lines.append(f"  {mark:<6} {t['id']}: {t['measured']} (target {t['target']})")
    env = res["environment"]
    lines.append(f"load average before {env.get('load_before')} after {env.get('load_after')}")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = res["sections"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    fig.suptitle(f"testbed benchmark {res['id']} (load {res['environment']['load_before']})")

    def err(s: dict[str, Any]) -> list[float]:
        return [s["median"] - s["min"], s["max"] - s["median"]]

    ax = axes[0][0]
    if "topology" in sec:
        sizes = sec["topology"]["sizes"]
        xs = [e["nodes"] for e in sizes]
        for kind in ("testbed", "ns_veth", "ns_veth_routes"):
            med = [e[kind]["total_s"]["median"] for e in sizes]
            ee = list(zip(*(err(e[kind]["total_s"]) for e in sizes), strict=True))
            ax.errorbar(xs, med, yerr=ee, marker="o", capsize=3, label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    ax.set_title("topology up+down (s) vs nodes")
    ax = axes[0][1]
    if "scenarios" in sec:
        pbs = [e for e in sec["scenarios"]["playbooks"] if e["wall_s"]["median"] is not None]
        ax.barh([e["playbook"] for e in pbs], [e["wall_s"]["median"] for e in pbs],
                xerr=list(zip(*(err(e["wall_s"]) for e in pbs), strict=True)) if pbs else None)
        ax.axvline(2.0, color="r", ls="--", lw=1)
    ax.set_title("scenario wall time (s), both transports")
    for ax, key in ((axes[0][2], "fidelity"), (axes[1][0], "unshaped")):
        if key in sec:
            f = sec[key]
            bars = [(t, f[t]["goodput_mbit"]) for t in ("tcp", "mptcp")]
            if "jumbo" in f:
                bars += [(f"{t}\nMTU 9000", f["jumbo"][t]["goodput_mbit"])
                         for t in ("tcp", "mptcp")]
            ax.bar([b[0] for b in bars], [b[1]["median"] for b in bars],
                   yerr=list(zip(*(err(b[1]) for b in bars), strict=True)), capsize=4)
            if f.get("rate_mbit_per_path"):
                r = f["rate_mbit_per_path"]
                for i in range(0, len(bars), 2):  # one path's rate for TCP, the sum for MPTCP
                    ax.hlines([r, 2 * r], [i - 0.4, i + 0.6], [i + 0.4, i + 1.4], colors="r",
                              linestyles="--")
        ax.set_title(f"{key} goodput (Mbit/s)")
    ax = axes[1][1]
    if "many_connections" in sec:
        h = sec["many_connections"]["handshake_ms"]
        c = sec["many_connections"].get("connect_ms", {})
        ks = [k for k in ("p50", "p90", "p99", "max") if h.get(k) is not None]
        xs = list(range(len(ks)))
        ax.bar([x - 0.2 for x in xs], [h[k] for k in ks], width=0.4, label="TLS handshake")
        if c:
            ax.bar([x + 0.2 for x in xs], [c.get(k) or 0 for k in ks], width=0.4,
                   label="TCP/MPTCP connect")
        ax.set_xticks(xs, ks)
        ax.legend(fontsize=8)
        ax.set_title(f"{sec['many_connections']['conns']} TLS/MPTCP via NAT: latency (ms), "
                     f"{sec['many_connections']['success_rate']:.1%} ok", fontsize=9)
    ax = axes[1][2]
    if "attack_rate" in sec:
        a = sec["attack_rate"]
        names = ["rawsend", "scapy send()"]
        vals = [a["rawsend"]["rate_pps"]["median"], a["scapy"]["rate_pps"]]
        if a.get("join_guessed_token", {}).get("rate_pps"):
            names.append("join_guessed_token")
            vals.append(a["join_guessed_token"]["rate_pps"])
        ax.bar(names, vals, log=True)
        ax.tick_params(axis="x", labelsize=8)
        ax.axhline(20_000, color="r", ls="--", lw=1)
    ax.set_title("MP_JOIN SYNs/s, one core")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
