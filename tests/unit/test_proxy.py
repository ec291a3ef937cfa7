"""The proxy middleboxes without a network: their REDIRECT rule, parameters, the report
built from the relay's log, and the ``core`` slot of dual_path (a place for middleboxes,
not for taps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.errors import SpecError
from testbed.middleboxes import MIDDLEBOXES
from testbed.middleboxes.proxy import MptcpProxy, TcpProxy
from testbed.model.playbook import parse_playbook
from testbed.model.topology import TOPOLOGY_DIR

PLAYBOOK = """\
name: proxytest
topology: {name: dual_path}
app: {kind: python}
%s
"""


def parse(body: str, topology_dir: Path = TOPOLOGY_DIR) -> object:
    return parse_playbook(PLAYBOOK % body, "p.yaml", {}, topology_dir)


def test_registered_with_a_redirect_to_the_relay() -> None:
    assert MIDDLEBOXES["tcp_proxy"] is TcpProxy and MIDDLEBOXES["mptcp_proxy"] is MptcpProxy
    assert not TcpProxy.mptcp_listener and MptcpProxy.mptcp_listener
    assert TcpProxy.capture_upstream and MptcpProxy.capture_upstream
    b = TcpProxy("wifi", TcpProxy.validate({"port": 8443}, "f", "m"))
    b.marker = "tbabcdef-mb-wifi-tcp_proxy"
    text = b.render_rules({**b.values, "server": "203.0.113.2"})
    rules = [ln for ln in text.splitlines() if ln.startswith("-A")]
    assert rules == ["-A PREROUTING -m comment --comment tbabcdef-mb-wifi-tcp_proxy -p tcp "
                     "-d 203.0.113.2 --dport 8443 -j REDIRECT --to-ports 15001"]
    assert text.startswith("*nat\n")


@pytest.mark.parametrize("params, field", [
    ({"listen_port": 80}, "m.listen_port"), ({"port": 0}, "m.port"),
    ({"idle_timeout_s": 0}, "m.idle_timeout_s"), ({"max_connections": 0}, "m.max_connections"),
    ({"origin": "x"}, "m.origin")])
def test_bad_params(params: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        MptcpProxy.validate(params, "f", "m")
    assert err.value.field == field


def test_report_from_the_relay_log(tmp_path: Path) -> None:
    b = MptcpProxy("core", MptcpProxy.validate({}, "f", "m"))
    b.evidence_dir = tmp_path
    assert b.finish({})["connections"] == 0
    lines = [{"event": "listening", "port": 15001},
             {"event": "relayed", "bytes_client_to_server": 300, "bytes_server_to_client": 7,
              "original_dst_method": "configured", "close_reason": "eof both ways",
              "upstream_local": "203.0.113.1:40000", "client_subflows_max": 2,
              "client_side_fallback": False},
             {"event": "refused", "reason": "max_connections reached"}]
    b.evidence("relay.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert b.finish({}) == {
        "connections": 1, "refused": 1, "bytes_client_to_server": 300,
        "bytes_server_to_client": 7, "original_dst_method": "configured",
        "close_reasons": "eof both ways", "upstream_local": "203.0.113.1:40000",
        "proxy_subflows_max": 2, "proxy_fallback": False}
    # The client's side, from its own MPTCP_INFO in the app outcome.
    outcome = {"mptcp": {"subflows": 1, "subflows_total": 2, "fallback": False}}
    (tmp_path / "app-outcome.json").write_text(json.dumps(outcome))
    report = b.finish({})
    assert (report["client_subflows"], report["client_fallback"]) == (2, False)
    (tmp_path / "app-outcome.json").write_text(json.dumps({"mptcp": {"fallback": True}}))
    assert b.finish({})["client_subflows"] == 1
    (tmp_path / "app-outcome.json").write_text(json.dumps({"mptcp": None}))
    assert b.finish({})["client_fallback"] is None


def test_core_is_a_middlebox_slot_but_not_an_access_router() -> None:
    pb = parse("middleboxes: [{kind: mptcp_proxy, path: core}]")
    assert [(m.kind, m.where) for m in pb.middleboxes] == [  # type: ignore[attr-defined]
        ("mptcp_proxy", "core")]
    with pytest.raises(SpecError) as err:
        parse("attacks: [{kind: passive, position: tap, path: core}]")
    assert err.value.field == "attacks[0].path"
    assert "not a path with an access router" in str(err.value)
    assert "cell, wifi" in str(err.value)


def test_a_path_without_a_slot_is_refused(tmp_path: Path) -> None:
    text = (TOPOLOGY_DIR / "dual_path.yaml").read_text()
    text = text.replace("middlebox_slots: {wifi: wifi_ap, cell: cell_gw, core: core}",
                        "middlebox_slots: {wifi: wifi_ap, cell: cell_gw}")
    (tmp_path / "dual_path.yaml").write_text(text)
    with pytest.raises(SpecError) as err:
        parse("middleboxes: [{kind: nat, path: core}]", tmp_path)
    assert err.value.field == "middleboxes[0].path"
    assert "no middlebox slot" in str(err.value) and "cell, wifi" in str(err.value)
