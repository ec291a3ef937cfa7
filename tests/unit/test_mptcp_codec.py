"""The MPTCP option codec: round trips, vectors computed independently here, and the
options and HMACs of real handshakes recorded on this kernel (tests/fixtures/*.pcap)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.model import mptcp
from testbed.runtime.mptcp_pcap import capable_handshakes, join_handshakes, read_segments

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KEY_A = 0x0102030405060708
KEY_B = 0x1112131415161718

u64 = st.integers(0, (1 << 64) - 1)
u32 = st.integers(0, (1 << 32) - 1)
u16 = st.integers(0, 0xFFFF)
u8 = st.integers(0, 255)


# -- derived values ---------------------------------------------------------------------------
def test_token_and_idsn_are_the_two_ends_of_sha256() -> None:
    digest = hashlib.sha256(bytes.fromhex("0102030405060708")).digest()
    assert mptcp.token(KEY_A) == int.from_bytes(digest[:4], "big") == 0x66840DDA
    assert mptcp.idsn(KEY_A) == int.from_bytes(digest[24:], "big") == 0xF5A101D3D29D6F72


def test_join_hmacs_key_order_and_truncation() -> None:
    full_b = hmac.new(struct.pack("!QQ", KEY_B, KEY_A), struct.pack("!II", 7, 9),
                      hashlib.sha256).digest()
    assert mptcp.join_synack_hmac(KEY_B, KEY_A, 7, 9) == int.from_bytes(full_b[:8], "big")
    full_a = hmac.new(struct.pack("!QQ", KEY_A, KEY_B), struct.pack("!II", 9, 7),
                      hashlib.sha256).digest()
    assert mptcp.join_ack_hmac(KEY_A, KEY_B, 9, 7) == full_a[:20]
    # The two directions never coincide: the SYN/ACK's HMAC does not give the ACK's.
    assert mptcp.join_ack_hmac(KEY_A, KEY_B, 9, 7)[:8] != full_b[:8]


def test_add_addr_hmac_is_the_rightmost_64_bits() -> None:
    msg = bytes([5]) + bytes([198, 51, 100, 9]) + b"\x00\x00"
    full = hmac.new(struct.pack("!QQ", KEY_A, KEY_B), msg, hashlib.sha256).digest()
    assert mptcp.add_addr_hmac(KEY_A, KEY_B, 5, "198.51.100.9") == \
        int.from_bytes(full[-8:], "big") == 0x48C04A41ECAFF720
    assert mptcp.add_addr_hmac(KEY_A, KEY_B, 5, "198.51.100.9", 8443) == 0xC3AFF8F73FDA9800


def test_dss_checksum_matches_the_internet_checksum() -> None:
    from scapy.utils import checksum

    payload = b"hello, mptcp!"
    pseudo = struct.pack("!QIHH", 2**40 + 3, 17, len(payload), 0)
    assert mptcp.dss_checksum(2**40 + 3, 17, len(payload), payload) == \
        checksum(pseudo + payload)


def test_keys_are_64_bit() -> None:
    with pytest.raises(ValueError):
        mptcp.token(1 << 64)


# -- building ----------------------------------------------------------------------------------
def test_built_bytes() -> None:
    assert mptcp.build(mptcp.MpCapable()) == bytes.fromhex("1e040101")
    assert mptcp.build(mptcp.MpJoinSyn(token=0xA1B2C3D4, nonce=0x01020304, addr_id=2)) == \
        bytes.fromhex("1e0c1002a1b2c3d401020304")
    assert mptcp.build(mptcp.MpTcpRst(reason=1)) == bytes.fromhex("1e048001")
    assert mptcp.build(mptcp.MpTcpRst(reason=6, transient=True)) == bytes.fromhex("1e048106")
    dss = mptcp.build(mptcp.Dss(data_ack=1, dsn=2, subflow_seq=3, data_len=4))
    assert dss == bytes.fromhex("1e1a200f") + struct.pack("!QQIH", 1, 2, 3, 4)
    assert mptcp.build(mptcp.AddAddr(1, "198.51.100.9", hmac=0x1122334455667788)) == \
        bytes.fromhex("1e103001c6336409") + bytes.fromhex("1122334455667788")
    assert mptcp.build(mptcp.AddAddr(1, "198.51.100.9", port=443, echo=True)) == \
        bytes.fromhex("1e0a3101c633640901bb")


def test_build_refuses_malformed() -> None:
    with pytest.raises(mptcp.OptionError):
        mptcp.build(mptcp.MpJoinAck(b"short"))
    with pytest.raises(mptcp.OptionError):
        mptcp.build(mptcp.AddAddr(1, "198.51.100.9"))
    with pytest.raises(mptcp.OptionError):
        mptcp.parse_option(bytes.fromhex("1e0510"))
    with pytest.raises(mptcp.OptionError):
        mptcp.parse_option(bytes.fromhex("1e0a1000aabbccdd0000"))  # MP_JOIN of length 10


# -- round trips -------------------------------------------------------------------------------
@given(st.one_of(
    st.builds(mptcp.MpCapable, version=st.just(1), flags=u8),
    st.builds(mptcp.MpCapable, version=st.just(1), flags=u8, sender_key=u64),
    st.builds(mptcp.MpCapable, version=st.just(1), flags=u8, sender_key=u64, receiver_key=u64),
    st.builds(mptcp.MpCapable, version=st.just(1), flags=u8, sender_key=u64,
              receiver_key=u64, data_len=u16, checksum=st.none() | u16),
    st.builds(mptcp.MpJoinSyn, token=u32, nonce=u32, addr_id=u8, backup=st.booleans()),
    st.builds(mptcp.MpJoinSynAck, hmac=u64, nonce=u32, addr_id=u8, backup=st.booleans()),
    st.builds(mptcp.MpJoinAck, hmac=st.binary(min_size=20, max_size=20)),
    st.builds(mptcp.Dss, data_ack=st.none() | u64, dsn=u64, subflow_seq=u32, data_len=u16,
              checksum=st.none() | u16, data_fin=st.booleans()),
    st.builds(mptcp.Dss, data_ack=u64),
    st.builds(mptcp.AddAddr, addr_id=u8, addr=st.ip_addresses(v=4).map(str),
              port=st.none() | st.integers(1, 0xFFFF), hmac=u64),
    st.builds(mptcp.AddAddr, addr_id=u8, addr=st.ip_addresses(v=4).map(str),
              port=st.none() | st.integers(1, 0xFFFF), echo=st.just(True)),
    st.builds(mptcp.MpTcpRst, reason=u8, transient=st.booleans()),
))
def test_round_trip(opt: mptcp.MptcpOption) -> None:
    raw = mptcp.build(opt)
    assert raw[0] == 30 and raw[1] == len(raw) <= 40
    assert mptcp.parse_option(raw) == opt
    kind, body = mptcp.scapy_option(opt)
    assert kind == 30 and mptcp.from_scapy(body) == opt


@given(st.binary(min_size=0, max_size=40))
def test_parse_never_crashes_on_garbage(body: bytes) -> None:
    with contextlib.suppress(mptcp.OptionError):
        mptcp.parse_option(bytes([30, len(body) + 2]) + body)


# -- real handshakes of this kernel ------------------------------------------------------------
def test_fixture_options_parse_and_rebuild_byte_for_byte() -> None:
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap

    count = 0
    for name in ("mptcp_tls_path1.pcap", "mptcp_tls_path2.pcap"):
        for pkt in rdpcap(str(FIXTURES / name)):
            if TCP not in pkt:
                continue
            for kind, value in pkt[TCP].options:
                if kind == 30:
                    assert mptcp.scapy_option(mptcp.from_scapy(value))[1] == bytes(value)
                    count += 1
    assert count >= 40  # every option of both recorded connections


def test_fixture_handshakes_match_the_codec() -> None:
    path1 = read_segments(FIXTURES / "mptcp_tls_path1.pcap")
    path2 = read_segments(FIXTURES / "mptcp_tls_path2.pcap")
    (cap,) = capable_handshakes(path1)
    assert (cap.client_key, cap.server_key) == (11610718547250634260, 7390306521180015419)
    (join,) = join_handshakes(path2)
    # The join SYN carries the server's token, derived from the server's key.
    assert join.token == mptcp.token(cap.server_key) == 3626730858
    assert join.server_nonce is not None and join.synack_hmac is not None
    # What the kernel sent equals what the codec computes from keys and nonces.
    assert join.synack_hmac == mptcp.join_synack_hmac(cap.server_key, cap.client_key,
                                                      join.server_nonce, join.client_nonce)
    assert join.ack_hmac == mptcp.join_ack_hmac(cap.client_key, cap.server_key,
                                                join.client_nonce, join.server_nonce)
    # First data sequence numbers: IDSN + 1 on each side (the client's first 517 bytes
    # ride on the MP_CAPABLE ACK, so the server's first data-ACK is past them).
    server_dsns = [s.first(mptcp.Dss).dsn for s in path1 if s.src == cap.server
                   and s.first(mptcp.Dss) is not None and s.first(mptcp.Dss).dsn is not None]
    assert min(server_dsns) == (mptcp.idsn(cap.server_key) + 1) & mptcp.MASK64
    first_ack = next(s.first(mptcp.Dss).data_ack for s in path1 if s.src == cap.server
                     and s.first(mptcp.Dss) is not None)
    assert first_ack == mptcp.idsn(cap.client_key) + 1 + 517


def test_worker_patches_a_prebuilt_frame_like_scapy_builds_it() -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from attacks.mptcp_worker import _patch_tcp

    def frame(seq: int, ack: int, window: int, tsval: int, tsecr: int) -> bytes:
        opts = [("NOP", None), ("NOP", None), ("Timestamp", (tsval, tsecr)),
                mptcp.scapy_option(mptcp.AddAddr(42, "198.51.100.10", hmac=7))]
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                     / IP(src="203.0.113.2", dst="198.51.100.1", ttl=64)
                     / TCP(sport=443, dport=40000, flags="A", seq=seq, ack=ack,
                           window=window, options=opts))

    template = frame(0, 0, 0, 0, 0)
    want = frame(0xFFFFFFF0, 12345, 4321, 2**32 - 1, 99)
    assert _patch_tcp(template, seq=0xFFFFFFF0, ack=12345, window=4321, tsval=2**32 - 1,
                      tsecr=99) == want
