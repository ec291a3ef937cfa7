"""MPTCP handshakes and sequence state read from pcaps (or live packets) with scapy.

scapy has no MPTCP layer: option 30 comes through as raw bytes, which
``testbed.model.mptcp`` parses. Used by the join attacks (keys from the attacker's own tap
capture, a token from the testbed's capture standing in for a leak) and by the tests that
check the codec against handshakes the kernel sent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.model import mptcp


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
    from scapy.layers.inet import IP, TCP

    if IP not in pkt or TCP not in pkt:
        return None
    ip, tcp = pkt[IP], pkt[TCP]
    seg = Segment(time=float(pkt.time), src=ip.src, dst=ip.dst, sport=tcp.sport,
                  dport=tcp.dport, flags=str(tcp.flags), seq=tcp.seq, ack=tcp.ack,
                  window=tcp.window,
                  payload_len=max(0, ip.len - ip.ihl * 4 - tcp.dataofs * 4))
    for kind, value in tcp.options:
        if kind == "Timestamp":
            seg.tsval, seg.tsecr = value
        elif kind in (mptcp.KIND, "MPTCP") and isinstance(value, bytes | bytearray):
            with contextlib.suppress(mptcp.OptionError):
                seg.options.append(mptcp.from_scapy(bytes(value)))
    return seg


def read_segments(pcap: Path) -> list[Segment]:
    """Every TCP segment of ``pcap`` (a pcap still being written is read up to its end)."""
    from scapy.utils import PcapReader

    out: list[Segment] = []
    with contextlib.suppress(EOFError), PcapReader(str(pcap)) as reader:
        for pkt in reader:
            seg = segment_of(pkt)
            if seg is not None:
                out.append(seg)
    return out


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
