"""The address plan: /30 per link from the path's pool, unique addresses, no default route,
policy routing on the multihomed client, shortest-path next hops that never cross a host,
and a subflow endpoint on the client's non-primary address only. Routes are also checked
by walking them hop by hop, as the kernel would."""

from __future__ import annotations

import ipaddress
import itertools
import random
from typing import Any

import pytest
import yaml

from testbed.errors import SpecError
from testbed.model.addressing import (
    FIRST_POLICY_TABLE,
    AddressPlan,
    RoutePlan,
    collapse_prefixes,
    plan_addresses,
)
from testbed.model.topology import TopologySpec, load_topology, parse_topology

MAIN = 254


@pytest.fixture(scope="module")
def dual() -> TopologySpec:
    return load_topology("dual_path")


@pytest.fixture(scope="module")
def plan(dual: TopologySpec) -> AddressPlan:
    return plan_addresses(dual)


def owner(plan: AddressPlan, address: ipaddress.IPv4Address) -> str:
    for node, intfs in plan.interfaces.items():
        if any(i.address.ip == address for i in intfs):
            return node
    raise AssertionError(f"nobody has {address}")


def lookup(plan: AddressPlan, node: str, dst: ipaddress.IPv4Address,
           table: int = MAIN) -> RoutePlan | None:
    matches = [r for r in plan.routes
               if r.node == node and r.table == table and dst in r.dst]
    assert len(matches) <= 1, matches
    return matches[0] if matches else None


def walk(plan: AddressPlan, src: str, dst: ipaddress.IPv4Address,
         table: int = MAIN) -> list[str]:
    """Nodes a packet from ``src`` to ``dst`` crosses (the first hop uses ``table``)."""
    hops = [src]
    node = src
    for _ in range(16):
        intfs = plan.interfaces[node]
        if any(i.address.ip == dst for i in intfs):
            return hops
        connected = [i for i in intfs if dst in i.address.network]
        if connected:
            assert len(connected) == 1
            assert connected[0].peer_address == dst, f"{dst} is not on the link"
            hops.append(connected[0].peer_node)
            return hops
        route = lookup(plan, node, dst, table if node == src else MAIN)
        assert route is not None, f"{node} has no route to {dst} (path so far {hops})"
        out = next(i for i in intfs if i.ifname == route.dev)
        assert out.peer_address == route.via, f"{node}: via {route.via} is not on {route.dev}"
        nxt = out.peer_node
        hops.append(nxt)
        if owner(plan, dst) == nxt:
            return hops  # a host accepts packets for any of its addresses
        assert nxt in plan.forwarding, f"{node} routes {dst} through non-forwarding {nxt}"
        node = nxt
    raise AssertionError(f"routing loop from {src} to {dst}: {hops}")


# --- interfaces and addresses ------------------------------------------------------------

def test_every_link_gets_a_slash30_from_its_pool(dual: TopologySpec,
                                                 plan: AddressPlan) -> None:
    seen_nets = set()
    for link in dual.links:
        a = plan.interface(link.a, link.b)
        b = plan.interface(link.b, link.a)
        assert a.link == link and b.link == link
        assert a.path == b.path == link.path
        assert a.address.network == b.address.network
        net = a.address.network
        assert net.prefixlen == 30
        assert net.subnet_of(dual.pools[link.path])
        assert a.address.ip != b.address.ip
        assert {a.address.ip, b.address.ip} == set(net.hosts())
        assert a.peer_address == b.address.ip and b.peer_address == a.address.ip
        assert a.peer_node == link.b and b.peer_node == link.a
        seen_nets.add(net)
    assert len(seen_nets) == len(dual.links)


def test_links_take_consecutive_subnets_in_declaration_order(plan: AddressPlan) -> None:
    assert str(plan.interface("client", "wifi_ap").address) == "198.51.100.1/30"
    assert str(plan.interface("wifi_ap", "client").address) == "198.51.100.2/30"
    assert str(plan.interface("wifi_ap", "core").address) == "198.51.100.5/30"
    assert str(plan.interface("client", "cell_gw").address) == "100.64.0.1/30"
    assert str(plan.interface("cell_gw", "core").address) == "100.64.0.5/30"
    assert str(plan.interface("core", "server").address) == "203.0.113.1/30"
    assert str(plan.interface("server", "core").address) == "203.0.113.2/30"


