"""Batched rtnetlink and MPTCP generic netlink, on sockets opened inside a namespace.

Building a network is hundreds to tens of thousands of small netlink requests (a route per
link subnet per node). pyroute2 spends about a millisecond of Python per request and forks a
helper per namespace socket; here every request is packed with ``struct`` into one buffer,
sent in one ``sendmsg`` per batch, and the acknowledgements are read back and checked.

Sockets are opened in a short-lived thread inside the namespace (network namespaces are
per thread): the thread that creates the namespaces (``create_namespaces``, ``unshare``), or
one that entered an existing namespace with ``setns(2)`` (``in_netns``), each after checking
that it really is in the wanted namespace and not in the root one. A socket stays bound to
the namespace it was created in, so the orchestrator's main thread then uses it without
ever leaving its own namespace. The same thread writes the node's sysctls
(``/proc/sys/net`` resolves to the namespace of the thread that opens it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED, MNT_DETACH = 0x1000, 0x4000, 1 << 20, 2
NETLINK_ROUTE = 0
NETLINK_GENERIC = 16
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWQDISC, RTM_NEWRULE = 16, 20, 24, 36, 32
IFF_UP = 0x1
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
FRA_SRC, FRA_PRIORITY, FRA_TABLE = 2, 6, 15
FR_ACT_TO_TBL = 1
RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 4, 0, 1
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_TBF_PARMS, TCA_TBF_RATE64, TCA_TBF_BURST = 1, 4, 6
TC_H_ROOT = 0xFFFFFFFF
TC_LINKLAYER_ETHERNET = 1
# generic netlink / MPTCP path manager (include/uapi/linux/mptcp_pm.h)
GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2
MPTCP_PM_CMD_ADD_ADDR, MPTCP_PM_CMD_SET_LIMITS = 1, 5
MPTCP_PM_ATTR_ADDR, MPTCP_PM_ATTR_RCV_ADD_ADDRS, MPTCP_PM_ATTR_SUBFLOWS = 1, 2, 3
MPTCP_PM_ADDR_ATTR_FAMILY, MPTCP_PM_ADDR_ATTR_ID, MPTCP_PM_ADDR_ATTR_ADDR4 = 1, 2, 3
MPTCP_PM_ADDR_ATTR_FLAGS = 6
MPTCP_PM_VER = 1
BATCH_BYTES = 64 * 1024

_NLH = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")


class NetlinkFailure(OSError):
    """A request was refused; ``what`` names it (e.g. ``route add 203.0.113.0/30``)."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


def _attr(kind: int, payload: bytes) -> bytes:
    n = _NLA.size + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * (-n % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, v: int) -> bytes:
    return _attr(kind, struct.pack("=I", v))


def _str(kind: int, s: str) -> bytes:
    return _attr(kind, s.encode() + b"\0")


def _ip4(kind: int, addr: Any) -> bytes:
    packed = getattr(addr, "packed", None)
    if packed is None or len(packed) != 4:
        packed = ipaddress.IPv4Address(str(addr)).packed
    return _NLA.pack(8, kind) + packed


# -- namespaces ------------------------------------------------------------------------------
_libc: Any = None


def _libc_call(name: str, *args: Any) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _setns(fd: int) -> None:
    _libc_call("setns", fd, CLONE_NEWNET)


def _shared_run_dir(run_dir: Path) -> None:
    """As ``ip netns add`` prepares /run/netns: a shared mount point (made one by binding
    it onto itself if it is not), so namespace mounts propagate to every mount namespace."""
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    target = str(run_dir).encode()
    try:
        _libc_call("mount", b"", target, b"none", MS_SHARED | MS_REC, None)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _libc_call("mount", target, target, b"none", MS_BIND | MS_REC, None)
        _libc_call("mount", b"", target, b"none", MS_SHARED | MS_REC, None)


