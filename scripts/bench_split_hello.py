"""The cost of the split-ClientHello client (claim S1): extra connection set-up time.

    sudo .venv/bin/python scripts/bench_split_hello.py [--n 25] [--cell-rate 1] [--out DIR]

For each network variant it builds the dual-path network once (a fresh one per variant),
starts the python TLS server, and runs the python client ``--n`` times in default mode and
``--n`` times in split mode, interleaved (default, split, split, default, ...) so that drift
hits both alike. Every client is a fresh process and a fresh MPTCP connection; the figure
is the client's own ``handshake_s``: from just before ``connect()`` to the end of the TLS
handshake (so it contains the TCP/MPTCP handshake, the ClientHello and, for the split
client, the wait for the second subflow and the steering).

Variants: the second (cellular) path unlimited, and rate-limited to ``--cell-rate`` Mbit/s
(TBF, both directions); with ``sch_netem`` (``testbed doctor``) also extra one-way delays on
the cellular link (``--cell-delays``), else those rows say INCONCLUSIVE and why.

Writes ``bench.json`` (every sample, and the split client's own timeline per connection)
and ``bench.md`` (the table in README) to ``--out`` (default results/bench-split-hello-<t>).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.apps import APPS, AppContext  # noqa: E402
from testbed.model.topology import load_topology  # noqa: E402
from testbed.runtime import doctor  # noqa: E402
from testbed.runtime.ledger import Ledger  # noqa: E402
from testbed.runtime.network import Network  # noqa: E402
from testbed.runtime.pki import make_pki  # noqa: E402

SNI = "www.example.test"
PAYLOAD_BYTES = 4096
WIFI_RATE_MBIT = 50


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 3),
            "p25_ms": round(quantile(ms, 0.25), 3), "p75_ms": round(quantile(ms, 0.75), 3),
            "iqr_ms": round(quantile(ms, 0.75) - quantile(ms, 0.25), 3),
            "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3),
            "mean_ms": round(statistics.fmean(ms), 3),
            "stdev_ms": round(statistics.stdev(ms), 3) if len(ms) > 1 else 0.0}


def run_variant(name: str, topo_params: dict[str, Any], n: int, work: Path,
                ledger: Ledger) -> dict[str, Any]:
    spec = load_topology("dual_path", topo_params)
    payload = work / "payload.bin"
    if not payload.exists():
        payload.write_bytes(bytes(range(256)) * (PAYLOAD_BYTES // 256))
    sha = hashlib.sha256(payload.read_bytes()).hexdigest()
    pki = make_pki(work / "pki", SNI)
    app = APPS["python"]()
    samples: dict[str, list[float]] = {"default": [], "split": []}
    failures: list[dict[str, Any]] = []
    timelines: list[dict[str, Any]] = []
    with Network.up(spec, ledger) as net:
        client, server = net.nodes["client"], net.nodes["server"]
        base = AppContext(workdir=work / name, pki=pki, transport="mptcp",
                          server_address=net.address("server"), port=443, sni=SNI,
                          payload=payload, payload_sha256=sha, timeout_s=15)
        base.workdir.mkdir(parents=True, exist_ok=True)
        handle = app.start_server(server, base)
        try:
            for i in range(n):
                order = ("default", "split") if i % 2 == 0 else ("split", "default")
                for mode in order:
                    ctx = AppContext(**{**base.__dict__,
                                        "split_client_hello": mode == "split"})
                    out = app.run_client(client, ctx).to_json()
                    if out["status"] != "ok" or out["handshake_s"] is None:
                        failures.append({"mode": mode, "i": i, "status": out["status"],
                                         "error": out["error"]})
                        continue
                    samples[mode].append(float(out["handshake_s"]))
                    split = (out.get("extra") or {}).get("split")
                    if split:
                        timelines.append(split)
                        if not split.get("rest_on_second_only"):
                            failures.append({"mode": mode, "i": i, "status": "leaked",
                                             "error": "rest not only on the second subflow"})
        finally:
            app.stop_server(server, handle)
    d, s = samples["default"], samples["split"]
    paired = [b - a for a, b in zip(d, s, strict=False)]
    waits = [t["second_subflow_s"] - t["first_sent_s"] for t in timelines]
    steer = [t["steered_s"] - t["second_subflow_s"] for t in timelines if "steered_s" in t]
    return {"variant": name, "topology_params": topo_params, "status": "measured",
            "default": summary(d), "split": summary(s),
            "extra_median_ms": round((statistics.median(s) - statistics.median(d)) * 1000, 3)
            if d and s else None,
            "paired_difference": summary(paired),
            "split_wait_for_second_subflow": summary(waits),
            "split_steering": summary(steer),
            "failures": failures,
            "samples_s": samples, "split_timelines": timelines}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| second path (cellular) | n | default: median [p25–p75] ms | "
             "split: median [p25–p75] ms | extra (median of split − default) | "
             "split: wait for the 2nd subflow / first part → rest sent, median ms | "
             "failures |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "measured":
            reason = str(r["reason"]).split("; fix:")[0]
            lines.append(f"| {r['variant']} | – | {r['status']}: {reason} | | | | |")
            continue
        d, s = r["default"], r["split"]
        gap = summary([t["rest_sent_s"] - t["first_sent_s"] for t in r["split_timelines"]])
        lines.append(
            f"| {r['variant']} | {d['n']}+{s['n']} | {d['median_ms']:.2f} "
            f"[{d['p25_ms']:.2f}–{d['p75_ms']:.2f}] | {s['median_ms']:.2f} "
            f"[{s['p25_ms']:.2f}–{s['p75_ms']:.2f}] | {r['extra_median_ms']:+.2f} ms "
            f"(paired: {r['paired_difference']['median_ms']:+.2f}, IQR "
            f"{r['paired_difference']['iqr_ms']:.2f}) | "
            f"{r['split_wait_for_second_subflow']['median_ms']:.2f} / "
            f"{gap['median_ms']:.2f} | {len(r['failures'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25, help="connections per client and variant")
    parser.add_argument("--cell-rate", type=float, default=1.0,
                        help="rate limit of the second path, Mbit/s (the limited variant)")
    parser.add_argument("--cell-delays", default="5,25,50",
                        help="one-way delays (ms) on the second path; need netem")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, metavar="BENCH_JSON",
                        help="only print the table of an earlier bench.json")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())["results"]), end="")
        return 0
    if args.n < 20:
        parser.error("--n must be at least 20")
    out = args.out or REPO / "results" / f"bench-split-hello-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    report = doctor.probe()
    variants: list[tuple[str, dict[str, Any], str | None]] = [
        ("unlimited", {"wifi_rate_mbit": WIFI_RATE_MBIT, "cell_rate_mbit": None}, None),
        (f"rate-limited {args.cell_rate:g} Mbit/s",
         {"wifi_rate_mbit": WIFI_RATE_MBIT, "cell_rate_mbit": args.cell_rate}, None),
    ]
    netem_missing = report.missing({"netem"})
    for delay in (float(x) for x in args.cell_delays.split(",") if x.strip()):
        reason = "; ".join(f"{k}: {v}" for k, v in netem_missing.items()) or None
        variants.append((f"+{delay:g} ms one-way delay (RTT +{2 * delay:g} ms)",
                         {"wifi_rate_mbit": WIFI_RATE_MBIT, "cell_rate_mbit": None,
                          "cell_delay_ms": delay}, reason))

    owner = os.getpid()

    def on_term(signum: int, _frame: Any) -> None:
        if os.getpid() != owner:
            # A forked pyroute2 helper inherited this handler: it must die as by default,
            # never unwind into this process's cleanup (it would delete live namespaces).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    # Other runs on the machine skew timings: the load average is recorded with them.
    load_before = list(os.getloadavg())
    ledger = Ledger.create(results_dir=str(out.resolve()))
    results: list[dict[str, Any]] = []
    try:
        for name, params, missing in variants:
            if missing:
                results.append({"variant": name, "topology_params": params,
                                "status": "INCONCLUSIVE", "reason": missing})
                print(f"{name}: INCONCLUSIVE ({missing})", flush=True)
                continue
            t0 = time.monotonic()
            r = run_variant(name, params, args.n, out, ledger)
            results.append(r)
            print(f"{name}: default {r['default'].get('median_ms')} ms, split "
                  f"{r['split'].get('median_ms')} ms, extra {r['extra_median_ms']} ms, "
                  f"{len(r['failures'])} failures ({time.monotonic() - t0:.0f}s)", flush=True)
    finally:
        ledger.release_all()
        ledger.close()
    env = {**doctor.fingerprint(report), "n": args.n, "payload_bytes": PAYLOAD_BYTES,
           "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())}
    (out / "bench.json").write_text(json.dumps({"environment": env, "results": results},
                                               indent=1, default=str))
    md = table(results)
    (out / "bench.md").write_text(md)
    print(md)
    print(f"written: {out}/bench.json, {out}/bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
