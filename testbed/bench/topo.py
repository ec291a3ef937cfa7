"""Section 1: topology build + teardown, the testbed against plain ``ip`` in the same run.

The generated topology is a chain ``client - r1 - ... - r<N-2> - server`` (one path, a /30
per link from 100.64.0.0/16), built with ``Network.up``/``down`` exactly as scenarios do.

Two baselines build the same namespaces and veths with plain iproute2, in as few processes
as it allows (the fastest plain-tool build we know):

- ``ns_veth``: one ``ip -batch`` that adds the namespaces and the veth pairs (each created
  directly between its two namespaces), one ``ip -batch`` that deletes the namespaces.
  This is the baseline the targets are checked against.
- ``ns_veth_routes``: the same, plus the testbed's addresses, links up, routes and policy
  rules from the address plan, with one ``ip -n NS -batch`` per namespace (no sysctls, no
  MPTCP endpoints or limits): the same network state with plain tools.

Baseline namespaces are named ``<run tag>-bl<i>`` and recorded in the run's ledger before
they exist, so ``testbed clean`` releases them after a crash; they are deleted in a
``finally`` otherwise.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Callable
from typing import Any

from testbed.bench.stats import ratio, summary
from testbed.model.addressing import AddressPlan, plan_addresses
from testbed.model.topology import LinkSpec, NodeSpec, TopologySpec, load_topology
from testbed.runtime.ledger import Ledger
from testbed.runtime.network import Network

CHAIN_POOL = ipaddress.ip_network("100.64.0.0/16")


def chain_spec(n: int) -> TopologySpec:
    """``n`` nodes in a line: a client, ``n - 2`` routers, a server."""
    if n < 2:
        raise ValueError("a chain needs at least 2 nodes")
    names = ["client", *(f"r{i}" for i in range(1, n - 1)), "server"]
    roles = {"client": "client", "server": "server"}
    nodes = tuple(NodeSpec(x, roles.get(x, "router")) for x in names)
    links = tuple(LinkSpec(names[i], names[i + 1], "chain") for i in range(n - 1))
    return TopologySpec(name=f"chain{n}", description=f"bench chain of {n} nodes", nodes=nodes,
                        links=links, pools={"chain": CHAIN_POOL},  # type: ignore[dict-item]
                        primary_path="chain", source=f"<bench chain {n}>")


def _ip_batch(lines: list[str], netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), "-force", "-batch", "-"]
    res = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {res.stderr.strip()[:500]}")


class Baseline:
    """Plain-iproute2 build of a spec's namespaces and veths (optionally its routes)."""

    def __init__(self, spec: TopologySpec, ledger: Ledger, routes: bool) -> None:
        self.spec = spec
        self.ledger = ledger
        self.routes = routes
        self.plan: AddressPlan = plan_addresses(spec)
        self.ns = {n.name: f"{ledger.tag}-bl{i}" for i, n in enumerate(spec.nodes)}

    def up(self) -> None:
        # Recorded before they exist: a crash leaves nothing `testbed clean` does not know.
        self.ledger.data.netns.extend(self.ns.values())
        self.ledger.save()
        lines = [f"netns add {ns}" for ns in self.ns.values()]
        for link in self.spec.links:
            ia = self.plan.interface(link.a, link.b).ifname
            ib = self.plan.interface(link.b, link.a).ifname
            lines.append(f"link add {ia} netns {self.ns[link.a]} type veth "
                         f"peer name {ib} netns {self.ns[link.b]}")
        _ip_batch(lines)
        if not self.routes:
            return
        for node in self.spec.nodes:
            cmds = ["link set lo up"]
            for intf in self.plan.interfaces[node.name]:
                cmds.append(f"addr add {intf.address} dev {intf.ifname}")
                cmds.append(f"link set {intf.ifname} up")
            for r in (r for r in self.plan.routes if r.node == node.name):
                cmds.append(f"route add {r.dst} via {r.via} dev {r.dev} table {r.table}")
            for rule in (r for r in self.plan.rules if r.node == node.name):
                cmds.append(f"rule add from {rule.src} table {rule.table} "
                            f"priority {rule.priority}")
            _ip_batch(cmds, self.ns[node.name])

    def down(self) -> None:
        names = [ns for ns in self.ns.values() if ns.startswith(f"{self.ledger.tag}-")]
        try:
            _ip_batch([f"netns del {ns}" for ns in names])
        finally:
            self.ledger.data.netns = [n for n in self.ledger.data.netns if n not in names]
            self.ledger.save()


def _time_testbed(spec: TopologySpec, ledger: Ledger) -> tuple[float, float]:
    cm = Network.up(spec, ledger)
    t0 = time.monotonic()
    cm.__enter__()
    t1 = time.monotonic()
    cm.__exit__(None, None, None)
    return t1 - t0, time.monotonic() - t1


def _time_baseline(spec: TopologySpec, ledger: Ledger, routes: bool) -> tuple[float, float]:
    base = Baseline(spec, ledger, routes)
    t0 = time.monotonic()
    try:
        base.up()
        t1 = time.monotonic()
    finally:
        t_down = time.monotonic()
        base.down()
    return t1 - t0, time.monotonic() - t_down


KINDS: dict[str, Callable[[TopologySpec, Ledger], tuple[float, float]]] = {
    "testbed": _time_testbed,
    "ns_veth": lambda s, led: _time_baseline(s, led, False),
    "ns_veth_routes": lambda s, led: _time_baseline(s, led, True),
}


def _entry(samples: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, s in samples.items():
        out[kind] = {"up_s": summary(s["up"]), "down_s": summary(s["down"]),
                     "total_s": summary(s["total"])}
    tb = samples["testbed"]["total"]
    out["ratio"] = {kind: ratio(tb, samples[kind]["total"])
                    for kind in samples if kind != "testbed"}
    return out


def measure(ledger: Ledger, sizes: list[int], repeats: int,
            say: Callable[[str], None]) -> dict[str, Any]:
    results = []
    for n in sizes:
        spec = chain_spec(n)
        samples: dict[str, dict[str, list[float]]] = {
            k: {"up": [], "down": [], "total": []} for k in KINDS}
        kinds = list(KINDS)
        for rep in range(repeats):
            # Alternate the order so that neither side always runs on a warmer machine.
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                up, down = KINDS[kind](spec, ledger)
                samples[kind]["up"].append(up)
                samples[kind]["down"].append(down)
                samples[kind]["total"].append(up + down)
        entry = {"nodes": n, "links": len(spec.links),
                 "routes": len(plan_addresses(spec).routes), **_entry(samples)}
        say(f"topology {n} nodes: testbed {entry['testbed']['total_s']['median']:.3f}s, "
            f"ns_veth {entry['ns_veth']['total_s']['median']:.3f}s "
            f"(x{entry['ratio']['ns_veth']['median']})")
        results.append(entry)
    dual = load_topology("dual_path")
    d: dict[str, dict[str, list[float]]] = {k: {"up": [], "down": [], "total": []}
                                            for k in KINDS}
    for rep in range(max(repeats, 5)):
        for kind in (list(KINDS) if rep % 2 == 0 else list(KINDS)[::-1]):
            up, down = KINDS[kind](dual, ledger)
            d[kind]["up"].append(up)
            d[kind]["down"].append(down)
            d[kind]["total"].append(up + down)
    dual_entry = {"nodes": len(dual.nodes), "links": len(dual.links), **_entry(d)}
    say(f"dual_path up+down: {dual_entry['testbed']['total_s']['median']:.3f}s")
    return {"shape": "chain", "repeats": repeats, "sizes": results, "dual_path": dual_entry}
