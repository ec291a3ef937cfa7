"""The split-ClientHello client (claim S1), without root: finding the server name in a real
ClientHello, choosing the cut, decoding the kernel's per-subflow answers, encoding the path
manager requests, and TLS over memory BIOs on a socket pair."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from pathlib import Path

import pytest

from testbed.peers.split_hello import (
    MPTCP_PM_ADDR_ATTR_ADDR4,
    MPTCP_PM_ADDR_ATTR_FAMILY,
    MPTCP_PM_ADDR_ATTR_FLAGS,
    MPTCP_PM_ADDR_FLAG_BACKUP,
    MPTCP_PM_ATTR_ADDR,
    SNI_MIDDLE,
    TCP_INFO_SIZE,
    BioTls,
    SplitError,
    SubflowState,
    endpoint_attr,
    nlattr,
    parse_attrs,
    parse_split_at,
    parse_tcp_info,
    sni_span,
    split_offset,
    usable_join,
)
from testbed.runtime.pki import Pki, make_pki

SNI = "www.example.test"


def client_hello(sni: str | None = SNI) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if sni is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@pytest.mark.parametrize("name", [SNI, "a.bc", "x" * 60 + ".example.test"])
def test_sni_span_finds_the_name_in_a_real_client_hello(name: str) -> None:
    hello = client_hello(name)
    start, end = sni_span(hello)
    assert hello[start:end] == name.encode()
    assert hello.count(name.encode()) == 1


def test_sni_middle_cuts_inside_the_name() -> None:
    hello = client_hello()
    start, end = sni_span(hello)
    cut = split_offset(hello, SNI_MIDDLE)
    assert start < cut < end
    assert hello[start:cut] == b"www.exam" and hello[cut:end] == b"ple.test"
    assert SNI.encode() not in hello[:cut] and SNI.encode() not in hello[cut:]


def test_byte_offsets() -> None:
    hello = client_hello()
    assert split_offset(hello, 5) == 5
    assert split_offset(hello, len(hello) - 1) == len(hello) - 1
    for bad in (0, len(hello), -1, True):
        with pytest.raises(SplitError):
            split_offset(hello, bad)
    assert parse_split_at("sni_middle") == SNI_MIDDLE
    assert parse_split_at("120") == 120
    with pytest.raises(ValueError):
        parse_split_at("middle")


def test_no_server_name_and_garbage() -> None:
    with pytest.raises(ValueError, match="no server_name"):
        sni_span(client_hello(None))
    with pytest.raises(ValueError, match="not a TLS handshake"):
        sni_span(b"GET / HTTP/1.1\r\n\r\n")
    hello = client_hello()
    with pytest.raises(ValueError, match="truncated"):
        sni_span(hello[:60])


def test_tcp_info_fields() -> None:
    raw = bytearray(TCP_INFO_SIZE)
    raw[0] = 1
    struct.pack_into("=I", raw, 140, 2)
    struct.pack_into("=Q", raw, 200, 143)
    struct.pack_into("=Q", raw, 128, 873)
    assert parse_tcp_info(bytes(raw)) == (1, 2, 143, 873)
    with pytest.raises(ValueError):
        parse_tcp_info(bytes(100))


def _sf(local: tuple[str, int], state: int = 1, segs_in: int = 2) -> SubflowState:
    return SubflowState(local, ("203.0.113.2", 443), state, segs_in, 0, 0)


def test_usable_join_waits_for_the_fourth_ack() -> None:
    initial = ("198.51.100.1", 40000)
    assert usable_join([_sf(initial)], initial) is None
    assert usable_join([_sf(initial), _sf(("100.64.0.1", 5), state=2, segs_in=0)],
                       initial) is None  # SYN_SENT
    assert usable_join([_sf(initial), _sf(("100.64.0.1", 5), segs_in=1)], initial) is None
    join = _sf(("100.64.0.1", 5))
    assert usable_join([_sf(initial), join], initial) == join


def test_endpoint_request_encoding() -> None:
    attr = endpoint_attr("198.51.100.1", MPTCP_PM_ADDR_FLAG_BACKUP)
    length, attr_type = struct.unpack_from("=HH", attr, 0)
    assert length == len(attr) and attr_type & 0x7FFF == MPTCP_PM_ATTR_ADDR
    assert attr_type & 0x8000  # NLA_F_NESTED, as iproute2 sends it
    inner = parse_attrs(parse_attrs(attr)[MPTCP_PM_ATTR_ADDR])
    assert struct.unpack("=H", inner[MPTCP_PM_ADDR_ATTR_FAMILY])[0] == socket.AF_INET
    assert inner[MPTCP_PM_ADDR_ATTR_ADDR4] == bytes([198, 51, 100, 1])
    assert struct.unpack("=I", inner[MPTCP_PM_ADDR_ATTR_FLAGS])[0] == MPTCP_PM_ADDR_FLAG_BACKUP
    assert len(nlattr(2, b"abc")) == 8  # padded to 4 bytes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), SNI)


def _server(pki: Pki, sock: socket.socket, payload: bytes, close_notify: bool,
            seen: dict[str, object]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    with ctx.wrap_socket(sock, server_side=True) as tls:
        seen["version"] = tls.version()
        tls.sendall(payload)
        if close_notify:
            tls.settimeout(5)
            try:
                tls.unwrap()
            except (OSError, ssl.SSLError) as exc:
                seen["unwrap"] = repr(exc)
        else:
            tls.shutdown(socket.SHUT_RDWR)


def _client_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=Path(pki.ca_cert))
    return ctx


@pytest.mark.parametrize("close_notify", [True, False])
def test_bio_tls_over_a_socket_pair(pki: Pki, close_notify: bool) -> None:
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 400
    seen: dict[str, object] = {}
    thread = threading.Thread(target=_server, args=(pki, b, payload, close_notify, seen))
    thread.start()
    try:
        a.settimeout(10)
        tls = BioTls(a, _client_ctx(pki), SNI)
        hello = tls.start_handshake()
        cut = split_offset(hello, SNI_MIDDLE)
        a.sendall(hello[:cut])  # what the split client does, minus the second subflow
        a.sendall(hello[cut:])
        tls.do_handshake()
        assert tls.version() == "TLSv1.3"
        got = b""
        end = "eof"
        while True:
            try:
                data = tls.recv(65536)
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLEOFError:  # as SSLSocket with suppress_ragged_eofs=False
                end = "eof without close_notify"
                break
            if not data:
                end = "close_notify"
                break
            got += data
        assert got == payload
        assert end == ("close_notify" if close_notify else "eof without close_notify")
        if close_notify:
            tls.unwrap()
    finally:
        thread.join(10)
        a.close()
    assert seen["version"] == "TLSv1.3"


# -- the playbook keys ------------------------------------------------------------------------
PLAYBOOK = """
name: s1x
topology: {name: dual_path}
transports: [mptcp]
app: {kind: python, bytes: 1000, split_client_hello: true}
"""


def _parse(text: str) -> object:
    from testbed.model.playbook import parse_playbook
    return parse_playbook(text, "x.yaml", {})


def test_playbook_split_keys() -> None:
    from testbed.errors import SpecError
    from testbed.model.playbook import Playbook

    pb = _parse(PLAYBOOK)
    assert isinstance(pb, Playbook)
    assert pb.app.split_client_hello and pb.app.split_at == SNI_MIDDLE
    assert pb.app.split_steer == "mp_prio"
    pb = _parse(PLAYBOOK.replace("split_client_hello: true",
                                 "split_client_hello: true, split_at: 120, split_steer: none"))
    assert isinstance(pb, Playbook)
    assert pb.app.split_at == 120 and pb.app.split_steer == "none"
    bad = {
        "transports: [tcp, mptcp]": ("app.split_client_hello", "MPTCP"),
        "kind: python": ("app.split_client_hello", "cannot split"),
        "split_client_hello: true": ("app.split_at", "byte offset"),
    }
    replacements = {"transports: [tcp, mptcp]": ("transports: [mptcp]", "transports: [tcp, mptcp]"),
                    "kind: python": ("kind: python", "kind: openssl"),
                    "split_client_hello: true": ("split_client_hello: true",
                                                 "split_client_hello: true, split_at: 0")}
    for key, (field, words) in bad.items():
        old, new = replacements[key]
        with pytest.raises(SpecError) as info:
            _parse(PLAYBOOK.replace(old, new))
        assert info.value.field == field and words in str(info.value)
    with pytest.raises(SpecError):
        _parse(PLAYBOOK.replace("split_client_hello: true", "split_client_hello: yes please"))


def test_s1_playbook_sweeps_three_clients() -> None:
    from testbed.model.playbook import expand_sweeps
    path = Path(__file__).resolve().parents[2] / "playbooks" / "s1_split_hello.yaml"
    pbs = {pb.name: pb for pb in expand_sweeps(path)}
    assert {n: (p.app.split_client_hello, p.app.split_steer) for n, p in pbs.items()} == {
        "s1_split_hello[client=default]": (False, "mp_prio"),
        "s1_split_hello[client=split]": (True, "mp_prio"),
        "s1_split_hello[client=split_nosteer]": (True, "none")}
    assert all(p.claim == "S1" and p.transports == ("mptcp",) for p in pbs.values())
