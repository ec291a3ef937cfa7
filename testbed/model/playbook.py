"""Playbooks: the experiment format users write (``playbooks/*.yaml``).

A playbook is YAML; string leaves may hold jinja2 expressions over its ``params`` (and
``--set`` overrides), rendered in a sandbox after parsing (see ``template``). Validation
errors name the file, the field and the allowed values.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attacks import ATTACKS
from testbed.errors import SpecError
from testbed.middleboxes import MIDDLEBOXES
from testbed.model.attachments import access_routers
from testbed.model.claims import CLAIMS
from testbed.model.expect import EXPECT_KEYS, Expectation, parse_expectations
from testbed.model.template import render_leaves
from testbed.model.topology import (
    TOPOLOGY_DIR,
    TopologySpec,
    available_topologies,
    load_topology,
)
from testbed.model.validate import NAME_RE, Fields, load_yaml, template_context

TRANSPORTS = ("tcp", "mptcp")
APP_KINDS = ("python", "nginx-curl", "openssl")
# Plugins register their kinds here (middlebox and attack issues); empty until they land.
MIDDLEBOX_KINDS: dict[str, str] = {k: cls.description for k, cls in MIDDLEBOXES.items()}
ATTACK_KINDS: dict[str, str] = {k: cls.description for k, cls in ATTACKS.items()}
# kind -> validate(params, file, field) returning the checked params (defaults filled in).
PluginValidator = Callable[[dict[str, Any], str, str], dict[str, Any]]
MIDDLEBOX_VALIDATORS: dict[str, PluginValidator] = {
    k: cls.validate for k, cls in MIDDLEBOXES.items()}
ATTACK_VALIDATORS: dict[str, PluginValidator] = {k: cls.validate for k, cls in ATTACKS.items()}
MAX_BYTES = 1 << 30  # 1 GiB per transfer
MAX_REPEAT = 100
MAX_TIMEOUT_S = 600
MAX_FILE_BYTES = 256 * 1024
# \Z, not $: "$" also matches before a trailing newline.
SNI_RE = re.compile(r"^(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\Z")
REQUIREMENT_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
SPLIT_SNI_MIDDLE = "sni_middle"
SPLIT_STEERS = ("mp_prio", "none")
MAX_SPLIT_AT = 16384


@dataclass(frozen=True)
class AppSpec:
    kind: str
    bytes: int
    sni: str
    port: int = 443
    timeout_s: float = 30.0
    # Claim S1 (python client, MPTCP only): testbed/peers/split_hello.py
    split_client_hello: bool = False
    split_at: int | str = SPLIT_SNI_MIDDLE
    split_steer: str = "mp_prio"
    # False (python app only): the same payload over the bare socket, no TLS. A control
    # that shows what TLS protects against (a3_join_plain), never a setting to measure TLS.
    tls: bool = True


@dataclass(frozen=True)
class PluginSpec:
    """A middlebox or attack entry: its kind plus the kind's own parameters."""

    kind: str
    where: str  # path (middlebox) or position (attack)
    params: dict[str, Any]


@dataclass
class Playbook:
    name: str
    file: str
    sha256: str
    claim: str | None
    description: str
    topology: TopologySpec
    transports: tuple[str, ...]
    app: AppSpec
    middleboxes: list[PluginSpec] = field(default_factory=list)
    attacks: list[PluginSpec] = field(default_factory=list)
    expect: dict[str, list[Expectation]] = field(default_factory=dict)
    requires: frozenset[str] = frozenset()
    sysctls: dict[str, int] = field(default_factory=dict)
    repeat: int = 1
    params: dict[str, Any] = field(default_factory=dict)


TOP_KEYS = ("name", "claim", "description", "params", "topology", "transports", "app",
            "middleboxes", "attacks", "expect", "requires", "sysctls", "repeat", "sweep")
ALLOWED_SYSCTLS = ("net.mptcp.checksum_enabled", "net.mptcp.allow_join_initial_addr_port",
                   "net.mptcp.add_addr_timeout", "net.mptcp.close_timeout",
                   "net.mptcp.blackhole_timeout", "net.mptcp.syn_retrans_before_tcp_fallback",
                   "net.mptcp.pm_type", "net.mptcp.stale_loss_cnt")


