"""AppOutcome and the pure pieces every app uses to build one: status rules, the decoding of
the kernel's MPTCP socket options, curl/openssl result classification, nginx config."""

from __future__ import annotations

import ctypes
import hashlib
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from testbed.apps import APPS, AppContext
from testbed.apps.nginx_curl import classify_curl, render_nginx_conf
from testbed.apps.openssl_cli import classify_failure, strip_http
from testbed.errors import RuntimeFailure
from testbed.model.outcome import STATUSES, AppOutcome, final_status
from testbed.peers.pyssl_peer import (
    MPTCP_INFO_LAYOUT,
    MPTCP_INFO_SIZE,
    SOCKADDR_STORAGE_SIZE,
    parse_mptcp_info,
    parse_subflow_addrs,
)
from testbed.runtime.pki import Pki

SHA = "ab" * 32


def _outcome(**over: Any) -> AppOutcome:
    base: dict[str, Any] = dict(
        app="python", transport="mptcp", status="ok", tls_version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384", sni="www.testbed.example", bytes_expected=10,
        bytes_received=10, sha256_expected=SHA, sha256_received=SHA, duration_s=0.5,
        handshake_s=0.01, error=None, mptcp={"fallback": False, "subflows": 1})
    base.update(over)
    return AppOutcome(**base)


# -- AppOutcome ---------------------------------------------------------------------------
def test_statuses_are_the_contract() -> None:
    assert STATUSES == ("ok", "checksum_mismatch", "tls_error", "connect_failed", "timeout",
                        "aborted", "error")


def test_json_round_trip() -> None:
    o = _outcome(extra={"local": {"addr": "198.51.100.1", "port": 1}})
    d = o.to_json()
    assert d["checksum_match"] is True
    assert AppOutcome.from_json(d) == o


def test_from_json_without_extra_and_with_unknown_keys() -> None:
    d = _outcome().to_json()
    del d["extra"]
    d["future_field"] = 1
    assert AppOutcome.from_json(d).extra == {}


@pytest.mark.parametrize("change", [
    {"status": "great"}, {"bytes_received": "10"}, {"bytes_expected": True},
    {"duration_s": "fast"}, {"mptcp": [1]}, {"extra": "x"},
])
def test_from_json_rejects_bad_values(change: dict[str, Any]) -> None:
    d = _outcome().to_json()
    d.update(change)
    with pytest.raises(ValueError):
        AppOutcome.from_json(d)


def test_from_json_rejects_missing_fields() -> None:
    d = _outcome().to_json()
    del d["sha256_received"]
    with pytest.raises(ValueError, match="sha256_received"):
        AppOutcome.from_json(d)


def test_unknown_status_is_refused() -> None:
    with pytest.raises(ValueError):
        _outcome(status="fine")


@pytest.mark.parametrize(("over", "match"), [
    ({}, True),
    ({"sha256_received": SHA.upper()}, True),
    ({"sha256_received": None}, False),
    ({"sha256_received": "cd" * 32}, False),
    ({"bytes_received": 9}, False),
])
def test_checksum_match(over: dict[str, Any], match: bool) -> None:
    assert _outcome(**over).checksum_match is match


def test_final_status() -> None:
    assert final_status("ok", SHA, SHA, 10, 10) == "ok"
    assert final_status("ok", "cd" * 32, SHA, 10, 10) == "checksum_mismatch"
    assert final_status("ok", SHA, SHA, 9, 10) == "checksum_mismatch"
    assert final_status("ok", None, SHA, 0, 10) == "checksum_mismatch"
    assert final_status("tls_error", None, SHA, 0, 10) == "tls_error"


# -- App.outcome: the wrapper side ----------------------------------------------------------
@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"0123456789")
    return AppContext(workdir=tmp_path / "w", pki=Pki(tmp_path, tmp_path, tmp_path),
                      transport="mptcp", server_address="198.51.100.2", port=443,
                      sni="www.testbed.example", payload=payload,
                      payload_sha256=hashlib.sha256(b"0123456789").hexdigest(), timeout_s=5)


