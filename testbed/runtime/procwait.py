"""Signalling a child process's group and waiting for its exit without polling.

``Popen.wait(timeout)`` polls with back-off sleeps that grow to 50 ms, so a process that
exits 20 ms after its SIGTERM is seen gone at 31 or 63 ms; a few of those per transport add
up. A pidfd (Linux 5.3+) becomes readable at the moment the process exits, so the wait ends
then. Both helpers act only on an unreaped child of ours (``poll()`` is None): its PID, and
its group id (our processes lead their own session), cannot have been recycled.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from typing import Any


def signal_group(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` to the process group led by ``proc`` if it still runs; whether sent."""
    if proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
        return True
    return False


def wait_exit(proc: subprocess.Popen[Any], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``proc`` to exit, woken by the exit itself; reap it.
    Returns whether it has exited. Falls back to ``Popen.wait`` without pidfd support."""
    if proc.poll() is not None:
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except (OSError, AttributeError):  # no pidfd (old kernel), or reaped meanwhile
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
        return proc.poll() is not None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(max(0, int(timeout_s * 1000)))
    finally:
        os.close(fd)
    return proc.poll() is not None
