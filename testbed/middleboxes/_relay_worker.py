"""The relay of the proxy middleboxes, run in the slot node:
``python -m testbed.middleboxes._relay_worker '<json config>'``.

It listens on ``listen_port`` (every address: iptables REDIRECT sends a flow to the primary
address of the interface it came in on), with a plain TCP socket (``tcp_proxy``) or an
``IPPROTO_MPTCP`` one (``mptcp_proxy``: it accepts MPTCP subflows, joins included, and
plain TCP). For each accepted connection it finds the original destination with
``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (conntrack; refused on an MPTCP socket, which
passes only a few SOL_IP options to its subflows) or else uses the configured ``origin``,
connects there with plain TCP and copies bytes both ways, one thread per direction. An EOF
is passed on as a half-close (``shutdown(SHUT_WR)``); a reset, an error or ``idle_timeout_s``
without data ends both directions. At most ``max_connections`` at once.

Every relayed connection is appended to ``log`` as one JSON line when it ends (client
address, original destination and how it was found, upstream local address, bytes each
way, close reason, and for MPTCP the proxy's MPTCP_INFO view of the client side), so the
evidence survives a stop. Prints ``ready`` once listening; SIGTERM ends it cleanly (open
connections are logged with reason ``stopped``). Standard library only (plus the repo's
stdlib-only MPTCP_INFO decoder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from testbed.peers.pyssl_peer import mptcp_view

IPPROTO_MPTCP = 262
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
SAMPLE_EVERY_S = 0.2


def hostport(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}"


class Relay:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.log_path = str(cfg["log"])
        self.mptcp = bool(cfg.get("mptcp", False))
        host, _, port = str(cfg["origin"]).rpartition(":")
        self.origin = (host, int(port))
        self.idle_s = float(cfg.get("idle_timeout_s", 30.0))
        self.slots = threading.BoundedSemaphore(int(cfg.get("max_connections", 16)))
        self.lock = threading.Lock()
        self.open: dict[int, Conn] = {}
        self.stopping = threading.Event()
        self.next_id = 0
        proto = IPPROTO_MPTCP if self.mptcp else socket.IPPROTO_TCP
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("0.0.0.0", int(cfg["listen_port"])))
        self.listener.listen(64)

    def log(self, record: dict[str, Any]) -> None:
        with self.lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                client, addr = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            if not self.slots.acquire(blocking=False):
                self.log({"event": "refused", "client": f"{addr[0]}:{addr[1]}",
                          "reason": "max_connections reached"})
                client.close()
                continue
            try:
                with self.lock:
                    self.next_id += 1
                    conn = Conn(self, self.next_id, client, addr)
                    self.open[conn.id] = conn
            except OSError as exc:  # the client went away before we looked at it
                self.log({"event": "lost", "client": hostport(addr), "error": str(exc)})
                client.close()
                self.slots.release()
                continue
            threading.Thread(target=conn.run, name=f"conn-{conn.id}", daemon=True).start()

    def done(self, conn: Conn) -> None:
        with self.lock:
            self.open.pop(conn.id, None)
        self.slots.release()

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()
        with self.lock:
            conns = list(self.open.values())
        for conn in conns:
            conn.abort("stopped")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with self.lock:
                if not self.open:
                    break
            time.sleep(0.05)


class Conn:
    """One relayed connection: the client's socket, the upstream socket, two copiers."""

    def __init__(self, relay: Relay, ident: int, client: socket.socket,
                 addr: tuple[str, int]) -> None:
        self.relay = relay
        self.id = ident
        self.client = client
        self.upstream: socket.socket | None = None
        self.t0 = time.monotonic()
        self.rec: dict[str, Any] = {
            "event": "relayed", "id": ident, "client": f"{addr[0]}:{addr[1]}",
            "proxy_local": hostport(client.getsockname()),
            "client_side_mptcp": relay.mptcp, "bytes_client_to_server": 0,
            "bytes_server_to_client": 0}
        self.ends: dict[str, str] = {}
        self.reason: str | None = None
        self.max_subflows: int | None = None
        self.fallback: bool | None = None
        self.last_view: dict[str, Any] | None = None
        # Every subflow (local/remote address pair) seen in any sample: the last sample
        # may come after the client closed one of them.
        self.pairs_seen: dict[str, Any] = {}
        self.last_sample = 0.0
        self.sample_lock = threading.Lock()

    def original_dst(self) -> tuple[tuple[str, int], str]:
        try:
            raw = self.client.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", raw, 2)[0]
            return (socket.inet_ntoa(raw[4:8]), port), "SO_ORIGINAL_DST"
        except OSError as exc:
            self.rec["original_dst_error"] = errno.errorcode.get(exc.errno or 0, str(exc))
            return self.relay.origin, "configured"

    def sample(self, force: bool = False) -> None:
        """The proxy's MPTCP view of the client side (subflows), at most every 0.2 s."""
        if not self.relay.mptcp:
            return
        now = time.monotonic()
        with self.sample_lock:
            if not force and now - self.last_sample < SAMPLE_EVERY_S:
                return
            self.last_sample = now
            with contextlib.suppress(OSError, ValueError):
                view = mptcp_view(self.client)
                self.last_view = view
                addrs = view.get("subflow_addrs")
                if isinstance(addrs, dict):
                    for pair in addrs.get("pairs") or []:
                        self.pairs_seen.setdefault(json.dumps(pair, sort_keys=True), pair)
                if view.get("fallback") is True:  # plain TCP accepted by the listener
                    self.fallback = True
                    self.max_subflows = max(self.max_subflows or 0, 1)
                elif isinstance(view.get("subflows"), int):
                    # mptcpi_subflows counts the subflows besides the initial one.
                    self.fallback = False
                    total = view["subflows"] + 1
                    self.max_subflows = max(self.max_subflows or 0, total)

    def run(self) -> None:
        try:
            dst, method = self.original_dst()
            self.rec["original_dst"] = f"{dst[0]}:{dst[1]}"
            self.rec["original_dst_method"] = method
            self.sample(force=True)
            try:
                up = socket.create_connection(dst, timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:
                self.reason = f"upstream connect failed: {exc}"
                return
            self.upstream = up
            self.rec["upstream_local"] = hostport(up.getsockname())
            self.rec["upstream_peer"] = hostport(up.getpeername())
            for s in (self.client, up):
                s.settimeout(self.relay.idle_s)
            back = threading.Thread(target=self.copy, args=(up, self.client, "server_to_client"),
                                    daemon=True)
            back.start()
            self.copy(self.client, up, "client_to_server")
            back.join()
        finally:
            self.finish()

    def copy(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        key = f"bytes_{direction}"
        end = "eof"
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                dst.sendall(data)
                self.rec[key] += len(data)
                self.sample()
            self.sample(force=True)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except TimeoutError:
            end = "idle timeout"
        except ConnectionResetError:
            end = "reset"
        except OSError as exc:
            end = f"error {errno.errorcode.get(exc.errno or 0, str(exc))}"
        self.ends[direction] = end
        if end != "eof":
            self.abort(f"{direction}: {end}")

    def abort(self, reason: str) -> None:
        """End both directions now (a reset, an error, an idle timeout or a stop)."""
        if self.reason is None:
            self.reason = reason
        for s in (self.client, self.upstream):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.rec["ends"] = self.ends
        self.rec["close_reason"] = self.reason or "eof both ways"
        self.rec["duration_s"] = round(time.monotonic() - self.t0, 3)
        if self.relay.mptcp:
            self.rec["client_subflows_max"] = self.max_subflows
            self.rec["client_side_fallback"] = self.fallback
            if self.last_view is not None:
                self.rec["client_mptcp_info"] = {
                    k: v for k, v in self.last_view.items() if k != "subflow_addrs"}
            if self.pairs_seen:
                self.rec["client_subflow_addrs"] = list(self.pairs_seen.values())
        for s in (self.client, self.upstream):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self.relay.log(self.rec)
        self.relay.done(self)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    try:
        relay = Relay(cfg)
    except OSError as exc:  # e.g. the port is taken: one line for the evidence
        print(f"relay: cannot listen on port {cfg['listen_port']}: {exc}", file=sys.stderr)
        return 2

    def on_term(_signo: int, _frame: object) -> None:
        threading.Thread(target=relay.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    relay.log({"event": "listening", "port": int(cfg["listen_port"]), "mptcp": relay.mptcp,
               "origin": cfg["origin"]})
    print("ready", flush=True)
    try:
        relay.serve()
    finally:
        relay.stop()
        relay.log({"event": "stopped", "open": len(relay.open)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
