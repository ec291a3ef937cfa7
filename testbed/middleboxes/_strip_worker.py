"""Worker of the option-stripping middleboxes (``strip_mp_capable`` with ``mode: remove``,
``strip_mptcp_after``), run INSIDE the path's slot node:
``python -m testbed.middleboxes._strip_worker '<json config>'``.

It binds NFQUEUE ``queue`` (the kind's rule feeds it, with ``--queue-bypass``) and accepts
every packet; the packets it selects lose TCP option 30 (MPTCP):

- ``mode: remove``: the option's bytes are taken out, the remaining options are padded with
  EOL to a multiple of 4, the data offset and the IPv4 total length shrink, both checksums
  are recomputed. This is what a normalising firewall that rebuilds the header does.
- ``mode: nop``: the option's bytes become NOPs (what xt_TCPOPTSTRIP does), length unchanged.

Which packets: without ``after``, every queued packet carrying option 30 (the rule only
queues handshake segments). With ``after: {direction, packets, bytes}``, the worker counts
the segments and payload bytes of each direction (c2s: towards ``server``) and strips every
segment of a selected direction once ``packets`` segments or ``bytes`` payload bytes of that
direction have passed untouched (one of the two is non-zero).

Each rewrite is appended to ``log`` as one JSON line as it happens (the evidence survives a
stop); a ``start`` line marks when stripping began in a direction, and a ``summary`` line
(segments seen, with option 30, stripped, per direction) is written at SIGTERM.
Standard library only, so it starts quickly.
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

from testbed.model.wire import option_spans
from testbed.runtime.nfqueue import Queue, refresh_checksums

MPTCP_OPTION = 30
EOL, NOP = 0, 1
FLAG_NAMES = ((0x02, "S"), (0x10, "A"), (0x01, "F"), (0x04, "R"), (0x08, "P"))


def flag_text(flags: int) -> str:
    return "".join(name for bit, name in FLAG_NAMES if flags & bit)


def strip_option(pkt: bytes, mode: str, kind: int = MPTCP_OPTION
                 ) -> tuple[bytes, int, int] | None:
    """``pkt`` (IPv4/TCP) without TCP option ``kind``: (new packet, TCP header length
    before, after); None when the packet is not TCP or carries no such option."""
    if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    doff = (pkt[ihl + 12] >> 4) * 4
    if doff < 20 or ihl + doff > min(total, len(pkt)):
        return None
    opts = pkt[ihl + 20:ihl + doff]
    spans = option_spans(opts)
    if not any(k == kind for k, _s, _e in spans):
        return None
    buf = bytearray(pkt[:total])
    if mode == "nop":
        for k, start, end in spans:
            if k == kind:
                buf[ihl + 20 + start:ihl + 20 + end] = bytes([NOP]) * (end - start)
        return bytes(refresh_checksums(buf)), doff, doff
    kept = b"".join(opts[s:e] for k, s, e in spans if k != kind)
    kept += bytes([EOL]) * (-len(kept) % 4)
    new_doff = 20 + len(kept)
    out = bytearray(buf[:ihl + 20]) + kept + buf[ihl + doff:]
    struct.pack_into("!H", out, 2, len(out))
    out[ihl + 12] = (new_doff // 4) << 4 | (out[ihl + 12] & 0x0F)
    return bytes(refresh_checksums(out)), doff, new_doff


class Selector:
    """Decides which segments lose the option, and keeps the per-direction counts."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.server = cfg.get("server", "")
        after = cfg.get("after")
        self.after = after
        self.dirs = ({"c2s", "s2c"} if after and after["direction"] == "both"
                     else {after["direction"]} if after else {"c2s", "s2c"})
        self.stats = {d: {"segments": 0, "payload_bytes": 0, "with_option": 0, "stripped": 0,
                          "started": None} for d in ("c2s", "s2c")}

    def direction(self, pkt: bytes) -> str:
        return "c2s" if socket.inet_ntoa(pkt[16:20]) == self.server else "s2c"

    def select(self, direction: str, payload: int) -> tuple[bool, bool]:
        """(strip this segment, stripping starts with it); counts the segment."""
        st = self.stats[direction]
        armed = True
        if self.after is not None:
            armed = direction in self.dirs and (
                (self.after["packets"] > 0 and st["segments"] >= self.after["packets"])
                or (self.after["bytes"] > 0 and st["payload_bytes"] >= self.after["bytes"]))
        st["segments"] += 1
        st["payload_bytes"] += payload
        starts = armed and st["started"] is None
        if starts:
            st["started"] = time.time()
        return armed, starts


def main() -> int:
    cfg = json.loads(sys.argv[1])
    log = Path(cfg["log"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sel = Selector(cfg)
    queue = Queue(cfg["queue"])
    print("ready", flush=True)
    with log.open("a") as out:
        try:
            for pkt_id, pkt in queue.packets():
                if len(pkt) < 40 or pkt[9] != 6:
                    queue.verdict(pkt_id)
                    continue
                ihl = (pkt[0] & 0x0F) * 4
                doff = (pkt[ihl + 12] >> 4) * 4
                payload = struct.unpack_from("!H", pkt, 2)[0] - ihl - doff
                direction = sel.direction(pkt)
                strip, starts = sel.select(direction, payload)
                new = strip_option(pkt, cfg["mode"]) if strip else None
                has_option = new is not None or any(
                    k == MPTCP_OPTION for k, _s, _e in option_spans(pkt[ihl + 20:ihl + doff]))
                st = sel.stats[direction]
                st["with_option"] += has_option
                if starts:
                    out.write(json.dumps({"event": "start", "time": st["started"],
                                          "direction": direction,
                                          "after_segments": st["segments"] - 1,
                                          "after_payload_bytes": st["payload_bytes"] - payload})
                              + "\n")
                if new is None:
                    queue.verdict(pkt_id)
                    continue
                queue.verdict(pkt_id, new[0])
                st["stripped"] += 1
                sport, dport, seq, ack = struct.unpack_from("!HHII", pkt, ihl)
                out.write(json.dumps({
                    "event": "strip", "time": time.time(), "direction": direction,
                    "flags": flag_text(pkt[ihl + 13]), "src": socket.inet_ntoa(pkt[12:16]),
                    "dst": socket.inet_ntoa(pkt[16:20]), "sport": sport, "dport": dport,
                    "seq": seq, "ack": ack, "payload": payload, "mode": cfg["mode"],
                    "hdr_len_before": new[1], "hdr_len_after": new[2]}) + "\n")
                out.flush()
        finally:
            out.write(json.dumps({"event": "summary", "time": time.time(),
                                  **{d: {k: v for k, v in s.items() if k != "started"}
                                     for d, s in sel.stats.items()}}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
