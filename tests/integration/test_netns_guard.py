"""Guards of the namespace handling: a node whose name is bound to the orchestrator's own
namespace runs nothing there, and deleting such a name kills nothing."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.errors import RuntimeFailure
from testbed.runtime.ledger import NETNS_DIR, Ledger, delete_netns_many
from testbed.runtime.node import Node

pytestmark = pytest.mark.root


def test_a_node_bound_to_the_orchestrators_namespace_runs_nothing(tmp_path: Path) -> None:
    ledger = Ledger.create(state_dir=tmp_path / "state")
    name = f"{ledger.tag}-fake"
    marker = tmp_path / "ran"
    subprocess.run(["ip", "netns", "attach", name, str(os.getpid())], check=True,
                   capture_output=True, timeout=10)
    try:
        node = Node("fake", "client", ledger, create=False)
        with pytest.raises(RuntimeFailure, match="orchestrator's own network namespace"):
            node.run(["touch", str(marker)])
        with pytest.raises(RuntimeFailure, match="orchestrator's own network namespace"):
            node.popen(["touch", str(marker)], label="must not start")
        with pytest.raises(RuntimeFailure, match="orchestrator's own network namespace"):
            _ = node.mn
        assert not marker.exists()
        assert ledger.data.processes == []
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
        ledger.close()
    assert not (NETNS_DIR / name).exists()


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
