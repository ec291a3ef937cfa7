"""The payload_rewrite ALG's stream arithmetic and packet handling (no root): a rewrite is
a position in the original byte stream, so however the sender re-cuts a retransmission the
receiver gets one consistent rewritten stream, and its acks map back to the original."""

from __future__ import annotations

import io
import itertools
import json
import random
import socket
import struct

import pytest

from testbed.errors import SpecError
from testbed.middleboxes import MIDDLEBOXES
from testbed.middleboxes._rewrite_worker import (
    Rewrite,
    Rewriter,
    apply_payload,
    backward,
    forward,
    make_rewrite,
)
from testbed.model.wire import parse_ipv4_tcp, tcp_checksum

STREAM = bytes(random.Random(7).randrange(256) for _ in range(4000))
CASES = [
    [Rewrite(1000, "insert", 4, b"ABCD")],
    [Rewrite(1000, "delete", 4)],
    [Rewrite(1000, "same_length", 4, b"WXYZ")],
    [Rewrite(500, "insert", 3, b"abc"), Rewrite(2000, "delete", 7)],
]


def rewritten(rewrites: list[Rewrite]) -> bytes:
    return apply_payload(0, STREAM, rewrites)


@pytest.mark.parametrize("rewrites", CASES)
def test_any_cut_of_the_stream_gives_the_same_rewritten_stream(rewrites: list[Rewrite]
                                                               ) -> None:
    want = rewritten(rewrites)
    assert len(want) == len(STREAM) + sum(r.delta for r in rewrites)
    rng = random.Random(1)
    for _ in range(50):
        cuts = sorted({0, len(STREAM), *(rng.randrange(len(STREAM)) for _ in range(8))})
        out = bytearray(len(want))
        for lo, hi in itertools.pairwise(cuts):
            piece = apply_payload(lo, STREAM[lo:hi], rewrites)
            at = forward(lo, rewrites)
            out[at:at + len(piece)] = piece
            assert forward(hi, rewrites) - at == len(piece)
        assert bytes(out) == want


@pytest.mark.parametrize("rewrites", CASES)
def test_acks_map_back_to_the_original_stream(rewrites: list[Rewrite]) -> None:
    for x in range(0, len(STREAM) + 1, 7):
        y = forward(x, rewrites)
        back = backward(y, rewrites)
        # A position right after deleted bytes and the deletion point are the same point
        # of the rewritten stream: the deleted bytes count as delivered.
        assert back == x or any(r.op == "delete" and r.at <= x <= r.at + r.n
                                and back == r.at + r.n for r in rewrites)
    ins = Rewrite(100, "insert", 4, b"ABCD")
    assert [backward(y, [ins]) for y in (100, 102, 104, 105)] == [100, 100, 100, 101]


def test_make_rewrite_modes() -> None:
    payload = bytes(range(100))
    same = make_rewrite(10, payload, "same_length", 4, b"")
    assert same.at == 10 + 48 and same.new == bytes(b ^ 0xFF for b in payload[48:52])
    assert make_rewrite(10, payload, "same_length", 4, b"EV").new == b"EVEV"
    assert make_rewrite(10, payload, "insert", 7, b"").new == b"#ALG##A"
    assert make_rewrite(0, payload[:3], "delete", 10, b"").n == 3


def packet(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, payload: bytes,
           flags: int = 0x18, sack: tuple[int, int] | None = None) -> bytes:
    opts = b""
    if sack is not None:
        opts = b"\x01\x01\x05\x0a" + struct.pack("!II", *sack)
    doff = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff // 4) << 4, flags, 1000, 0,
                      0) + opts + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


def valid(pkt: bytes) -> bool:
    ihl = 20
    total = struct.unpack_from("!H", pkt, 2)[0]
    got = struct.unpack_from("!H", pkt, ihl + 16)[0]
    return total == len(pkt) and got == tcp_checksum(pkt[12:16], pkt[16:20], pkt[ihl:total])


