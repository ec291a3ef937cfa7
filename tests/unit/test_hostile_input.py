"""Hostile input: property-based tests (hypothesis) over well over 1,000 generated malformed
playbooks and topology specs.

Property: parsing either returns a valid object or raises a SpecError whose message starts
with the file name given ("fuzz.yaml: "). Any other exception (TypeError, KeyError,
RecursionError, ValueError, ...) is a bug, and so is a template that reads a file, runs a
process, or takes the machine's memory or time.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.errors import SpecError
from testbed.model import playbook as pb
from testbed.model.addressing import plan_addresses
from testbed.model.playbook import TOP_KEYS, Playbook, parse_playbook
from testbed.model.topology import TopologySpec, parse_topology
from testbed.model.validate import NAME_RE

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {p.name: p.read_text() for p in sorted((REPO / "playbooks").glob("*.yaml"))}
BASELINE_TEXT = SHIPPED["baseline.yaml"]
DUAL_TEXT = (REPO / "topologies" / "dual_path.yaml").read_text()
BASELINE = yaml.safe_load(BASELINE_TEXT)
DUAL = yaml.safe_load(DUAL_TEXT)
FILE = "fuzz.yaml"
PREFIX = f"{FILE}: "

SENTINEL = Path(tempfile.gettempdir()) / f"tb-sandbox-sentinel-{os.getpid()}"
ESCAPES = [
    f"{{{{ cycler.__init__.__globals__.os.system('touch {SENTINEL}') }}}}",
    f"{{{{ joiner.__init__.__globals__.os.popen('touch {SENTINEL}').read() }}}}",
    f"{{{{ lipsum.__globals__['os'].system('touch {SENTINEL}') }}}}",
    f"{{{{ namespace.__init__.__globals__.os.system('touch {SENTINEL}') }}}}",
    f"{{{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system("
    f"'touch {SENTINEL}') }}}}",
    f"{{{{ ''.__class__.__mro__[1].__subclasses__()[0]('touch {SENTINEL}') }}}}",
    "{{ app.__class__.__mro__[-1].__subclasses__() }}",
    "{{ app|attr('__class__') }}",
    "{{ [].__class__.__base__.__subclasses__() }}",
    f"{{% set x = cycler.__init__.__globals__.os.system('touch {SENTINEL}') %}}",
    f"{{{{ config.__class__.__init__.__globals__['os'].popen('touch {SENTINEL}') }}}}",
    f"{{{{ ('touch {SENTINEL}')|map('system')|list }}}}",
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/hostname' %}",
    "{% import 'os' as os %}{{ os.system('id') }}",
    "{% from '/etc/passwd' import x %}",
]
HOSTILE_TEMPLATES = [
    "{{ x.__class__ }}", "{{ ''.__class__.__mro__ }}", "{{ range(10**9) }}",
    "{{ lipsum.__globals__ }}", "{{ cycler.__init__.__globals__.os.system('id') }}",
    "{% for i in range(99999999) %}x{% endfor %}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**9 }}", "{{ [1] * 10**9 }}", "{{ ([[0] * 50000] * 50000)|string }}",
    "{{ 9**9**9 }}", "{{ 10 ** (10 ** 10) }}", "{{ 2 ** 100000 }}",
    "{{ (2 ** 5000) * (2 ** 5000) }}",
    "{{ ('9' * 4300)|int + ('9' * 4300)|int }}", "{{ '%999999999d' % 1 }}",
    "{{ '{:999999999}'.format(1) }}", "{{ 'a'|center(10**9) }}", "{{ 'a'.ljust(10**9) }}",
    "{{ ('a' * 1000)|replace('a', 'a' * 1000)|replace('a', 'a' * 1000) }}",
    "{{ 'a'|wordwrap(1) }}", "{{ [1, 2]|slice(10**9) }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "{{ " + "(" * 500 + "1" + ")" * 500 + " }}", "{{ " + "[" * 500 + "]" * 500 + " }}",
    "{{ '[' * 150 ~ ']' * 150 }}", "{{ '(' * 100 ~ ')' * 100 }}",
    "{{ self }}", "{{ app }}", "{{ bytes }}", "{{ wifi_rate_mbit }}", "{{ cell_delay_ms }}",
    "{{ 1/0 }}", "{{ 1 // 0 }}", "{{ 1e308 * 10 }}", "{{ -1 ** 0.5 }}", "{{ [][0] }}",
    "{{ {}['x'] }}", "{{ 'abc'[10**100] }}", "{{ 'abc'[::0] }}", "{{ x is divisibleby 0 }}",
    "{{ '{1, 2}' }}", "{{ '(1, 2)' }}", "{{ \"b'x'\" }}", "{{ '1j' }}", "{{ {[1]: 2} }}",
    "{{ none }}", "{{ true }}", "{{ [app, app] }}", "{{ {'kind': 'python'} }}", "{{ ",
    "{% if %}", "{{ }}", "{% endfor %}", "{{ 1 }}{{ 2 }}", "{% raw %}{{ x }}{% endraw %}",
    "{{ x|nosuchfilter }}", "{{ app|upper }}", "{{ bytes * 2 }}", "{{ bytes|string }}",
    "{{ 'a' ~ 'b' }}", "{{ 4000000 if true else 1 }}", "{{ 'x' * 3000 }}",
    "{{ ('9' * 5000)|int }}", "{{ '1e999'|float }}", "{{ [1, 2]|sum(start=[]) }}",
    "{{ app ~ '\n' }}",
    *ESCAPES,
]
NAMES = ["../../etc/passwd", "..", "../x", "a/b", "/etc/passwd", "dual_path/../dual_path",
         "x/..", "./dual_path", "CON", "a\nb", "baseline\n", "", " ", "a" * 300, "\x00",
         "naïve", "über"]
KEYS = sorted({*TOP_KEYS, "kind", "bytes", "sni", "port", "timeout_s", "tcp", "mptcp",
               "status", "subflows", "fallback", "counters", "paths_with_data",
               "server", "client", "MPTcpExtMPJoinAckRx", "path", "position",
               "nodes", "links", "pools", "primary_path", "middlebox_slots", "attach", "role",
               "a", "b", "rate_mbit", "delay_ms", "loss_pct", "capture", "wifi", "cell",
               "core", "off_path", "wifi_ap", "net.mptcp.pm_type", "net.ipv4.ip_forward",
               "tap", "on_path", "half_on_path", *pb.MIDDLEBOX_KINDS, *pb.ATTACK_KINDS})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 443, 65536, 2**31, 2**63, 10**12, 10**13, 10**100,
                     -(10**100), 10**4000, 1e308, -0.0, float("inf"), float("nan")]),
    st.text(max_size=20), st.sampled_from(KEYS), st.sampled_from(NAMES),
    st.sampled_from(HOSTILE_TEMPLATES),
    st.sampled_from(["x" * 5000, "{{ app }}" * 300, "198.51.100.0/24", "10.0.0.0/8",
                     "0.0.0.0/0", "fd6d:7074:6370::/48", ">=1", "==0", "< 2", "=> 1",
                     "TLSv1.3", "ok", "python", "openssl", "www.example.test", "P1", "tcp",
                     "mptcp", "router", "client", "yes", "on", "~", "2001-01-01"]),
    st.dates(),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.sampled_from(NAMES),
                 st.integers(-3, 3), st.none(), st.booleans())
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(keys, children, max_size=5)),
    max_leaves=25,
)


def _slots(doc: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) for every entry of every mapping and list in ``doc``."""
    out: list[tuple[Any, Any]] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                out.append((node, k))
                stack.append(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                out.append((node, i))
                stack.append(v)
    return out


@st.composite
def mutated(draw: st.DrawFn, original: dict[str, Any]) -> Any:
    doc = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(doc)
        if not slots:
            break
        parent, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(["drop", "replace", "replace", "add", "rename"]))
        if op == "drop":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(values)
        elif op == "add":
            if isinstance(parent, dict):
                parent[draw(keys)] = draw(values)
            else:
                parent.insert(key, draw(values))
        elif isinstance(parent, dict):  # rename a key, keep the value
            parent[draw(keys)] = parent.pop(key)
    return doc


