"""Small wire-format helpers shared by the active attacks and the middleboxes (standard
library only, so the workers that run inside attacker/router nodes import it quickly).

- ``option_spans``: where each TCP option is (the one walker of TCP options).
- ``read_pcap``: the TCP segments of a pcap (Ethernet or Linux cooked, IPv4), parsed with
  ``struct``. Fast enough to re-read a growing capture in the middle of a transfer (the
  testbed's tcpdump writes packet by packet, ``-U``).
- ``tcp_checksum``: recompute a TCP checksum after a payload was changed.
- ``payload_pattern``: the testbed's deterministic payload (``scenario._payload``), to check
  that what an application received is an untouched prefix of it.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEQ_MOD = 1 << 32
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
PAYLOAD_CHUNK = 1 << 20  # as testbed.runtime.scenario.PAYLOAD_CHUNK


@dataclass(frozen=True)
class Segment:
    ts: float          # capture time (epoch seconds)
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    win: int           # raw 16-bit window field (unscaled)
    length: int        # TCP payload bytes
    tsval: int | None
    tsecr: int | None
    wscale: int | None  # window scale option (SYN / SYN-ACK only)
    has_mptcp: bool     # carries option 30

    @property
    def end(self) -> int:
        return (self.seq + self.length) % SEQ_MOD


def option_spans(opts: bytes) -> list[tuple[int, int, int]]:
    """(kind, start, end) of each TCP option in ``opts`` (NOPs included; stops at EOL or a
    malformed length: what follows cannot be parsed safely and is left alone)."""
    out = []
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:  # EOL
            break
        if kind == 1:  # NOP
            out.append((1, i, i + 1))
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2 or i + opts[i + 1] > len(opts):
            break
        out.append((kind, i, i + opts[i + 1]))
        i += opts[i + 1]
    return out


def _options(raw: bytes) -> tuple[int | None, int | None, int | None, bool]:
    tsval = tsecr = wscale = None
    mptcp = False
    for kind, start, end in option_spans(raw):
        body = raw[start + 2:end]
        if kind == 8 and len(body) == 8:
            tsval, tsecr = struct.unpack("!II", body)
        elif kind == 3 and len(body) == 1:
            wscale = body[0]
        elif kind == 30:
            mptcp = True
    return tsval, tsecr, wscale, mptcp


def parse_ipv4_tcp(pkt: bytes, ts: float = 0.0) -> Segment | None:
    """One IPv4 packet (from its IP header) as a ``Segment``; None if it is not TCP."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[9] != 6:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    tcp = pkt[ihl:total] if total >= ihl + 20 else pkt[ihl:]
    if len(tcp) < 20:
        return None
    sport, dport, seq, ack, off, flags, win = struct.unpack_from("!HHIIBBH", tcp, 0)
    doff = (off >> 4) * 4
    tsval, tsecr, wscale, mptcp = _options(tcp[20:doff])
    return Segment(ts, socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20]), sport, dport,
                   seq, ack, flags, win, max(len(tcp) - doff, 0), tsval, tsecr, wscale, mptcp)


def pcap_frames(path: Path) -> tuple[int, Iterator[tuple[float, bytes]]]:
    """The link type of a classic pcap file and its records as (time, frame), read up to
    the last whole record (a capture still being written is fine)."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return 1, iter(())
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file (pcapng is not supported)")
    scale = 1e9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e6
    record = struct.Struct(endian + "IIII")

    def records() -> Iterator[tuple[float, bytes]]:
        pos = 24
        while pos + 16 <= len(data):
            sec, frac, incl, _orig = record.unpack_from(data, pos)
            pos += 16
            if pos + incl > len(data):
                return
            yield sec + frac / scale, data[pos:pos + incl]
            pos += incl

    return struct.unpack_from(endian + "I", data, 20)[0], records()


def read_pcap(path: Path) -> list[Segment]:
    """Every IPv4 TCP segment of a classic pcap file (a truncated last record is ignored)."""
    linktype, frames = pcap_frames(path)
    out: list[Segment] = []
    for ts, frame in frames:
        if linktype == 1:        # Ethernet
            etype, start = struct.unpack_from("!H", frame, 12)[0] if len(frame) >= 14 else 0, 14
            if etype == 0x8100 and len(frame) >= 18:
                etype, start = struct.unpack_from("!H", frame, 16)[0], 18
        elif linktype == 113:    # Linux cooked
            etype, start = struct.unpack_from("!H", frame, 14)[0] if len(frame) >= 16 else 0, 16
        elif linktype in (101, 228):  # raw IPv4
            etype, start = 0x0800, 0
        else:
            continue
        if etype != 0x0800:
            continue
        seg = parse_ipv4_tcp(frame[start:], ts)
        if seg is not None:
            out.append(seg)
    return out


def seq_after(a: int, b: int) -> bool:
    """``a`` is after ``b`` in 32-bit sequence space."""
    return 0 < (a - b) % SEQ_MOD < (1 << 31)


def internet_checksum(data: bytes) -> int:
    """The ones' complement of the ones' complement sum of ``data``'s 16-bit words (RFC
    1071: IPv4 header, TCP, and MPTCP's DSS checksum)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    """The TCP checksum of ``segment`` (its checksum field taken as zero)."""
    seg = segment[:16] + b"\x00\x00" + segment[18:]
    return internet_checksum(src + dst + struct.pack("!BBH", 0, 6, len(seg)) + seg)


def payload_pattern(size: int) -> bytes:
    """The 32-byte period of the testbed's payload of ``size`` bytes (see
    ``testbed.runtime.scenario._payload``)."""
    return hashlib.sha256(str(size).encode()).digest()


def is_payload_prefix(received: Path, size: int) -> bool:
    """Whether ``received`` holds exactly the first bytes of the testbed's payload."""
    period = payload_pattern(size)
    offset = 0
    with Path(received).open("rb") as fh:
        while chunk := fh.read(PAYLOAD_CHUNK):
            start = offset % len(period)
            reps = (start + len(chunk)) // len(period) + 2
            if chunk != (period * reps)[start:start + len(chunk)]:
                return False
            offset += len(chunk)
    return offset <= size