def load_playbook(path: str | Path, overrides: dict[str, Any] | None = None,
                  topology_dir: Path = TOPOLOGY_DIR) -> Playbook:
    path = Path(path)
    file = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SpecError(file, "(file)", f"cannot read: {exc.strerror}",
                        "give the path of a playbook, e.g. playbooks/baseline.yaml") from None
    if size > MAX_FILE_BYTES:
        raise SpecError(file, "(file)", f"{size} bytes, larger than {MAX_FILE_BYTES}",
                        "a playbook is a short description")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(file, "(file)", f"cannot read: {exc}", "save it as UTF-8 text") from None
    return parse_playbook(text, file, overrides or {}, topology_dir)


def parse_playbook(text: str, file: str, overrides: dict[str, Any],
                   topology_dir: Path = TOPOLOGY_DIR) -> Playbook:
    data = load_yaml(text, file)
    top = Fields(data, file, "", TOP_KEYS)
    context = template_context(top, overrides, "set on the command line but not declared",
                               "declared parameters")
    # `sweep` lists parameter values (expand_sweeps); it is data, never a template.
    rendered = render_leaves({k: v for k, v in data.items() if k not in ("params", "sweep")},
                             context, file)
    top = Fields(rendered, file, "", TOP_KEYS)

    name = top.str("name", pattern=NAME_RE)
    claim = top.opt_str("claim", choices=tuple(CLAIMS))
    description = top.str("description", default="", max_len=4000)

    topo = Fields(top.raw("topology"), file, "topology", ("name", "params"))
    topo_params = topo.mapping("params")
    topology = _load_topology(topo.str("name", pattern=NAME_RE), topo_params, topology_dir,
                              file)

    transports_raw = top.sequence("transports", max_items=2) or list(TRANSPORTS)
    for i, t in enumerate(transports_raw):
        if t not in TRANSPORTS:
            raise top.error(f"transports[{i}]", f"{t!r} is not a transport",
                            f"allowed values: {', '.join(TRANSPORTS)}")
    if len(set(transports_raw)) != len(transports_raw):
        raise top.error("transports", "a transport is listed twice")
    transports = tuple(transports_raw)

    app_f = Fields(top.raw("app"), file, "app", ("kind", "bytes", "sni", "port", "timeout_s",
                                                 "tls", *APP_SPLIT_KEYS))
    sni = app_f.str("sni", default="www.example.test", max_len=253)
    if not SNI_RE.match(sni):
        raise app_f.error("sni", f"{sni!r} is not a DNS name", "e.g. www.example.test")
    app = AppSpec(
        kind=app_f.str("kind", choices=APP_KINDS),
        bytes=app_f.integer("bytes", default=1_000_000, lo=1, hi=MAX_BYTES),
        sni=sni,
        port=app_f.integer("port", default=443, lo=1, hi=65535),
        timeout_s=app_f.number("timeout_s", default=30.0, lo=1, hi=MAX_TIMEOUT_S),
        tls=_tls_option(app_f),
        **_split_options(app_f, transports),
    )

    middleboxes = _plugins(top, "middleboxes", "path", MIDDLEBOX_KINDS, set(topology.paths),
                           MIDDLEBOX_VALIDATORS)
    for i, mb in enumerate(middleboxes):  # only a path with a slot node can host one
        if mb.where not in topology.middlebox_slots:
            raise top.error(f"middleboxes[{i}].path", f"path {mb.where!r} has no middlebox "
                            f"slot in topology {topology.name}", "paths with a slot: "
                            f"{', '.join(sorted(topology.middlebox_slots)) or 'none'}")
    attacks = _plugins(top, "attacks", "position", ATTACK_KINDS,
                       {"tap", "off_path", "half_on_path", "on_path"}, ATTACK_VALIDATORS)
    for i, attack in enumerate(attacks):
        cls = ATTACKS[attack.kind]
        where = f"attacks[{i}]"
        if attack.where not in cls.positions:
            raise top.error(f"{where}.position", f"{attack.kind} cannot act from "
                            f"{attack.where!r}", f"allowed values: {', '.join(cls.positions)}")
        if attack.where in ("tap", "on_path"):
            path = attack.params.get("path")
            routers = access_routers(topology)
            if not isinstance(path, str) or path not in routers:
                raise top.error(f"{where}.path", f"{path!r} is not a path with an access "
                                "router", f"allowed values: {', '.join(sorted(routers))}")
        elif "path" in attack.params:
            raise top.error(f"{where}.path", f"position {attack.where} takes no path",
                            "remove 'path'")
        for t in transports:
            if t not in cls.transports:
                raise top.error(f"{where}.kind", f"{attack.kind} does not apply to {t}",
                                f"list only {', '.join(cls.transports)} in 'transports'")

    expect_f = Fields(top.raw("expect") or {}, file, "expect", transports)
    expect = {t: parse_expectations(expect_f.mapping(t), file, f"expect.{t}", topology)
              for t in transports}

    requires = set()
    for i, req in enumerate(top.sequence("requires")):
        if not isinstance(req, str) or not REQUIREMENT_RE.match(req):
            raise top.error(f"requires[{i}]", f"{req!r} is not a capability name",
                            "use the names 'testbed doctor' prints")
        requires.add(req)

    sysctls = {}
    for key, value in top.mapping("sysctls").items():
        if key not in ALLOWED_SYSCTLS:
            raise top.error(f"sysctls.{key}", "not a sysctl a playbook may set",
                            f"allowed: {', '.join(ALLOWED_SYSCTLS)}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
            raise top.error(f"sysctls.{key}", f"{value!r} is not an integer 0..100000")
        sysctls[key] = value

    return Playbook(
        name=name, file=file, sha256=hashlib.sha256(text.encode()).hexdigest(), claim=claim,
        description=description, topology=topology, transports=transports, app=app,
        middleboxes=middleboxes, attacks=attacks, expect=expect, requires=frozenset(requires),
        sysctls=sysctls, repeat=top.integer("repeat", default=1, lo=1, hi=MAX_REPEAT),
        params=context,
    )


APP_SPLIT_KEYS = ("split_client_hello", "split_at", "split_steer")


def _tls_option(app_f: Fields) -> bool:
    """``app.tls``: only the python app may turn TLS off (a plaintext control)."""
    tls = app_f.boolean("tls", True)
    if not tls:
        kind = app_f.raw("kind")
        if kind != "python":
            raise app_f.error("tls", f"the {kind!r} app always runs TLS"[:200],
                              "use kind: python for a plaintext control, or remove 'tls'")
        if app_f.boolean("split_client_hello", False):
            raise app_f.error("tls", "split_client_hello splits a TLS ClientHello",
                              "remove 'tls: false' or 'split_client_hello'")
    return tls


def _split_options(app_f: Fields, transports: tuple[str, ...]) -> dict[str, Any]:
    """The split-ClientHello options of ``app`` (claim S1), checked."""
    split = app_f.boolean("split_client_hello", False)
    at = app_f.raw("split_at", SPLIT_SNI_MIDDLE)
    if at != SPLIT_SNI_MIDDLE and (isinstance(at, bool) or not isinstance(at, int)
                                   or not 1 <= at <= MAX_SPLIT_AT):
        raise app_f.error("split_at", f"{at!r} is neither {SPLIT_SNI_MIDDLE!r} nor a byte "
                          f"offset"[:200], f"use {SPLIT_SNI_MIDDLE} or 1..{MAX_SPLIT_AT}")
    steer = app_f.str("split_steer", default="mp_prio", choices=SPLIT_STEERS)
    if split:
        kind = app_f.raw("kind")
        if kind != "python":
            raise app_f.error("split_client_hello", f"the {kind!r} client cannot split its "
                              "ClientHello"[:200], "use kind: python")
        if "tcp" in transports:
            raise app_f.error("split_client_hello", "needs a second subflow, so MPTCP",
                              "list only mptcp in 'transports'")
    return {"split_client_hello": split, "split_at": at, "split_steer": steer}


def _load_topology(name: str, params: dict[str, Any], directory: Path,
                   file: str) -> TopologySpec:
    """The playbook's topology; its errors name the playbook (the topology file only as
    the reason), since the playbook chose the name and the parameters."""
    if name not in available_topologies(directory):
        raise SpecError(file, "topology.name", f"no topology called '{name}'",
                        f"available: {', '.join(available_topologies(directory)) or 'none'}")
    try:
        return load_topology(name, params, directory)
    except SpecError as exc:
        if exc.field in {f"params.{k}" for k in params}:
            raise SpecError(file, f"topology.{exc.field}", exc.problem, exc.fix) from None
        raise SpecError(file, "topology.params", f"topology '{name}' rejects these "
                        f"parameters: {exc}"[:1000], "fix the values under topology.params"
                        ) from None


def _plugins(top: Fields, key: str, where_key: str, registry: dict[str, str],
             places: set[str],
             validators: dict[str, PluginValidator] | None = None) -> list[PluginSpec]:
    out = []
    for i, body in enumerate(top.sequence(key, max_items=16)):
        field_name = f"{key}[{i}]"
        if not isinstance(body, dict):
            raise top.error(field_name, "expected a mapping with 'kind' and "
                            f"'{where_key}'")
        kind = body.get("kind")
        if not isinstance(kind, str) or kind not in registry:
            available = ", ".join(sorted(registry)) or "none in this version"
            singular = key[:-2] if key.endswith("es") else key[:-1]
            raise top.error(f"{field_name}.kind", f"unknown {singular} kind {kind!r}"[:200],
                            f"available: {available}")
        where = body.get(where_key)
        if not isinstance(where, str) or where not in places:
            raise top.error(f"{field_name}.{where_key}", f"{where!r} is not allowed",
                            f"allowed values: {', '.join(sorted(places))}")
        earlier = next((j for j, spec in enumerate(out)
                        if spec.kind == kind and spec.where == where), None)
        if earlier is not None and key == "middleboxes":
            # A box's rule marker and evidence files are named by path and kind: a second
            # box of the kind on the path would share them (its teardown removing the
            # first's rules).
            raise top.error(f"{field_name}.kind", f"a second {kind!r} on path {where!r} "
                            f"(the first is {key}[{earlier}])",
                            f"one {kind} per path; combine their parameters")
        params = {k: v for k, v in body.items() if k not in ("kind", where_key)}
        validate = (validators or {}).get(str(kind))
        if validate is not None:
            params = validate(params, top.file, top.path(field_name))
        out.append(PluginSpec(str(kind), str(where), params))
    return out


MAX_SWEEP_VALUES = 16
MAX_SWEEP_SCENARIOS = 64
SWEEP_VALUE_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,40}\Z")


