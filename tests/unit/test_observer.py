"""The per-path observer summary, against real pcaps recorded on this kernel by
tests/fixtures/make_pcaps.sh (TLS 1.3 over MPTCP, one MP_JOIN on a second path; a
ClientHello cut inside the SNI), plus pure tests of the fragment search."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import RuntimeFailure
from testbed.runtime import observer
from testbed.runtime.observer import _contiguous, sni_fragments, summarize_pcap, token_of_key

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text())
SNI: str = EXPECTED["sni"]
SERVER: str = EXPECTED["server_address"]

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")


def summary(name: str, sni: str = SNI, total: int = EXPECTED["size"]) -> dict[str, Any]:
    return summarize_pcap(FIXTURES / name, sni=sni, server_addresses=[SERVER],
                          total_app_bytes=total)


@pytest.fixture(scope="module")
def path1() -> dict[str, Any]:
    return summary("mptcp_tls_path1.pcap")


@pytest.fixture(scope="module")
def path2() -> dict[str, Any]:
    return summary("mptcp_tls_path2.pcap")


# -- pure ------------------------------------------------------------------------------------
def test_token_of_key_matches_tshark() -> None:
    # tshark's mptcp.expected_token for this key, from a capture on this machine
    assert token_of_key(7390306521180015419) == 3626730858


def test_fragments_whole_name() -> None:
    assert sni_fragments(b"\x00\x1bsecret.example\x00", b"secret.example") == [b"secret.example"]


def test_fragments_at_cuts() -> None:
    name = b"secret-service.example.test"
    assert sni_fragments(b"\x16\x03\x01junk secret-servic", name) == [b"secret-servic"]
    assert sni_fragments(b"e.example.test\x00\x0b\x00\x04", name) == [b"e.example.test"]
    assert sni_fragments(b"-service.ex", name) == [b"-service.ex"]  # a middle piece alone
    assert sni_fragments(b"tail.exam" + b"\x00" * 10 + b"secr", b"secr.tail.exam") == [
        b"secr", b"tail.exam"]


def test_fragments_ignore_short_and_uncut_pieces() -> None:
    name = b"secret-service.example.test"
    assert sni_fragments(b"xxxxsec", name) == []  # 3 bytes: below the minimum
    assert sni_fragments(b"xx service xx", name) == []  # inside the payload: no cut there
    assert sni_fragments(b"", name) == []
    assert sni_fragments(b"abc", b"") == []
    assert sni_fragments(b"xxsecr", name, min_len=5) == []


def test_contiguous_runs() -> None:
    segs = [(11, b"world"), (1, b"hello "), (7, b"xxxxworld"), (40, b"later")]
    assert _contiguous(segs) == [b"hello xxxxworld", b"later"]
    assert _contiguous([]) == []


# -- real captures ---------------------------------------------------------------------------
@needs_tshark
def test_initial_path_sees_sni_keys_and_handshake(path1: dict[str, Any]) -> None:
    assert path1["packets"] > 10
    assert path1["warning"] is None
    assert path1["sni"]["status"] == "full"
    assert path1["sni"]["decoded"] == [SNI]
    mp = path1["mptcp"]
    assert mp["mp_capable_syn"] == 1
    assert mp["mp_capable"] >= 3  # SYN, SYN/ACK, third ACK (and the first data packet)
    assert mp["mp_join_syn"] == 0
    assert mp["dss"] > 0
    assert mp["mp_tcprst"] == mp["mp_fail"] == mp["add_addr"] == 0
    assert len(mp["keys"]) == 2
    assert all(len(k) == 16 for k in mp["keys"])
    assert set(mp["derived_tokens"]) == set(mp["keys"])
    assert path1["addresses"] == [EXPECTED["client_path1"], SERVER]
    assert path1["server_addresses_seen"] == [SERVER]
    assert path1["syn_destinations"] == [SERVER]
    assert path1["payload_bytes"]["to_server"] > 517  # the ClientHello at least
    json.dumps(path1)  # serialisable


@needs_tshark
def test_second_path_sees_join_token_not_sni(path1: dict[str, Any],
                                             path2: dict[str, Any]) -> None:
    assert path2["sni"]["status"] == "none"
    assert path2["sni"]["decoded"] == []
    mp = path2["mptcp"]
    assert mp["mp_join_syn"] == 1
    assert mp["mp_capable"] == 0
    assert mp["keys"] == []
    assert len(mp["tokens"]) == 1
    # the join SYN carries the server's token, which the initial path's observer can derive
    assert mp["tokens"][0] in path1["mptcp"]["derived_tokens"].values()
    # P3: the server address is visible on the second path too
    assert path2["server_addresses_seen"] == [SERVER]
    assert path2["syn_destinations"] == [SERVER]
    assert EXPECTED["client_path2"] in path2["addresses"]
    # the scheduler put the transfer on this path in that recording
    total = path1["payload_bytes"]["from_server"] + path2["payload_bytes"]["from_server"]
    assert total >= EXPECTED["size"]
    assert path2["bytes_seen_ratio"] == round(path2["payload_bytes"]["from_server"]
                                              / EXPECTED["size"], 4)


@needs_tshark
def test_tokens_derivable_within_one_capture(tmp_path: Path) -> None:
    merged = tmp_path / "both.pcap"
    subprocess.run(["mergecap", "-F", "pcap", "-w", str(merged),
                    str(FIXTURES / "mptcp_tls_path1.pcap"), str(FIXTURES / "mptcp_tls_path2.pcap")],
                   check=True, capture_output=True, timeout=30)
    both = summarize_pcap(merged, sni=SNI, server_addresses=[SERVER], total_app_bytes=0)
    assert both["mptcp"]["tokens_derivable_from_keys"] == both["mptcp"]["tokens"]
    assert both["bytes_seen_ratio"] is None


@needs_tshark
def test_split_clienthello_reassembled_is_full() -> None:
    s = summary("split_sni_path1.pcap")
    assert s["sni"]["status"] == "full"
    assert s["sni"]["decoded"] == [SNI]


@needs_tshark
def test_second_half_of_split_clienthello_is_partial() -> None:
    s = summary("split_sni_tail.pcap")
    assert s["sni"]["status"] == "partial"
    assert s["sni"]["decoded"] == []
    assert s["sni"]["fragments_seen"] == [SNI[len(SNI) // 2:]]
    assert s["mptcp"]["keys"]  # the keys also ride on the first data segment's MP_CAPABLE


@needs_tshark
def test_other_name_not_claimed(path1: dict[str, Any]) -> None:
    s = summary("mptcp_tls_path1.pcap", sni="another.example.test")
    assert s["sni"]["status"] == "none"
    assert s["sni"]["decoded"] == [SNI]


@needs_tshark
def test_plaintext_name_split_over_segments(tmp_path: Path) -> None:
    scapy = pytest.importorskip("scapy.all")
    name = "secret-service.example.test"
    first = b"GET / HTTP/1.1\r\nHost: secret-ser"
    second = b"vice.example.test\r\n\r\n"
    pkts = [scapy.Ether() / scapy.IP(src="198.51.100.1", dst=SERVER) /
            scapy.TCP(sport=40000, dport=8080, flags="S", seq=99),
            scapy.Ether() / scapy.IP(src="198.51.100.1", dst=SERVER) /
            scapy.TCP(sport=40000, dport=8080, flags="PA", seq=100) / first,
            scapy.Ether() / scapy.IP(src="198.51.100.1", dst=SERVER) /
            scapy.TCP(sport=40000, dport=8080, flags="PA", seq=100 + len(first)) / second]
    both, tail = tmp_path / "both.pcap", tmp_path / "tail.pcap"
    scapy.wrpcap(str(both), pkts)
    scapy.wrpcap(str(tail), [pkts[0], pkts[2]])
    s = summarize_pcap(both, sni=name, server_addresses=[SERVER], total_app_bytes=100)
    assert s["sni"]["status"] == "full"
    assert s["sni"]["found_in"] == "payload"
    assert s["mptcp"]["option30_packets"] == 0
    t = summarize_pcap(tail, sni=name, server_addresses=[SERVER], total_app_bytes=100)
    assert t["sni"]["status"] == "partial"
    assert t["sni"]["fragments_seen"] == ["vice.example.test"]
    assert t["payload_bytes"] == {"to_server": len(second), "from_server": 0}


# -- degenerate inputs and failures ----------------------------------------------------------
@needs_tshark
@pytest.mark.parametrize("keep", [0, 24, 10])
def test_empty_or_truncated_capture(tmp_path: Path, keep: int) -> None:
    pcap = tmp_path / "cut.pcap"
    pcap.write_bytes((FIXTURES / "mptcp_tls_path1.pcap").read_bytes()[:keep])
    s = summarize_pcap(pcap, sni=SNI, server_addresses=[SERVER], total_app_bytes=10)
    assert s["packets"] == 0
    assert s["sni"]["status"] == "none"
    assert s["payload_bytes"] == {"to_server": 0, "from_server": 0}


@needs_tshark
def test_capture_cut_mid_packet_keeps_what_was_read(tmp_path: Path) -> None:
    pcap = tmp_path / "cut.pcap"
    pcap.write_bytes((FIXTURES / "mptcp_tls_path1.pcap").read_bytes()[:3000])
    s = summarize_pcap(pcap, sni=SNI, server_addresses=[SERVER], total_app_bytes=10)
    assert 0 < s["packets"] < summary("mptcp_tls_path1.pcap")["packets"]
    assert "cut short" in s["warning"]
    assert s["sni"]["status"] == "full"


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="no capture file"):
        summarize_pcap(tmp_path / "nope.pcap", sni=SNI, server_addresses=[], total_app_bytes=1)


@needs_tshark
def test_not_a_capture_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_text("this is not a pcap\n" * 4)
    with pytest.raises(RuntimeFailure, match="tshark failed"):
        summarize_pcap(bad, sni=SNI, server_addresses=[], total_app_bytes=1)


def test_tshark_missing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observer.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeFailure, match="tshark is not installed"):
        summary("mptcp_tls_path1.pcap")


def test_tshark_timeout_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(argv: list[str], **kwargs: Any) -> None:
        raise subprocess.TimeoutExpired(argv, kwargs.get("timeout", 0))

    monkeypatch.setattr(observer.shutil, "which", lambda _name: "/usr/bin/tshark")
    monkeypatch.setattr(observer.subprocess, "run", slow)
    with pytest.raises(RuntimeFailure, match="took more than"):
        summary("mptcp_tls_path1.pcap")
