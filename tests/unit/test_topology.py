"""Topology specs: the shipped dual_path spec, its parameters, and every way a spec can be
wrong, each reported as a SpecError naming the file, the field and the allowed values."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.errors import SpecError
from testbed.model.topology import (
    ALLOWED_POOLS,
    ROLES,
    available_topologies,
    load_topology,
    parse_topology,
)

FILE = "mini.yaml"

# A small valid spec: client -wifi- ap -core- server, plus a cell link from the client to
# the server's router. Tests mutate a deep copy.
MINI: dict[str, Any] = {
    "name": "mini",
    "description": "a small spec",
    "params": {"rate": 10, "delay": None},
    "nodes": {
        "client": {"role": "client"},
        "ap": {"role": "router"},
        "gw": {"role": "router"},
        "server": {"role": "server"},
    },
    "links": [
        {"a": "client", "b": "ap", "path": "wifi", "rate_mbit": "{{ rate }}",
         "delay_ms": "{{ delay }}"},
        {"a": "client", "b": "gw", "path": "cell"},
        {"a": "ap", "b": "server", "path": "core"},
        {"a": "gw", "b": "server", "path": "core"},
    ],
    "pools": {"wifi": "198.51.100.0/24", "cell": "100.64.0.0/24", "core": "203.0.113.0/24"},
    "primary_path": "wifi",
    "middlebox_slots": {"wifi": "ap"},
    "attach": {"off_path": "gw"},
}


def mini(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINI)
    spec.update(changes)
    return spec


def parse(spec: dict[str, Any], overrides: dict[str, Any] | None = None):
    return parse_topology(yaml.safe_dump(spec, sort_keys=False), FILE, overrides or {})


def refused(spec: dict[str, Any], field: str, *fragments: str,
            overrides: dict[str, Any] | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(spec, overrides)
    err = info.value
    msg = str(err)
    assert msg.startswith(f"{FILE}: {field}: "), msg
    assert err.file == FILE and err.field == field
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return err


# --- the shipped spec --------------------------------------------------------------------

def test_dual_path_is_available_and_loads() -> None:
    assert "dual_path" in available_topologies()
    spec = load_topology("dual_path")
    assert spec.name == "dual_path"
    assert spec.source.endswith("topologies/dual_path.yaml")
    assert {n.name: n.role for n in spec.nodes} == {
        "client": "client", "wifi_ap": "router", "cell_gw": "router", "core": "router",
        "server": "server"}
    assert [(link.a, link.b, link.path) for link in spec.links] == [
        ("client", "wifi_ap", "wifi"), ("client", "cell_gw", "cell"),
        ("wifi_ap", "core", "wifi"), ("cell_gw", "core", "cell"), ("core", "server", "core")]
    assert spec.paths == ["wifi", "cell", "core"]
    assert spec.primary_path == "wifi"
    assert {p: str(n) for p, n in spec.pools.items()} == {
        "wifi": "198.51.100.0/24", "cell": "100.64.0.0/24", "core": "203.0.113.0/24"}
    assert spec.middlebox_slots == {"wifi": "wifi_ap", "cell": "cell_gw", "core": "core"}
    assert spec.attach == {"off_path": "core", "half_on_path": "core"}
    assert [n.name for n in spec.by_role("router")] == ["wifi_ap", "cell_gw", "core"]
    assert spec.node("server").role == "server"
    with pytest.raises(KeyError):
        spec.node("nobody")


def test_dual_path_defaults_shape_access_links_only() -> None:
    spec = load_topology("dual_path")
    access = [link for link in spec.links if link.a == "client"]
    assert [link.rate_mbit for link in access] == [50, 50]
    assert all(link.capture for link in access)
    assert all(link.delay_ms is None and link.loss_pct is None for link in spec.links)
    assert all(link.rate_mbit is None and not link.capture
               for link in spec.links if link.a != "client")
    assert spec.requirements == {"tbf"}


def test_dual_path_params_override() -> None:
    spec = load_topology("dual_path", {"cell_rate_mbit": None, "wifi_rate_mbit": 7.5})
    rates = {link.path: link.rate_mbit for link in spec.links if link.a == "client"}
    assert rates == {"wifi": 7.5, "cell": None}  # no tbf on the cell link
    assert spec.requirements == {"tbf"}

    unshaped = load_topology("dual_path", {"cell_rate_mbit": None, "wifi_rate_mbit": None})
    assert all(link.rate_mbit is None for link in unshaped.links)
    assert unshaped.requirements == set()


def test_dual_path_delay_and_loss_need_netem() -> None:
    spec = load_topology("dual_path", {"cell_delay_ms": 40})
    cell = next(link for link in spec.links if link.a == "client" and link.path == "cell")
    assert cell.delay_ms == 40 and cell.needs_netem
    assert spec.requirements == {"tbf", "netem"}

    lossy = load_topology("dual_path", {"wifi_loss_pct": 1.5, "wifi_rate_mbit": None,
                                        "cell_rate_mbit": None})
    assert lossy.requirements == {"netem"}
    # 0 ms of delay is no delay: no netem needed.
    assert load_topology("dual_path", {"wifi_delay_ms": 0}).requirements == {"tbf"}


def test_dual_path_unknown_param_override() -> None:
    with pytest.raises(SpecError) as info:
        load_topology("dual_path", {"wifi_rate": 10})
    msg = str(info.value)
    assert msg.startswith(f"{load_topology('dual_path').source}: params.wifi_rate: ")
    assert "no such parameter" in msg and "cell_rate_mbit" in msg and "wifi_rate_mbit" in msg


def test_dual_path_bad_param_value_names_link_field() -> None:
    with pytest.raises(SpecError) as info:
        load_topology("dual_path", {"wifi_rate_mbit": 0})
    assert "links[0].rate_mbit: 0 is out of range" in str(info.value)
    with pytest.raises(SpecError) as info:
        load_topology("dual_path", {"cell_delay_ms": "slow"})
    assert "links[1].delay_ms: expected a number, got str 'slow'" in str(info.value)


@pytest.mark.parametrize("name", ["nope", "../../etc/passwd", "dual_path/../x", "Dual_Path",
                                  "dual_path\n", "", 5, None])
def test_load_topology_refuses_unknown_or_unsafe_names(name: Any) -> None:
    with pytest.raises(SpecError) as info:
        load_topology(name)
    err = info.value
    assert err.field == "topology.name"
    assert "available: dual_path" in str(err)


def test_load_topology_from_another_directory(tmp_path: Path) -> None:
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(MINI))
    spec = load_topology("mini", {"rate": 3}, directory=tmp_path)
    assert spec.links[0].rate_mbit == 3
    assert available_topologies(tmp_path) == ["mini"]


def test_load_topology_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError) as info:
        load_topology("bad", directory=tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'bad.yaml'}: (file): ")
    assert "UTF-8" in str(info.value)


# --- the small spec: valid forms ---------------------------------------------------------

def test_mini_parses_with_templates_rendered_to_native_types() -> None:
    spec = parse(MINI)
    assert spec.links[0].rate_mbit == 10 and isinstance(spec.links[0].rate_mbit, int)
    assert spec.links[0].delay_ms is None
    assert spec.source == FILE
    assert spec.middlebox_slots == {"wifi": "ap"} and spec.attach == {"off_path": "gw"}
    assert parse(MINI, {"rate": None, "delay": 5}).requirements == {"netem"}


def test_optional_sections_may_be_absent() -> None:
    spec = mini()
    for key in ("description", "params", "middlebox_slots", "attach"):
        del spec[key]
    spec["links"][0] = {"a": "client", "b": "ap", "path": "wifi"}
    parsed = parse(spec)
    assert parsed.description == "" and parsed.middlebox_slots == {} and parsed.attach == {}


def test_every_allowed_pool_range_is_accepted() -> None:
    for net in ALLOWED_POOLS:
        if net.version != 4:
            continue
        spec = mini(pools={"wifi": str(net)})
        spec["links"] = [{"a": "client", "b": "ap", "path": "wifi"},
                         {"a": "ap", "b": "server", "path": "wifi"},
                         {"a": "client", "b": "gw", "path": "wifi"}]
        del spec["middlebox_slots"]
        assert parse(spec).pools["wifi"] == net


# --- refused specs -----------------------------------------------------------------------

def test_unknown_top_level_key() -> None:
    refused(mini(colour="red"), "colour", "unknown key", "allowed keys: name, description")


def test_unknown_key_in_node_and_link() -> None:
    spec = mini()
    spec["nodes"]["ap"]["colour"] = "red"
    refused(spec, "nodes.ap.colour", "unknown key", "allowed keys: role")
    spec = mini()
    spec["links"][1]["jitter_ms"] = 5
    refused(spec, "links[1].jitter_ms", "unknown key", "allowed keys: a, b, path, rate_mbit")


def test_unknown_role_lists_allowed_roles() -> None:
    spec = mini()
    spec["nodes"]["ap"]["role"] = "switch"
    refused(spec, "nodes.ap.role", "'switch' is not allowed",
            f"allowed values: {', '.join(ROLES)}")


def test_missing_role() -> None:
    spec = mini()
    spec["nodes"]["ap"] = None
    refused(spec, "nodes.ap.role", "missing")


@pytest.mark.parametrize("bad", ["Client", "../etc", "a/b", "x" * 17, "1st", "node\n"])
def test_invalid_node_name(bad: str) -> None:
    spec = mini()
    spec["nodes"][bad] = {"role": "router"}
    with pytest.raises(SpecError) as info:
        parse(spec)
    assert str(info.value).startswith(f"{FILE}: nodes.{bad}: invalid node name")


def test_link_to_unknown_node_lists_declared_nodes() -> None:
    spec = mini()
    spec["links"][2]["b"] = "ghost"
    refused(spec, "links[2].b", "unknown node 'ghost'",
            "declared nodes: ap, client, gw, server")
    spec = mini()
    spec["links"][0]["a"] = "phone"
    refused(spec, "links[0].a", "unknown node 'phone'")


def test_duplicate_link_in_either_direction() -> None:
    spec = mini()
    spec["links"].append({"a": "client", "b": "ap", "path": "wifi"})
    refused(spec, "links[4].b", "a second link between client and ap")
    spec = mini()
    spec["links"].append({"a": "ap", "b": "client", "path": "wifi"})
    refused(spec, "links[4].b", "a second link between ap and client")


def test_link_to_itself() -> None:
    spec = mini()
    spec["links"][1]["b"] = "client"
    refused(spec, "links[1].b", "two different nodes")


def test_link_on_path_without_pool() -> None:
    spec = mini()
    spec["links"][1]["path"] = "lte"
    refused(spec, "links[1].path", "no address pool for path 'lte'", "pools: wifi, cell, core")


@pytest.mark.parametrize("cidr", ["10.0.0.0/24", "192.0.2.0/24", "192.168.1.0/24",
                                  "8.8.8.0/24", "198.51.0.0/16", "100.0.0.0/8"])
def test_pool_outside_test_ranges(cidr: str) -> None:
    spec = mini()
    spec["pools"]["cell"] = cidr
    refused(spec, "pools.cell", "is outside the test ranges",
            "198.51.100.0/24, 203.0.113.0/24 or 100.64.0.0/10")


@pytest.mark.parametrize(("cidr", "problem"), [
    ("fd6d:7074:6370::/64", "only IPv4 pools"),
    ("not-a-net", "is not a network"),
    ("198.51.100.1/24", "is not a network"),  # host bits set
    ("198.51.100.0/30", "is too small"),
    (42, "is not a network"),
])
def test_bad_pool_values(cidr: Any, problem: str) -> None:
    spec = mini()
    spec["pools"]["cell"] = cidr
    refused(spec, "pools.cell", problem)


def test_overlapping_pools() -> None:
    spec = mini()
    spec["pools"]["core"] = "198.51.100.128/25"
    refused(spec, "pools.core", "198.51.100.128/25 overlaps pools.wifi (198.51.100.0/24)",
            "give each path its own prefix")


@pytest.mark.parametrize("bad", ["../x", "a/b", "Wifi", "averyverylongpath"])
def test_invalid_path_name(bad: str) -> None:
    spec = mini()
    spec["pools"][bad] = "203.0.113.0/25"
    spec["pools"]["core"] = "203.0.113.128/25"
    with pytest.raises(SpecError) as info:
        parse(spec)
    assert str(info.value).startswith(f"{FILE}: pools.{bad}: invalid path name")


def test_disconnected_node() -> None:
    spec = mini()
    spec["nodes"]["lonely"] = {"role": "router"}
    refused(spec, "links", "nodes not connected to the rest: lonely")


def test_disconnected_island() -> None:
    spec = mini()
    spec["nodes"]["x1"] = {"role": "router"}
    spec["nodes"]["x2"] = {"role": "router"}
    spec["links"].append({"a": "x1", "b": "x2", "path": "core"})
    refused(spec, "links", "x1, x2")


@pytest.mark.parametrize("role", ["client", "server"])
def test_missing_client_or_server(role: str) -> None:
    spec = mini()
    name = role  # the node called client has role client, same for server
    spec["nodes"][name]["role"] = "router"
    refused(spec, "nodes", "needs at least one node with role client and one with role server")


def test_no_nodes_no_links() -> None:
    refused(mini(nodes={}), "nodes", "no nodes")
    refused(mini(links=[]), "links", "no links")
    refused(mini(nodes=["client"]), "nodes", "expected a mapping, got list")
    refused(mini(links={"a": "client"}), "links", "expected a list, got dict")


def test_unknown_param_override() -> None:
    refused(MINI, "params.speed", "this topology has no such parameter",
            "known parameters: delay, rate", overrides={"speed": 1})


def test_invalid_param_name() -> None:
    spec = mini(params={"Rate": 1})
    refused(spec, "params.Rate", "invalid parameter name")


def test_template_with_undefined_variable() -> None:
    spec = mini()
    spec["links"][0]["rate_mbit"] = "{{ speed }}"
    refused(spec, "links[0].rate_mbit", "template uses an undefined variable", "'speed'",
            "known: delay, rate")


def test_template_that_is_not_allowed() -> None:
    spec = mini()
    spec["links"][0]["rate_mbit"] = "{{ rate.__class__ }}"
    refused(spec, "links[0].rate_mbit", "template not allowed")


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("rate_mbit", 0, "0 is out of range (allowed: 0.01 to 100000)"),
    ("rate_mbit", "fast", "expected a number, got str"),
    ("rate_mbit", True, "expected a number, got bool"),
    ("delay_ms", -1, "out of range"),
    ("delay_ms", 10_001, "out of range"),
    ("loss_pct", 101, "out of range"),
    ("loss_pct", float("nan"), "out of range"),
    ("capture", "yes", "expected true or false"),
])
def test_bad_link_values(field: str, value: Any, problem: str) -> None:
    spec = mini()
    spec["links"][1][field] = value
    refused(spec, f"links[1].{field}", problem)


def test_primary_path_must_carry_a_link() -> None:
    spec = mini(primary_path="lte")
    refused(spec, "primary_path", "no link is on path 'lte'")
    spec = mini()
    del spec["primary_path"]
    refused(spec, "primary_path", "missing")


def test_bad_middlebox_slot_and_attach() -> None:
    refused(mini(middlebox_slots={"lte": "ap"}), "middlebox_slots.lte", "unknown path")
    refused(mini(middlebox_slots={"wifi": "ghost"}), "middlebox_slots.wifi",
            "unknown node 'ghost'", "declared nodes:")
    refused(mini(middlebox_slots={"wifi": ["ap"]}), "middlebox_slots.wifi", "unknown node")
    refused(mini(attach={"on_the_moon": "gw"}), "attach.on_the_moon",
            "unknown attachment point", "allowed: off_path, half_on_path")
    refused(mini(attach={"off_path": "ghost"}), "attach.off_path", "unknown node 'ghost'")
    refused(mini(attach={"off_path": {"x": 1}}), "attach.off_path", "unknown node")


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "Mini", "mini\n", ""])
def test_invalid_spec_name(name: str) -> None:
    refused(mini(name=name), "name", "not a valid name")


def test_syntax_error_and_non_mapping() -> None:
    with pytest.raises(SpecError) as info:
        parse_topology("name: [unclosed", FILE, {})
    assert str(info.value).startswith(f"{FILE}: (syntax): not valid YAML")
    with pytest.raises(SpecError) as info:
        parse_topology("- a\n- b\n", FILE, {})
    assert str(info.value).startswith(f"{FILE}: (top level): expected a mapping, got list")


def test_link_mtu_is_optional_and_bounded() -> None:
    assert all(link.mtu is None for link in parse(mini()).links)
    spec = mini()
    spec["links"][0]["mtu"] = 9000
    assert parse(spec).links[0].mtu == 9000
    for bad, fragment in ((100, "100 is out of range"), (70000, "allowed: 576 to 65535"),
                          (1500.5, "expected a whole number"), ("big", "expected a number")):
        spec["links"][0]["mtu"] = bad
        refused(spec, "links[0].mtu", fragment)