def create_namespaces(paths: list[Path], setup: Callable[[Path], T]) -> list[T]:
    """Create a named network namespace at each of ``paths`` (all in one directory, e.g.
    /run/netns), as ``ip netns add`` does but in-process. A new thread, for each path in
    turn, creates the file, moves itself into a new namespace (``unshare``), binds that
    namespace onto the file, checks the result, and calls ``setup(path)`` while inside it
    (sysctls, netlink sockets). Returns what ``setup`` returned, in the order of
    ``paths``. The thread ends afterwards, inside the last namespace: it never acts in
    the orchestrator's. A path that already exists is an error (``FileExistsError``).

    Nothing else should run Python in the orchestrator meanwhile: the thread needs the GIL
    back after each system call, and waits up to the interpreter's switch interval (5 ms)
    each time while another thread computes (overlapping the address planning made a
    200-node build slower, not faster)."""
    results: list[T] = []
    error: list[BaseException] = []
    root = os.stat("/proc/self/ns/net")
    root_id = (root.st_dev, root.st_ino)
    if paths:
        _shared_run_dir(paths[0].parent)

    def body() -> None:
        try:
            for path in paths:
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
                _libc_call("unshare", CLONE_NEWNET)
                _libc_call("mount", b"/proc/thread-self/ns/net", str(path).encode(), b"none",
                           MS_BIND, None)
                here, named = os.stat("/proc/thread-self/ns/net"), os.stat(path)
                if ((named.st_dev, named.st_ino) != (here.st_dev, here.st_ino)
                        or (here.st_dev, here.st_ino) == root_id):
                    raise OSError(errno.EPERM, f"{path} is not a new namespace of its own")
                results.append(setup(path))
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    # One thread: two (each taking every other path) were no faster, the kernel's
    # asynchronous cleanup of the previous run's namespaces keeping the other core busy.
    t = threading.Thread(target=body, name="netns:create", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return results


def remove_namespaces(paths: list[Path]) -> None:
    """As ``ip netns delete``: detach each namespace's mount and remove its file (the
    namespace itself ends when nothing uses it any more)."""
    for path in paths:
        with contextlib.suppress(OSError):
            _libc_call("umount2", str(path).encode(), MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def in_netns(netns_path: str | Path, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that first enters the network namespace at
    ``netns_path`` (e.g. ``/run/netns/tb1a2b3c-client``); return its result. The thread
    ends afterwards: it never goes back to, nor acts in, the orchestrator's namespace."""
    result: list[Any] = []
    error: list[BaseException] = []
    root = os.stat("/proc/self/ns/net").st_ino

    def body() -> None:
        try:
            fd = os.open(str(netns_path), os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.fstat(fd).st_ino
                _setns(fd)
            finally:
                os.close(fd)
            here = os.stat("/proc/thread-self/ns/net").st_ino
            if here != target or here == root:
                raise OSError(errno.EPERM, f"setns into {netns_path} did not take effect")
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns:{Path(netns_path).name}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def write_sysctls(values: dict[str, Any]) -> None:
    """Write ``net.*`` sysctls in the calling thread's network namespace (call it through
    ``in_netns``). Keys are dotted names; only ``net.`` keys are accepted. A value the
    namespace already has is not written again (reading first halves the cost: a new
    namespace starts with many of them, and writing ip_forward walks every device)."""
    for key, value in values.items():
        if not key.startswith("net.") or "/" in key or ".." in key:
            raise ValueError(f"refusing sysctl {key!r}")
        fd = os.open("/proc/sys/" + key.replace(".", "/"), os.O_RDWR | os.O_CLOEXEC)
        try:
            want = f"{value}\n".encode()
            if os.read(fd, 4096) != want:
                os.pwrite(fd, want, 0)  # at offset 0: a later offset is ignored for numbers
        finally:
            os.close(fd)


# -- batched requests ------------------------------------------------------------------------
class Batch:
    """Requests queued on one netlink socket; ``commit`` sends them and checks every ack."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # What each request does, for error messages: a string, or a tuple of parts that is
        # only formatted if the request fails (formatting addresses costs more than packing).
        self.msgs: list[tuple[bytes, Any]] = []
        self.seq = 0

    def add(self, mtype: int, flags: int, body: bytes, what: Any) -> None:
        hdr = _NLH.pack(_NLH.size + len(body), mtype, flags | NLM_F_REQUEST | NLM_F_ACK, 0, 0)
        self.msgs.append((hdr + body, what))

    def commit(self) -> None:
        msgs, self.msgs = self.msgs, []
        i = 0
        while i < len(msgs):
            chunk: list[bytes] = []
            whats: dict[int, Any] = {}
            size = 0
            while i < len(msgs) and (not chunk or size + len(msgs[i][0]) <= BATCH_BYTES):
                self.seq += 1
                raw = bytearray(msgs[i][0])
                struct.pack_into("=I", raw, 8, self.seq)
                chunk.append(bytes(raw))
                whats[self.seq] = msgs[i][1]
                size += len(raw)
                i += 1
            self.sock.sendmsg(chunk)
            self._acks(whats)

    def _acks(self, pending: dict[int, Any]) -> None:
        first_error: NetlinkFailure | None = None
        while pending:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + _NLH.size <= len(data):
                length, mtype, _flags, seq, _pid = _NLH.unpack_from(data, off)
                if length < _NLH.size:
                    break
                if mtype == NLMSG_ERROR and seq in pending:
                    (err,) = struct.unpack_from("=i", data, off + _NLH.size)
                    what = pending.pop(seq)
                    if err and first_error is None:
                        if isinstance(what, tuple):
                            what = " ".join(str(w) for w in what if w is not None)
                        first_error = NetlinkFailure(-err, what)
                off += (length + 3) & ~3
        if first_error is not None:
            raise first_error


def route_socket() -> socket.socket:
    """A NETLINK_ROUTE socket in the calling thread's namespace."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((0, 0))
    return s


def genl_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                      NETLINK_GENERIC)
    s.bind((0, 0))
    return s


class Rtnl(Batch):
    """rtnetlink requests, by interface index (the caller assigns indexes at creation)."""

    def veth(self, name: str, index: int, peer: str, peer_index: int, peer_ns_fd: int,
             mtu: int | None = None) -> None:
        mtu_attr = _u32(IFLA_MTU, mtu) if mtu else b""
        peer_info = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, peer_index, 0, 0)
        peer_info += _str(IFLA_IFNAME, peer) + _u32(IFLA_NET_NS_FD, peer_ns_fd) + mtu_attr
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0)
        body += _str(IFLA_IFNAME, name) + mtu_attr
        body += _nest(IFLA_LINKINFO, _str(IFLA_INFO_KIND, "veth"),
                      _nest(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info)))
        self.add(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"veth {name} <-> {peer}")

    def up(self, index: int, what: str) -> None:
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
        self.add(RTM_NEWLINK, 0, body, f"link set {what} up")

    def addr(self, index: int, iface: ipaddress.IPv4Interface, what: str) -> None:
        body = struct.pack("=BBBBI", socket.AF_INET, iface.network.prefixlen, 0, 0, index)
        body += _ip4(IFA_LOCAL, iface.ip) + _ip4(IFA_ADDRESS, iface.ip)
        self.add(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"addr add {iface} dev {what}")

    def route(self, dst: ipaddress.IPv4Network, oif: int, *, via: Any = None,
              table: int = 254, scope: int = RT_SCOPE_UNIVERSE) -> None:
        body = struct.pack("=BBBBBBBBI", socket.AF_INET, dst.prefixlen, 0, 0,
                           table if table < 256 else 252, RTPROT_STATIC, scope, RTN_UNICAST, 0)
        body += _ip4(RTA_DST, dst.network_address) + _u32(RTA_OIF, oif)
        if via is not None:
            body += _ip4(RTA_GATEWAY, via)
        body += _u32(RTA_TABLE, table)
        self.add(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body,
                 ("route add", dst, "via" if via is not None else None, via, "table", table))

    def rule(self, src: Any, table: int, priority: int) -> None:
        body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 32, 0,
                           table if table < 256 else 252, 0, 0, FR_ACT_TO_TBL, 0)
        body += _ip4(FRA_SRC, src) + _u32(FRA_PRIORITY, priority) + _u32(FRA_TABLE, table)
        self.add(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, body,
                 f"rule add from {src} table {table}")

    def tbf(self, index: int, rate_bit: float, burst: int, latency_s: float, what: str) -> None:
        """Root TBF: ``rate_bit`` bit/s, ``burst`` bytes, queue for ``latency_s`` (as
        ``tc qdisc add dev X root handle 1: tbf rate R burst B latency L``)."""
        rate = int(rate_bit / 8)  # bytes/s
        psched = [int(x, 16) for x in Path("/proc/net/psched").read_text().split()]
        tick_in_usec = psched[0] / psched[1] * (psched[2] / 1e6)
        buffer = int(int(1e6 * burst / rate) * tick_in_usec)
        limit = int(rate * latency_s + burst)
        ratespec = struct.pack("=BBHhHI", 0, TC_LINKLAYER_ETHERNET, 0, -1, 0,
                               min(rate, 0xFFFFFFFF))
        parms = ratespec + bytes(12) + struct.pack("=III", limit, buffer, 0)
        opts = _attr(TCA_TBF_PARMS, parms) + _u32(TCA_TBF_BURST, burst)
        if rate >= 1 << 32:
            opts += _attr(TCA_TBF_RATE64, struct.pack("=Q", rate))
        body = struct.pack("=BxxxiIII", socket.AF_UNSPEC, index, 0x10000, TC_H_ROOT, 0)
        body += _str(TCA_KIND, "tbf") + _nest(TCA_OPTIONS, opts)
        self.add(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body, f"tbf on {what}")