@st.composite
def text_edits(draw: st.DrawFn, original: str) -> str:
    """Raw text damage: cut, insert or overwrite characters anywhere."""
    text = original
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        junk = draw(st.one_of(st.text(max_size=10), st.sampled_from(
            [":", "- ", "{", "}", "[", "]", "&a ", "*a", "!!python/object:os.system ", "\t",
             "\n  ", "'", '"', "%", "@", "`", "|", ">", "? ", "{{", "{%", "#", "---\n",
             "...\n", "\x00", "\ufeff"])))
        text = text[:i] + junk + text[j:]
    return text


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_DUMPER, sort_keys=False, allow_unicode=True)


def documents(original: dict[str, Any], original_text: str) -> st.SearchStrategy[str]:
    return st.one_of(
        mutated(original).map(dump),
        mutated(original).map(dump),
        mutated(original).map(dump),
        values.map(dump),
        text_edits(original_text),
        st.text(max_size=200),
    )


def assert_spec_error_or_valid(parse: Any, text: str) -> Any:
    try:
        return parse(text)
    except SpecError as exc:
        msg = str(exc)
        assert msg.startswith(PREFIX), f"message does not name {FILE}: {msg[:300]!r}"
        assert exc.file == FILE
        assert len(msg) < 20_000, "unbounded error message"
        return None
    finally:
        assert not SENTINEL.exists(), "a template ran a process"


