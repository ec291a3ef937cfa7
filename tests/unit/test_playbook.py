"""Playbooks: the shipped baseline (defaults and overrides) and every validation error path
of ``playbook.py`` and ``expect.py``, each a SpecError naming the file and the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.errors import SpecError
from testbed.model import playbook as pb
from testbed.model.claims import CLAIMS
from testbed.model.expect import EXPECT_KEYS, Expectation
from testbed.model.outcome import STATUSES
from testbed.model.playbook import (
    ALLOWED_SYSCTLS,
    APP_KINDS,
    MAX_FILE_BYTES,
    load_playbook,
    parse_playbook,
)

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "playbooks" / "baseline.yaml"
BASE: dict[str, Any] = yaml.safe_load(BASELINE.read_text())
FILE = "pb.yaml"


def base(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def parse(data: dict[str, Any], overrides: dict[str, Any] | None = None):
    return parse_playbook(yaml.safe_dump(data, sort_keys=False), FILE, overrides or {})


def refused(data: dict[str, Any] | str, field: str, *fragments: str,
            overrides: dict[str, Any] | None = None) -> SpecError:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    with pytest.raises(SpecError) as info:
        parse_playbook(text, FILE, overrides or {})
    err = info.value
    msg = str(err)
    assert msg.startswith(f"{FILE}: {field}: "), msg
    assert err.file == FILE and err.field == field
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return err


def with_expect(transport: str, **expectations: Any) -> dict[str, Any]:
    data = base()
    data["expect"][transport] = expectations
    return data


# --- the baseline ------------------------------------------------------------------------

def test_baseline_loads_with_defaults() -> None:
    book = load_playbook(BASELINE)
    assert book.name == "baseline"
    assert book.file == str(BASELINE)
    assert len(book.sha256) == 64
    assert book.claim is None
    assert book.topology.name == "dual_path"
    assert book.transports == ("tcp", "mptcp")
    assert book.app.kind == "python" and book.app.bytes == 2_000_000
    assert book.app.sni == "www.example.test" and book.app.port == 443
    assert book.app.timeout_s == 30
    assert book.middleboxes == [] and book.attacks == []
    assert book.sysctls == {} and book.repeat == 1 and book.requires == frozenset()
    assert book.params == {"app": "python", "bytes": 2_000_000, "timeout_s": 30}
    assert set(book.expect) == {"tcp", "mptcp"}
    mptcp = {e.label: e for e in book.expect["mptcp"]}
    assert mptcp["subflows"].expected == ("==", 2)
    assert mptcp["paths_with_data"].expected == ["cell", "wifi"]  # sorted
    assert mptcp["counters.server.MPTcpExtMPJoinAckRx"] == Expectation(
        "counters", ("==", 1), node="server", counter="MPTcpExtMPJoinAckRx")
    tcp = {e.label: e for e in book.expect["tcp"]}
    assert tcp["fallback"].expected is False and tcp["keys_seen_on"].expected == []


@pytest.mark.parametrize("kind", APP_KINDS)
def test_baseline_app_override(kind: str) -> None:
    book = load_playbook(BASELINE, {"app": kind})
    assert book.app.kind == kind
    assert book.params["app"] == kind


def test_baseline_bytes_override_keeps_native_int() -> None:
    book = load_playbook(BASELINE, {"bytes": 1234})
    assert book.app.bytes == 1234 and isinstance(book.app.bytes, int)


def test_baseline_unknown_override_refused() -> None:
    with pytest.raises(SpecError) as info:
        load_playbook(BASELINE, {"color": "red"})
    msg = str(info.value)
    assert msg.startswith(f"{BASELINE}: params.color: set on the command line but not declared")
    assert "declared parameters: app, bytes" in msg


def test_baseline_bad_override_value_names_the_field() -> None:
    with pytest.raises(SpecError) as info:
        load_playbook(BASELINE, {"app": "curl"})
    msg = str(info.value)
    assert msg.startswith(f"{BASELINE}: app.kind: 'curl' is not allowed")
    assert f"allowed values: {', '.join(APP_KINDS)}" in msg
    with pytest.raises(SpecError) as info:
        load_playbook(BASELINE, {"bytes": 0})
    assert str(info.value).startswith(f"{BASELINE}: app.bytes: 0 is out of range")


def test_same_text_same_hash() -> None:
    text = BASELINE.read_text()
    assert parse_playbook(text, "a", {}).sha256 == parse_playbook(text, "b", {}).sha256
    assert parse_playbook(text + "\n# x\n", "a", {}).sha256 != \
        parse_playbook(text, "a", {}).sha256


def test_minimal_playbook_gets_defaults() -> None:
    book = parse_playbook("name: mini\ntopology: {name: dual_path}\napp: {kind: openssl}\n",
                          FILE, {})
    assert book.transports == ("tcp", "mptcp")
    assert book.app.bytes == 1_000_000 and book.app.sni == "www.example.test"
    assert book.expect == {"tcp": [], "mptcp": []}
    assert book.description == ""


def test_optional_sections() -> None:
    data = base(claim="P1", transports=["mptcp"], repeat=3, requires=["netem", "tbf"],
                sysctls={"net.mptcp.checksum_enabled": 1})
    del data["expect"]["tcp"]
    data["topology"]["params"] = {"cell_delay_ms": 20}
    book = parse(data)
    assert book.claim == "P1" and book.transports == ("mptcp",) and book.repeat == 3
    assert book.requires == frozenset({"netem", "tbf"})
    assert book.sysctls == {"net.mptcp.checksum_enabled": 1}
    assert "netem" in book.topology.requirements


def test_plugins_registered_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pb, "MIDDLEBOX_KINDS", {"fake": "does nothing"})
    monkeypatch.setattr(pb, "MIDDLEBOX_VALIDATORS", {}, raising=False)
    book = parse(base(middleboxes=[{"kind": "fake", "path": "wifi", "port": 8080}]))
    assert book.middleboxes == [pb.PluginSpec("fake", "wifi", {"port": 8080})]


# --- refused playbooks -------------------------------------------------------------------

def test_unknown_top_key() -> None:
    refused(base(colour="red"), "colour", "unknown key",
            "allowed keys: name, claim, description, params")


@pytest.mark.parametrize("name", ["Baseline", "base line", "../../etc/passwd", "a/b", "x" * 17,
                                  "baseline\n", 42])
def test_bad_name(name: Any) -> None:
    refused(base(name=name), "name")


def test_missing_name() -> None:
    data = base()
    del data["name"]
    refused(data, "name", "missing")


def test_unknown_claim_lists_claims() -> None:
    refused(base(claim="Z9"), "claim", "'Z9' is not allowed",
            f"allowed values: {', '.join(CLAIMS)}")


@pytest.mark.parametrize("params", [{"Bad": 1}, {"a-b": 1}, {1: 2}])
def test_bad_param_name(params: dict[Any, Any]) -> None:
    err = refused(base(params=params), f"params.{next(iter(params))}", "invalid parameter name")
    assert "lower-case" in str(err)


def test_template_with_undefined_variable() -> None:
    data = base()
    data["app"]["sni"] = "{{ host }}"
    refused(data, "app.sni", "template uses an undefined variable", "'host' is undefined",
            "known: app, bytes")


def test_template_not_allowed() -> None:
    data = base()
    data["app"]["kind"] = "{{ app.__class__ }}"
    refused(data, "app.kind", "template not allowed")


def test_bad_transport() -> None:
    refused(base(transports=["tcp", "quic"]), "transports[1]", "'quic' is not a transport",
            "allowed values: tcp, mptcp")
    refused(base(transports="tcp"), "transports", "expected a list, got str")


def test_duplicate_transport() -> None:
    refused(base(transports=["tcp", "tcp"]), "transports", "a transport is listed twice")
    refused(base(transports=["tcp", "mptcp", "tcp"]), "transports", "more than the limit of 2")


@pytest.mark.parametrize("kind", ["curl", "Python", "", 3, None])
def test_bad_app_kind_lists_allowed_kinds(kind: Any) -> None:
    data = base()
    data["app"]["kind"] = kind
    refused(data, "app.kind", *(() if kind is None or isinstance(kind, int)
                                 else ("allowed values: python, nginx-curl, openssl",)))


def test_app_missing_or_not_a_mapping() -> None:
    data = base()
    del data["app"]
    refused(data, "app", "expected a mapping")
    refused(base(app=["python"]), "app", "expected a mapping, got list")
    data = base()
    data["app"]["protocol"] = "h2"
    refused(data, "app.protocol", "unknown key", "allowed keys: kind, bytes, sni, port")


@pytest.mark.parametrize("sni", ["not a name", "WWW.EXAMPLE.TEST", "localhost", "-a.example",
                                 "a..example", "www.example.test\n", "x" * 250 + ".test",
                                 "www.example.test/../x"])
def test_bad_sni(sni: str) -> None:
    data = base()
    data["app"]["sni"] = sni
    refused(data, "app.sni")


@pytest.mark.parametrize(("value", "problem"), [
    (0, "0 is out of range (allowed: 1 to"),
    (-5, "out of range"),
    ((1 << 30) + 1, "out of range"),
    (10**30, "out of range"),
    (1.5, "expected a whole number, got 1.5"),
    (True, "expected a number, got bool"),
    ("lots", "expected a number, got str 'lots'"),
    ([1], "expected a number, got list"),
    (float("nan"), "expected a whole number"),
])
def test_bad_bytes(value: Any, problem: str) -> None:
    data = base()
    data["app"]["bytes"] = value
    refused(data, "app.bytes", problem)


@pytest.mark.parametrize(("field", "value"), [("port", 0), ("port", 65536), ("port", 443.0),
                                              ("timeout_s", 0), ("timeout_s", 601),
                                              ("timeout_s", float("inf"))])
def test_bad_port_and_timeout(field: str, value: Any) -> None:
    data = base()
    data["app"][field] = value
    refused(data, f"app.{field}")


def test_unknown_middlebox_kind_says_available_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pb, "MIDDLEBOX_KINDS", {})
    refused(base(middleboxes=[{"kind": "nat", "path": "wifi"}]), "middleboxes[0].kind",
            "unknown middlebox kind 'nat'", "available: none in this version")
    monkeypatch.setattr(pb, "MIDDLEBOX_KINDS", {"strip": "s", "nat": "n"})
    refused(base(middleboxes=[{"kind": "proxy", "path": "wifi"}]), "middleboxes[0].kind",
            "unknown middlebox kind 'proxy'", "available: nat, strip")
    refused(base(middleboxes=[{"kind": ["nat"], "path": "wifi"}]), "middleboxes[0].kind",
            "unknown middlebox kind")
    monkeypatch.setattr(pb, "MIDDLEBOX_VALIDATORS", {}, raising=False)
    refused(base(middleboxes=[{"kind": "nat", "path": "lte"}]), "middleboxes[0].path",
            "'lte' is not allowed", "allowed values: cell, ")
    refused(base(middleboxes=[{"kind": "nat", "path": {"x": 1}}]), "middleboxes[0].path")
    refused(base(middleboxes=["nat"]), "middleboxes[0]", "expected a mapping")


def test_a_second_box_of_one_kind_on_one_path_is_refused() -> None:
    """A box's rule marker and evidence are named by path and kind: two of one kind on one
    path would share them. On different paths they are fine (blackhole both paths)."""
    refused(base(middleboxes=[{"kind": "nat", "path": "wifi"},
                              {"kind": "drop_mptcp_syn", "path": "cell"},
                              {"kind": "nat", "path": "wifi"}]),
            "middleboxes[2].kind", "a second 'nat' on path 'wifi' (the first is "
            "middleboxes[0])", "one nat per path")
    book = parse(base(middleboxes=[{"kind": "nat", "path": "wifi"},
                                   {"kind": "nat", "path": "cell"}]))
    assert [(m.kind, m.where) for m in book.middleboxes] == [("nat", "wifi"), ("nat", "cell")]


def test_unknown_attack_kind_and_position(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pb, "ATTACK_KINDS", {})
    refused(base(attacks=[{"kind": "inject", "position": "tap"}]), "attacks[0].kind",
            "unknown attack kind 'inject'", "available: none in this version")
    monkeypatch.setattr(pb, "ATTACK_KINDS", {"inject": "i"})
    refused(base(attacks=[{"kind": "inject", "position": "inside"}]), "attacks[0].position",
            "allowed values: half_on_path, off_path, on_path, tap")


# --- expectations ------------------------------------------------------------------------

def test_expectation_with_unknown_path() -> None:
    refused(with_expect("mptcp", paths_with_data=["wifi", "lte"]),
            "expect.mptcp.paths_with_data", "unknown path 'lte'",
            "paths of dual_path: cell, core, wifi")
    refused(with_expect("tcp", sni_seen_on="wifi"), "expect.tcp.sni_seen_on",
            "expected a list of paths")
    refused(with_expect("tcp", keys_seen_on=[1]), "expect.tcp.keys_seen_on",
            "expected a list of paths")


def test_unknown_expectation_key() -> None:
    refused(with_expect("tcp", latency=3), "expect.tcp.latency", "unknown expectation",
            f"allowed: {', '.join(EXPECT_KEYS)}")


def test_expect_for_a_transport_not_run() -> None:
    refused(base(transports=["tcp"]), "expect.mptcp", "unknown key", "allowed keys: tcp")
    refused(base(expect=[1]), "expect", "expected a mapping")
    data = base()
    data["expect"]["tcp"] = [1]
    refused(data, "expect.tcp", "expected a mapping, got list")


@pytest.mark.parametrize("value", ["about 2", "=> 1", ">= 1.5", "2x", "", ">=", True, 1.5,
                                   [2], 10**13, ">= 99999999999999"])
def test_bad_comparison(value: Any) -> None:
    refused(with_expect("mptcp", subflows=value), "expect.mptcp.subflows")


@pytest.mark.parametrize(("value", "expected"), [(2, ("==", 2)), (">=1", (">=", 1)),
                                                 (" != 0 ", ("!=", 0)), ("<-1", ("<", -1))])
def test_good_comparisons(value: Any, expected: tuple[str, int]) -> None:
    book = parse(with_expect("mptcp", subflows=value))
    assert book.expect["mptcp"] == [Expectation("subflows", expected)]


def test_bad_comparison_message_gives_examples() -> None:
    refused(with_expect("mptcp", subflows="about 2"), "expect.mptcp.subflows",
            "'about 2' is not a number or a comparison", "'>=1'")


def test_unknown_counter_node() -> None:
    refused(with_expect("mptcp", counters={"phone": {"MPTcpExtMPJoinAckRx": 1}}),
            "expect.mptcp.counters.phone", "unknown node",
            "nodes of dual_path: cell_gw, client, core, server, wifi_ap")


@pytest.mark.parametrize("counter", ["Mptcp-Ext", "1abc", "X", "MPTcpExtMPJoinAckRx\n"])
def test_bad_counter_name(counter: str) -> None:
    refused(with_expect("mptcp", counters={"server": {counter: 1}}),
            f"expect.mptcp.counters.server.{counter}", "not a counter name")


def test_bad_counter_shapes() -> None:
    refused(with_expect("mptcp", counters=[1]), "expect.mptcp.counters",
            "expected {node: {Counter: comparison}}")
    refused(with_expect("mptcp", counters={"server": 1}), "expect.mptcp.counters.server",
            "expected {Counter: comparison}")
    refused(with_expect("mptcp", counters={"server": {"MPTcpExtMPJoinAckRx": "lots"}}),
            "expect.mptcp.counters.server.MPTcpExtMPJoinAckRx", "not a number or a comparison")


def test_bad_status_tls_version_and_booleans() -> None:
    refused(with_expect("tcp", status="fine"), "expect.tcp.status",
            f"allowed values: {', '.join(STATUSES)}")
    refused(with_expect("tcp", status=["ok"]), "expect.tcp.status")
    refused(with_expect("tcp", tls_version="TLSv1.0"), "expect.tcp.tls_version",
            "allowed values: TLSv1.3, TLSv1.2")
    refused(with_expect("tcp", checksum_match="yes"), "expect.tcp.checksum_match",
            "expected true or false")
    refused(with_expect("tcp", fallback=0), "expect.tcp.fallback", "expected true or false")


# --- the rest of the top level -----------------------------------------------------------

def test_sysctl_not_allowed() -> None:
    refused(base(sysctls={"net.ipv4.ip_forward": 1}), "sysctls.net.ipv4.ip_forward",
            "not a sysctl a playbook may set", f"allowed: {', '.join(ALLOWED_SYSCTLS)}")
    refused(base(sysctls={"net.mptcp.checksum_enabled": 10**6}),
            "sysctls.net.mptcp.checksum_enabled", "is not an integer 0..100000")
    refused(base(sysctls={"net.mptcp.checksum_enabled": True}),
            "sysctls.net.mptcp.checksum_enabled", "is not an integer")
    refused(base(sysctls={"net.mptcp.checksum_enabled": "1"}),
            "sysctls.net.mptcp.checksum_enabled", "is not an integer")


@pytest.mark.parametrize(("value", "problem"), [(101, "101 is out of range (allowed: 1 to 100)"),
                                                (0, "out of range"), (2.5, "whole number"),
                                                ("many", "expected a number")])
def test_repeat(value: Any, problem: str) -> None:
    refused(base(repeat=value), "repeat", problem)


@pytest.mark.parametrize("req", ["Netem", "a/b", "../x", 5, "x" * 33])
def test_bad_requirement(req: Any) -> None:
    refused(base(requires=[req]), "requires[0]", "is not a capability name")


def test_topology_errors_name_the_playbook() -> None:
    refused(base(topology={"name": "triple_path"}), "topology.name",
            "no topology called 'triple_path'", "available: dual_path")
    refused(base(topology={"name": "../../etc/passwd"}), "topology.name", "not a valid name")
    refused(base(topology={"name": "dual_path", "params": {"wifi_rate": 1}}),
            "topology.params.wifi_rate", "this topology has no such parameter",
            "wifi_rate_mbit")
    err = refused(base(topology={"name": "dual_path", "params": {"wifi_rate_mbit": "fast"}}),
                  "topology.params", "dual_path.yaml: links[0].rate_mbit: expected a number")
    assert "fix the values under topology.params" in str(err)
    refused(base(topology="dual_path"), "topology", "expected a mapping, got str")
    refused(base(topology={"name": "dual_path", "size": 3}), "topology.size", "unknown key")


def test_yaml_syntax_error() -> None:
    refused("name: [baseline\n", "(syntax)", "not valid YAML", "fix the YAML syntax")
    refused("name: baseline\n  bad: indent\n", "(syntax)", "not valid YAML")
    refused("name: !!python/object/apply:os.system ['id']\n", "(syntax)", "not valid YAML")


def test_yaml_values_the_safe_loader_cannot_build() -> None:
    refused("name: baseline\nrepeat: 2001-13-45\n", "(syntax)", "not a valid YAML value")
    refused("name: baseline\nrepeat: !!int zz\n", "(syntax)", "not a valid YAML value")
    refused("name: baseline\nrepeat: !!timestamp zz\n", "(syntax)", "not a valid YAML value")


def test_alias_bomb_and_self_reference() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = "params:\n" + "".join(f"  {line}\n" for line in lines)
    refused(bomb, "(document)", "more than")
    refused("name: &x [*x]\n", "(document)", "nested more than")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n", "", "null\n"])
def test_top_level_not_a_mapping(text: str) -> None:
    refused(text, "(top level)", "expected a mapping")


# --- files -------------------------------------------------------------------------------

def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(BASELINE.read_text() + "#" * MAX_FILE_BYTES)
    with pytest.raises(SpecError) as info:
        load_playbook(path)
    assert str(info.value).startswith(f"{path}: (file): ")
    assert f"larger than {MAX_FILE_BYTES}" in str(info.value)


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: baseline\ndescription: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_playbook(path)
    assert str(info.value).startswith(f"{path}: (file): cannot read")
    assert "UTF-8" in str(info.value)


def test_file_missing_or_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_playbook(tmp_path / "nope.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'nope.yaml'}: (file): cannot read")
    with pytest.raises(SpecError) as info:
        load_playbook(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: (file): cannot read")


def test_utf8_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "utf8.yaml"
    data = base(description="Caf\u00e9 \u2014 \u7db2\u8def")
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert load_playbook(path).description == "Caf\u00e9 \u2014 \u7db2\u8def"


# --- app.tls: the plaintext control (python app only) ------------------------------------
def test_app_tls_defaults_true_and_python_may_turn_it_off() -> None:
    assert parse(base()).app.tls is True
    data = base()
    data["app"] = {**data["app"], "kind": "python", "tls": False}
    assert parse(data).app.tls is False


@pytest.mark.parametrize("kind", ["nginx-curl", "openssl"])
def test_app_tls_false_refused_for_other_apps(kind: str) -> None:
    data = base()
    data["app"] = {**data["app"], "kind": kind, "tls": False}
    refused(data, "app.tls", kind, "python")


def test_app_tls_must_be_a_boolean() -> None:
    data = base()
    data["app"] = {**data["app"], "kind": "python", "tls": "no"}
    refused(data, "app.tls", "true or false")


def test_app_tls_false_refuses_split_client_hello() -> None:
    data = base()
    data["app"] = {**data["app"], "kind": "python", "tls": False, "split_client_hello": True}
    data["transports"] = ["mptcp"]
    refused(data, "app.tls", "split_client_hello")