_mptcp_family: int | None = None


def mptcp_family(sock: socket.socket) -> int:
    """The generic netlink id of ``mptcp_pm`` (global to the kernel; looked up once)."""
    global _mptcp_family
    if _mptcp_family is None:
        body = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0) + _str(CTRL_ATTR_FAMILY_NAME,
                                                                    "mptcp_pm")
        sock.send(_NLH.pack(_NLH.size + len(body), GENL_ID_CTRL, NLM_F_REQUEST, 1, 0) + body)
        data = sock.recv(65536)
        length, mtype, _f, _s, _p = _NLH.unpack_from(data, 0)
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, _NLH.size)
            raise NetlinkFailure(-err, "generic netlink family mptcp_pm")
        off = _NLH.size + 4
        while off < length:
            alen, akind = _NLA.unpack_from(data, off)
            if akind == CTRL_ATTR_FAMILY_ID:
                _mptcp_family = struct.unpack_from("=H", data, off + 4)[0]
                break
            off += (alen + 3) & ~3
        if _mptcp_family is None:
            raise NetlinkFailure(errno.ENOENT, "generic netlink family mptcp_pm")
    return _mptcp_family


class Mptcp(Batch):
    """MPTCP in-kernel path manager: limits and endpoints."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.family = mptcp_family(sock)

    def _cmd(self, cmd: int, attrs: bytes, what: str) -> None:
        self.add(self.family, 0, struct.pack("=BBH", cmd, MPTCP_PM_VER, 0) + attrs, what)

    def limits(self, subflows: int, add_addr_accepted: int) -> None:
        self._cmd(MPTCP_PM_CMD_SET_LIMITS, _u32(MPTCP_PM_ATTR_RCV_ADD_ADDRS, add_addr_accepted)
                  + _u32(MPTCP_PM_ATTR_SUBFLOWS, subflows), "mptcp limits set")

    def endpoint(self, addr: Any, ep_id: int, flags: int) -> None:
        inner = (_attr(MPTCP_PM_ADDR_ATTR_FAMILY, struct.pack("=H", socket.AF_INET))
                 + _attr(MPTCP_PM_ADDR_ATTR_ID, struct.pack("=B", ep_id))
                 + _ip4(MPTCP_PM_ADDR_ATTR_ADDR4, addr)
                 + _u32(MPTCP_PM_ADDR_ATTR_FLAGS, flags))
        self._cmd(MPTCP_PM_CMD_ADD_ADDR, _nest(MPTCP_PM_ATTR_ADDR, inner),
                  f"mptcp endpoint add {addr} id {ep_id}")


def close_all(socks: Iterable[socket.socket | None]) -> None:
    for s in socks:
        if s is not None:
            s.close()