def test_all_addresses_and_interface_names_unique(plan: AddressPlan) -> None:
    addresses = [i.address.ip for intfs in plan.interfaces.values() for i in intfs]
    assert len(addresses) == len(set(addresses)) == 10
    for node, intfs in plan.interfaces.items():
        names = [i.ifname for i in intfs]
        assert len(names) == len(set(names)), node
        assert all(0 < len(n) <= 15 for n in names)
    assert [i.ifname for i in plan.interfaces["client"]] == ["wifi0", "cell0"]
    assert [i.ifname for i in plan.interfaces["core"]] == ["wifi0", "cell0", "core0"]


def test_address_lookups(plan: AddressPlan) -> None:
    assert str(plan.address("client", "cell")) == "100.64.0.1"
    assert str(plan.address("client")) == "198.51.100.1"  # first interface
    assert str(plan.address("server")) == "203.0.113.2"
    assert plan.path_of("100.64.0.1") == "cell"
    assert plan.path_of("192.0.2.1") is None
    with pytest.raises(KeyError):
        plan.address("server", "wifi")
    with pytest.raises(KeyError):
        plan.interface("client", "server")


# --- routes ------------------------------------------------------------------------------

def test_no_default_route_anywhere(dual: TopologySpec, plan: AddressPlan) -> None:
    link_nets = {i.address.network for intfs in plan.interfaces.values() for i in intfs}
    assert plan.routes
    for route in plan.routes:
        # A route covers link subnets and nothing else (merged routes included).
        assert all(net in link_nets for net in route.dst.subnets(new_prefix=30)), route
        assert any(route.dst.subnet_of(pool) for pool in dual.pools.values())


def test_no_route_to_a_directly_connected_subnet_in_main(plan: AddressPlan) -> None:
    for route in plan.routes:
        if route.table != MAIN:
            continue
        own = {i.address.network for i in plan.interfaces[route.node]}
        assert route.dst not in own, route


def test_every_route_leaves_by_an_own_interface_towards_its_peer(plan: AddressPlan) -> None:
    for route in plan.routes:
        out = [i for i in plan.interfaces[route.node] if i.ifname == route.dev]
        assert len(out) == 1, route
        assert out[0].peer_address == route.via, route


def test_client_policy_routing(plan: AddressPlan) -> None:
    client = plan.interfaces["client"]
    rules = [r for r in plan.rules if r.node == "client"]
    assert [(r.src, r.table) for r in rules] == [
        (i.address.ip, FIRST_POLICY_TABLE + n) for n, i in enumerate(client)]
    assert len({r.priority for r in rules}) == len(rules)
    for rule, intf in zip(rules, client, strict=True):
        table = [r for r in plan.routes if r.node == "client" and r.table == rule.table]
        assert table, rule
        # Everything in the table leaves by the interface that owns the source address.
        assert {(r.dev, r.via) for r in table} == {(intf.ifname, intf.peer_address)}
        server = plan.address("server")
        assert lookup(plan, "client", server, rule.table) is not None
        # From the cell address the packet goes out the cell link, then via the core.
        hops = walk(plan, "client", server, rule.table)
        assert hops[1] == intf.peer_node and hops[-1] == "server"


def test_only_the_multihomed_client_gets_rules(plan: AddressPlan) -> None:
    assert {r.node for r in plan.rules} == {"client"}
    assert {r.table for r in plan.routes} == {MAIN, FIRST_POLICY_TABLE,
                                               FIRST_POLICY_TABLE + 1}


def test_client_main_route_to_server_uses_the_primary_path(plan: AddressPlan) -> None:
    route = lookup(plan, "client", plan.address("server"))
    assert route is not None
    wifi = plan.interface("client", "wifi_ap")
    assert (route.dev, route.via) == (wifi.ifname, wifi.peer_address)
    assert walk(plan, "client", plan.address("server")) == [
        "client", "wifi_ap", "core", "server"]


def test_server_reaches_client_cell_address_via_core_not_through_client(
        plan: AddressPlan) -> None:
    cell_addr = plan.address("client", "cell")
    route = lookup(plan, "server", cell_addr)
    assert route is not None
    assert route.via == plan.interface("core", "server").address.ip
    assert walk(plan, "server", cell_addr) == ["server", "core", "cell_gw", "client"]
    assert walk(plan, "server", plan.address("client", "wifi")) == [
        "server", "core", "wifi_ap", "client"]


def test_no_route_has_a_host_as_next_hop(plan: AddressPlan) -> None:
    for route in plan.routes:
        if route.table != MAIN:
            continue
        assert owner(plan, route.via) in plan.forwarding, route


def test_routers_forward_hosts_do_not(plan: AddressPlan) -> None:
    assert plan.forwarding == {"wifi_ap", "cell_gw", "core"}


