"""Worker of the ``payload_rewrite`` middlebox, run INSIDE the slot node:
``python -m testbed.middleboxes._rewrite_worker '<json config>'``.

An application-level gateway in miniature: it receives the app's segments (both directions)
from an NFQUEUE rule and rewrites the payload of the ``after``-th data segment of one
direction (and ``count - 1`` more) in one of three ways, then keeps the connection
consistent as an ALG (or Linux's nf_conntrack seqadj) does:

- ``same_length``: ``bytes`` bytes in the middle of the payload are replaced by ``fill``
  (or inverted when ``fill`` is empty); no sequence number changes.
- ``insert``: ``bytes`` bytes are inserted there; ``delete``: ``bytes`` bytes are removed.
  From then on every segment of that direction has its sequence number shifted by the
  running delta, and every acknowledgement number and SACK block edge of the opposite
  direction is shifted back, so both TCP endpoints stay in sync. Retransmissions, however
  the sender re-cuts them, get the same change at the same stream position (a rewrite is
  stored as a position in the original byte stream, not as a packet).

The worker is MPTCP-unaware on purpose, as a deployed ALG is: the DSS option (data
sequence mapping, checksum) is left as it was. What MPTCP makes of that is the
measurement. A grown packet gets its DF bit cleared (the router may then fragment it to
the next link's MTU, as an ALG that grows a full-sized segment would have to).

Every rewrite (first copy and retransmissions) is appended to ``log`` as a JSON line as it
happens; a ``summary`` line (packets whose seq / ack / SACK were shifted) is written at
exit (SIGTERM). Fail-open: the queue has NFQA_CFG_F_FAIL_OPEN and the rules use
``--queue-bypass``. Standard library only.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.model.wire import option_spans
from testbed.runtime.nfqueue import Queue, refresh_checksums

SEQ_MOD = 1 << 32
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
DEFAULT_INSERT = b"#ALG#"
WINDOW = 8  # unchanged bytes logged on each side of a change, to find it in a pcap


def rel(x: int, base: int) -> int:
    """``x`` relative to ``base`` in 32-bit sequence space, as a signed integer."""
    d = (x - base) % SEQ_MOD
    return d - SEQ_MOD if d >= 1 << 31 else d


@dataclass(frozen=True)
class Rewrite:
    """One change at a position of the original byte stream (relative to the flow base)."""

    at: int
    op: str            # same_length | insert | delete
    n: int
    new: bytes = b""   # the replacement (same_length) or inserted bytes (insert)

    @property
    def delta(self) -> int:
        return self.n if self.op == "insert" else -self.n if self.op == "delete" else 0


def forward(x: int, rewrites: list[Rewrite]) -> int:
    """Original stream position -> position in the rewritten stream."""
    out = x
    for r in rewrites:
        if r.op == "insert" and x > r.at:
            out += r.n
        elif r.op == "delete":
            out -= min(max(x, r.at), r.at + r.n) - r.at
    return out


def backward(y: int, rewrites: list[Rewrite]) -> int:
    """Rewritten stream position (an ack or SACK edge of the receiver) -> original.
    An edge inside inserted bytes maps to the insertion point; an edge at a deletion
    point counts the deleted bytes as delivered (the sender must not resend them)."""
    d = 0
    for r in sorted(rewrites, key=lambda r: r.at):
        na = r.at + d
        if r.op == "insert":
            if y <= na:
                return y - d
            if y <= na + r.n:
                return r.at
            d += r.n
        elif r.op == "delete":
            if y < na:
                return y - d
            if y == na:
                return r.at + r.n
            d -= r.n
    return y - d


def apply_payload(start: int, payload: bytes, rewrites: list[Rewrite]) -> bytes:
    """The payload of an original segment at ``start`` after the rewrites it overlaps."""
    end = start + len(payload)
    buf = bytearray(payload)
    for r in sorted(rewrites, key=lambda r: r.at, reverse=True):
        if r.op == "insert":
            if start <= r.at < end:
                i = r.at - start
                buf[i:i] = r.new
        else:
            lo, hi = max(r.at, start), min(r.at + r.n, end)
            if lo >= hi:
                continue
            if r.op == "delete":
                del buf[lo - start:hi - start]
            else:
                buf[lo - start:hi - start] = r.new[lo - r.at:hi - r.at]
    return bytes(buf)


def make_rewrite(at: int, payload: bytes, op: str, n: int, fill: bytes) -> Rewrite:
    """A rewrite of ``n`` bytes in the middle of a segment of ``payload`` at ``at``."""
    n = min(n, len(payload)) if op != "insert" else n
    off = max(0, len(payload) // 2 - n // 2)
    if op == "insert":
        data = (fill or DEFAULT_INSERT) * (n // len(fill or DEFAULT_INSERT) + 1)
        return Rewrite(at + off, op, n, data[:n])
    if op == "delete":
        return Rewrite(at + off, op, n)
    old = payload[off:off + n]
    new = ((fill * (n // len(fill) + 1))[:n] if fill else bytes(b ^ 0xFF for b in old))
    return Rewrite(at + off, op, n, new)


@dataclass
class Flow:
    """The state of one TCP connection (one MPTCP subflow) crossing the box."""

    base: int | None = None        # original seq of the first rewritten segment
    highest: int | None = None     # highest original end seen in the rewritten direction
    rewrites: list[Rewrite] = field(default_factory=list)


def sack_edges(tcp: bytes, doff: int) -> list[int]:
    """Byte offsets (in the TCP header) of every SACK block edge (option 5)."""
    return [20 + start + 2 + 4 * k for kind, start, end in option_spans(tcp[20:doff])
            if kind == 5 for k in range((end - start - 2) // 4)]


class Rewriter:
    def __init__(self, cfg: dict[str, Any], out: Any) -> None:
        self.cfg = cfg
        self.out = out
        self.server = cfg["server"]
        self.port = int(cfg.get("port") or 0)
        self.s2c = cfg["direction"] == "s2c"
        self.flows: dict[tuple[str, int], Flow] = {}
        self.data_segments = 0
        self.rewritten = 0
        self.stats = {"packets": 0, "seq_shifted": 0, "ack_shifted": 0, "sack_shifted": 0,
                      "df_cleared": 0}

    def handle(self, pkt: bytes) -> bytes | None:
        """The packet to forward instead of ``pkt``, or None to forward it unchanged."""
        if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        total = struct.unpack_from("!H", pkt, 2)[0]
        src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
        sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", pkt, ihl)
        doff = (off >> 4) * 4
        if src == self.server and (not self.port or sport == self.port):
            client, from_server = (dst, dport), True
        elif dst == self.server and (not self.port or dport == self.port):
            client, from_server = (src, sport), False
        else:
            return None
        self.stats["packets"] += 1
        flow = self.flows.setdefault(client, Flow())
        if from_server == self.s2c:
            return self._data_side(pkt, ihl, total, doff, seq, flags, flow, client)
        if flow.rewrites and flags & ACK:
            return self._ack_side(pkt, ihl, doff, ack, flow)
        return None

    def _data_side(self, pkt: bytes, ihl: int, total: int, doff: int, seq: int, flags: int,
                   flow: Flow, client: tuple[str, int]) -> bytes | None:
        payload = pkt[ihl + doff:total]
        again = False
        if payload and not flags & SYN:
            end = (seq + len(payload)) % SEQ_MOD
            new_data = flow.highest is None or rel(end, flow.highest) > 0
            if new_data:
                flow.highest = end
                self.data_segments += 1
                if (self.data_segments >= self.cfg["after"]
                        and self.rewritten < self.cfg["count"]):
                    if flow.base is None:
                        flow.base = seq
                    at = rel(seq, flow.base)
                    flow.rewrites.append(make_rewrite(
                        at, payload, self.cfg["mode"], self.cfg["bytes"],
                        bytes.fromhex(self.cfg["fill_hex"])))
                    self.rewritten += 1
            else:
                again = True
        if not flow.rewrites or flow.base is None:
            return None
        start = rel(seq, flow.base)
        new_payload = apply_payload(start, payload, flow.rewrites) if payload else payload
        new_seq = (flow.base + forward(start, flow.rewrites)) % SEQ_MOD
        if new_payload == payload and new_seq == seq:
            return None
        buf = bytearray(pkt[:ihl + doff]) + new_payload
        struct.pack_into("!H", buf, 2, len(buf))
        struct.pack_into("!I", buf, ihl + 4, new_seq)
        if len(buf) > total and buf[6] & 0x40:
            buf[6] &= ~0x40 & 0xFF
            self.stats["df_cleared"] += 1
        if new_seq != seq:
            self.stats["seq_shifted"] += 1
        refresh_checksums(buf)
        if new_payload != payload:
            self._log(flow, client, seq, new_seq, payload, new_payload, again, pkt, ihl, doff)
        return bytes(buf)

    def _ack_side(self, pkt: bytes, ihl: int, doff: int, ack: int, flow: Flow) -> bytes | None:
        assert flow.base is not None
        buf = bytearray(pkt)
        changed = False
        new_ack = (flow.base + backward(rel(ack, flow.base), flow.rewrites)) % SEQ_MOD
        if new_ack != ack:
            struct.pack_into("!I", buf, ihl + 8, new_ack)
            self.stats["ack_shifted"] += 1
            changed = True
        tcp = pkt[ihl:ihl + doff]
        for at in sack_edges(tcp, doff):
            edge = struct.unpack_from("!I", tcp, at)[0]
            new = (flow.base + backward(rel(edge, flow.base), flow.rewrites)) % SEQ_MOD
            if new != edge:
                struct.pack_into("!I", buf, ihl + at, new)
                self.stats["sack_shifted"] += 1
                changed = True
        if not changed:
            return None
        refresh_checksums(buf)
        return bytes(buf)

    def _log(self, flow: Flow, client: tuple[str, int], seq: int, new_seq: int,
             payload: bytes, new_payload: bytes, again: bool, pkt: bytes, ihl: int,
             doff: int) -> None:
        # The first differing byte and the changed window, for the pcap checks.
        i = next((k for k in range(min(len(payload), len(new_payload)))
                  if payload[k] != new_payload[k]), min(len(payload), len(new_payload)))
        tail = 0
        while (tail < min(len(payload), len(new_payload)) - i
               and payload[-1 - tail] == new_payload[-1 - tail]):
            tail += 1
        delta = sum(r.delta for r in flow.rewrites)
        event = {"time": time.time(), "data_segment": self.data_segments,
                 "retransmission": again, "client": client[0], "client_port": client[1],
                 "direction": self.cfg["direction"], "mode": self.cfg["mode"],
                 "seq": seq, "new_seq": new_seq, "len": len(payload),
                 "new_len": len(new_payload), "payload_offset": i,
                 "before": payload[i:len(payload) - tail].hex(),
                 "after": new_payload[i:len(new_payload) - tail].hex(),
                 "window_offset": max(0, i - WINDOW),
                 "window_before": payload[max(0, i - WINDOW):len(payload) - tail + WINDOW].hex(),
                 "window_after": new_payload[max(0, i - WINDOW):
                                             len(new_payload) - tail + WINDOW].hex(),
                 "segment_delta": len(new_payload) - len(payload), "delta": delta,
                 "mptcp_option": b"\x1e" in _option_kinds(pkt[ihl + 20:ihl + doff])}
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()


def _option_kinds(raw: bytes) -> bytes:
    return bytes(kind for kind, _start, _end in option_spans(raw))


def main() -> int:
    cfg = json.loads(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    queue = Queue(cfg["queue"])
    with Path(cfg["log"]).open("a") as out:
        rw = Rewriter(cfg, out)
        print("ready", flush=True)
        try:
            for pkt_id, pkt in queue.packets():
                try:
                    new = rw.handle(pkt)
                except Exception as exc:  # never hold a packet: log and pass it unchanged
                    out.write(json.dumps({"error": repr(exc)[:300]}) + "\n")
                    new = None
                queue.verdict(pkt_id, new)
        finally:
            out.write(json.dumps({"summary": rw.stats, "data_segments": rw.data_segments,
                                  "rewritten": rw.rewritten}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
