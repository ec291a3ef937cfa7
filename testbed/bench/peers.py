"""Benchmark peers run inside testbed nodes: ``python -m testbed.bench.peers <role> ...``.

Standard library only (they start with the orchestrator's interpreter inside a node). Every
role prints ONE JSON line on stdout with what it measured and its own resource usage.

- ``bulk-server``: accept one connection, send zeros as fast as the socket takes them until
  the peer closes or ``--duration`` passes.
- ``bulk-client``: connect (TCP or MPTCP), read for ``--duration`` seconds; goodput counted
  after ``--warmup`` seconds (slow start excluded), at the receiving application.
- ``tls-server``: asyncio TLS 1.3 server on an MPTCP (or TCP) listening socket: reads one
  line per connection, answers it, waits for EOF.
- ``tls-client``: opens ``--conns`` TLS connections at once (asyncio), measures each
  handshake (connect + TLS), holds all of them open until every one is done, then sends a
  line and checks the answer. Reports the success count and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import resource
import socket
import ssl
import sys
import time
from typing import Any

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
BULK_CHUNK = 256 * 1024


def _usage() -> dict[str, Any]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_user_s": round(ru.ru_utime, 3), "cpu_sys_s": round(ru.ru_stime, 3),
            "max_rss_kib": ru.ru_maxrss}


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _sock(transport: str) -> socket.socket:
    proto = IPPROTO_MPTCP if transport == "mptcp" else socket.IPPROTO_TCP
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)


def _subflows(sock: socket.socket) -> int | None:
    with contextlib.suppress(OSError):
        return sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 96)[0]
    return None


def _emit(data: dict[str, Any]) -> None:
    print(json.dumps({**data, "usage": _usage()}), flush=True)


# -- bulk ------------------------------------------------------------------------------------
def bulk_server(args: argparse.Namespace) -> int:
    srv = _sock(args.transport)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(8)
    srv.settimeout(args.duration + 10)
    conn, _ = srv.accept()
    buf = bytes(BULK_CHUNK)
    sent = 0
    deadline = time.monotonic() + args.duration + 5
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            sent += conn.send(buf)
    conn.close()
    _emit({"sent": sent})
    return 0


def _drain(sock: socket.socket, buf: bytearray) -> tuple[int, bool]:
    """Read whatever is queued without waiting; (bytes, peer closed)."""
    n = 0
    sock.settimeout(0)
    try:
        while True:
            k = sock.recv_into(buf)
            if not k:
                return n, True
            n += k
    except (BlockingIOError, InterruptedError):
        return n, False
    finally:
        sock.settimeout(10)


def bulk_client(args: argparse.Namespace) -> int:
    """Goodput over a window that starts and ends with an emptied receive queue, so bytes
    that waited in the socket while this process was not scheduled (a loaded machine) are
    never counted as if they had arrived inside the window."""
    sock = _sock(args.transport)
    sock.settimeout(10)
    sock.connect((args.connect, args.port))
    buf = bytearray(BULK_CHUNK)
    total = 0
    closed = False
    warm_end = time.monotonic() + args.warmup
    while not closed and time.monotonic() < warm_end:
        n = sock.recv_into(buf)
        total += n
        closed = not n
    n, closed = _drain(sock, buf)
    total += n
    start = time.monotonic()
    subflows = _subflows(sock)
    end = start + args.duration
    counted = 0
    while not closed and time.monotonic() < end:
        n = sock.recv_into(buf)
        counted += n
        closed = not n
    n, closed = _drain(sock, buf)
    counted += n
    elapsed = time.monotonic() - start
    total += counted
    sock.close()
    _emit({"bytes": counted, "seconds": round(elapsed, 4), "total_bytes": total,
           "goodput_mbit": round(counted * 8 / elapsed / 1e6, 3), "subflows": subflows})
    return 0


# -- many TLS connections ----------------------------------------------------------------------
async def _tls_server(args: argparse.Namespace) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    sock = _sock(args.transport)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", args.port))
    sock.listen(args.backlog)
    sock.setblocking(False)
    served = 0
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            line = await reader.readline()
            writer.write(b"ok " + line)
            await writer.drain()
            await reader.read()  # until the client closes
            served += 1
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, sock=sock, ssl=ctx, backlog=args.backlog,
                                        ssl_handshake_timeout=args.timeout)
    print(json.dumps({"event": "listening"}), file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        import signal
        loop.add_signal_handler(signal.SIGTERM, done.set)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(done.wait(), args.duration)
    server.close()
    _emit({"served": served})
    return 0


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                   addr: tuple[str, int]) -> None:
    """Non-blocking connect of a ready socket to a numeric address. (``loop.sock_connect``
    resolves the address with the socket's protocol, and getaddrinfo knows no
    IPPROTO_MPTCP.)"""
    err = sock.connect_ex(addr)
    if err == 0:
        return
    if err != errno.EINPROGRESS:
        raise OSError(err, os.strerror(err))
    done: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def _tls_client(args: argparse.Namespace) -> int:
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    loop = asyncio.get_running_loop()
    all_open = asyncio.Event()
    opened = 0
    latencies: list[float] = []
    connects: list[float] = []
    errors: dict[str, int] = {}
    subflows: list[int] = []

    async def one(i: int) -> bool:
        nonlocal opened
        sock = _sock(args.transport)
        sock.setblocking(False)
        writer = None
        try:
            t0 = time.monotonic()
            await asyncio.wait_for(_connect(loop, sock, (args.connect, args.port)),
                                   args.timeout)
            connects.append(time.monotonic() - t0)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=args.sni),
                args.timeout)
            latencies.append(time.monotonic() - t0)
            opened += 1
            if opened == args.conns:
                all_open.set()
            # Hold every connection open until all are: that is what "concurrent" means.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(all_open.wait(), args.timeout)
            raw = writer.get_extra_info("socket")
            if raw is not None and i % 50 == 0:
                n = _subflows(raw)  # type: ignore[arg-type]
                if n is not None:
                    subflows.append(n)
            writer.write(f"hello {i}\n".encode())
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), args.timeout)
            if answer != f"ok hello {i}\n".encode():
                raise ValueError("wrong answer")
            return True
        except Exception as exc:  # counted by kind: the report is the point
            key = type(exc).__name__
            errors[key] = errors.get(key, 0) + 1
            return False
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            else:
                sock.close()

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(args.conns)))
    wall = time.monotonic() - t0

    def pcts(values: list[float]) -> dict[str, float | None]:
        v = sorted(values)
        out: dict[str, float | None] = {}
        for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
            out[name] = round(v[min(len(v) - 1, int(p / 100 * len(v)))] * 1000, 2) if v else None
        return out

    _emit({"conns": args.conns, "ok": sum(results), "handshakes": len(latencies),
           "errors": errors, "wall_s": round(wall, 3),
           "handshake_ms": pcts(latencies), "connect_ms": pcts(connects),
           "subflows_sampled": subflows})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testbed.bench.peers")
    p.add_argument("role", choices=("bulk-server", "bulk-client", "tls-server", "tls-client"))
    p.add_argument("--transport", choices=("tcp", "mptcp"), default="mptcp")
    p.add_argument("--port", type=int, default=5201)
    p.add_argument("--connect", default="")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--cert", default="")
    p.add_argument("--key", default="")
    p.add_argument("--ca", default="")
    p.add_argument("--sni", default="www.example.test")
    args = p.parse_args(argv)
    _raise_nofile()
    if args.role == "bulk-server":
        return bulk_server(args)
    if args.role == "bulk-client":
        return bulk_client(args)
    if args.role == "tls-server":
        return asyncio.run(_tls_server(args))
    return asyncio.run(_tls_client(args))


if __name__ == "__main__":
    sys.exit(main())