@pytest.mark.parametrize("mode,delta", [("same_length", 0), ("insert", 4), ("delete", -4)])
def test_rewriter_shifts_seq_and_acks(mode: str, delta: int) -> None:
    log = io.StringIO()
    rw = Rewriter({"server": "203.0.113.2", "port": 0, "direction": "s2c", "mode": mode,
                   "after": 2, "count": 1, "bytes": 4, "fill_hex": ""}, log)
    srv, cli = "203.0.113.2", "198.51.100.1"
    base = 0xFFFFFF00  # wraps: the arithmetic is modulo 2**32
    segs = [STREAM[i:i + 100] for i in range(0, 300, 100)]
    assert rw.handle(packet(srv, cli, 443, 5000, base, 1, segs[0])) is None
    out = rw.handle(packet(srv, cli, 443, 5000, base + 100, 1, segs[1]))
    assert out is not None and valid(out)
    seg = parse_ipv4_tcp(out)
    assert seg is not None and seg.length == 100 + delta and seg.seq == base + 100
    if mode == "insert":
        assert not out[6] & 0x40  # DF cleared on a grown packet
    # The next segment moves by delta; a retransmission of the changed one is changed again.
    nxt = rw.handle(packet(srv, cli, 443, 5000, (base + 200) % 2**32, 1, segs[2]))
    assert (parse_ipv4_tcp(nxt).seq if nxt else base + 200) == (base + 200 + delta) % 2**32
    again = rw.handle(packet(srv, cli, 443, 5000, base + 100, 1, segs[1]))
    assert again == out
    # The client's ack of everything (rewritten space) maps back to the original end.
    ack = rw.handle(packet(cli, srv, 5000, 443, 1, (base + 300 + delta) % 2**32, b"",
                           0x10, sack=((base + 200 + delta) % 2**32,
                                       (base + 300 + delta) % 2**32)))
    if delta:
        assert ack is not None and valid(ack)
        got = parse_ipv4_tcp(ack)
        assert got is not None and got.ack == (base + 300) % 2**32
        assert struct.unpack_from("!II", ack, 20 + 24) == ((base + 200) % 2**32,
                                                            (base + 300) % 2**32)
    else:
        assert ack is None
    events = [json.loads(ln) for ln in log.getvalue().splitlines()]
    assert [e["retransmission"] for e in events] == [False, True]
    assert events[0]["segment_delta"] == delta and events[0]["data_segment"] == 2
    # Other hosts' traffic is not touched.
    assert rw.handle(packet("192.0.2.1", cli, 443, 5000, base, 1, segs[0])) is None


def test_fill_must_be_printable_ascii() -> None:
    cls = MIDDLEBOXES["payload_rewrite"]
    assert cls.validate({"mode": "insert", "fill": "EVIL"}, "f.yaml", "m")["fill"] == "EVIL"
    with pytest.raises(SpecError, match="fill"):
        cls.validate({"fill": "\x00"}, "f.yaml", "middleboxes[0]")
    with pytest.raises(SpecError, match="mode"):
        cls.validate({"mode": "grow"}, "f.yaml", "middleboxes[0]")


def test_rewriter_client_to_server() -> None:
    """direction c2s: the client's data is changed, the server's acks are mapped back."""
    log = io.StringIO()
    rw = Rewriter({"server": "203.0.113.2", "port": 443, "direction": "c2s",
                   "mode": "delete", "after": 1, "count": 1, "bytes": 4, "fill_hex": ""}, log)
    srv, cli = "203.0.113.2", "198.51.100.1"
    # The server's data is never touched, whatever its position in the count.
    assert rw.handle(packet(srv, cli, 443, 5000, 7, 1000, STREAM[:100])) is None
    out = rw.handle(packet(cli, srv, 5000, 443, 1000, 107, STREAM[:100]))
    assert out is not None and valid(out)
    seg = parse_ipv4_tcp(out)
    assert seg is not None and seg.length == 96 and seg.seq == 1000
    nxt = rw.handle(packet(cli, srv, 5000, 443, 1100, 107, STREAM[100:200]))
    assert nxt is not None and parse_ipv4_tcp(nxt).seq == 1096  # type: ignore[union-attr]
    ack = rw.handle(packet(srv, cli, 443, 5000, 107, 1196, b"", 0x10))
    assert ack is not None and parse_ipv4_tcp(ack).ack == 1200  # type: ignore[union-attr]
    # Another server port is not the app's: left alone.
    assert rw.handle(packet(cli, srv, 5001, 80, 1100, 107, STREAM[100:200])) is None
    assert json.loads(log.getvalue().splitlines()[0])["direction"] == "c2s"