def test_wrapper_fills_expected_fields(ctx: AppContext) -> None:
    good = hashlib.sha256(b"0123456789").hexdigest()
    o = APPS["python"]().outcome(ctx, status="ok", bytes_received=10, sha256_received=good)
    assert (o.app, o.transport, o.bytes_expected, o.status) == ("python", "mptcp", 10, "ok")
    bad = APPS["python"]().outcome(ctx, status="ok", bytes_received=10, sha256_received=SHA)
    assert bad.status == "checksum_mismatch" and bad.error


def test_truncation_without_close_notify_is_aborted(ctx: AppContext) -> None:
    short = hashlib.sha256(b"01234").hexdigest()
    o = APPS["openssl"]().outcome(ctx, status="ok", bytes_received=5, sha256_received=short,
                                  extra={"close_notify": False})
    assert o.status == "aborted"
    assert o.error and "close_notify" in o.error
    # A clean close with the wrong bytes is a checksum mismatch, not an abort.
    o = APPS["openssl"]().outcome(ctx, status="ok", bytes_received=5, sha256_received=short,
                                  extra={"close_notify": True})
    assert o.status == "checksum_mismatch"


def test_context_validation(ctx: AppContext) -> None:
    from dataclasses import replace
    with pytest.raises(ValueError):
        replace(ctx, transport="quic")
    with pytest.raises(ValueError):
        replace(ctx, port=0)


def test_registry_and_requirements() -> None:
    assert set(APPS) == {"python", "nginx-curl", "openssl"}
    assert APPS["nginx-curl"]().requirements("tcp") == {"nginx", "curl"}
    assert "mptcpize" in APPS["nginx-curl"]().requirements("mptcp")
    assert "mptcpize" in APPS["openssl"]().requirements("mptcp")
    assert "mptcpize" not in APPS["python"]().requirements("mptcp")
    for cls in APPS.values():
        assert cls.kind in APPS and APPS[cls.kind] is cls


# -- struct mptcp_info / MPTCP_SUBFLOW_ADDRS ------------------------------------------------
class _CMptcpInfo(ctypes.Structure):
    """struct mptcp_info transcribed from include/uapi/linux/mptcp.h (6.18); ctypes applies
    the C alignment rules, so the offsets below are the compiler's, not hand-computed."""

    _fields_ = [
        ("subflows", ctypes.c_uint8), ("add_addr_signal", ctypes.c_uint8),
        ("add_addr_accepted", ctypes.c_uint8), ("subflows_max", ctypes.c_uint8),
        ("add_addr_signal_max", ctypes.c_uint8), ("add_addr_accepted_max", ctypes.c_uint8),
        ("flags", ctypes.c_uint32), ("token", ctypes.c_uint32),
        ("write_seq", ctypes.c_uint64), ("snd_una", ctypes.c_uint64),
        ("rcv_nxt", ctypes.c_uint64), ("local_addr_used", ctypes.c_uint8),
        ("local_addr_max", ctypes.c_uint8), ("csum_enabled", ctypes.c_uint8),
        ("retransmits", ctypes.c_uint32), ("bytes_retrans", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64), ("bytes_received", ctypes.c_uint64),
        ("bytes_acked", ctypes.c_uint64), ("subflows_total", ctypes.c_uint8),
        ("endp_laminar_max", ctypes.c_uint8), ("endp_fullmesh_max", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8), ("last_data_sent", ctypes.c_uint32),
        ("last_data_recv", ctypes.c_uint32), ("last_ack_recv", ctypes.c_uint32),
    ]


def test_mptcp_info_layout_matches_the_c_struct() -> None:
    assert ctypes.sizeof(_CMptcpInfo) == MPTCP_INFO_SIZE
    for name, offset, fmt in MPTCP_INFO_LAYOUT:
        field = getattr(_CMptcpInfo, name)
        assert (field.offset, field.size) == (offset, struct.calcsize("=" + fmt)), name