def expand_sweeps(path: str | Path, overrides: dict[str, Any] | None = None,
                  topology_dir: Path = TOPOLOGY_DIR) -> list[Playbook]:
    """The scenarios of a playbook: one per combination (cartesian product, in the order
    written) of the values its ``sweep: {param: [v1, v2], ...}`` lists, each named
    ``<name>[param=v1,...]`` and reported separately; just the playbook when it has no
    sweep. A parameter set with ``--set`` (``overrides``) is fixed, not swept."""
    overrides = dict(overrides or {})
    base = load_playbook(path, overrides, topology_dir)
    file = str(path)
    data = load_yaml(Path(path).read_text(encoding="utf-8"), file)
    raw = data.get("sweep") if isinstance(data, dict) else None
    if raw is None:
        return [base]
    if not isinstance(raw, dict) or not raw:
        raise SpecError(file, "sweep", "expected a non-empty mapping of parameter -> list",
                        "e.g. sweep: {nat_path: [wifi, cell]}")
    axes: list[tuple[str, list[Any]]] = []
    for param, values in raw.items():
        field_name = f"sweep.{param}"
        if not isinstance(param, str) or param not in base.params:
            raise SpecError(file, field_name, "not a declared parameter",
                            f"declared parameters: {', '.join(sorted(base.params)) or 'none'}")
        if param in overrides:
            continue
        if not isinstance(values, list) or not values:
            raise SpecError(file, field_name, "expected a non-empty list of values",
                            f"e.g. {param}: [a, b]")
        if len(values) > MAX_SWEEP_VALUES:
            raise SpecError(file, field_name, f"{len(values)} values, more than "
                            f"{MAX_SWEEP_VALUES}", "sweep fewer values")
        for i, value in enumerate(values):
            if isinstance(value, dict | list) or value is None or \
                    not SWEEP_VALUE_RE.match(str(value)):
                raise SpecError(file, f"{field_name}[{i}]", f"{value!r} is not a plain value"
                                [:200], "use numbers or words of letters, digits, '_.+-'")
        if len({str(v) for v in values}) != len(values):
            raise SpecError(file, field_name, "a value is listed twice")
        axes.append((param, values))
    combos: list[dict[str, Any]] = [{}]
    for param, values in axes:
        combos = [{**c, param: v} for c in combos for v in values]
        if len(combos) > MAX_SWEEP_SCENARIOS:
            raise SpecError(file, "sweep", f"more than {MAX_SWEEP_SCENARIOS} combinations",
                            "sweep fewer parameters or values")
    out = []
    for combo in combos:
        if not combo:
            return [base]
        suffix = ",".join(f"{k}={v}" for k, v in combo.items())
        try:
            pb = load_playbook(path, {**overrides, **combo}, topology_dir)
        except SpecError as exc:
            raise SpecError(exc.file, exc.field, f"{exc.problem} (with sweep {suffix})",
                            exc.fix) from None
        pb.name = f"{pb.name}[{suffix}]"
        out.append(pb)
    return out


def expect_keys_help() -> str:
    return ", ".join(EXPECT_KEYS)