@pytest.fixture(autouse=True)
def _no_sentinel() -> Any:
    SENTINEL.unlink(missing_ok=True)
    yield
    assert not SENTINEL.exists(), "a template ran a process"


FUZZ = settings(max_examples=600, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@FUZZ
@given(documents(BASELINE, BASELINE_TEXT))
def test_fuzzed_playbooks(text: str) -> None:
    book = assert_spec_error_or_valid(lambda t: parse_playbook(t, FILE, {}), text)
    if book is not None:
        assert isinstance(book, Playbook)
        assert NAME_RE.match(book.name)
        assert isinstance(book.topology, TopologySpec)
        assert set(book.transports) <= {"tcp", "mptcp"}
        assert set(book.expect) == set(book.transports)
        assert 1 <= book.app.bytes <= 1 << 30 and isinstance(book.app.bytes, int)


@FUZZ
@given(documents(DUAL, DUAL_TEXT))
def test_fuzzed_topologies(text: str) -> None:
    spec = assert_spec_error_or_valid(lambda t: parse_topology(t, FILE, {}), text)
    if spec is not None:
        assert isinstance(spec, TopologySpec)
        assert spec.by_role("client") and spec.by_role("server")
        # A valid spec always gets an address plan (or a SpecError naming its file).
        plan = assert_spec_error_or_valid(lambda _: plan_addresses(spec), text)
        if plan is not None:
            addresses = [i.address.ip for intfs in plan.interfaces.values() for i in intfs]
            assert len(addresses) == len(set(addresses))


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(sorted(SHIPPED)).flatmap(
    lambda name: mutated(yaml.safe_load(SHIPPED[name])).map(dump)))
def test_fuzzed_shipped_playbooks(text: str) -> None:
    # Every shipped playbook (middleboxes, attacks and their parameters included), damaged.
    assert_spec_error_or_valid(lambda t: parse_playbook(t, FILE, {}), text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["app", "bytes"]), values, min_size=1, max_size=2))
def test_fuzzed_overrides(overrides: dict[str, Any]) -> None:
    # --set values reach the templates: any value is either accepted or a SpecError.
    assert_spec_error_or_valid(lambda t: parse_playbook(t, FILE, overrides), BASELINE_TEXT)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(DUAL["params"])), values, min_size=1,
                       max_size=3))
