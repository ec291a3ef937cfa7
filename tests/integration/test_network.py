"""The network the engine builds, read back with pyroute2: an independent check of the
batched netlink encoder (nlfast) against the address plan, and of real reachability."""

from __future__ import annotations

import dataclasses
import ipaddress
import select
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.generic.mptcp import MPTCP

from testbed.model.addressing import FIRST_POLICY_TABLE
from testbed.model.topology import load_topology
from testbed.runtime.ledger import Ledger
from testbed.runtime.network import MPTCP_LIMIT_ADD_ADDR, MPTCP_LIMIT_SUBFLOWS, Network

pytestmark = pytest.mark.root

# A UDP datagram filling a 9000-byte IP packet, sent with DF (no fragmentation), then one
# byte more, which the sender's kernel must refuse.
SEND_DF = """import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.sendto(bytes(9000 - 28), (sys.argv[1], 9))
print("sent")
try:
    s.sendto(bytes(9001 - 28), (sys.argv[1], 9))
except OSError as exc:
    print("EMSGSIZE" if exc.errno == 90 else exc)
"""
RECEIVE_ONE = """import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9))
print("bound", flush=True)
s.settimeout(8)
print("received", len(s.recv(65535)))
"""


def test_dual_path_matches_its_plan(tmp_path: Path) -> None:
    spec = load_topology("dual_path", {"cell_rate_mbit": None})
    ledger = Ledger.create(state_dir=tmp_path / "state")
    root_devs = {line.split(":")[0].strip()
                 for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]}
    try:
        with Network.up(spec, ledger) as net:
            for name, node in net.nodes.items():
                with IPRoute(netns=node.netns, flags=0) as ipr:
                    addrs = {(a.get_attr("IFA_LABEL"), f"{a.get_attr('IFA_ADDRESS')}/"
                              f"{a['prefixlen']}") for a in ipr.get_addr(family=2)}
                    planned = {(i.ifname, str(i.address)) for i in net.plan.interfaces[name]}
                    assert planned | {("lo", "127.0.0.1/8")} == addrs, name
                    routes = set()
                    for table in (254, *range(FIRST_POLICY_TABLE, FIRST_POLICY_TABLE + 4)):
                        for r in ipr.get_routes(family=2, table=table):
                            gw = r.get_attr("RTA_GATEWAY")
                            if gw and r["proto"] == 4:  # static routes we added
                                routes.add((f"{r.get_attr('RTA_DST')}/{r['dst_len']}", gw,
                                            table))
                    planned_routes = {(str(r.dst), str(r.via), r.table)
                                      for r in net.plan.routes if r.node == name}
                    assert routes == planned_routes, name
                    # No default route anywhere: only testbed subnets are reachable.
                    assert all(r["dst_len"] > 0 for r in ipr.get_routes(family=2, table=254))
                    rules = {(r.get_attr("FRA_SRC"), r.get_attr("FRA_TABLE"))
                             for r in ipr.get_rules(family=2) if r.get_attr("FRA_SRC")}
                    assert rules == {(str(r.src), r.table) for r in net.plan.rules
                                     if r.node == name}
                    qdiscs = {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs()}
                    shaped = any(i.link.rate_mbit for i in net.plan.interfaces[name])
                    assert ("tbf" in qdiscs) == shaped, (name, qdiscs)
                with MPTCP(netns=node.netns, flags=0) as mp:
                    (limits,) = mp.limits("show")
                    assert limits.get_attr("MPTCP_PM_ATTR_SUBFLOWS") == MPTCP_LIMIT_SUBFLOWS
                    assert limits.get_attr("MPTCP_PM_ATTR_RCV_ADD_ADDRS") == \
                        MPTCP_LIMIT_ADD_ADDR
                    endpoints = {ep.get_attr("MPTCP_PM_ATTR_ADDR").get_attr(
                        "MPTCP_PM_ADDR_ATTR_ADDR4") for ep in mp.endpoint("show")}
                    assert endpoints == {str(e.address) for e in net.plan.endpoints
                                         if e.node == name}
                forwarding = node.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
                assert forwarding == ("1" if name in net.plan.forwarding else "0")
                others = node.run(["sysctl", "-n", "net.ipv4.conf.all.rp_filter",
                                   "net.ipv6.conf.all.disable_ipv6",
                                   "net.ipv6.conf.default.disable_ipv6",
                                   "net.mptcp.enabled"]).stdout.split()
                assert others == ["0", "1", "1", "1"], (name, others)
                # /proc/net read through the node shows the node's own devices.
                devs = {line.split(":")[0].strip()
                        for line in node.read_proc_net("dev").splitlines()[2:]}
                assert {i.ifname for i in net.plan.interfaces[name]} <= devs, (name, devs)
                assert devs != root_devs
            # Real reachability: the client reaches the server from each of its addresses.
            server = net.address("server")
            for path in ("wifi", "cell"):
                src = net.address("client", path)
                probe = net.nodes["client"].run(
                    [sys.executable, "-c", "import socket,sys\ns=socket.socket()\n"
                     "s.bind((sys.argv[1],0))\ntry:\n s.settimeout(3);"
                     "s.connect((sys.argv[2],9))\nexcept ConnectionRefusedError:\n"
                     " print('refused')", src, server], timeout=10)
                assert probe.stdout.strip() == "refused", (path, probe.stderr)
            assert ipaddress.ip_address(server) in spec.pools["core"]
    finally:
        ledger.release_all()
        ledger.close()


def test_link_mtu_is_set_on_both_ends_and_carries_full_frames(tmp_path: Path) -> None:
    """A link's ``mtu`` reaches both veth ends, and a datagram of exactly that size crosses
    the shaped link unfragmented (DF set); one byte more is refused."""
    base = load_topology("dual_path")
    spec = dataclasses.replace(base, links=tuple(
        dataclasses.replace(link, mtu=9000) for link in base.links))
    ledger = Ledger.create(state_dir=tmp_path / "state")
    try:
        with Network.up(spec, ledger) as net:
            for name, node in net.nodes.items():
                with IPRoute(netns=node.netns, flags=0) as ipr:
                    mtus = {link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_MTU")
                            for link in ipr.get_links()}
                    for intf in net.plan.interfaces[name]:
                        assert mtus[intf.ifname] == 9000, (name, mtus)
            # The datagram leaves the client through its TBF, which drops any frame larger
            # than its burst: a full frame crossing it shows the burst fits the MTU.
            shaped = net.nodes["client"].run(["tc", "qdisc", "show", "dev", "wifi0"]).stdout
            assert "tbf" in shaped, shaped
            wifi_ap = str(net.plan.interface("client", "wifi_ap").peer_address)
            receiver = net.nodes["wifi_ap"].popen(
                [sys.executable, "-c", RECEIVE_ONE, wifi_ap], label="udp receiver",
                stdout=subprocess.PIPE, text=True)
            try:
                assert receiver.stdout is not None
                ready, _, _ = select.select([receiver.stdout], [], [], 10)
                assert ready and receiver.stdout.readline().strip() == "bound"
                sent = net.nodes["client"].run([sys.executable, "-c", SEND_DF, wifi_ap],
                                               timeout=10)
                assert sent.stdout.split() == ["sent", "EMSGSIZE"], sent.stdout + sent.stderr
                out, _ = receiver.communicate(timeout=10)
                assert out.split() == ["received", str(9000 - 28)], out
            finally:
                net.nodes["wifi_ap"].stop(receiver)
    finally:
        ledger.release_all()
        ledger.close()
