"""An empty ledger file (a run killed between creating and first saving it) owns nothing:
``clean`` removes it once it is old enough, and never a fresh one being written."""

from __future__ import annotations

import os
import time
from pathlib import Path

from testbed.runtime.ledger import EMPTY_LEDGER_GRACE_S, stale_ledgers


def test_old_empty_ledger_is_dropped_fresh_one_kept(tmp_path: Path) -> None:
    old = tmp_path / "tbaaaaaa.json"
    fresh = tmp_path / "tbbbbbbb.json"
    old.write_text("")
    fresh.write_text("")
    past = time.time() - EMPTY_LEDGER_GRACE_S - 5
    os.utime(old, (past, past))
    assert stale_ledgers(tmp_path) == []
    assert not old.exists()
    assert fresh.exists()


def test_unreadable_nonempty_ledger_is_left_alone(tmp_path: Path) -> None:
    broken = tmp_path / "tbcccccc.json"
    broken.write_text("{not json")
    past = time.time() - EMPTY_LEDGER_GRACE_S - 5
    os.utime(broken, (past, past))
    assert stale_ledgers(tmp_path) == []
    assert broken.exists()