def test_every_node_reaches_every_address(plan: AddressPlan) -> None:
    addresses = [i.address.ip for intfs in plan.interfaces.values() for i in intfs]
    for src in plan.interfaces:
        for dst in addresses:
            hops = walk(plan, src, dst)
            assert hops[-1] == owner(plan, dst)
            # Hosts are never crossed, only reached.
            assert all(h in plan.forwarding for h in hops[1:-1]), hops


def test_subflow_endpoint_on_client_cell_address_only(plan: AddressPlan) -> None:
    assert len(plan.endpoints) == 1
    ep = plan.endpoints[0]
    assert ep.node == "client"
    assert ep.address == plan.address("client", "cell")
    assert ep.ifname == plan.interface("client", "cell_gw").ifname
    assert ep.flags == ("subflow",)


def test_plan_follows_the_primary_path(dual: TopologySpec) -> None:
    text = yaml.safe_dump(_dual_as_dict(dual, primary_path="cell"), sort_keys=False)
    plan = plan_addresses(parse_topology(text, "x.yaml", {}))
    assert [e.address for e in plan.endpoints] == [plan.address("client", "wifi")]


def _dual_as_dict(spec: TopologySpec, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": spec.name,
        "nodes": {n.name: {"role": n.role} for n in spec.nodes},
        "links": [{"a": link.a, "b": link.b, "path": link.path} for link in spec.links],
        "pools": {p: str(n) for p, n in spec.pools.items()},
        "primary_path": spec.primary_path,
    }
    data.update(changes)
    return data


# --- custom specs ------------------------------------------------------------------------

LINE = {
    "name": "line",
    "nodes": {"client": {"role": "client"}, "r1": {"role": "router"},
              "r2": {"role": "router"}, "r3": {"role": "middlebox"},
              "server": {"role": "server"}},
    "links": [{"a": "client", "b": "r1", "path": "lan"}, {"a": "r1", "b": "r2", "path": "lan"},
              {"a": "r2", "b": "r3", "path": "lan"}, {"a": "r3", "b": "server", "path": "lan"}],
    "pools": {"lan": "203.0.113.0/24"},
    "primary_path": "lan",
}


def test_three_routers_in_a_line() -> None:
    plan = plan_addresses(parse_topology(yaml.safe_dump(LINE), "line.yaml", {}))
    addr = {n: [str(i.address) for i in plan.interfaces[n]] for n in plan.interfaces}
    assert addr == {
        "client": ["203.0.113.1/30"], "r1": ["203.0.113.2/30", "203.0.113.5/30"],
        "r2": ["203.0.113.6/30", "203.0.113.9/30"], "r3": ["203.0.113.10/30", "203.0.113.13/30"],
        "server": ["203.0.113.14/30"]}
    net = [ipaddress.ip_network(f"203.0.113.{4 * i}/30") for i in range(4)]
    ip = ipaddress.ip_address

    def hop(node: str, dst: ipaddress.IPv4Network) -> str:
        route = lookup(plan, node, dst.network_address)
        assert route is not None and dst.subnet_of(route.dst), (node, dst, route)
        return str(route.via)

    # The client and the server each have one way out.
    assert {hop("client", n) for n in net[1:]} == {"203.0.113.2"}
    assert {hop("server", n) for n in net[:3]} == {"203.0.113.13"}
    # Routers send each subnet towards the side it is on.
    assert hop("r1", net[2]) == hop("r1", net[3]) == "203.0.113.6"
    assert hop("r2", net[0]) == "203.0.113.5" and hop("r2", net[3]) == "203.0.113.10"
    assert hop("r3", net[0]) == hop("r3", net[1]) == "203.0.113.9"
    assert plan.forwarding == {"r1", "r2", "r3"}  # middleboxes forward too
    assert plan.rules == [] and plan.endpoints == []  # single-homed hosts
    assert all(r.table == MAIN for r in plan.routes)
    # Each node has a route to every subnet it is not on, and none to one it is on.
    for node, intfs in plan.interfaces.items():
        own = {i.address.network for i in intfs}
        for n in net:
            assert (lookup(plan, node, n.network_address) is None) == (n in own), (node, n)
    assert walk(plan, "client", ip("203.0.113.14")) == ["client", "r1", "r2", "r3", "server"]
    assert walk(plan, "server", ip("203.0.113.1")) == ["server", "r3", "r2", "r1", "client"]


