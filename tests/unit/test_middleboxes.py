"""Middlebox plugins without a network: parameter validation (also through playbooks),
rule templates and the marker that teardown relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import RuntimeFailure, SpecError
from testbed.middleboxes import MIDDLEBOXES
from testbed.middleboxes.base import Middlebox, mark_iptables_rules, render
from testbed.middleboxes.blackhole import Blackhole
from testbed.middleboxes.drop_mptcp_syn import DropMptcpSyn
from testbed.middleboxes.nat import Nat
from testbed.middleboxes.strip_mp_capable import StripMpCapable
from testbed.model.playbook import MIDDLEBOX_KINDS, load_playbook, parse_playbook

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = """\
name: mbtest
topology: {name: dual_path}
app: {kind: python}
middleboxes:
  - %s
"""


def parse(entry: str) -> object:
    return parse_playbook(PLAYBOOK % entry, "mb.yaml", {})


def test_registry_and_playbook_kinds() -> None:
    assert set(MIDDLEBOXES) == {"nat", "strip_mp_capable", "drop_mptcp_syn", "blackhole",
                                "resegment", "tcp_proxy", "mptcp_proxy", "strip_mptcp_after",
                                "payload_rewrite"}
    assert set(MIDDLEBOX_KINDS) >= set(MIDDLEBOXES)
    for kind, cls in MIDDLEBOXES.items():
        assert cls.kind == kind and cls.description and cls.requires
        assert MIDDLEBOX_KINDS[kind] == cls.description
        for name, spec in cls.params.items():
            assert spec.name == name and spec.help
            cls.validate({}, "f", "m")  # defaults are valid


def test_defaults_filled_in() -> None:
    assert StripMpCapable.validate({}, "f", "m") == {"mode": "nop", "direction": "syn"}
    assert Blackhole.validate({"after_s": 2}, "f", "m") == {"after_s": 2.0}


def test_remove_mode_queues_the_handshake_to_the_worker() -> None:
    pb = parse("{kind: strip_mp_capable, path: wifi, mode: remove, direction: both}")
    assert pb.middleboxes[0].params == {"mode": "remove", "direction": "both"}  # type: ignore[attr-defined]
    b = box(StripMpCapable, mode="remove", direction="both")
    rules = [ln for ln in b.render_rules(ctx(b, queue=30)).splitlines() if ln.startswith("-A")]
    assert len(rules) == 2
    assert all(r.endswith("-j NFQUEUE --queue-num 30 --queue-bypass") for r in rules)
    assert StripMpCapable.requires >= {"nfqueue", "tcpoptstrip"}


@pytest.mark.parametrize("entry, field, words", [
    ("{kind: strip_mp_capable, path: wifi, mode: squash}", "middleboxes[0].mode", ["nop"]),
    ("{kind: strip_mp_capable, path: wifi, direction: ack}", "middleboxes[0].direction",
     ["syn", "synack", "both"]),
    ("{kind: nat, path: cell, random_ports: 'yes'}", "middleboxes[0].random_ports", ["bool"]),
    ("{kind: blackhole, path: wifi, after_s: -1}", "middleboxes[0].after_s", ["0.0..600.0"]),
    ("{kind: blackhole, path: wifi, after_s: true}", "middleboxes[0].after_s", ["float"]),
    ("{kind: nat, path: cell, colour: red}", "middleboxes[0].colour", ["mode", "random_ports"]),
    ("{kind: nat, path: lte}", "middleboxes[0].path", ["'lte' is not allowed"]),
    ("{kind: firewall, path: wifi}", "middleboxes[0].kind", ["blackhole", "nat"]),
])
def test_bad_params_name_field_and_allowed_values(entry: str, field: str,
                                                  words: list[str]) -> None:
    with pytest.raises(SpecError) as err:
        parse(entry)
    assert err.value.field == field
    for word in words:
        assert word in str(err.value)


def test_repository_playbooks_validate() -> None:
    claims = {}
    for name in ("m1_nat", "m2_strip_mp_capable", "m2d_drop_mptcp_syn", "a2_blackhole"):
        pb = load_playbook(REPO / "playbooks" / f"{name}.yaml")
        claims[name] = pb.claim
        assert pb.middleboxes and set(pb.transports) == {"tcp", "mptcp"}
    assert claims == {"m1_nat": "M1", "m2_strip_mp_capable": "M2",
                      "m2d_drop_mptcp_syn": "M2d", "a2_blackhole": "A2"}
    synack = load_playbook(REPO / "playbooks" / "m2_strip_mp_capable.yaml",
                           {"direction": "synack"})
    assert synack.middleboxes[0].params == {"mode": "nop", "direction": "synack"}


def box(cls: type[Middlebox], path: str = "wifi", **params: object) -> Middlebox:
    b = cls(path, cls.validate(params, "f", "m"))
    b.marker = f"tbabcdef-mb-{path}-{cls.kind}"
    return b


def ctx(b: Middlebox, **extra: object) -> dict[str, object]:
    return {**b.values, "path": b.path, "marker": b.marker, "table_name": b.nft_table, **extra}


@pytest.mark.parametrize("direction, flags", [
    ("syn", ["SYN,ACK SYN -j"]), ("synack", ["SYN,ACK SYN,ACK -j"]),
    ("both", ["SYN,ACK SYN -j", "SYN,ACK SYN,ACK -j"])])
def test_strip_template(direction: str, flags: list[str]) -> None:
    b = box(StripMpCapable, direction=direction)
    text = b.render_rules(ctx(b))
    rules = [ln for ln in text.splitlines() if ln.startswith("-A")]
    assert text.startswith("*mangle\n") and text.rstrip().endswith("COMMIT")
    assert len(rules) == len(flags)
    for rule, flag in zip(rules, flags, strict=True):
        assert rule.startswith("-A FORWARD -m comment --comment tbabcdef-mb-wifi-strip_mp_capable ")
        assert flag in rule and rule.endswith("-j TCPOPTSTRIP --strip-options 30")


def test_nat_template() -> None:
    b = box(Nat, path="cell")
    text = b.render_rules(ctx(b, egress="cell1", egress_address="100.64.0.5"))
    assert ("-A POSTROUTING -m comment --comment tbabcdef-mb-cell-nat -o cell1 -p tcp "
            "-j MASQUERADE --random") in text
    b = box(Nat, path="cell", mode="snat", random_ports=False)
    text = b.render_rules(ctx(b, egress="cell1", egress_address="100.64.0.5"))
    assert "-j SNAT --to-source 100.64.0.5\n" in text


def test_template_undefined_variable_is_an_error() -> None:
    b = box(Nat, path="cell")
    with pytest.raises(RuntimeFailure, match="egress"):
        b.render_rules(ctx(b))  # no egress interface given


def test_template_sandbox() -> None:
    with pytest.raises(RuntimeFailure):
        render("{{ ''.__class__.__mro__ }}", {})


def test_drop_template_is_nft_with_own_table() -> None:
    b = box(DropMptcpSyn)
    assert b.nft_table == "tbabcdef_mb_wifi_drop_mptcp_syn"
    text = b.render_rules(ctx(b))
    assert "table inet tbabcdef_mb_wifi_drop_mptcp_syn {" in text
    assert "tcp flags & (syn | ack) == syn tcp option mptcp exists counter drop" in text
    assert "syn | ack tcp option" not in text
    b = box(DropMptcpSyn, direction="both")
    assert b.render_rules(ctx(b)).count("tcp option mptcp exists") == 2


def test_blackhole_counts_data_at_setup_and_drops_later() -> None:
    b = box(Blackhole)
    text = b.render_rules(ctx(b, data_min_len=121))
    # At setup only a counting rule without target: it tells when the data starts.
    assert ("-A FORWARD -m comment --comment tbabcdef-mb-wifi-blackhole -p tcp -m length "
            "--length 121:65535\n") in text
    assert "-j" not in text
    text = b.render_rules(ctx(b), Blackhole.drop_template)
    assert "-I FORWARD 1 -m comment --comment tbabcdef-mb-wifi-blackhole -j DROP" in text


def test_mark_iptables_rules_keeps_other_lines() -> None:
    text = "*filter\n:X - [0:0]\n-A X -j DROP\n-I FORWARD 2 -p tcp -j X\nCOMMIT\n"
    out = mark_iptables_rules(text, "m1").splitlines()
    assert out == ["*filter", ":X - [0:0]", "-A X -m comment --comment m1 -j DROP",
                   "-I FORWARD 2 -m comment --comment m1 -p tcp -j X", "COMMIT"]


def test_teardown_without_setup_is_a_no_op() -> None:
    b = box(Blackhole)
    b.marker = ""
    b.teardown()
    b.teardown()
    assert b.remaining_rules() == []


def test_requirements_follow_the_parameters() -> None:
    strip = MIDDLEBOXES["strip_mp_capable"]
    nop = strip.validate({"mode": "nop"}, "f", "m")
    remove = strip.validate({"mode": "remove"}, "f", "m")
    assert strip.requirements(nop) == {"iptables", "tcpoptstrip"}
    assert strip.requirements(remove) == {"iptables", "nfqueue"}
    assert strip.requirements(nop) | strip.requirements(remove) <= strip.requires
    nat = MIDDLEBOXES["nat"]
    assert nat.requirements(nat.validate({}, "f", "m")) == nat.requires