def _mptcp_info_bytes() -> bytes:
    """A 6.18-sized struct mptcp_info, laid out by hand at the header's offsets."""
    raw = bytearray(MPTCP_INFO_SIZE)
    struct.pack_into("=6B", raw, 0, 2, 1, 1, 8, 2, 8)       # subflows .. accepted_max
    struct.pack_into("=II3Q", raw, 8, 0b10, 0xDEADBEEF, 1000, 900, 5000)  # flags .. rcv_nxt
    struct.pack_into("=3B", raw, 40, 1, 2, 0)                # local_addr_used .. csum
    struct.pack_into("=I4Q", raw, 44, 3, 4096, 10_000, 20_000, 9000)  # retransmits .. acked
    struct.pack_into("=3BxIII", raw, 80, 2, 1, 0, 11, 12, 13)  # subflows_total .. last_ack
    return bytes(raw)


def test_parse_mptcp_info_full() -> None:
    info = parse_mptcp_info(_mptcp_info_bytes())
    assert info["subflows"] == 2 and info["subflows_max"] == 8
    assert info["token"] == 0xDEADBEEF
    assert (info["write_seq"], info["snd_una"], info["rcv_nxt"]) == (1000, 900, 5000)
    assert info["retransmits"] == 3 and info["bytes_retrans"] == 4096
    assert info["bytes_sent"] == 10_000 and info["bytes_received"] == 20_000
    assert info["subflows_total"] == 2 and info["endp_laminar_max"] == 1
    assert (info["last_data_sent"], info["last_data_recv"], info["last_ack_recv"]) == \
        (11, 12, 13)
    assert info["fallback"] is False and info["remote_key_received"] is True
    assert info["info_len"] == MPTCP_INFO_SIZE


def test_parse_mptcp_info_only_what_the_kernel_returned() -> None:
    # A 5.9-era kernel returns 40 bytes: nothing past rcv_nxt may be invented.
    info = parse_mptcp_info(_mptcp_info_bytes()[:40])
    assert "rcv_nxt" in info and "local_addr_used" not in info
    assert "bytes_sent" not in info and "last_ack_recv" not in info
    fallback = bytearray(_mptcp_info_bytes())
    struct.pack_into("=I", fallback, 8, 1)
    assert parse_mptcp_info(bytes(fallback))["fallback"] is True
    assert parse_mptcp_info(b"") == {"info_len": 0}


def _sockaddr_in(addr: str, port: int) -> bytes:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(addr)
    return raw.ljust(SOCKADDR_STORAGE_SIZE, b"\0")


def _sockaddr_in6(addr: str, port: int) -> bytes:
    raw = (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
           + socket.inet_pton(socket.AF_INET6, addr) + b"\0" * 4)
    return raw.ljust(SOCKADDR_STORAGE_SIZE, b"\0")


def test_parse_subflow_addrs() -> None:
    pairs = [(_sockaddr_in("198.51.100.1", 40000), _sockaddr_in("198.51.100.2", 443)),
             (_sockaddr_in6("fd6d:7074:6370::1", 40001),
              _sockaddr_in6("fd6d:7074:6370::2", 443))]
    body = b"".join(a + b for a, b in pairs)
    raw = struct.pack("=IIII", 16, 2, 256, 256) + body
    got = parse_subflow_addrs(raw)
    assert got["num_subflows"] == 2
    assert got["pairs"][0] == {"local": {"addr": "198.51.100.1", "port": 40000},
                               "remote": {"addr": "198.51.100.2", "port": 443}}
    assert got["pairs"][1]["remote"] == {"addr": "fd6d:7074:6370::2", "port": 443}
    # The kernel reports more subflows than fitted in the buffer: only complete ones parse.
    truncated = struct.pack("=IIII", 16, 3, 256, 256) + body
    assert len(parse_subflow_addrs(truncated)["pairs"]) == 2
    with pytest.raises(ValueError):
        parse_subflow_addrs(b"\0" * 8)


