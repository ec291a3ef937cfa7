"""MPTCP handshakes and sequence state read from pcaps (or live packets) with scapy.

scapy has no MPTCP layer: option 30 comes through as raw bytes, which
``testbed.model.mptcp`` parses. Used by the join attacks (keys from the attacker's own tap
capture, a token from the testbed's capture standing in for a leak) and by the tests that
check the codec against handshakes the kernel sent.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.model import mptcp
from testbed.model.wire import pcap_frames


@dataclass
class Segment:
    """One IPv4 TCP segment with its MPTCP options parsed."""

    time: float
    src: str
    dst: str
    sport: int
    dport: int
    flags: str
    seq: int
    ack: int
    window: int
    payload_len: int
    tsval: int | None = None
    tsecr: int | None = None
    wscale: int | None = None
    options: list[mptcp.MptcpOption] = field(default_factory=list)

    def first(self, cls: type[Any]) -> Any:
        return next((o for o in self.options if isinstance(o, cls)), None)

    @property
    def syn(self) -> bool:
        return "S" in self.flags

    @property
    def is_ack(self) -> bool:
        return "A" in self.flags


def segment_of(pkt: Any) -> Segment | None:
    """A scapy packet as a ``Segment`` (None when it is not IPv4/TCP)."""
    from scapy.layers.l2 import Ether

    if Ether not in pkt:
        return None
    return segment_from_frame(bytes(pkt), float(pkt.time))


def segment_from_frame(frame: bytes, when: float) -> Segment | None:
    """An Ethernet frame as a ``Segment`` (None when it is not IPv4/TCP). A plain parser:
    scapy dissects a few thousand packets a second, too slow while a transfer runs."""
    if len(frame) < 14 + 20 + 20 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0xF) * 4
    if ip[0] >> 4 != 4 or ip[9] != 6 or len(ip) < ihl + 20:
        return None
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ihl:]
    sport, dport, seq, ack, off_flags, window = struct.unpack("!HHIIHH", tcp[:16])
    doff = (off_flags >> 12) * 4
    flags = "".join(name for bit, name in _FLAGS if off_flags & bit)
    seg = Segment(time=when, src=socket.inet_ntoa(ip[12:16]), dst=socket.inet_ntoa(ip[16:20]),
                  sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=window,
                  payload_len=max(0, total - ihl - doff))
    opts = tcp[20:doff]
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        length = opts[i + 1]
        body = opts[i:i + length]
        if kind == 8 and length == 10:
            seg.tsval, seg.tsecr = struct.unpack("!II", body[2:10])
        elif kind == 3 and length == 3 and len(body) == 3:
            seg.wscale = body[2]
        elif kind == mptcp.KIND and len(body) == length:
            with contextlib.suppress(mptcp.OptionError):
                seg.options.append(mptcp.parse_option(bytes(body)))
        i += length
    return seg


# scapy's flag letters, in its order
_FLAGS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "A"), (0x20, "U"),
          (0x40, "E"), (0x80, "C"))


def read_segments(pcap: Path) -> list[Segment]:
    """Every IPv4 TCP segment of an Ethernet pcap (one still being written is read up to
    its last whole record)."""
    linktype, frames = pcap_frames(pcap)
    if linktype != 1:
        raise ValueError(f"{pcap}: link type {linktype}, only Ethernet (1) is supported")
    return [seg for ts, frame in frames if (seg := segment_from_frame(frame, ts)) is not None]


@dataclass(frozen=True)
class CapableHandshake:
    client: str
    server: str
    sport: int
    dport: int
    client_key: int
    server_key: int


@dataclass(frozen=True)
class JoinHandshake:
    client: str
    server: str
    sport: int
    dport: int
    token: int
    client_nonce: int
    server_nonce: int | None = None
    synack_hmac: int | None = None
    ack_hmac: bytes | None = None


def capable_handshakes(segments: list[Segment]) -> list[CapableHandshake]:
    """Both keys of each MPTCP connection whose third ACK (or first data) was seen."""
    seen: dict[tuple[str, int, str, int], CapableHandshake] = {}
    for seg in segments:
        cap = seg.first(mptcp.MpCapable)
        if cap is None or seg.syn or cap.receiver_key is None or cap.sender_key is None:
            continue
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        seen.setdefault(key, CapableHandshake(seg.src, seg.dst, seg.sport, seg.dport,
                                              cap.sender_key, cap.receiver_key))
    return list(seen.values())


def join_handshakes(segments: list[Segment]) -> list[JoinHandshake]:
    """Each MP_JOIN seen: token and nonces, and the HMACs of its SYN/ACK and third ACK."""
    joins: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    for seg in segments:
        syn = seg.first(mptcp.MpJoinSyn)
        if syn is not None and seg.flags == "S":
            joins.setdefault((seg.src, seg.sport, seg.dst, seg.dport),
                             {"token": syn.token, "client_nonce": syn.nonce})
            continue
        synack = seg.first(mptcp.MpJoinSynAck)
        if synack is not None and seg.syn and seg.is_ack:
            rec = joins.get((seg.dst, seg.dport, seg.src, seg.sport))
            if rec is not None:
                rec.update(server_nonce=synack.nonce, synack_hmac=synack.hmac)
            continue
        jack = seg.first(mptcp.MpJoinAck)
        if jack is not None:
            rec = joins.get((seg.src, seg.sport, seg.dst, seg.dport))
            if rec is not None:
                rec.setdefault("ack_hmac", jack.hmac)
    return [JoinHandshake(k[0], k[2], k[1], k[3], **v) for k, v in joins.items()]
