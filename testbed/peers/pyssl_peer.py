"""TLS 1.3 peer run inside a node: ``python -m testbed.peers.pyssl_peer server|client ...``.

Standard library only (it runs in the node with the orchestrator's interpreter). The socket
is opened with ``IPPROTO_MPTCP`` for ``--transport mptcp`` and as plain TCP otherwise.

``server`` listens, and for every connection completes a TLS 1.3 handshake, sends the
payload file and closes (close_notify, then FIN). It logs one JSON line per event to
stderr (``listening``, ``conn``, ``stopping``).

``client`` connects, reads to EOF, hashes what it read, reads the kernel's MPTCP view of
the connection (``MPTCP_INFO``, ``MPTCP_SUBFLOW_ADDRS``) before closing, and prints ONE
JSON line on stdout with the fields of ``AppOutcome`` it knows. It never runs longer than
``--timeout`` seconds: every blocking call gets the time that is left.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.peers.split_hello import BioTls

# split_hello.SNI_MIDDLE, not imported from there: the module (dataclasses, inspect) costs
# every peer process ~15 ms of start-up, and only the S1 client uses it (imported there).
SNI_MIDDLE = "sni_middle"

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
MPTCP_SUBFLOW_ADDRS = 3
MPTCP_INFO_FLAG_FALLBACK = 1 << 0
MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED = 1 << 1

# struct mptcp_info (include/uapi/linux/mptcp.h, Linux 6.18), natural alignment:
# (field, offset, struct format). Fields appeared over time (5.9 ... 6.18); the kernel copies
# min(optlen, sizeof) bytes, so only fields that end within the returned length are parsed.
# Note: endp_laminar_max (6.18) and endp_fullmesh_max (6.18) sit where older kernels (6.10+)
# have "reserved" bytes, which read as 0 there.
MPTCP_INFO_LAYOUT: tuple[tuple[str, int, str], ...] = (
    ("subflows", 0, "B"),
    ("add_addr_signal", 1, "B"),
    ("add_addr_accepted", 2, "B"),
    ("subflows_max", 3, "B"),
    ("add_addr_signal_max", 4, "B"),
    ("add_addr_accepted_max", 5, "B"),
    # 2-byte hole
    ("flags", 8, "I"),
    ("token", 12, "I"),
    ("write_seq", 16, "Q"),
    ("snd_una", 24, "Q"),
    ("rcv_nxt", 32, "Q"),
    ("local_addr_used", 40, "B"),
    ("local_addr_max", 41, "B"),
    ("csum_enabled", 42, "B"),
    # 1-byte hole
    ("retransmits", 44, "I"),
    ("bytes_retrans", 48, "Q"),
    ("bytes_sent", 56, "Q"),
    ("bytes_received", 64, "Q"),
    ("bytes_acked", 72, "Q"),
    ("subflows_total", 80, "B"),
    ("endp_laminar_max", 81, "B"),
    ("endp_fullmesh_max", 82, "B"),
    # 1 reserved byte
    ("last_data_sent", 84, "I"),
    ("last_data_recv", 88, "I"),
    ("last_ack_recv", 92, "I"),
)
MPTCP_INFO_SIZE = 96

# struct mptcp_subflow_data { __u32 size_subflow_data, num_subflows, size_kernel, size_user; }
# aligned(8) -> 16 bytes; then num_subflows struct mptcp_subflow_addrs, each two unions the
# size of struct __kernel_sockaddr_storage (128 bytes): local then remote.
SUBFLOW_DATA_FMT = "=IIII"
SUBFLOW_DATA_SIZE = 16
SOCKADDR_STORAGE_SIZE = 128
SUBFLOW_ADDRS_SIZE = 2 * SOCKADDR_STORAGE_SIZE

CHUNK = 256 * 1024


def parse_mptcp_info(raw: bytes) -> dict[str, Any]:
    """Decode the fields of ``struct mptcp_info`` that lie entirely within ``raw``."""
    info: dict[str, Any] = {}
    for name, offset, fmt in MPTCP_INFO_LAYOUT:
        size = struct.calcsize("=" + fmt)
        if offset + size <= len(raw):
            info[name] = struct.unpack_from("=" + fmt, raw, offset)[0]
    if "flags" in info:
        info["fallback"] = bool(info["flags"] & MPTCP_INFO_FLAG_FALLBACK)
        info["remote_key_received"] = bool(info["flags"] & MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED)
    info["info_len"] = len(raw)
    return info


def parse_sockaddr(raw: bytes) -> dict[str, Any] | None:
    """Decode a ``sockaddr_in``/``sockaddr_in6`` (family in host order, port in network order)."""
    if len(raw) < 2:
        return None
    (family,) = struct.unpack_from("=H", raw, 0)
    if family == socket.AF_INET and len(raw) >= 8:
        port = struct.unpack_from("!H", raw, 2)[0]
        return {"addr": socket.inet_ntop(socket.AF_INET, raw[4:8]), "port": port}
    if family == socket.AF_INET6 and len(raw) >= 24:
        port = struct.unpack_from("!H", raw, 2)[0]
        return {"addr": socket.inet_ntop(socket.AF_INET6, raw[8:24]), "port": port}
    return {"family": family}


def parse_subflow_addrs(raw: bytes) -> dict[str, Any]:
    """Decode an ``MPTCP_SUBFLOW_ADDRS`` answer: header plus (local, remote) pairs."""
    if len(raw) < SUBFLOW_DATA_SIZE:
        raise ValueError("MPTCP_SUBFLOW_ADDRS answer shorter than its header")
    size_hdr, num, size_kernel, size_user = struct.unpack_from(SUBFLOW_DATA_FMT, raw, 0)
    stride = size_user or SUBFLOW_ADDRS_SIZE
    elem = min(size_kernel, size_user) if size_kernel else size_user
    pairs = []
    offset = size_hdr
    while offset + elem <= len(raw) and len(pairs) < num and elem >= SUBFLOW_ADDRS_SIZE:
        local = parse_sockaddr(raw[offset:offset + SOCKADDR_STORAGE_SIZE])
        remote = parse_sockaddr(raw[offset + SOCKADDR_STORAGE_SIZE:offset + SUBFLOW_ADDRS_SIZE])
        pairs.append({"local": local, "remote": remote})
        offset += stride
    return {"num_subflows": num, "pairs": pairs}


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def read_subflow_addrs(fd: int, max_subflows: int = 16) -> dict[str, Any]:
    """``getsockopt(SOL_MPTCP, MPTCP_SUBFLOW_ADDRS)``. The request header must be filled in
    (``size_subflow_data``, ``size_user``), which ``socket.getsockopt`` cannot do: libc's
    ``getsockopt`` is called through ctypes."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = SUBFLOW_DATA_SIZE + max_subflows * SUBFLOW_ADDRS_SIZE
    buf = ctypes.create_string_buffer(size)
    struct.pack_into(SUBFLOW_DATA_FMT, buf, 0, SUBFLOW_DATA_SIZE, 0, 0, SUBFLOW_ADDRS_SIZE)
    optlen = ctypes.c_uint32(size)
    rc = libc.getsockopt(fd, SOL_MPTCP, MPTCP_SUBFLOW_ADDRS, buf, ctypes.byref(optlen))
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, _errname(code))
    return parse_subflow_addrs(buf.raw[:optlen.value])


