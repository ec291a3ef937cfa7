"""MPTCP option codec and crypto (RFC 8684, MPTCP v1), pure.

Builds and parses TCP option 30 for the suboptions the attacks need, and computes the
values derived from the 64-bit keys (DESIGN.md §4, checked against the kernel's own
handshakes in ``tests/integration/test_join_attacks.py``):

- token = most significant 32 bits of SHA-256(key); IDSN = least significant 64 bits.
- MP_JOIN SYN/ACK: leftmost 64 bits of HMAC-SHA256(key=KeyB‖KeyA, msg=R_B‖R_A).
- MP_JOIN third ACK: leftmost 160 bits of HMAC-SHA256(key=KeyA‖KeyB, msg=R_A‖R_B).
- ADD_ADDR: rightmost 64 bits of HMAC-SHA256(key=sender‖receiver, msg=id‖addr‖port).

Every HMAC key is the sender's key followed by the receiver's. ``build_*`` return the
whole option (kind, length, body); ``parse_option`` takes the same, ``from_scapy`` the
``(30, body)`` pair scapy gives for an option it does not know.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass

from testbed.model.wire import internet_checksum

KIND = 30
MP_CAPABLE, MP_JOIN, DSS, ADD_ADDR, REMOVE_ADDR, MP_PRIO, MP_FAIL, MP_FASTCLOSE, \
    MP_TCPRST = range(9)
SUBTYPE_NAMES = {MP_CAPABLE: "MP_CAPABLE", MP_JOIN: "MP_JOIN", DSS: "DSS",
                 ADD_ADDR: "ADD_ADDR", REMOVE_ADDR: "REMOVE_ADDR", MP_PRIO: "MP_PRIO",
                 MP_FAIL: "MP_FAIL", MP_FASTCLOSE: "MP_FASTCLOSE", MP_TCPRST: "MP_TCPRST"}
CAPABLE_FLAG_CHECKSUM = 0x80  # A: checksum required
CAPABLE_FLAG_HMAC_SHA256 = 0x01  # H
DSS_DATA_FIN, DSS_DSN8, DSS_MAP, DSS_ACK8, DSS_ACK = 0x10, 0x08, 0x04, 0x02, 0x01
MASK64 = (1 << 64) - 1


class OptionError(ValueError):
    """Bytes that are not a well-formed MPTCP option of a supported subtype."""


# -- keys ------------------------------------------------------------------------------------
def _key_bytes(key: int) -> bytes:
    if not 0 <= key <= MASK64:
        raise ValueError(f"an MPTCP key is 64 bits, got {key:#x}")
    return key.to_bytes(8, "big")


def token(key: int) -> int:
    """The 32-bit token of the connection at the host owning ``key``."""
    return int.from_bytes(hashlib.sha256(_key_bytes(key)).digest()[:4], "big")


def idsn(key: int) -> int:
    """The initial data sequence number of the host owning ``key``."""
    return int.from_bytes(hashlib.sha256(_key_bytes(key)).digest()[-8:], "big")


def hmac_sha256(sender_key: int, receiver_key: int, msg: bytes) -> bytes:
    return hmac.new(_key_bytes(sender_key) + _key_bytes(receiver_key), msg,
                    hashlib.sha256).digest()


def join_hmac(sender_key: int, receiver_key: int, sender_nonce: int,
              receiver_nonce: int) -> bytes:
    """The full HMAC a join peer computes: key = sender‖receiver, msg = R_sender‖R_receiver."""
    return hmac_sha256(sender_key, receiver_key,
                       struct.pack("!II", sender_nonce, receiver_nonce))


def join_synack_hmac(key_b: int, key_a: int, nonce_b: int, nonce_a: int) -> int:
    """Truncated (leftmost 64 bits) HMAC of the SYN/ACK sent by B (the join's listener)."""
    return int.from_bytes(join_hmac(key_b, key_a, nonce_b, nonce_a)[:8], "big")


def join_ack_hmac(key_a: int, key_b: int, nonce_a: int, nonce_b: int) -> bytes:
    """The 160-bit HMAC of the third ACK sent by A (the join's initiator)."""
    return join_hmac(key_a, key_b, nonce_a, nonce_b)[:20]


def add_addr_hmac(sender_key: int, receiver_key: int, addr_id: int, addr: str,
                  port: int | None = None) -> int:
    """Rightmost 64 bits of the ADD_ADDR HMAC (IPv4; the port is 0 when absent)."""
    msg = bytes([addr_id]) + ipaddress.IPv4Address(addr).packed + struct.pack("!H", port or 0)
    return int.from_bytes(hmac_sha256(sender_key, receiver_key, msg)[-8:], "big")


def dss_checksum(dsn: int, subflow_seq: int, length: int, payload: bytes) -> int:
    """The DSS checksum: ones' complement sum over the pseudo-header (64-bit DSN, subflow
    sequence, data-level length, zero checksum) and the payload (RFC 8684 §3.3.1)."""
    return internet_checksum(struct.pack("!QIHH", dsn & MASK64, subflow_seq, length, 0)
                             + payload)


# -- suboptions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MpCapable:
    version: int = 1
    flags: int = CAPABLE_FLAG_HMAC_SHA256
    sender_key: int | None = None
    receiver_key: int | None = None
    data_len: int | None = None
    checksum: int | None = None


@dataclass(frozen=True)
class MpJoinSyn:
    token: int
    nonce: int
    addr_id: int = 0
    backup: bool = False


@dataclass(frozen=True)
class MpJoinSynAck:
    hmac: int  # 64-bit truncated
    nonce: int
    addr_id: int = 0
    backup: bool = False


@dataclass(frozen=True)
class MpJoinAck:
    hmac: bytes  # 160 bits


@dataclass(frozen=True)
class Dss:
    data_ack: int | None = None
    dsn: int | None = None
    subflow_seq: int = 0
    data_len: int = 0
    checksum: int | None = None
    data_fin: bool = False
    ack64: bool = True
    dsn64: bool = True


@dataclass(frozen=True)
class AddAddr:
    addr_id: int
    addr: str
    port: int | None = None
    hmac: int | None = None  # None for an echo
    echo: bool = False


@dataclass(frozen=True)
class MpTcpRst:
    reason: int
    transient: bool = False


@dataclass(frozen=True)
class Unknown:
    subtype: int
    body: bytes


MptcpOption = MpCapable | MpJoinSyn | MpJoinSynAck | MpJoinAck | Dss | AddAddr | MpTcpRst \
    | Unknown


def _opt(body: bytes) -> bytes:
    if len(body) + 2 > 40:
        raise OptionError(f"option of {len(body) + 2} bytes does not fit in TCP options")
    return bytes([KIND, len(body) + 2]) + body


def build(opt: MptcpOption) -> bytes:
    """The whole option 30 (kind, length, body) for ``opt``."""
    if isinstance(opt, MpCapable):
        body = bytes([(MP_CAPABLE << 4) | (opt.version & 0xF), opt.flags & 0xFF])
        if opt.sender_key is not None:
            body += _key_bytes(opt.sender_key)
            if opt.receiver_key is not None:
                body += _key_bytes(opt.receiver_key)
                if opt.data_len is not None:
                    body += struct.pack("!H", opt.data_len)
                    if opt.checksum is not None:
                        body += struct.pack("!H", opt.checksum)
        return _opt(body)
    if isinstance(opt, MpJoinSyn):
        return _opt(bytes([(MP_JOIN << 4) | int(opt.backup), opt.addr_id])
                    + struct.pack("!II", opt.token, opt.nonce))
    if isinstance(opt, MpJoinSynAck):
        return _opt(bytes([(MP_JOIN << 4) | int(opt.backup), opt.addr_id])
                    + struct.pack("!QI", opt.hmac & MASK64, opt.nonce))
    if isinstance(opt, MpJoinAck):
        if len(opt.hmac) != 20:
            raise OptionError(f"the third-ACK HMAC is 20 bytes, got {len(opt.hmac)}")
        return _opt(bytes([MP_JOIN << 4, 0]) + opt.hmac)
    if isinstance(opt, Dss):
        flags = DSS_DATA_FIN if opt.data_fin else 0
        body = b""
        if opt.data_ack is not None:
            flags |= DSS_ACK | (DSS_ACK8 if opt.ack64 else 0)
            body += (struct.pack("!Q", opt.data_ack & MASK64) if opt.ack64
                     else struct.pack("!I", opt.data_ack & 0xFFFFFFFF))
        if opt.dsn is not None:
            flags |= DSS_MAP | (DSS_DSN8 if opt.dsn64 else 0)
            body += (struct.pack("!Q", opt.dsn & MASK64) if opt.dsn64
                     else struct.pack("!I", opt.dsn & 0xFFFFFFFF))
            body += struct.pack("!IH", opt.subflow_seq, opt.data_len)
            if opt.checksum is not None:
                body += struct.pack("!H", opt.checksum)
        return _opt(bytes([DSS << 4, flags]) + body)
    if isinstance(opt, AddAddr):
        body = bytes([(ADD_ADDR << 4) | int(opt.echo), opt.addr_id])
        body += ipaddress.IPv4Address(opt.addr).packed
        if opt.port:
            body += struct.pack("!H", opt.port)
        if not opt.echo:
            if opt.hmac is None:
                raise OptionError("an ADD_ADDR that is not an echo carries an HMAC")
            body += struct.pack("!Q", opt.hmac & MASK64)
        return _opt(body)
    if isinstance(opt, MpTcpRst):
        return _opt(bytes([(MP_TCPRST << 4) | int(opt.transient), opt.reason]))
    return _opt(bytes([(opt.subtype << 4)]) + opt.body)


def scapy_option(opt: MptcpOption) -> tuple[int, bytes]:
    """``opt`` as scapy wants an unknown TCP option: ``(30, body)``."""
    return KIND, build(opt)[2:]


def from_scapy(value: bytes) -> MptcpOption:
    """Parse the body scapy gives for option 30."""
    return parse_option(bytes([KIND, len(value) + 2]) + bytes(value))


def parse_option(data: bytes) -> MptcpOption:
    """Parse one whole option 30. MP_JOIN's three forms are told apart by length."""
    if len(data) < 3 or data[0] != KIND or data[1] != len(data):
        raise OptionError(f"not an MPTCP option: {data[:4].hex()}")
    length = data[1]
    subtype = data[2] >> 4
    low = data[2] & 0xF
    try:
        if subtype == MP_CAPABLE:
            flags = data[3]
            sender = receiver = dlen = csum = None
            if length >= 12:
                sender = int.from_bytes(data[4:12], "big")
            if length >= 20:
                receiver = int.from_bytes(data[12:20], "big")
            if length >= 22:
                dlen = struct.unpack("!H", data[20:22])[0]
            if length >= 24:
                csum = struct.unpack("!H", data[22:24])[0]
            if length not in (4, 12, 20, 22, 24):
                raise OptionError(f"MP_CAPABLE of length {length}")
            return MpCapable(low, flags, sender, receiver, dlen, csum)
        if subtype == MP_JOIN:
            if length == 12:
                tok, nonce = struct.unpack("!II", data[4:12])
                return MpJoinSyn(tok, nonce, data[3], bool(low & 1))
            if length == 16:
                mac, nonce = struct.unpack("!QI", data[4:16])
                return MpJoinSynAck(mac, nonce, data[3], bool(low & 1))
            if length == 24:
                return MpJoinAck(bytes(data[4:24]))
            raise OptionError(f"MP_JOIN of length {length}")
        if subtype == DSS:
            flags = data[3]
            pos = 4
            data_ack = dsn = csum = None
            ssn = dlen = 0
            # The width flags only mean something when their field is present.
            ack64 = bool(flags & DSS_ACK8) or not flags & DSS_ACK
            dsn64 = bool(flags & DSS_DSN8) or not flags & DSS_MAP
            if flags & DSS_ACK:
                n = 8 if ack64 else 4
                data_ack = int.from_bytes(data[pos:pos + n], "big")
                pos += n
            if flags & DSS_MAP:
                n = 8 if dsn64 else 4
                dsn = int.from_bytes(data[pos:pos + n], "big")
                pos += n
                ssn, dlen = struct.unpack("!IH", data[pos:pos + 6])
                pos += 6
                if length - pos >= 2:
                    csum = struct.unpack("!H", data[pos:pos + 2])[0]
                    pos += 2
            if pos != length:
                raise OptionError(f"DSS flags {flags:#x} do not match length {length}")
            return Dss(data_ack, dsn, ssn, dlen, csum, bool(flags & DSS_DATA_FIN), ack64, dsn64)
        if subtype == ADD_ADDR:
            echo = bool(low & 1)
            addr = str(ipaddress.IPv4Address(bytes(data[4:8])))
            rest = length - 8
            mac_len = 0 if echo else 8
            if rest not in (mac_len, mac_len + 2):
                raise OptionError(f"ADD_ADDR (IPv4) of length {length}")
            port = struct.unpack("!H", data[8:10])[0] if rest == mac_len + 2 else None
            mac = None if echo else int.from_bytes(data[length - 8:length], "big")
            return AddAddr(data[3], addr, port, mac, echo)
        if subtype == MP_TCPRST:
            if length != 4:
                raise OptionError(f"MP_TCPRST of length {length}")
            return MpTcpRst(data[3], bool(low & 1))
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, OptionError):
            raise
        raise OptionError(f"{SUBTYPE_NAMES.get(subtype, subtype)}: {exc}") from None
    return Unknown(subtype, bytes(data[3:]))
