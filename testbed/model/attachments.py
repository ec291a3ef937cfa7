"""Attacker attachment points: add attacker nodes to a topology spec (pure).

Positions (DESIGN.md §2):

- ``tap`` on a path: a node linked to the path's access router; the router mirrors every
  frame of the path's access link to it (it sees that path's traffic and may inject from
  its own link). ``on_path`` attaches the same way.
- ``off_path``: a host with its own link to the topology's ``attach.off_path`` node (server
  side); it sees nothing of the victim's traffic but can send spoofed packets.
- ``half_on_path``: a host with its own address linked to ``attach.half_on_path``; it
  receives only what is sent to that address.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from testbed.errors import SpecError
from testbed.model.topology import LinkSpec, NodeSpec, TopologySpec

POSITIONS = ("tap", "on_path", "off_path", "half_on_path")


@dataclass(frozen=True)
class Tap:
    """``attacker`` receives a mirror of the frames on ``router``'s link to ``observed``."""

    attacker: str
    router: str
    observed: str
    path: str


@dataclass(frozen=True)
class Attachment:
    position: str
    node: str  # the attacker node's name in the extended spec
    path: str | None = None


def access_routers(spec: TopologySpec) -> dict[str, str]:
    """The middlebox slots that are access routers: ``{path: router}`` for each slot node
    linked to a client on its path. A slot elsewhere (e.g. ``core`` in dual_path, where the
    paths meet) hosts middleboxes but is no place for a tap or an on-path attacker."""
    clients = {n.name for n in spec.nodes if n.role == "client"}
    return {path: router for path, router in spec.middlebox_slots.items()
            if any(lk.path == path and router in (lk.a, lk.b) and {lk.a, lk.b} & clients
                   for lk in spec.links)}


def attach(spec: TopologySpec, position: str,
           path: str | None = None) -> tuple[TopologySpec, Attachment, Tap | None]:
    """Return ``spec`` extended with one attacker node at ``position``."""
    if position not in POSITIONS:
        raise SpecError(spec.source, "attacks.position", f"{position!r} is not a position",
                        f"allowed values: {', '.join(POSITIONS)}")
    names = {n.name for n in spec.nodes}
    if position in ("tap", "on_path"):
        routers = access_routers(spec)
        if path not in routers:
            raise SpecError(spec.source, "attacks.path", f"no access router for path {path!r}",
                            f"paths with one: {', '.join(sorted(routers))}")
        router = routers[path]
        observed = _client_neighbour(spec, router, path)
        name = _free(f"{'tap' if position == 'tap' else 'onpath'}_{path}"[:16], names)
        link = LinkSpec(a=router, b=name, path=path)
        tap: Tap | None = Tap(name, router, observed, path)
    else:
        host = spec.attach.get(position)
        if host is None:
            raise SpecError(spec.source, f"attach.{position}",
                            f"topology {spec.name} has no {position} attachment point",
                            f"add 'attach: {{{position}: <node>}}' to the topology")
        link_path = next(lk.path for lk in spec.links if host in (lk.a, lk.b))
        server_side = [lk.path for lk in spec.links if host in (lk.a, lk.b)
                       and any(n.role == "server" and n.name in (lk.a, lk.b)
                               for n in spec.nodes)]
        link_path = server_side[0] if server_side else link_path
        name = _free(position, names)
        link = LinkSpec(a=host, b=name, path=link_path)
        tap = None
    extended = dataclasses.replace(spec, nodes=(*spec.nodes, NodeSpec(name, "attacker")),
                                   links=(*spec.links, link))
    return extended, Attachment(position, name, path), tap


def _client_neighbour(spec: TopologySpec, router: str, path: str) -> str:
    clients = {n.name for n in spec.nodes if n.role == "client"}
    for lk in spec.links:
        if lk.path == path and router in (lk.a, lk.b):
            other = lk.b if lk.a == router else lk.a
            if other in clients:
                return other
    raise SpecError(spec.source, "middlebox_slots", f"{router} has no link to a client on "
                    f"path {path}", "a tap mirrors the client's access link")


def _free(base: str, names: set[str]) -> str:
    name, i = base, 1
    while name in names:
        i += 1
        name = f"{base[:14]}{i}"
    return name
