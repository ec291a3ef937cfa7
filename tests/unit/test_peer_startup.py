"""The python TLS peer starts without importing the split-ClientHello module (only the S1
client needs it; it pulls in dataclasses and inspect, ~15 ms of every peer's start-up), and
its copy of the split default is the module's own value."""

from __future__ import annotations

import subprocess
import sys

from testbed.peers import pyssl_peer, split_hello
from testbed.runtime.worker import REPO_ROOT, worker_env


def test_split_default_is_split_hellos() -> None:
    assert pyssl_peer.SNI_MIDDLE == split_hello.SNI_MIDDLE
    assert split_hello.parse_split_at(pyssl_peer.SNI_MIDDLE) == split_hello.SNI_MIDDLE


def test_peer_does_not_import_split_hello() -> None:
    code = ("import sys, testbed.peers.pyssl_peer; "
            "print('testbed.peers.split_hello' in sys.modules, 'inspect' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=worker_env(), cwd=REPO_ROOT, timeout=30, check=True)
    assert res.stdout.split() == ["False", "False"], res.stdout