def mptcp_view(sock: socket.socket) -> dict[str, Any]:
    """The kernel's MPTCP view of a connected socket, or the fallback marker.

    On a connection that fell back to TCP, SOL_MPTCP options are passed to the remaining TCP
    subflow, which does not know them: ``EOPNOTSUPP`` (errno 95, also spelled ENOTSUP).
    """
    try:
        raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_SIZE)
    except OSError as exc:
        code = exc.errno or 0
        if code == errno.EOPNOTSUPP:
            return {"fallback": True, "error": _errname(code)}
        return {"fallback": None, "error": _errname(code)}
    view = parse_mptcp_info(raw)
    try:
        view["subflow_addrs"] = read_subflow_addrs(sock.fileno())
    except (OSError, ValueError) as exc:
        view["subflow_addrs_error"] = str(exc)
    return view


TCP_STATES = ("", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
              "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING")


def tcp_state(sock: socket.socket) -> str | None:
    """``tcpi_state`` from TCP_INFO (for MPTCP: the first subflow's), or None."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return None
    return TCP_STATES[raw[0]] if raw and raw[0] < len(TCP_STATES) else None


def _addr(pair: Any) -> dict[str, Any] | None:
    if isinstance(pair, tuple) and len(pair) >= 2:
        return {"addr": pair[0], "port": pair[1]}
    return None


def _open_socket(transport: str) -> socket.socket:
    proto = IPPROTO_MPTCP if transport == "mptcp" else socket.IPPROTO_TCP
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)


def _log(event: str, **fields: Any) -> None:
    print(json.dumps({"t": round(time.time(), 6), "event": event, **fields}),
          file=sys.stderr, flush=True)


# -- server ----------------------------------------------------------------------------------
def _serve_one(conn: socket.socket, peer: Any, ctx: ssl.SSLContext, payload: Path,
               transport: str, io_timeout: float) -> None:
    record: dict[str, Any] = {"peer": _addr(peer), "local": _addr(conn.getsockname())}
    sent = 0
    t0 = time.monotonic()
    try:
        conn.settimeout(io_timeout)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            record["tls_version"] = tls.version()
            cipher = tls.cipher()
            record["cipher"] = cipher[0] if cipher else None
            record["handshake_s"] = round(time.monotonic() - t0, 6)
            with payload.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    tls.sendall(chunk)
                    sent += len(chunk)
            if transport == "mptcp":
                record["mptcp"] = mptcp_view(tls)
            record["bytes_sent"] = sent
            try:
                tls.unwrap()  # close_notify; waits (bounded) for the client's
                record["close_notify"] = "exchanged"
            except (OSError, ValueError) as exc:
                record["close_notify"] = f"sent; then {type(exc).__name__}: {exc}"
    except (OSError, ValueError) as exc:
        record["bytes_sent"] = sent
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            conn.close()
    record["duration_s"] = round(time.monotonic() - t0, 6)
    _log("conn", **record)


RECEIVED_HEAD = 256  # bytes of what a plaintext server received, logged in hex


def _serve_plain(conn: socket.socket, peer: Any, payload: Path, transport: str,
                 io_timeout: float) -> None:
    """``--no-tls`` (a control showing what TLS protects against): send the payload on the
    bare socket, shut down the sending side, then read what the peer sent until its EOF.
    The client sends nothing, so every byte received here was put into the connection by
    someone else: each arrival is logged at once (``received``: bytes and SHA-256 so far,
    the first bytes in hex), checked between the chunks sent too, so the evidence is in
    the log even if the connection never ends (an injection desynchronises the data
    sequence numbers: the client's DATA_FIN then never lands)."""
    record: dict[str, Any] = {"peer": _addr(peer), "local": _addr(conn.getsockname()),
                              "plaintext": True, "tls_version": None}
    sent = 0
    got = bytearray()
    digest = hashlib.sha256()
    state = {"received": 0, "eof": False}
    t0 = time.monotonic()

    def take(data: bytes) -> None:
        if not data:
            state["eof"] = True
            return
        digest.update(data)
        state["received"] += len(data)
        if len(got) < RECEIVED_HEAD:
            got.extend(data[:RECEIVED_HEAD - len(got)])
        _log("received", peer=record["peer"], plaintext=True,
             received_bytes=state["received"], received_sha256=digest.hexdigest(),
             received_head_hex=bytes(got).hex())

    try:
        conn.settimeout(io_timeout)
        with payload.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                conn.sendall(chunk)
                sent += len(chunk)
                while not state["eof"] and select.select([conn], [], [], 0)[0]:
                    take(conn.recv(CHUNK))
        if transport == "mptcp":
            record["mptcp"] = mptcp_view(conn)
        record["bytes_sent"] = sent
        conn.shutdown(socket.SHUT_WR)
        while not state["eof"]:
            take(conn.recv(CHUNK))
        record["eof"] = "clean"
    except (OSError, ValueError) as exc:
        record["bytes_sent"] = sent
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            conn.close()
    record.update(received_bytes=state["received"], received_sha256=digest.hexdigest(),
                  received_head_hex=bytes(got).hex())
    record["duration_s"] = round(time.monotonic() - t0, 6)
    _log("conn", **record)


def run_server(args: argparse.Namespace) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    if args.keylog:
        ctx.keylog_filename = args.keylog
    sni_seen: dict[str, Any] = {}

    def on_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni_seen["last"] = name

    ctx.sni_callback = on_sni  # type: ignore[assignment]
    payload = Path(args.payload)
    try:
        lsock = _open_socket(args.transport)
    except OSError as exc:
        _log("error", error=f"cannot open a {args.transport} socket: {exc}")
        return 2
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        lsock.bind((args.bind, args.port))
        lsock.listen(64)
    except OSError as exc:
        _log("error", error=f"cannot listen on {args.bind}:{args.port}: {exc}")
        return 2

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    _log("listening", bind=args.bind, port=args.port, transport=args.transport,
         payload_bytes=payload.stat().st_size, tls=not args.no_tls)
    try:
        while True:
            conn, peer = lsock.accept()
            if args.no_tls:
                threading.Thread(target=_serve_plain, daemon=True,
                                 args=(conn, peer, payload, args.transport,
                                       args.io_timeout)).start()
                continue
            threading.Thread(target=_serve_one, daemon=True,
                             args=(conn, peer, ctx, payload, args.transport,
                                   args.io_timeout)).start()
    except SystemExit:
        _log("stopping")
    finally:
        lsock.close()
    return 0


# -- client ----------------------------------------------------------------------------------
class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def arm(self, sock: socket.socket) -> None:
        left = self.left()
        if left <= 0:
            raise TimeoutError("time bound reached")
        sock.settimeout(left)


def run_client(args: argparse.Namespace) -> dict[str, Any]:
    clock = _Deadline(args.timeout)
    result: dict[str, Any] = {
        "status": "error", "tls_version": None, "cipher": None, "sni": args.sni,
        "bytes_received": 0, "sha256_received": None, "duration_s": 0.0, "handshake_s": None,
        "error": None, "mptcp": None, "extra": {},
    }
    extra: dict[str, Any] = result["extra"]
    try:
        sock = _open_socket(args.transport)
    except OSError as exc:
        result["error"] = f"cannot open a {args.transport} socket: {exc}"
        return result
    phase = "connect"
    tls: ssl.SSLSocket | BioTls | None = None
    digest = hashlib.sha256()
    received = 0
    try:
        try:
            clock.arm(sock)
            sock.connect((args.connect, args.port))
        except TimeoutError:
            result.update(status="timeout", error=f"timed out during connect after "
                                                  f"{clock.elapsed():.3f}s")
            return result
        except OSError as exc:
            result.update(status="connect_failed", error=f"{type(exc).__name__}: {exc}")
            return result
        extra["connect_s"] = round(clock.elapsed(), 6)
        extra["local"] = _addr(sock.getsockname())
        extra["peer"] = _addr(sock.getpeername())

        if args.no_tls:  # a plaintext control: the same payload, no TLS
            extra["plaintext"] = True
            phase = "transfer"
            with contextlib.ExitStack() as stack:
                out = stack.enter_context(Path(args.out).open("wb")) if args.out else None
                while True:
                    clock.arm(sock)
                    data = sock.recv(CHUNK)
                    if not data:
                        break
                    digest.update(data)
                    received += len(data)
                    if out is not None:
                        out.write(data)
            result["status"] = "ok"
            return result

        phase = "handshake"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cafile=args.ca)
        if args.keylog:
            ctx.keylog_filename = args.keylog
        if args.split_client_hello:  # claim S1: see testbed/peers/split_hello.py
            from testbed.peers.split_hello import SplitError, parse_split_at, split_handshake

            split: dict[str, Any] = {}
            extra["split"] = split
            try:
                tls = split_handshake(sock, ctx, args.sni, parse_split_at(args.split_at),
                                      clock.left, split, steer=args.split_steer == "mp_prio")
            except SplitError as exc:
                result.update(status="error", error=f"split ClientHello: {exc}")
                return result
        else:
            tls = ctx.wrap_socket(sock, server_hostname=args.sni,
                                  do_handshake_on_connect=False, suppress_ragged_eofs=False)
            clock.arm(tls)
            tls.do_handshake()
        result["handshake_s"] = round(clock.elapsed(), 6)
        result["tls_version"] = tls.version()
        cipher = tls.cipher()
        result["cipher"] = cipher[0] if cipher else None

        phase = "transfer"
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(Path(args.out).open("wb")) if args.out else None
            while True:
                clock.arm(tls)
                try:
                    data = tls.recv(CHUNK)
                except ssl.SSLZeroReturnError:
                    data = b""
                except ssl.SSLEOFError as exc:
                    # Closed (FIN, or a reset OpenSSL reports as EOF) without close_notify:
                    # a truncation that the bytes will judge.
                    extra["close_notify"] = False
                    extra["eof"] = str(exc)
                    # Python's ssl reports a RST as this EOF too; the TCP state tells them
                    # apart (CLOSE after a reset, CLOSE_WAIT after a FIN).
                    extra["tcp_state_at_eof"] = tcp_state(tls)
                    break
                if not data:
                    extra["close_notify"] = True
                    break
                digest.update(data)
                received += len(data)
                if out is not None:
                    out.write(data)
        result["status"] = "ok"
    except TimeoutError:
        result.update(status="timeout",
                      error=f"timed out during {phase} after {clock.elapsed():.3f}s")
    except ssl.SSLCertVerificationError as exc:
        result.update(status="tls_error", error=f"certificate verification failed: "
                                                f"{exc.verify_message or exc}")
    except ssl.SSLError as exc:
        result.update(status="tls_error", error=f"{phase}: {type(exc).__name__}: {exc}")
    except OSError as exc:
        # Reset/closed during the handshake is a failed TLS setup (as curl's exit 35);
        # after it, the connection was cut mid-transfer.
        status = "tls_error" if phase == "handshake" else "aborted"
        result.update(status=status, error=f"{phase}: {type(exc).__name__}: {exc}")
    finally:
        result["bytes_received"] = received
        result["sha256_received"] = digest.hexdigest() if phase == "transfer" else None
        target = tls if tls is not None else sock
        if args.transport == "mptcp" and phase != "connect":
            with contextlib.suppress(OSError, ValueError):
                result["mptcp"] = mptcp_view(target)
        if tls is not None and extra.get("close_notify"):
            with contextlib.suppress(OSError, ValueError):
                tls.settimeout(max(0.05, min(1.0, clock.left())))
                tls.unwrap()
        with contextlib.suppress(OSError):
            target.close()
        result["duration_s"] = round(clock.elapsed(), 6)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyssl_peer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--bind", default="0.0.0.0")
    srv.add_argument("--port", type=int, default=443)
    srv.add_argument("--transport", choices=("tcp", "mptcp"), required=True)
    srv.add_argument("--cert", required=True)
    srv.add_argument("--key", required=True)
    srv.add_argument("--payload", required=True)
    srv.add_argument("--keylog")
    srv.add_argument("--io-timeout", type=float, default=60.0)
    srv.add_argument("--no-tls", action="store_true",
                     help="plaintext control: the payload over the bare socket")
    cli = sub.add_parser("client")
    cli.add_argument("--connect", required=True)
    cli.add_argument("--port", type=int, default=443)
    cli.add_argument("--transport", choices=("tcp", "mptcp"), required=True)
    cli.add_argument("--sni", required=True)
    cli.add_argument("--ca", required=True)
    cli.add_argument("--out")
    cli.add_argument("--keylog")
    cli.add_argument("--timeout", type=float, required=True)
    cli.add_argument("--no-tls", action="store_true",
                     help="plaintext control: read the payload from the bare socket")
    cli.add_argument("--split-client-hello", action="store_true",
                     help="claim S1: send the ClientHello's rest on the second subflow")
    cli.add_argument("--split-at", default=SNI_MIDDLE,
                     help=f"byte offset in the ClientHello, or {SNI_MIDDLE!r}")
    cli.add_argument("--split-steer", choices=("mp_prio", "none"), default="mp_prio",
                     help="none: split the writes only (a control)")
    args = parser.parse_args(argv)
    if args.role == "server":
        return run_server(args)
    result = run_client(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
