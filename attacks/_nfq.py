"""Worker of ``tls_tamper``, run INSIDE the path's access router:
``python -m attacks._nfq '<json config>'``.

A minimal NFQUEUE client over a raw ``NETLINK_NETFILTER`` socket (no libnetfilter_queue
binding needed): it binds queue ``queue``, receives every packet the router's iptables rule
queues (whole packets, GSO already segmented by the kernel), accepts them unchanged, except
that in the ``after``-th server->client segment with payload (and the ``count - 1`` next
ones, and their retransmissions) it flips ``flip`` payload bytes (XOR 0xff) in the middle
of the payload and fixes the TCP checksum. Each tampering is appended to ``log`` as one
JSON line as it happens, so the evidence survives the worker being stopped.

Fail-open: the queue is configured with NFQA_CFG_F_FAIL_OPEN and the rule uses
``--queue-bypass``, so the victim's packets pass if the worker lags or is gone.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from attacks._wire import parse_ipv4_tcp, tcp_checksum

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
NF_ACCEPT = 1


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

    def packets(self) -> Any:
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

    def verdict(self, pkt_id: int, payload: bytes | None = None) -> None:
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pkt_id))
        if payload is not None:
            attrs += _attr(NFQA_PAYLOAD, payload)
        self.seq += 1
        self.sock.send(_msg(NFQNL_MSG_VERDICT, self.queue, attrs, self.seq))


def tamper(pkt: bytes, flip: int) -> tuple[bytes, dict[str, Any]]:
    """Flip ``flip`` bytes in the middle of the TCP payload; fix the TCP checksum."""
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    doff = (pkt[ihl + 12] >> 4) * 4
    start = ihl + doff
    size = total - start
    at = start + max(0, size // 2 - flip // 2)
    n = min(flip, total - at)
    buf = bytearray(pkt)
    before = bytes(buf[at:at + n])
    for i in range(at, at + n):
        buf[i] ^= 0xFF
    seg = bytes(buf[ihl:total])
    struct.pack_into("!H", buf, ihl + 16, tcp_checksum(bytes(buf[12:16]), bytes(buf[16:20]), seg))
    return bytes(buf), {"payload_offset": at - start, "bytes": n, "before": before.hex(),
                        "after": bytes(buf[at:at + n]).hex()}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    log = Path(cfg["log"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    queue = Queue(cfg["queue"])
    print("ready", flush=True)
    data_segments = 0
    done: set[tuple[int, int, int]] = set()  # (dport, seq, len) of the segments changed
    with log.open("a") as out:
        for pkt_id, pkt in queue.packets():
            seg = parse_ipv4_tcp(pkt)
            if (seg is None or seg.length == 0 or seg.src != cfg["server"]
                    or seg.sport != cfg["port"]):
                queue.verdict(pkt_id)
                continue
            key = (seg.dport, seg.seq, seg.length)
            again = key in done
            if not again:
                data_segments += 1
                if data_segments < cfg["after"] or len(done) >= cfg["count"]:
                    queue.verdict(pkt_id)
                    continue
            # A retransmission of a segment already changed is changed the same way: if
            # the first copy is lost downstream (the access link's queue), the clean copy
            # would otherwise undo the attack.
            new, what = tamper(pkt, cfg["flip"])
            queue.verdict(pkt_id, new)
            done.add(key)
            out.write(json.dumps({"time": time.time(), "data_segment": data_segments,
                                  "retransmission": again,
                                  "src": seg.src, "dst": seg.dst, "sport": seg.sport,
                                  "dport": seg.dport, "seq": seg.seq, "len": seg.length,
                                  "mptcp_option": seg.has_mptcp, **what}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