# -- curl / openssl classification ------------------------------------------------------
@pytest.mark.parametrize(("code", "stderr", "status"), [
    (0, "", "ok"),
    (7, "curl: (7) Failed to connect", "connect_failed"),
    (28, "curl: (28) Operation timed out", "timeout"),
    (35, "curl: (35) error:0A000410:SSL routines::sslv3 alert handshake failure", "tls_error"),
    (60, "curl: (60) SSL certificate problem", "tls_error"),
    (18, "curl: (18) transfer closed with 1 bytes remaining to read", "aborted"),
    (56, "curl: (56) OpenSSL SSL_read: Connection reset by peer, errno 104", "aborted"),
    (56, "curl: (56) OpenSSL SSL_read: error:0A000119:SSL routines::decryption failed or "
         "bad record mac, errno 0", "tls_error"),
    (56, "curl: (56) OpenSSL SSL_read: error:0A000126:SSL routines::unexpected eof while "
         "reading, errno 0", "aborted"),
    (3, "curl: (3) URL", "error"),
])
def test_classify_curl(code: int, stderr: str, status: str) -> None:
    assert classify_curl(code, stderr) == status


def test_classify_openssl() -> None:
    refused = ("80:error:8000006F:system library:BIO_connect:Connection refused:x.c:117:\n"
               "connect:errno=111\n")
    assert classify_failure(refused, handshake_done=False) == ("connect_failed",
                                                               "connect:errno=111")
    verify = "verify error:num=62:hostname mismatch\n80:error:0A000086:SSL routines::failed\n"
    assert classify_failure(verify, handshake_done=False)[0] == "tls_error"
    mac = "CONNECTION ESTABLISHED\n80:error:0A000119:SSL routines::bad record mac\n"
    assert classify_failure(mac, handshake_done=True)[0] == "tls_error"
    assert classify_failure("read:errno=104\n", handshake_done=True)[0] == "aborted"


def test_strip_http() -> None:
    body = b"\r\n\r\nbinary\x00data"
    assert strip_http(b"HTTP/1.0 200 ok\r\nContent-type: text/plain" + body) == \
        (200, body[4:])
    assert strip_http(b"HTTP/1.0 404 not found\r\n\r\n")[0] == 404
    assert strip_http(b"garbage") == (None, b"garbage")


# -- nginx config ---------------------------------------------------------------------------
def test_nginx_conf_keeps_everything_under_the_workdir(tmp_path: Path) -> None:
    conf = render_nginx_conf(prefix=tmp_path / "ngx", port=443, sni="www.testbed.example",
                             cert=tmp_path / "s.pem", key=tmp_path / "s.key",
                             payload=tmp_path / "payload.bin")
    for line in ("daemon off;", "master_process off;", "worker_processes 1;",
                 "ssl_protocols TLSv1.3;", "listen 443 ssl;",
                 "server_name www.testbed.example;"):
        assert line in conf
    paths = [tok.strip('";') for tok in conf.split() if tok.startswith('"/')]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)
    for directive in ("pid", "error_log", "access_log", "client_body_temp_path",
                      "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
                      "scgi_temp_path"):
        assert f"{directive} \"{tmp_path}" in conf


@pytest.mark.parametrize("bad", ['a"b', "a;b", "a$b", "a{b", "a\nb"])
def test_nginx_conf_refuses_unsafe_paths(tmp_path: Path, bad: str) -> None:
    with pytest.raises(RuntimeFailure):
        render_nginx_conf(prefix=tmp_path / bad, port=443, sni="x.example",
                          cert=tmp_path / "c", key=tmp_path / "k", payload=tmp_path / "p")


def test_nginx_conf_odd_sni_uses_catch_all(tmp_path: Path) -> None:
    conf = render_nginx_conf(prefix=tmp_path, port=8443, sni="bad;name", cert=tmp_path / "c",
                             key=tmp_path / "k", payload=tmp_path / "p")
    assert "server_name _;" in conf and "bad;name" not in conf
