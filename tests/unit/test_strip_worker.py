"""The option rewrite of the strip worker (pure bytes in, bytes out): option 30 removed or
NOP'd, the other options intact and aligned, lengths and checksums right."""

from __future__ import annotations

import socket
import struct

from testbed.middleboxes._strip_worker import Selector, strip_option
from testbed.model.wire import internet_checksum, option_spans, parse_ipv4_tcp
from testbed.runtime.nfqueue import refresh_checksums

# Linux's MPTCP SYN: MSS, SACK-permitted + timestamps, NOP + window scale, MP_CAPABLE v1.
SYN_OPTS = (bytes([2, 4, 0x05, 0xB4, 4, 2, 8, 10]) + bytes(8) + bytes([1, 3, 3, 7])
            + bytes([30, 4, 0x01, 0x81]))


def packet(opts: bytes, payload: bytes = b"", flags: int = 0x02) -> bytes:
    doff = 20 + len(opts)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + doff + len(payload), 1, 0, 64, 6, 0,
                     socket.inet_aton("198.51.100.1"), socket.inet_aton("203.0.113.2"))
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1000, 0, (doff // 4) << 4, flags, 64240, 0, 0)
    return bytes(refresh_checksums(bytearray(ip + tcp + opts + payload)))


def checksums_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, total - ihl)
    return internet_checksum(pkt[:ihl]) == 0 and internet_checksum(pseudo + pkt[ihl:total]) == 0


def test_remove_shortens_header_and_keeps_other_options() -> None:
    pkt = packet(SYN_OPTS, b"hello")
    assert checksums_ok(pkt) and parse_ipv4_tcp(pkt).has_mptcp  # type: ignore[union-attr]
    new, before, after = strip_option(pkt, "remove")  # type: ignore[misc]
    assert (before, after) == (44, 40)
    assert len(new) == len(pkt) - 4 and struct.unpack_from("!H", new, 2)[0] == len(new)
    assert checksums_ok(new)
    seg = parse_ipv4_tcp(new)
    assert seg is not None and not seg.has_mptcp and seg.wscale == 7 and seg.length == 5
    assert new.endswith(b"hello")
    assert [k for k, _s, _e in option_spans(new[40:60])] == [2, 4, 8, 1, 3]


def test_remove_pads_to_four_bytes_with_eol() -> None:
    # A 17-byte option 30 after a 3-byte window scale: 3 bytes are left, padded to 4.
    opts = bytes([3, 3, 7]) + bytes([30, 17]) + bytes(15)
    new, before, after = strip_option(packet(opts), "remove")  # type: ignore[misc]
    assert (before, after) == (40, 24)
    assert new[40:44] == bytes([3, 3, 7, 0]) and checksums_ok(new)


def test_nop_keeps_length() -> None:
    pkt = packet(SYN_OPTS)
    new, before, after = strip_option(pkt, "nop")  # type: ignore[misc]
    assert before == after == 44 and len(new) == len(pkt)
    assert new[60:64] == bytes([1, 1, 1, 1]) and checksums_ok(new)


def test_no_option_no_rewrite() -> None:
    assert strip_option(packet(SYN_OPTS[:-4]), "remove") is None
    assert strip_option(b"\x45" + bytes(50), "remove") is None


def test_selector_counts_per_direction() -> None:
    sel = Selector({"server": "203.0.113.2",
                    "after": {"direction": "s2c", "packets": 0, "bytes": 3000}})
    assert [sel.select("s2c", 1400)[0] for _ in range(4)] == [False, False, False, True]
    assert sel.select("c2s", 0) == (False, False)
    sel = Selector({"server": "x", "after": {"direction": "both", "packets": 2, "bytes": 0}})
    assert [sel.select("c2s", 0) for _ in range(3)] == [(False, False), (False, False),
                                                          (True, True)]
    assert sel.stats["c2s"]["segments"] == 3 and sel.stats["s2c"]["segments"] == 0


def test_strip_after_classify() -> None:
    from testbed.middleboxes.strip_after import classify

    base = {"stripped": 10, "with_option": 50, "ok": True, "status": "ok",
            "fell_back": False, "reset": False, "other_path_bytes": 0}
    assert classify(**{**base, "fell_back": True}) == "clean_fallback"  # type: ignore[arg-type]
    assert classify(**{**base, "reset": True, "other_path_bytes": 10**6}  # type: ignore[arg-type]
                    ) == "subflow_reset_continue"
    # A reset with nothing on another path is not "continued elsewhere".
    assert classify(**{**base, "reset": True}) == "unaffected"  # type: ignore[arg-type]
    assert classify(**{**base, "ok": False, "status": "timeout"}) == "stall"  # type: ignore[arg-type]
    assert classify(**{**base, "ok": False, "status": "tls_error"}) == "corrupt"  # type: ignore[arg-type]
    assert classify(**{**base, "ok": False, "status": "aborted"}) == "abort"  # type: ignore[arg-type]
    assert classify(**{**base, "stripped": 0}) == "not_triggered"  # type: ignore[arg-type]
    assert classify(**{**base, "stripped": 0, "with_option": 0}) == "no_mptcp"  # type: ignore[arg-type]


def test_strip_after_params_and_rules() -> None:
    import pytest

    from testbed.errors import SpecError
    from testbed.middleboxes.strip_after import StripMptcpAfter as S

    assert S.validate({}, "f", "m") == {"direction": "s2c", "after_packets": 0,
                                        "after_bytes": 100_000, "mode": "nop"}
    assert S.validate({"after_packets": 5}, "f", "m")["after_bytes"] == 0
    for bad, field in (({"after_packets": 5, "after_bytes": 9}, "m.after_packets"),
                       ({"after_bytes": 0}, "m.after_bytes"),
                       ({"direction": "up"}, "m.direction")):
        with pytest.raises(SpecError) as err:
            S.validate(bad, "f.yaml", "m")
        assert err.value.field == field
    b = S("wifi", S.validate({"direction": "both"}, "f", "m"))
    b.marker = "tbabcdef-mb-wifi-strip_mptcp_after"
    text = b.render_rules({**b.values, "server": "203.0.113.2", "queue": 31})
    rules = [ln for ln in text.splitlines() if ln.startswith("-A")]
    assert len(rules) == 2 and "-d 203.0.113.2 " in rules[0] and "-s 203.0.113.2 " in rules[1]
    assert all("NFQUEUE --queue-num 31 --queue-bypass" in r for r in rules)
