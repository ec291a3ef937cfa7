"""rawsend builds valid MP_JOIN SYNs and patches tokens with correct TCP checksums."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP

from testbed.runtime.rawsend import TOKEN_OFF, JoinSynBatch, join_syn, token_guesses


def _check(raw: bytes) -> IP:
    pkt = IP(raw)
    sent = pkt[TCP].chksum
    del pkt[TCP].chksum
    assert IP(bytes(pkt))[TCP].chksum == sent
    return pkt


def test_join_syn_is_a_valid_mp_join() -> None:
    pkt = _check(join_syn("100.64.0.9", "203.0.113.2", 40000, 443, 0xDEADBEEF, 7))
    assert pkt[TCP].flags == "S"
    opts = dict(pkt[TCP].options)
    assert opts["MSS"] == 1460
    mptcp = opts[30]
    assert mptcp[0] >> 4 == 1  # MP_JOIN
    assert mptcp[2:6] == bytes.fromhex("deadbeef")


@pytest.mark.parametrize("tokens", [[0, 1, 0xFFFFFFFF, 0x12345678], list(range(1000, 1256))])
def test_batch_tokens_and_checksums(tokens: list[int]) -> None:
    batch = JoinSynBatch("100.64.0.9", "203.0.113.2", 443, n=256)
    assert batch.set_tokens(tokens) == min(len(tokens), 256)
    for i, tok in enumerate(tokens[:256]):
        raw = bytes(batch.view[i * batch.size:(i + 1) * batch.size])
        assert int.from_bytes(raw[TOKEN_OFF:TOKEN_OFF + 4], "big") == tok
        assert _check(raw)[TCP].sport == 20000 + i


def test_token_guesses_walk_distinct_values() -> None:
    g = token_guesses(5)
    seen = {next(g) for _ in range(10000)}
    assert len(seen) == 10000


@pytest.mark.parametrize("first", [0, 0xFFFF0000, 0x7FFFFFFF])
def test_batch_guesses_patch_port_sequence_and_token(first: int) -> None:
    batch = JoinSynBatch("100.64.0.9", "203.0.113.2", 443, n=64, sport_base=30000)
    sports = [(1024 + 997 * i) % 65536 for i in range(64)]
    seqs = [(first + 0x9E3779B1 * i) & 0xFFFFFFFF for i in range(64)]
    tokens = [(first ^ (0x5BD1E995 * i)) & 0xFFFFFFFF for i in range(64)]
    assert batch.set_guesses(sports, seqs, tokens) == 64
    for i in range(64):
        raw = bytes(batch.view[i * batch.size:(i + 1) * batch.size])
        tcp = _check(raw)[TCP]
        assert (tcp.sport, tcp.seq, tcp.dport) == (sports[i], seqs[i], 443)
        assert int.from_bytes(raw[TOKEN_OFF:TOKEN_OFF + 4], "big") == tokens[i]
    assert batch.set_guesses(sports[:3], seqs, tokens) == 3
