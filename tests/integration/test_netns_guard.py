"""Guards of the batched namespace handling: a name bound to the orchestrator's own
namespace is never attached by the builder, and deleting it kills nothing."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from testbed.errors import RuntimeFailure
from testbed.runtime.ledger import NETNS_DIR, delete_netns_many
from testbed.runtime.node import attach_all

pytestmark = pytest.mark.root


class _FakeNode:
    def __init__(self, pid: int, tag: str) -> None:
        self.pid = pid
        self.name = "fake"
        self.netns = f"{tag}-fake"


def test_attach_refuses_a_process_in_the_orchestrators_namespace() -> None:
    tag = f"tbg{secrets.token_hex(3)}"
    with pytest.raises(RuntimeFailure, match="not in a namespace of its own"):
        attach_all([_FakeNode(os.getpid(), tag)])
    assert not (NETNS_DIR / f"{tag}-fake").exists()


def test_delete_of_a_name_bound_to_the_root_namespace_kills_nothing() -> None:
    tag = f"tbg{secrets.token_hex(3)}"
    name = f"{tag}-root"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        subprocess.run(["ip", "netns", "attach", name, str(os.getpid())], check=True,
                       capture_output=True, timeout=10)
        try:
            assert delete_netns_many([name], tag) == [name]
            time.sleep(0.2)
            assert sleeper.poll() is None  # a root-namespace process survived
            assert not (NETNS_DIR / name).exists()  # the name was removed
        finally:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
    finally:
        sleeper.kill()
        sleeper.wait()