def test_routing_never_transits_a_host() -> None:
    # r2 is reachable from r1 only through the server. A host never forwards: the only
    # route through it is to its own address on the far link, never beyond it.
    spec = {
        "name": "host_in_middle",
        "nodes": {"client": {"role": "client"}, "r1": {"role": "router"},
                  "server": {"role": "server"}, "r2": {"role": "router"}},
        "links": [{"a": "client", "b": "r1", "path": "lan"},
                  {"a": "r1", "b": "server", "path": "lan"},
                  {"a": "server", "b": "r2", "path": "lan"}],
        "pools": {"lan": "198.51.100.0/24"},
        "primary_path": "lan",
    }
    plan = plan_addresses(parse_topology(yaml.safe_dump(spec), "h.yaml", {}))
    server_far = plan.interface("server", "r2").address.ip
    assert walk(plan, "client", server_far) == ["client", "r1", "server"]
    r1_route = lookup(plan, "r1", server_far)
    assert r1_route is not None and r1_route.via == plan.address("server")
    with pytest.raises(AssertionError, match="non-forwarding server"):
        walk(plan, "client", plan.interface("r2", "server").address.ip)
    for route in plan.routes:
        host = owner(plan, route.via)
        if host not in plan.forwarding:
            assert route.dst in {i.address.network for i in plan.interfaces[host]}, route


def test_pool_exhaustion_is_a_spec_error() -> None:
    spec = dict(LINE, pools={"lan": "203.0.113.0/29"})  # room for two /30 links only
    topo = parse_topology(yaml.safe_dump(spec), "line.yaml", {})
    with pytest.raises(SpecError) as info:
        plan_addresses(topo)
    assert str(info.value).startswith("line.yaml: pools.lan: the pool has no room left")


def test_interface_names_stay_unique_for_long_path_names() -> None:
    spec = {
        "name": "long_paths",
        "nodes": {"client": {"role": "client"}, "r1": {"role": "router"},
                  "server": {"role": "server"}},
        "links": [{"a": "client", "b": "r1", "path": "abcdefghijk1"},
                  {"a": "client", "b": "server", "path": "abcdefghijk2"},
                  {"a": "r1", "b": "server", "path": "abcdefghijk1"}],
        "pools": {"abcdefghijk1": "198.51.100.0/24", "abcdefghijk2": "203.0.113.0/24"},
        "primary_path": "abcdefghijk1",
    }
    plan = plan_addresses(parse_topology(yaml.safe_dump(spec), "l.yaml", {}))
    for node, intfs in plan.interfaces.items():
        names = [i.ifname for i in intfs]
        assert len(set(names)) == len(names), (node, names)
        assert all(len(n) <= 15 for n in names)


# --- merged routes -----------------------------------------------------------------------

def test_collapse_prefixes_matches_the_standard_library() -> None:


    rng = random.Random(8)
    pool = list(ipaddress.ip_network("100.64.0.0/22").subnets(new_prefix=30))
    for _ in range(60):
        nets = rng.sample(pool, rng.randint(1, len(pool)))
        ints = [(int(n.network_address), n.prefixlen) for n in nets]
        assert collapse_prefixes(ints) == list(ipaddress.collapse_addresses(nets))
        # Mixed prefix lengths: merged blocks plus /30s outside them.
        mixed = list(ipaddress.collapse_addresses(nets[: len(nets) // 2]))
        mixed += [n for n in rng.sample(pool, len(pool) // 3)
                  if not any(n.subnet_of(m) for m in mixed)]
        ints = [(int(n.network_address), n.prefixlen) for n in mixed]
        assert collapse_prefixes(ints) == list(ipaddress.collapse_addresses(mixed))


def test_a_long_chain_gets_merged_routes_that_still_reach_every_link() -> None:
    """12 nodes in a line: 11 /30s, so each node would need up to 10 routes; merged
    routes are far fewer, and walking them hop by hop still reaches every address."""
    names = ["client", *(f"r{i}" for i in range(1, 11)), "server"]
    spec = {"name": "chain", "description": "a line of 12",
            "nodes": {n: {"role": "client" if n == "client" else
                          "server" if n == "server" else "router"} for n in names},
            "links": [{"a": a, "b": b, "path": "p"} for a, b in itertools.pairwise(names)],
            "pools": {"p": "100.64.0.0/24"}, "primary_path": "p"}
    plan = plan_addresses(parse_topology(yaml.safe_dump(spec), "chain.yaml", {}))
    assert len(plan.routes) < sum(11 - len(i) for i in plan.interfaces.values()) / 2
    unused = ipaddress.ip_network("100.64.0.44/30")  # the pool's 12th /30: no link
    for src in names:
        assert lookup(plan, src, unused.network_address) is None, src
        for dst_node in names:
            for intf in plan.interfaces[dst_node]:
                if src != dst_node:
                    hops = walk(plan, src, intf.address.ip)
                    assert hops[0] == src and owner(plan, intf.address.ip) in hops[-1:]