def test_fuzzed_topology_params_through_a_playbook(params: dict[str, Any]) -> None:
    doc = copy.deepcopy(BASELINE)
    doc["topology"]["params"] = params
    assert_spec_error_or_valid(lambda t: parse_playbook(t, FILE, {}), dump(doc))


# --- explicit escapes and names ----------------------------------------------------------

@pytest.mark.parametrize("template", ESCAPES)
def test_template_cannot_run_a_process_or_read_a_file(template: str) -> None:
    doc = copy.deepcopy(BASELINE)
    doc["app"]["kind"] = template
    with pytest.raises(SpecError) as info:
        parse_playbook(dump(doc), FILE, {})
    assert str(info.value).startswith(f"{PREFIX}app.kind: template")
    assert "root:" not in str(info.value)  # nothing of /etc/passwd
    topo = copy.deepcopy(DUAL)
    topo["links"][0]["rate_mbit"] = template
    with pytest.raises(SpecError) as info:
        parse_topology(dump(topo), FILE, {})
    assert str(info.value).startswith(f"{PREFIX}links[0].rate_mbit: template")
    assert not SENTINEL.exists()


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10**9 }}", "{{ [1] * 10**9 }}", "{{ ([[0] * 50000] * 50000)|string }}",
    "{{ 10 ** (10 ** 10) }}", "{{ 'a'|center(10**9) }}", "{{ '%999999999d' % 1 }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{{ ('a' * 1000)|replace('a', 'a' * 1000)|replace('a', 'a' * 1000) }}",
])
def test_template_cannot_exhaust_memory_or_time(template: str) -> None:
    doc = copy.deepcopy(BASELINE)
    doc["description"] = template
    with pytest.raises(SpecError) as info:
        parse_playbook(dump(doc), FILE, {})
    assert str(info.value).startswith(f"{PREFIX}description: template")


def test_harmless_templates_still_work() -> None:
    doc = copy.deepcopy(BASELINE)
    doc["description"] = "{{ app|upper }} x{{ bytes // 1000 }} {{ 'on' if bytes > 1 else 'off' }}"
    doc["app"]["bytes"] = "{{ bytes * 2 }}"
    book = parse_playbook(dump(doc), FILE, {"app": "openssl"})
    assert book.description == "OPENSSL x2000 on"
    assert book.app.bytes == 4_000_000


name_with_traversal = st.builds(
    lambda a, sep, b: a + sep + b,
    st.text(alphabet="abz_./", max_size=6), st.sampled_from(["/", "..", "../", "/.."]),
    st.text(alphabet="abz_./", max_size=6))


@settings(max_examples=50, deadline=None)
@given(name_with_traversal)
def test_names_with_slash_or_dotdot_are_refused(name: str) -> None:
    def refused(parse: Any, doc: dict[str, Any], field: str) -> None:
        with pytest.raises(SpecError) as info:
            parse(dump(doc))
        assert str(info.value).startswith(f"{PREFIX}{field}"), str(info.value)

    playbook = lambda t: parse_playbook(t, FILE, {})  # noqa: E731
    topology = lambda t: parse_topology(t, FILE, {})  # noqa: E731

    refused(playbook, {**copy.deepcopy(BASELINE), "name": name}, "name: ")
    refused(playbook, {**copy.deepcopy(BASELINE), "topology": {"name": name}}, "topology.name: ")
    refused(playbook, {**copy.deepcopy(BASELINE), "requires": [name]}, "requires[0]: ")
    refused(playbook, {**copy.deepcopy(BASELINE), "params": {name: 1}}, f"params.{name}: ")
    refused(topology, {**copy.deepcopy(DUAL), "name": name}, "name: ")
    nodes = {**DUAL["nodes"], name: {"role": "router"}}
    refused(topology, {**copy.deepcopy(DUAL), "nodes": nodes}, f"nodes.{name}: ")
    pools = {**DUAL["pools"], name: "203.0.113.128/25"}
    refused(topology, {**copy.deepcopy(DUAL), "pools": pools}, f"pools.{name}: ")
