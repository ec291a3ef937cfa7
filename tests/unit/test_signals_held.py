"""A SIGINT/SIGTERM during a run's final release is acted on after it, not inside it."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from testbed.runtime.scenario import signals_held


def _raise(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_release_is_held_until_it_is_done(sig: signal.Signals) -> None:
    old = signal.signal(sig, _raise)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt, match=sig.name), signals_held():
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # bytecodes run: a handler would have fired here
                pass
            done.append("released")
        assert done == ["released"]
        assert signal.getsignal(sig) is _raise
    finally:
        signal.signal(sig, old)


def test_ignored_signal_stays_ignored() -> None:
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


def test_no_second_interrupt_while_one_propagates() -> None:
    old = signal.signal(signal.SIGINT, _raise)
    try:
        with pytest.raises(RuntimeError), signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            raise RuntimeError("the first failure")
    finally:
        signal.signal(signal.SIGINT, old)
