"""Topology specs: plain data loaded from ``topologies/<name>.yaml``.

A spec names nodes (with a role), point-to-point links (each labelled with the path it
belongs to, e.g. ``wifi`` or ``cell``), an address pool per path, the node that hosts
each path's middlebox slot, and where attackers attach. The runtime builds a network
from it; nothing here touches the kernel.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import SpecError
from testbed.model.template import render_leaves
from testbed.model.validate import NAME_RE, Fields, load_yaml, template_context

ROLES = ("client", "server", "router", "middlebox", "attacker")
ALLOWED_POOLS = tuple(
    ipaddress.ip_network(n)
    for n in ("198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10", "fd6d:7074:6370::/48")
)
MAX_NODES = 256
MAX_RATE_MBIT = 100_000
MIN_MTU, MAX_MTU = 576, 65535  # IPv4's minimum datagram every host must take; veth's maximum
MAX_DELAY_MS = 10_000
# Path labels name interfaces ("<path><n>", at most 15 characters): at most 12 characters.
PATH_RE = re.compile(r"^[a-z][a-z0-9_]{0,11}\Z")

TOPOLOGY_DIR = Path(__file__).resolve().parents[2] / "topologies"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    role: str


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    path: str
    rate_mbit: float | None = None
    delay_ms: float | None = None
    loss_pct: float | None = None
    capture: bool = False
    mtu: int | None = None  # both ends; None: the veth default (1500)

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    @property
    def needs_netem(self) -> bool:
        return bool(self.delay_ms) or bool(self.loss_pct)


@dataclass(frozen=True)
class TopologySpec:
    name: str
    description: str
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...]
    pools: dict[str, ipaddress.IPv4Network]
    primary_path: str
    middlebox_slots: dict[str, str] = field(default_factory=dict)
    attach: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def by_role(self, role: str) -> list[NodeSpec]:
        return [n for n in self.nodes if n.role == role]

    @property
    def paths(self) -> list[str]:
        seen: list[str] = []
        for link in self.links:
            if link.path not in seen:
                seen.append(link.path)
        return seen

    @property
    def requirements(self) -> set[str]:
        needs: set[str] = set()
        for link in self.links:
            if link.needs_netem:
                needs.add("netem")
            if link.rate_mbit:
                needs.add("tbf")
        return needs


ATTACH_POINTS = ("off_path", "half_on_path")


def available_topologies(directory: Path = TOPOLOGY_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_topology(name: str, params: dict[str, Any] | None = None,
                  directory: Path = TOPOLOGY_DIR) -> TopologySpec:
    """Load ``directory/<name>.yaml`` and render it with its params, overridden by ``params``."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(str(directory), "topology.name", f"{name!r} is not a topology name",
                        f"available: {', '.join(available_topologies(directory))}")
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(str(path), "topology.name", f"no topology called '{name}'",
                        f"available: {', '.join(available_topologies(directory))}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), "(file)", f"cannot read: {exc}", "save it as UTF-8 text"
                        ) from None
    return parse_topology(text, str(path), params or {})


