"""Attachment points extend a spec with attacker nodes; the address plan routes them."""

from __future__ import annotations

import pytest

from testbed.errors import SpecError
from testbed.model.addressing import plan_addresses
from testbed.model.attachments import access_routers, attach
from testbed.model.topology import load_topology


def test_tap_links_to_the_paths_access_router_and_mirrors_the_client_link() -> None:
    spec, att, tap = attach(load_topology("dual_path"), "tap", "cell")
    assert att.node == "tap_cell"
    assert tap is not None and (tap.router, tap.observed, tap.path) == ("cell_gw", "client",
                                                                         "cell")
    plan = plan_addresses(spec)
    (intf,) = plan.interfaces["tap_cell"]
    assert intf.peer_node == "cell_gw" and intf.path == "cell"
    assert "tap_cell" not in plan.forwarding


def test_off_path_host_sits_on_the_server_side_with_its_own_routes() -> None:
    spec, att, tap = attach(load_topology("dual_path"), "off_path")
    assert tap is None and att.node == "off_path"
    plan = plan_addresses(spec)
    (intf,) = plan.interfaces["off_path"]
    assert intf.peer_node == "core"
    server = plan.address("server")
    assert any(r.node == "off_path" and server in r.dst for r in plan.routes)
    # The server can answer it: it has a route back to the attacker's subnet.
    assert any(r.node == "server" and intf.address.ip in r.dst for r in plan.routes)


def test_two_attachments_get_distinct_names() -> None:
    spec, a1, _ = attach(load_topology("dual_path"), "tap", "wifi")
    spec, a2, _ = attach(spec, "tap", "wifi")
    assert a1.node != a2.node


@pytest.mark.parametrize(("position", "path", "field"), [
    ("nowhere", None, "attacks.position"), ("tap", "satellite", "attacks.path"),
    ("tap", "core", "attacks.path"), ("on_path", "core", "attacks.path")])
def test_bad_positions_are_refused(position: str, path: str | None, field: str) -> None:
    with pytest.raises(SpecError) as err:
        attach(load_topology("dual_path"), position, path)
    assert err.value.field == field


def test_a_slot_that_is_not_an_access_router_hosts_no_tap() -> None:
    # core is the middlebox slot of path core (where the paths meet), not an access router:
    # a tap or on-path attacker there is refused, naming the paths that have one.
    spec = load_topology("dual_path")
    assert spec.middlebox_slots["core"] == "core"
    assert access_routers(spec) == {"wifi": "wifi_ap", "cell": "cell_gw"}
    with pytest.raises(SpecError) as err:
        attach(spec, "on_path", "core")
    assert "no access router for path 'core'" in str(err.value)
    assert "cell, wifi" in str(err.value)
