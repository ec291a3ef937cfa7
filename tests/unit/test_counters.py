"""Counter parsing and diffing, against /proc/net text recorded in a server namespace by
tests/fixtures/make_pcaps.sh (two MPTCP connections, each with one MP_JOIN)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.model.counters import diff, mptcp, parse_proc_net

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def before() -> dict[str, int]:
    return parse_proc_net((FIXTURES / "netstat_before.txt").read_text())


@pytest.fixture(scope="module")
def after() -> dict[str, int]:
    return parse_proc_net((FIXTURES / "netstat_after.txt").read_text())


@pytest.fixture(scope="module")
def snmp() -> dict[str, int]:
    return parse_proc_net((FIXTURES / "snmp_after.txt").read_text())


def test_netstat_keys_are_named_like_nstat(after: dict[str, int]) -> None:
    for key in ("TcpExtBeyondWindow", "TcpExtTCPChallengeACK", "TcpExtPAWSEstab",
                "MPTcpExtMPJoinAckRx", "MPTcpExtMPCapableSYNRX", "IpExtInOctets"):
        assert key in after
    assert not any(":" in k or " " in k for k in after)
    # every name of every header line made it (no group dropped or misaligned)
    text = (FIXTURES / "netstat_after.txt").read_text().splitlines()
    expected = sum(len(line.split()) - 1 for line in text[0::2])
    assert len(after) == expected


def test_snmp_keys_and_negative_values(snmp: dict[str, int]) -> None:
    assert snmp["TcpMaxConn"] == -1
    assert snmp["IpForwarding"] in (1, 2)
    assert snmp["IpDefaultTTL"] == 64
    assert "IpForwDatagrams" in snmp
    assert snmp["TcpPassiveOpens"] == 4  # two connections, each with one join subflow


def test_diff_of_real_snapshots(before: dict[str, int], after: dict[str, int]) -> None:
    delta = diff(before, after)
    assert all(v != 0 for v in delta.values())
    assert delta["MPTcpExtMPCapableSYNRX"] == 2
    assert delta["MPTcpExtMPJoinSynRx"] == 2
    assert delta["MPTcpExtMPJoinAckRx"] == 2
    assert "MPTcpExtMPJoinNoTokenFound" not in delta
    assert mptcp(delta) == {
        "MPTcpExtMPCapableACKRX": 2, "MPTcpExtMPCapableSYNRX": 2,
        "MPTcpExtMPJoinAckRx": 2, "MPTcpExtMPJoinSynRx": 2,
    }


def test_diff_semantics() -> None:
    before = {"A": 1, "B": 5, "Gone": 3}
    after = {"A": 1, "B": 7, "New": 4, "Neg": -1}
    assert diff(before, after) == {"B": 2, "New": 4, "Neg": -1}
    assert diff(after, after) == {}


def test_mptcp_filter() -> None:
    assert mptcp({"MPTcpExtX": 1, "TcpExtY": 2, "TcpActiveOpens": 3}) == {"MPTcpExtX": 1}


def test_parse_skips_non_integers_and_bad_groups() -> None:
    text = (
        "Foo: A B C\n"
        "Foo: 1 x -7\n"
        "Bar: D E\n"
        "Bar: 1\n"  # length mismatch: whole group skipped
        "garbage line without colon\n"
        "Baz: F\n"
        "Baz: 18446744073709551615\n"
        "Trunc: G H\n"  # header without values (truncated read)
    )
    assert parse_proc_net(text) == {"FooA": 1, "FooC": -7, "BazF": 18446744073709551615}


def test_parse_empty() -> None:
    assert parse_proc_net("") == {}
