"""A minimal NFQUEUE client over a raw ``NETLINK_NETFILTER`` socket (stdlib only: no
libnetfilter_queue binding needed), for the workers that rewrite packets in flight inside
a node (the ``tls_tamper`` attack, the NFQUEUE middleboxes).

The queue is configured with NFQA_CFG_F_FAIL_OPEN, and the rules that feed it use
``--queue-bypass``: when the worker lags or is gone, packets pass unchanged instead of
being dropped. Packets arrive whole (GSO already segmented by the kernel).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

from testbed.model.wire import internet_checksum

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NF_DROP, NF_ACCEPT = 0, 1


def _attr(kind: int, data: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(data), kind)
    return head + data + b"\x00" * (-len(data) % 4)


def _msg(msg_type: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type,
                       flags, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, pos)
        if size < 4:
            break
        out[kind & 0x3FFF] = data[pos + 4:pos + size]
        pos += (size + 3) & ~3
    return out


class Queue:
    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET)))
        self._config(_attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
                     + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)))

    def _config(self, attrs: bytes) -> None:
        self.seq += 1
        self.sock.send(_msg(NFQNL_MSG_CONFIG, self.queue, attrs, self.seq,
                            NLM_F_REQUEST | NLM_F_ACK))
        while True:
            data = self.sock.recv(65536)
            _len, mtype, _flags, seq = struct.unpack_from("=IHHI", data, 0)
            if mtype == NLMSG_ERROR and seq == self.seq:
                err = struct.unpack_from("=i", data, 16)[0]
                if err:
                    raise OSError(-err, f"nfqueue config failed: {err}")
                return

    def packets(self) -> Iterator[tuple[int, bytes]]:
        """Yield (packet id, packet bytes) for every queued packet."""
        while True:
            data = self.sock.recv(1 << 18)
            pos = 0
            while pos + 16 <= len(data):
                length, mtype, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, pos)
                if length < 16:
                    break
                if mtype == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    attrs = _attrs(data[pos + 20:pos + length])
                    if NFQA_PACKET_HDR in attrs and NFQA_PAYLOAD in attrs:
                        pkt_id = struct.unpack_from("!I", attrs[NFQA_PACKET_HDR], 0)[0]
                        yield pkt_id, attrs[NFQA_PAYLOAD]
                pos += (length + 3) & ~3

    def verdict(self, pkt_id: int, payload: bytes | None = None, *, accept: bool = True
                ) -> None:
        """Accept the packet (replaced by ``payload`` when given) or drop it."""
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT if accept else NF_DROP,
                                                    pkt_id))
        if payload is not None:
            attrs += _attr(NFQA_PAYLOAD, payload)
        self.seq += 1
        self.sock.send(_msg(NFQNL_MSG_VERDICT, self.queue, attrs, self.seq))


def refresh_checksums(pkt: bytearray) -> bytearray:
    """Recompute the IPv4 header checksum and the TCP checksum of an IPv4/TCP packet in
    place (after its options, payload or length changed); the IPv4 total length must
    already be right. Returns ``pkt``."""
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    struct.pack_into("!H", pkt, 10, 0)
    struct.pack_into("!H", pkt, 10, internet_checksum(bytes(pkt[:ihl])))
    seg = pkt[ihl:total]
    struct.pack_into("!H", pkt, ihl + 16, 0)
    pseudo = bytes(pkt[12:20]) + struct.pack("!BBH", 0, 6, len(seg))
    struct.pack_into("!H", pkt, ihl + 16, internet_checksum(pseudo + bytes(pkt[ihl:total])))
    return pkt
