"""No hangs: a stalled connection ends within its bound with a classified outcome.

- Whole runs (``tests/fixtures/stall_blackhole.yaml``): every path blackholed 0.2 s after
  the first data segment — TCP's only path, both paths under MPTCP. The transfer ends as
  ``timeout`` within ``timeout_s`` + the kill grace (+ a margin for process start on a
  loaded machine), and the verdict is a real one (CONFIRMED: the expected timeout), not
  ERROR.
- Each app's client (python, nginx-curl's curl, openssl s_client), over TCP and MPTCP,
  against a server that accepts the connection and never answers: ``timeout`` within the
  same bound.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from testbed.apps import APPS
from testbed.apps.base import KILL_GRACE_S
from testbed.model.playbook import load_playbook
from testbed.model.result import Verdict
from testbed.runtime.scenario import run_playbooks
from tests.integration.test_apps import Net, net  # noqa: F401  (the two-node fixture)

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
MARGIN_S = 4.0   # process start-up and teardown of the client on a loaded machine
SILENT = ("import socket,sys,time\n"
          "s=socket.socket(socket.AF_INET, socket.SOCK_STREAM, int(sys.argv[1]))\n"
          "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', int(sys.argv[2]))); s.listen(8)\n"
          "held=[]\n"
          "while True: held.append(s.accept())\n")


def test_blackholed_paths_end_as_timeout_in_bound(tmp_path: Path) -> None:
    timeout_s = 5
    pb = load_playbook(REPO / "tests" / "fixtures" / "stall_blackhole.yaml",
                       {"timeout_s": timeout_s})
    result, _ = run_playbooks([pb], results_root=tmp_path)
    assert result.complete
    for transport, tr in result.scenarios[0].transports.items():
        assert tr.outcome is not None, (transport, tr.reason)
        assert tr.outcome["status"] == "timeout", (transport, tr.reason)
        assert tr.verdict == Verdict.CONFIRMED, (transport, tr.reason)
        assert tr.timings["client_s"] <= timeout_s + KILL_GRACE_S + MARGIN_S, \
            (transport, tr.timings)
        # One blackhole per path: the second's report sits beside the first's (its
        # position in the playbook's list), as a repeated attack kind's does.
        assert set(tr.facts["middlebox"]) == {"blackhole", "blackhole[1]"}, tr.facts


@pytest.mark.parametrize("transport", ["tcp", "mptcp"])
@pytest.mark.parametrize("kind", sorted(APPS))
def test_silent_server_ends_as_timeout_in_bound(net: Net, kind: str,  # noqa: F811
                                                transport: str) -> None:
    port = 9500 + sorted(APPS).index(kind) * 2 + (transport == "mptcp")
    ctx = net.ctx(f"{kind}-silent-{transport}", transport, port=port, timeout_s=3.0)
    proto = 262 if transport == "mptcp" else 6   # IPPROTO_MPTCP, IPPROTO_TCP
    silent = net.server.popen(["python3", "-c", SILENT, str(proto), str(port)],
                              label="silent server")
    try:
        deadline = time.monotonic() + 30
        while not net.server.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip():
            assert silent.poll() is None, "the silent server exited"
            assert time.monotonic() < deadline, "the silent server never listened"
            time.sleep(0.05)
        t0 = time.monotonic()
        outcome = APPS[kind]().run_client(net.client, ctx)
        elapsed = time.monotonic() - t0
    finally:
        net.server.stop(silent)
    assert outcome.status == "timeout", outcome
    assert elapsed <= ctx.timeout_s + KILL_GRACE_S + MARGIN_S, elapsed
