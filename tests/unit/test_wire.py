"""Unit tests of the wire helpers shared by attacks and middleboxes (no root): the pcap
reader on a recorded fixture, the TCP checksum against scapy's, the NFQUEUE rewriter's
tamper step, the payload-prefix check and the TCP option walker."""

from __future__ import annotations

from pathlib import Path

from scapy.all import IP, TCP, Raw

from attacks._nfq import tamper
from testbed.model.wire import (
    SYN,
    is_payload_prefix,
    option_spans,
    parse_ipv4_tcp,
    payload_pattern,
    read_pcap,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_read_pcap_finds_the_mptcp_handshake() -> None:
    segs = read_pcap(FIXTURES / "mptcp_tls_path1.pcap")
    syns = [s for s in segs if s.flags & SYN]
    assert syns and all(s.has_mptcp for s in syns)
    assert any(s.tsval is not None for s in segs)
    assert any(s.length > 0 for s in segs)


def test_tamper_flips_bytes_and_keeps_a_valid_checksum() -> None:
    pkt = bytes(IP(src="203.0.113.2", dst="198.51.100.1")
                / TCP(sport=443, dport=40000, seq=1000, ack=5, flags="PA")
                / Raw(b"A" * 100))
    new, what = tamper(pkt, 2)
    assert what["bytes"] == 2 and what["before"] == "4141" and what["after"] == "bebe"
    reparsed = IP(new)
    original_sum = reparsed[TCP].chksum
    del reparsed[TCP].chksum
    assert IP(bytes(reparsed))[TCP].chksum == original_sum
    seg = parse_ipv4_tcp(new)
    assert seg is not None and seg.seq == 1000 and seg.length == 100


def test_payload_prefix(tmp_path: Path) -> None:
    period = payload_pattern(1000)
    good = tmp_path / "good.bin"
    good.write_bytes((period * 40)[:999])
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"X" + (period * 40)[1:999])
    assert is_payload_prefix(good, 1000)
    assert not is_payload_prefix(bad, 1000)


def test_option_spans_walks_nops_and_stops_at_eol_or_a_bad_length() -> None:
    opts = bytes([1, 1, 8, 10]) + bytes(8) + bytes([5, 10]) + bytes(8) + bytes([0, 30, 4, 0])
    assert option_spans(opts) == [(1, 0, 1), (1, 1, 2), (8, 2, 12), (5, 12, 22)]
    # Option 30 claims 40 bytes where 3 are left: nothing after the MSS is trusted.
    assert option_spans(bytes([2, 4, 5, 0xB4, 30, 40, 1])) == [(2, 0, 4)]
    assert option_spans(bytes([3, 1, 1])) == []  # a length below 2 is malformed
