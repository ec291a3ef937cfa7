"""``PcapAnalysis``: the observer summary computed by tshark passes started before the
capture is complete and fed the file as it grows must be the very summary
``summarize_pcap`` computes from the finished file; its processes are in the ledger while
they run, and are gone (and forgotten) after ``close`` on every path."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import RuntimeFailure
from testbed.runtime.ledger import Ledger, is_alive
from testbed.runtime.observer import ORCHESTRATOR, PcapAnalysis, summarize_pcap

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text())
SNI: str = EXPECTED["sni"]
SERVER: str = EXPECTED["server_address"]

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger.create(state_dir=tmp_path / "state")
    try:
        yield led
    finally:
        led.release_all()
        led.close()


def _analysis(pcap: Path, ledger: Ledger, sni: str = SNI) -> PcapAnalysis:
    return PcapAnalysis.start(pcap, sni=sni, ledger=ledger)


def _summary(analysis: PcapAnalysis) -> dict[str, Any]:
    return analysis.summarize(server_addresses=[SERVER], total_app_bytes=EXPECTED["size"])


def _grow(src: bytes, dst: Path, chunk: int, pause_s: float) -> None:
    """Append ``src`` to ``dst`` piece by piece, as tcpdump writes a capture."""
    with dst.open("ab") as f:
        for i in range(0, len(src), chunk):
            f.write(src[i:i + chunk])
            f.flush()
            time.sleep(pause_s)


@pytest.mark.parametrize(("name", "sni"), [
    ("mptcp_tls_path1.pcap", SNI),        # SNI decoded by pass 1
    ("mptcp_tls_path2.pcap", SNI),        # no SNI: pass 2 searches the payloads
    ("split_sni_path1.pcap", SNI),        # a ClientHello cut inside the name: fragments
    ("split_sni_tail.pcap", SNI),
    ("mptcp_tls_path1.pcap", ""),         # no name to search: no pass 2
])
def test_growing_capture_gives_the_file_summary(tmp_path: Path, ledger: Ledger, name: str,
                                                sni: str) -> None:
    data = (FIXTURES / name).read_bytes()
    pcap = tmp_path / name
    pcap.write_bytes(data[:24])  # tcpdump writes the header before it reports listening
    analysis = _analysis(pcap, ledger, sni)
    try:
        pids = [p.pid for p in ledger.data.processes]
        assert len(pids) == (2 if sni else 1)
        assert {p.node for p in ledger.data.processes} == {ORCHESTRATOR}
        analysis.follow()
        # Odd-sized pieces: records arrive cut anywhere, as from a real writer.
        _grow(data[24:], pcap, chunk=997, pause_s=0.005)
        early = _summary(analysis)
    finally:
        analysis.close()
    assert early == summarize_pcap(pcap, sni=sni, server_addresses=[SERVER],
                                   total_app_bytes=EXPECTED["size"])
    assert early["packets"] > 0
    assert ledger.data.processes == []
    assert not any(is_alive(pid, None) for pid in pids)


def test_truncated_capture_same_warning(tmp_path: Path, ledger: Ledger) -> None:
    pcap = tmp_path / "cut.pcap"
    pcap.write_bytes((FIXTURES / "mptcp_tls_path1.pcap").read_bytes()[:3000])
    analysis = _analysis(pcap, ledger)
    try:
        analysis.follow()
        early = _summary(analysis)
    finally:
        analysis.close()
    on_file = summarize_pcap(pcap, sni=SNI, server_addresses=[SERVER],
                             total_app_bytes=EXPECTED["size"])
    assert "cut short" in (early["warning"] or "")
    assert early == on_file  # the warning included: it names the file, not the pipe


def test_not_a_capture_raises(tmp_path: Path, ledger: Ledger) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_text("this is not a pcap\n" * 4)
    analysis = _analysis(bad, ledger)
    try:
        analysis.follow()
        with pytest.raises(RuntimeFailure, match="tshark failed"):
            _summary(analysis)
    finally:
        analysis.close()
    assert ledger.data.processes == []


def test_close_without_summary_stops_at_once(tmp_path: Path, ledger: Ledger) -> None:
    """The error path: the capture never completes. tshark ignores SIGTERM while it waits
    for input, so close must end it by EOF, well within the kill grace period."""
    pcap = tmp_path / "x.pcap"
    pcap.write_bytes((FIXTURES / "mptcp_tls_path1.pcap").read_bytes()[:1000])
    analysis = _analysis(pcap, ledger)
    pids = [p.pid for p in ledger.data.processes]
    analysis.follow()
    time.sleep(0.5)  # tshark is up and blocked on its stdin
    t0 = time.monotonic()
    analysis.close()
    assert time.monotonic() - t0 < 1.0
    assert ledger.data.processes == []
    assert not any(is_alive(pid, None) for pid in pids)
    analysis.close()  # idempotent


def test_close_before_follow(tmp_path: Path, ledger: Ledger) -> None:
    analysis = _analysis(tmp_path / "never.pcap", ledger)
    pids = [p.pid for p in ledger.data.processes]
    analysis.close()
    assert ledger.data.processes == []
    assert not any(is_alive(pid, None) for pid in pids)


def test_close_while_summarizing_in_a_thread(tmp_path: Path, ledger: Ledger) -> None:
    """An interrupt while a worker thread waits for the summary: close (from the ledger's
    thread) stops the passes and the worker returns instead of hanging."""
    pcap = tmp_path / "x.pcap"
    pcap.write_bytes((FIXTURES / "mptcp_tls_path2.pcap").read_bytes())
    analysis = _analysis(pcap, ledger)
    pids = [p.pid for p in ledger.data.processes]
    analysis.follow()
    outcome: list[object] = []

    def work() -> None:
        try:
            outcome.append(_summary(analysis))
        except Exception as exc:  # whichever way it ends, it must end
            outcome.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    analysis.close()
    worker.join(10)
    assert not worker.is_alive()
    assert outcome
    assert ledger.data.processes == []
    assert not any(is_alive(pid, None) for pid in pids)
