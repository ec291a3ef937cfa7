"""Runs on the REMOTE machine: ``python -m testbed.remote_guard -- TESTBED-ARGS...``.

The remote driver starts every testbed command through this guard, in the project
checkout. The guard runs ``.venv/bin/testbed ARGS`` (through ``sudo -n`` when the login user
is not root) and relays its output. Its own stdin is the SSH channel, which the driver keeps
open and never writes to: end of file on it means the SSH session is gone (connection lost,
sshd killed, driver interrupted). The guard then sends SIGTERM to the testbed, which
releases everything its run made, waits for it (bounded), and as a last resort kills its
process group and runs ``testbed clean``. So a dropped connection leaves nothing behind on
the remote side. Output that can no longer be delivered is discarded: the testbed never
sees a broken pipe in the middle of its cleanup.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = float(os.environ.get("TESTBED_GUARD_GRACE", "90"))
LOST_EXIT = 255


def testbed_argv(args: list[str]) -> list[str]:
    exe = str(Path(sys.executable).parent / "testbed")
    cmd = [exe, *args]
    if os.geteuid() != 0:
        cmd = ["sudo", "-n", "--", *cmd]
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop_requested = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    child = subprocess.Popen(testbed_argv(args), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    assert child.stdout is not None and child.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ, 1)
    sel.register(child.stderr, selectors.EVENT_READ, 2)
    stdin_open = True
    try:
        sel.register(sys.stdin.fileno(), selectors.EVENT_READ, 0)
    except (ValueError, OSError):
        stdin_open = False
    sink_alive = True
    lost = False
    open_pipes = 2
    stop_deadline: float | None = None
    killed = False

    def request_stop() -> None:
        nonlocal stop_deadline
        if stop_deadline is None:
            stop_deadline = time.monotonic() + GRACE_S
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    while open_pipes > 0 or child.poll() is None:
        if stop_requested or lost:
            request_stop()
        if stop_deadline is not None and time.monotonic() > stop_deadline and not killed:
            killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
        events = sel.select(timeout=0.5) if (open_pipes or stdin_open) else []
        if not events and open_pipes == 0:
            time.sleep(0.2)
        for key, _ in events:
            fd = key.fd
            if key.data == 0:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    data = b""
                if not data:
                    # The SSH session is gone: stop the run, release what it made.
                    sel.unregister(fd)
                    stdin_open = False
                    lost = True
                continue
            data = os.read(fd, 65536)
            if not data:
                sel.unregister(fd)
                open_pipes -= 1
                continue
            if sink_alive:
                try:
                    os.write(key.data, data)
                except OSError:
                    sink_alive = False
                    lost = True
    rc = child.wait()
    if killed:
        # Last resort after a SIGKILL: the ledger-based cleanup (releases only what a dead
        # run's ledger lists).
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(testbed_argv(["clean"]), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return LOST_EXIT if lost else rc


if __name__ == "__main__":
    sys.exit(main())
