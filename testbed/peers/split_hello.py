"""The article's mitigation (claim S1): split the TLS ClientHello across two MPTCP subflows.

Standard library only: it runs inside the client node as part of ``pyssl_peer``.

The client holds its ClientHello (``ssl.SSLObject`` over ``ssl.MemoryBIO``: OpenSSL writes
the record into a buffer, the application decides when its bytes reach the socket), writes
the first part (default: up to the middle of the server name) on the initial subflow,
waits until the kernel has a second subflow that can carry data, steers the scheduler onto
it, and writes the rest. The server is an unmodified TLS server.

How the rest is steered, and why
--------------------------------
Linux gives an application no per-write choice of subflow: the MPTCP socket's packet
scheduler picks one for every chunk, and the default scheduler prefers the initial subflow
(measured here: without steering, the whole ClientHello crosses the initial path even when
the second subflow is up). What the scheduler does honour is subflow *priority*: it sends
on backup subflows only when no non-backup subflow is active. So, once the second subflow
is usable, the client marks the initial subflow backup (the kernel also tells the server
with MP_PRIO), writes the rest, and after the handshake marks it non-backup again so the
transfer uses both paths. Not sooner: until the server's answer has acknowledged (DATA_ACK)
the whole ClientHello, MPTCP could reinject unacknowledged bytes of it on another
subflow, and with the initial subflow non-backup that could be Wi-Fi. The price is that
the server's first flight also goes over the second path (the only non-backup one then).

Alternatives considered:

- The userspace path manager (``net.mptcp.pm_type=1``) creates subflows and sets flags per
  connection (by token), but then no subflow ever appears for any other connection of the
  namespace unless a daemon (mptcpd) creates it, and the default client would get no second
  subflow to compare with; iproute2 6.1 here has no ``ip mptcp subflow`` command either.
  The kernel path manager already opens the second subflow as soon as the connection is
  fully established (right after the server acknowledges the first part), which is as
  early as the userspace PM could.
- Cork / ``TCP_NOTSENT_LOWAT`` / small send buffers only delay bytes; they do not choose
  the subflow.
- A BPF or custom scheduler would choose per packet, but this kernel ships only
  ``default``.

The price of the chosen way: the kernel path manager's flags are per endpoint (local
address), not per connection, so for the moment between the second subflow coming up and
the end of the handshake *every* connection of the namespace from the initial address is
backup. The initial address needs an endpoint for its flags to be changed (the testbed
configures endpoints only for the other addresses): the client adds one without flags if
there is none (an endpoint without ``signal``/``subflow`` makes the kernel path manager
neither announce nor open anything) and leaves it in place (deleting an endpoint removes
the subflows that use its address, on every connection). Flags are changed over generic
netlink from this process (``mptcp_pm`` family, ``MPTCP_PM_CMD_SET_FLAGS``, what
``ip mptcp endpoint change ADDR backup`` sends), not by running ``ip``, whose start-up
(~4 ms) would dominate the measured cost on a sub-millisecond test network.

When is the second subflow usable? The scheduler skips an MP_JOIN subflow until it is
*fully established*, i.e. until the server acknowledged the third ACK of the join (the
fourth packet). Writing the rest before that would send it on the initial (backup)
subflow, the only active one. The client polls ``MPTCP_TCPINFO`` and
``MPTCP_SUBFLOW_ADDRS`` and waits for a subflow on another local address in state
ESTABLISHED that has received at least two segments (SYN/ACK and that fourth ACK). After
writing, it checks from the per-subflow ``tcpi_bytes_sent`` which subflow carried the rest;
the per-path captures remain the evidence.

If no second subflow is usable within ``wait_s`` the client fails closed: it never sends
the rest of the ClientHello on the initial path (that would reveal the whole name to the
observer the mitigation is for).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SOL_MPTCP = 284
MPTCP_TCPINFO = 2
MPTCP_SUBFLOW_ADDRS = 3
SUBFLOW_DATA_FMT = "=IIII"
SUBFLOW_DATA_SIZE = 16
SOCKADDR_STORAGE_SIZE = 128
TCP_ESTABLISHED = 1
# struct tcp_info offsets (include/uapi/linux/tcp.h); all present since Linux 4.19.
TCPI_SEGS_IN = 140
TCPI_BYTES_RECEIVED = 128
TCPI_BYTES_SENT = 200
TCP_INFO_SIZE = 232
MAX_SUBFLOWS = 8
DEFAULT_WAIT_S = 5.0
POLL_S = 0.0002
RECV_CHUNK = 256 * 1024

SNI_MIDDLE = "sni_middle"


class SplitError(Exception):
    """The split could not be done as asked (no second subflow, bad split point...)."""


# -- the ClientHello -------------------------------------------------------------------------
def sni_span(hello: bytes) -> tuple[int, int]:
    """Offsets ``(start, end)`` of the host name of the server_name extension in ``hello``
    (the bytes OpenSSL wrote: one TLS record holding the ClientHello). Raises ValueError
    when the bytes are not such a record or have no server name."""
    def need(pos: int, n: int) -> None:
        if pos + n > len(hello):
            raise ValueError(f"ClientHello truncated at byte {pos} (needs {n} more)")

    need(0, 9)
    if hello[0] != 22:
        raise ValueError(f"not a TLS handshake record (content type {hello[0]})")
    if hello[5] != 1:
        raise ValueError(f"not a ClientHello (handshake type {hello[5]})")
    pos = 9 + 2 + 32  # record header, handshake header, legacy_version, random
    need(pos, 1)
    pos += 1 + hello[pos]  # legacy_session_id
    need(pos, 2)
    pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher_suites
    need(pos, 1)
    pos += 1 + hello[pos]  # legacy_compression_methods
    need(pos, 2)
    end_ext = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
    pos += 2
    while pos + 4 <= end_ext:
        ext_type = int.from_bytes(hello[pos:pos + 2], "big")
        ext_len = int.from_bytes(hello[pos + 2:pos + 4], "big")
        body = pos + 4
        need(body, ext_len)
        if ext_type == 0:  # server_name: list length, then (type 0, length, name)...
            p = body + 2
            while p + 3 <= body + ext_len:
                name_len = int.from_bytes(hello[p + 1:p + 3], "big")
                if hello[p] == 0:
                    need(p + 3, name_len)
                    return p + 3, p + 3 + name_len
                p += 3 + name_len
        pos = body + ext_len
    raise ValueError("the ClientHello has no server_name extension")


def split_offset(hello: bytes, split_at: int | str) -> int:
    """Where to cut ``hello``: ``"sni_middle"`` (the middle of the host name) or a byte
    offset, which must leave at least one byte on each side."""
    if split_at == SNI_MIDDLE:
        start, end = sni_span(hello)
        if end - start < 2:
            raise SplitError("the server name is too short to split")
        return start + (end - start) // 2
    if isinstance(split_at, bool) or not isinstance(split_at, int):
        raise SplitError(f"split_at must be {SNI_MIDDLE!r} or a byte offset, not {split_at!r}")
    if not 0 < split_at < len(hello):
        raise SplitError(f"split_at {split_at} is outside the {len(hello)}-byte ClientHello "
                         f"(1..{len(hello) - 1})")
    return split_at


def parse_split_at(text: str) -> int | str:
    return SNI_MIDDLE if text == SNI_MIDDLE else int(text)


# -- the kernel's view of the subflows -------------------------------------------------------
def _subflow_data(fd: int, optname: int, elem_size: int) -> list[bytes]:
    """``getsockopt(SOL_MPTCP, optname)`` for the per-subflow options that take a filled-in
    ``struct mptcp_subflow_data`` header (``socket.getsockopt`` cannot pass one in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = SUBFLOW_DATA_SIZE + MAX_SUBFLOWS * elem_size
    buf = ctypes.create_string_buffer(size)
    struct.pack_into(SUBFLOW_DATA_FMT, buf, 0, SUBFLOW_DATA_SIZE, 0, 0, elem_size)
    optlen = ctypes.c_uint32(size)
    if libc.getsockopt(fd, SOL_MPTCP, optname, buf, ctypes.byref(optlen)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    raw = buf.raw[:optlen.value]
    hdr, num, _size_kernel, size_user = struct.unpack_from(SUBFLOW_DATA_FMT, raw, 0)
    stride = size_user or elem_size
    return [raw[hdr + i * stride:hdr + (i + 1) * stride]
            for i in range(num) if hdr + (i + 1) * stride <= len(raw)]


def _sockaddr(raw: bytes) -> tuple[str, int] | None:
    family = struct.unpack_from("=H", raw, 0)[0] if len(raw) >= 2 else 0
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
    return None


@dataclass(frozen=True)
class SubflowState:
    local: tuple[str, int] | None
    remote: tuple[str, int] | None
    state: int
    segs_in: int
    bytes_sent: int
    bytes_received: int

    def to_json(self) -> dict[str, Any]:
        return {"local": f"{self.local[0]}:{self.local[1]}" if self.local else None,
                "remote": f"{self.remote[0]}:{self.remote[1]}" if self.remote else None,
                "state": self.state, "segs_in": self.segs_in, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received}


def parse_tcp_info(raw: bytes) -> tuple[int, int, int, int]:
    """(state, segs_in, bytes_sent, bytes_received) from a ``struct tcp_info``."""
    if len(raw) < TCP_INFO_SIZE:
        raise ValueError(f"tcp_info of {len(raw)} bytes, expected {TCP_INFO_SIZE}")
    return (raw[0], struct.unpack_from("=I", raw, TCPI_SEGS_IN)[0],
            struct.unpack_from("=Q", raw, TCPI_BYTES_SENT)[0],
            struct.unpack_from("=Q", raw, TCPI_BYTES_RECEIVED)[0])


def subflows(sock: socket.socket) -> list[SubflowState]:
    """Every subflow of an MPTCP socket: addresses and TCP state. The two getsockopts list
    the subflows in the same order; they are read again if a subflow came or went between
    them."""
    for _ in range(10):
        infos = _subflow_data(sock.fileno(), MPTCP_TCPINFO, TCP_INFO_SIZE)
        addrs = _subflow_data(sock.fileno(), MPTCP_SUBFLOW_ADDRS, 2 * SOCKADDR_STORAGE_SIZE)
        if len(infos) == len(addrs):
            out = []
            for info, addr in zip(infos, addrs, strict=True):
                state, segs_in, sent, received = parse_tcp_info(info)
                out.append(SubflowState(_sockaddr(addr[:SOCKADDR_STORAGE_SIZE]),
                                        _sockaddr(addr[SOCKADDR_STORAGE_SIZE:]),
                                        state, segs_in, sent, received))
            return out
    raise OSError(errno.EAGAIN, "the subflow list kept changing")


def usable_join(states: list[SubflowState], initial: tuple[str, int]) -> SubflowState | None:
    """A subflow other than the initial one that the scheduler will send on: established,
    and the server acknowledged the join's third ACK (SYN/ACK + that ACK received)."""
    for sf in states:
        if sf.local != initial and sf.state == TCP_ESTABLISHED and sf.segs_in >= 2:
            return sf
    return None


# -- generic netlink: the kernel path manager's endpoints ------------------------------------
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLA_F_NESTED = 0x8000
MPTCP_PM_NAME = "mptcp_pm"
MPTCP_PM_VER = 1
MPTCP_PM_CMD_ADD_ADDR = 1
MPTCP_PM_CMD_SET_FLAGS = 7
MPTCP_PM_ATTR_ADDR = 1
MPTCP_PM_ADDR_ATTR_FAMILY = 1
MPTCP_PM_ADDR_ATTR_ADDR4 = 3
MPTCP_PM_ADDR_ATTR_FLAGS = 6
MPTCP_PM_ADDR_FLAG_BACKUP = 4


def nlattr(attr_type: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), attr_type) + payload
    return data + b"\0" * (-len(data) % 4)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        length, attr_type = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        out[attr_type & ~NLA_F_NESTED] = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return out


def endpoint_attr(address: str, flags: int) -> bytes:
    """MPTCP_PM_ATTR_ADDR for an IPv4 endpoint, as ``ip mptcp endpoint`` builds it."""
    inner = (nlattr(MPTCP_PM_ADDR_ATTR_FAMILY, struct.pack("=H", socket.AF_INET))
             + nlattr(MPTCP_PM_ADDR_ATTR_ADDR4, socket.inet_pton(socket.AF_INET, address))
             + nlattr(MPTCP_PM_ADDR_ATTR_FLAGS, struct.pack("=I", flags)))
    return nlattr(MPTCP_PM_ATTR_ADDR | NLA_F_NESTED, inner)


class PathManager:
    """The few requests to the in-kernel path manager the split needs, over one generic
    netlink socket of this process's namespace."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.settimeout(timeout_s)
        self.sock.bind((0, 0))
        self.seq = 0
        reply = self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1,
                              nlattr(CTRL_ATTR_FAMILY_NAME, MPTCP_PM_NAME.encode() + b"\0"))
        family = parse_attrs(reply).get(CTRL_ATTR_FAMILY_ID)
        if family is None:
            raise OSError(errno.ENOENT, "no mptcp_pm generic netlink family")
        self.family = struct.unpack("=H", family[:2])[0]

    def close(self) -> None:
        self.sock.close()

    def _request(self, msg_type: int, cmd: int, version: int, attrs: bytes) -> bytes:
        """Send one request with NLM_F_ACK; return the attributes of its reply (empty for a
        bare ACK). A negative errno in the reply raises OSError."""
        self.seq += 1
        body = struct.pack("=BBH", cmd, version, 0) + attrs
        self.sock.send(struct.pack("=IHHII", 16 + len(body), msg_type,
                                   NLM_F_REQUEST | NLM_F_ACK, self.seq, 0) + body)
        payload = b""
        while True:
            data = self.sock.recv(65536)
            pos = 0
            while pos + 16 <= len(data):
                length, rtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, pos)
                if length < 16:
                    raise OSError(errno.EPROTO, "malformed netlink message")
                if seq == self.seq:
                    if rtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, pos + 16)[0]
                        if code:
                            raise OSError(code, os.strerror(code))
                        return payload
                    payload = data[pos + 20:pos + length]  # after nlmsghdr + genlmsghdr
                pos += (length + 3) & ~3

    def add_endpoint(self, address: str, flags: int = 0) -> bool:
        """Add an endpoint for ``address``; False if there already is one."""
        try:
            self._request(self.family, MPTCP_PM_CMD_ADD_ADDR, MPTCP_PM_VER,
                          endpoint_attr(address, flags))
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def set_backup(self, address: str, backup: bool) -> None:
        """``ip mptcp endpoint change ADDRESS backup|nobackup``: the kernel updates every
        subflow from that address and sends MP_PRIO for each."""
        self._request(self.family, MPTCP_PM_CMD_SET_FLAGS, MPTCP_PM_VER,
                      endpoint_attr(address, MPTCP_PM_ADDR_FLAG_BACKUP if backup else 0))


# -- TLS over a memory BIO -------------------------------------------------------------------
class BioTls:
    """An ``ssl.SSLObject`` driven over a connected socket: the parts of ``ssl.SSLSocket``
    the client uses (handshake, recv, unwrap, version, cipher, timeouts, getsockopt,
    close), with the same exceptions (SSLZeroReturnError on close_notify, SSLEOFError on
    EOF without it, TimeoutError from the socket)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def pending_output(self) -> bytes:
        return self.outgoing.read()

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(RECV_CHUNK)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def _drive(self, step: Callable[[], Any]) -> Any:
        while True:
            try:
                result = step()
            except ssl.SSLWantReadError:
                self.flush()
                self._fill()
                continue
            self.flush()
            return result

    def start_handshake(self) -> bytes:
        """Run OpenSSL until it wants the server's answer; return what it wrote (the
        ClientHello) without sending it."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return self.outgoing.read()
        raise SplitError("the handshake completed without an answer from the server")

    def do_handshake(self) -> None:
        self._drive(self.obj.do_handshake)

    def recv(self, n: int) -> bytes:
        data: bytes = self._drive(lambda: self.obj.read(n))
        return data

    def unwrap(self) -> None:
        self._drive(self.obj.unwrap)

    def version(self) -> str | None:
        return self.obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.obj.cipher()

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
        return self.sock.getsockopt(level, optname, buflen)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


# -- the split handshake ---------------------------------------------------------------------
def split_handshake(sock: socket.socket, ctx: ssl.SSLContext, sni: str, split_at: int | str,
                    time_left: Callable[[], float], report: dict[str, Any], *,
                    steer: bool = True, wait_s: float = DEFAULT_WAIT_S) -> BioTls:
    """Complete the TLS handshake on the connected MPTCP socket ``sock`` with the
    ClientHello split at ``split_at``; fills ``report`` as it goes (timings in seconds
    from the start of this call, sizes, subflows, which subflow carried each part).

    ``steer=False`` splits the writes but leaves the scheduler alone (a control: the
    default scheduler keeps the rest on the initial subflow). Raises SplitError when no
    second subflow is usable in time; the rest of the ClientHello is then not sent.
    """
    t0 = time.monotonic()

    def at() -> float:
        return round(time.monotonic() - t0, 6)

    tls = BioTls(sock, ctx, sni)
    hello = tls.start_handshake()
    cut = split_offset(hello, split_at)
    try:
        start, end = sni_span(hello)
    except ValueError:
        start = end = -1
    first, rest = hello[:cut], hello[cut:]
    report.update(hello_bytes=len(hello), split_at=cut, sni_offset=[start, end],
                  first_bytes=len(first), rest_bytes=len(rest), steer=steer,
                  first_sni_part=hello[start:cut].decode("ascii", "replace")
                  if start <= cut <= end else None,
                  rest_sni_part=hello[cut:end].decode("ascii", "replace")
                  if start <= cut <= end else None)
    initial_local = sock.getsockname()[:2]
    sock.settimeout(max(0.001, time_left()))
    sock.sendall(first)
    report["first_sent_s"] = at()

    deadline = time.monotonic() + min(wait_s, max(0.0, time_left()))
    polls = 0
    while True:
        states = subflows(sock)
        join = usable_join(states, initial_local)
        polls += 1
        if join is not None:
            break
        if time.monotonic() >= deadline:
            report["subflows_at_give_up"] = [s.to_json() for s in states]
            raise SplitError(f"no second subflow usable within {at():.3f}s; the rest of the "
                             "ClientHello was not sent (failing closed: sending it on the "
                             "initial path would reveal the whole server name there)")
        time.sleep(POLL_S)
    report["second_subflow_s"] = at()
    report["polls"] = polls
    before = {s.local: s.bytes_sent for s in states}

    pm: PathManager | None = None
    if steer:
        try:
            pm = PathManager()
            report["endpoint_added"] = pm.add_endpoint(initial_local[0])
            pm.set_backup(initial_local[0], True)
        except OSError as exc:
            if pm is not None:
                with contextlib.suppress(OSError):
                    pm.set_backup(initial_local[0], False)
                pm.close()
            raise SplitError(f"cannot mark the initial subflow backup ({exc}); the rest of "
                             "the ClientHello was not sent") from exc
        report["steered_s"] = at()
    try:
        sock.settimeout(max(0.001, time_left()))
        sock.sendall(rest)
        report["rest_sent_s"] = at()
        after = subflows(sock)
        carried = {f"{s.local[0]}:{s.local[1]}" if s.local else "?":
                   s.bytes_sent - before.get(s.local, 0) for s in after}
        report["rest_bytes_by_subflow"] = carried
        report["initial_subflow"] = f"{initial_local[0]}:{initial_local[1]}"
        report["second_subflow"] = join.to_json()["local"]
        report["rest_on_second_only"] = (
            carried.get(report["initial_subflow"], 0) == 0
            and carried.get(report["second_subflow"], 0) >= len(rest))
        tls.settimeout(max(0.001, time_left()))
        tls.do_handshake()
        report["handshake_done_s"] = at()
    finally:
        if pm is not None:
            with contextlib.suppress(OSError):
                pm.set_backup(initial_local[0], False)
                report["restored_s"] = at()
            pm.close()
    return tls