def parse_topology(text: str, file: str, overrides: dict[str, Any]) -> TopologySpec:
    data = load_yaml(text, file)
    top = Fields(data, file, "", ("name", "description", "params", "nodes", "links", "pools",
                                  "primary_path", "middlebox_slots", "attach"))
    context = template_context(top, overrides, "this topology has no such parameter",
                               "known parameters")
    rendered = render_leaves({k: v for k, v in data.items() if k != "params"}, context, file)
    top = Fields(rendered, file, "", top.data.keys())

    name = top.str("name", pattern=NAME_RE)
    description = top.str("description", default="", max_len=2000)

    raw_nodes = top.mapping("nodes")
    if not raw_nodes:
        raise top.error("nodes", "no nodes", "declare at least a client and a server")
    if len(raw_nodes) > MAX_NODES:
        raise top.error("nodes", f"{len(raw_nodes)} nodes, more than {MAX_NODES}")
    nodes = []
    for node_name, body in raw_nodes.items():
        if not isinstance(node_name, str) or not NAME_RE.match(node_name):
            raise top.error(f"nodes.{node_name}", "invalid node name",
                            "use 1-16 lower-case letters, digits or '_', starting with a letter")
        f = Fields(body or {}, file, f"nodes.{node_name}", ("role",))
        nodes.append(NodeSpec(node_name, f.str("role", choices=ROLES)))
    node_names = {n.name for n in nodes}

    pools: dict[str, ipaddress.IPv4Network] = {}
    for path_name, cidr in top.mapping("pools").items():
        field_name = f"pools.{path_name}"
        if not isinstance(path_name, str) or not PATH_RE.match(path_name):
            raise SpecError(file, field_name, "invalid path name",
                            "use 1-12 lower-case letters, digits or '_', starting with a letter")
        try:
            net = ipaddress.ip_network(str(cidr), strict=True)
        except ValueError:
            raise SpecError(file, field_name, f"{cidr!r} is not a network",
                            "write a prefix such as 198.51.100.0/24") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise SpecError(file, field_name, "only IPv4 pools are supported for now",
                            "use a prefix inside 198.51.100.0/24, 203.0.113.0/24 or 100.64.0.0/10")
        if not any(net.subnet_of(p) for p in ALLOWED_POOLS if p.version == 4):  # type: ignore[arg-type]
            raise SpecError(file, field_name, f"{net} is outside the test ranges",
                            "use 198.51.100.0/24, 203.0.113.0/24 or 100.64.0.0/10 (DESIGN.md §7)")
        if net.prefixlen > 29:
            raise SpecError(file, field_name, f"{net} is too small", "use a /29 or larger")
        pools[str(path_name)] = net
    nets = list(pools.items())
    for i, (pa, na) in enumerate(nets):
        for pb, nb in nets[i + 1:]:
            if na.overlaps(nb):
                raise SpecError(file, f"pools.{pb}", f"{nb} overlaps pools.{pa} ({na})",
                                "give each path its own prefix")

    links = []
    seen_pairs: set[frozenset[str]] = set()
    for i, body in enumerate(top.sequence("links", max_items=4 * MAX_NODES)):
        f = Fields(body, file, f"links[{i}]",
                   ("a", "b", "path", "rate_mbit", "delay_ms", "loss_pct", "capture", "mtu"))
        a, b = f.str("a"), f.str("b")
        for end, value in (("a", a), ("b", b)):
            if value not in node_names:
                raise f.error(end, f"unknown node '{value}'",
                              f"declared nodes: {', '.join(sorted(node_names))}")
        if a == b:
            raise f.error("b", "a link must join two different nodes")
        pair = frozenset((a, b))
        if pair in seen_pairs:
            raise f.error("b", f"a second link between {a} and {b}", "one link per pair of nodes")
        seen_pairs.add(pair)
        path_label = f.str("path")
        if path_label not in pools:
            raise f.error("path", f"no address pool for path '{path_label}'",
                          f"add 'pools: {{{path_label}: <prefix>}}'; pools: {', '.join(pools)}")
        links.append(LinkSpec(
            a=a, b=b, path=path_label,
            rate_mbit=f.opt_number("rate_mbit", lo=0.01, hi=MAX_RATE_MBIT),
            delay_ms=f.opt_number("delay_ms", lo=0, hi=MAX_DELAY_MS),
            loss_pct=f.opt_number("loss_pct", lo=0, hi=100),
            capture=f.boolean("capture", False),
            mtu=f.integer("mtu", lo=MIN_MTU, hi=MAX_MTU) if f.has("mtu") else None,
        ))
    if not links:
        raise top.error("links", "no links", "join the nodes with links")

    primary = top.str("primary_path")
    if primary not in {link.path for link in links}:
        raise top.error("primary_path", f"no link is on path '{primary}'")

    slots = {}
    for path_label, node_name in top.mapping("middlebox_slots").items():
        if path_label not in pools:
            raise top.error(f"middlebox_slots.{path_label}", "unknown path",
                            f"paths with a pool: {', '.join(pools)}")
        if not isinstance(node_name, str) or node_name not in node_names:
            raise top.error(f"middlebox_slots.{path_label}", f"unknown node {node_name!r}",
                            f"declared nodes: {', '.join(sorted(node_names))}")
        slots[str(path_label)] = str(node_name)

    attach = {}
    for point, node_name in top.mapping("attach").items():
        if point not in ATTACH_POINTS:
            raise top.error(f"attach.{point}", "unknown attachment point",
                            f"allowed: {', '.join(ATTACH_POINTS)}")
        if not isinstance(node_name, str) or node_name not in node_names:
            raise top.error(f"attach.{point}", f"unknown node {node_name!r}",
                            f"declared nodes: {', '.join(sorted(node_names))}")
        attach[str(point)] = str(node_name)

    spec = TopologySpec(name=name, description=description, nodes=tuple(nodes),
                        links=tuple(links), pools=pools, primary_path=primary,
                        middlebox_slots=slots, attach=attach, source=file)
    _check_connected(spec)
    if not spec.by_role("client") or not spec.by_role("server"):
        raise top.error("nodes", "needs at least one node with role client and one with "
                        "role server")
    return spec


def _check_connected(spec: TopologySpec) -> None:
    adj: dict[str, set[str]] = {n.name: set() for n in spec.nodes}
    for link in spec.links:
        adj[link.a].add(link.b)
        adj[link.b].add(link.a)
    start = spec.nodes[0].name
    seen = {start}
    todo = [start]
    while todo:
        for nxt in adj[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    missing = sorted(set(adj) - seen)
    if missing:
        raise SpecError(spec.source, "links", f"nodes not connected to the rest: "
                        f"{', '.join(missing)}", "add links that reach them")
