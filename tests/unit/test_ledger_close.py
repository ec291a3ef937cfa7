"""A ledger killed in the middle of an atomic save leaves ``<tag>.tmp``: closing the ledger
(what ``testbed clean`` does for a dead run) removes it too."""

from __future__ import annotations

from pathlib import Path

from testbed.runtime.ledger import Ledger


def test_close_removes_a_half_saved_ledger(tmp_path: Path) -> None:
    ledger = Ledger.create(state_dir=tmp_path)
    half = ledger.path.with_suffix(".tmp")
    half.write_text('{"run_id": ')  # a save interrupted by SIGKILL
    ledger.close()
    assert list(tmp_path.iterdir()) == []
