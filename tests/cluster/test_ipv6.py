"""IPv6 services through policyd onto real dpd nodes (docs/ipv6.md): one applied with
ApplyService to every node, one by `xlbctl apply -f` of a YAML document (its IPv6
addresses quoted) to the node its selector picks; each lands on its nodes identically
(ListServices), carries TCP and UDP through node1 from its client namespace (ping6 of
the VIP answered too), a hand edit through node1's dpd is repaired at the next drift
check, and a delete in policyd removes it from every node."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from lab import netns
from tests.cluster.conftest import open_cluster, wait_until
from tests.e2e.test_ipv6 import be6, ipv6_links, start_servers
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

VIP6 = "2001:db8:ff::10"
C6 = "2001:db8:10::2"  # node1's client (tests.e2e.test_ipv6.ipv6_links)
SYNCED = ppb.SYNC_STATE_SYNCED
PORT = 9090  # the backends' IPv6 servers (the cluster's IPv4 ones hold 8080)

DNS6 = f"""kind: Service
metadata:
  name: dns6
  node_selector: {{v6dns: "yes"}}
spec:
  vip: "{VIP6}"
  port: 53
  protocol: PROTOCOL_UDP
  endpoints:
    - {{address: "{be6(1)}", port: {PORT}}}
    - {{address: "{be6(2)}", port: {PORT}}}
"""


def held(cluster: Any, name: str) -> dict[tuple[str, int, int], dpb.Service]:
    return {(s.vip, s.port, s.protocol): s for s in cluster.datapath(name).ListServices(
        dpb.ListServicesRequest(), timeout=5)}


def peer6(topo: Any, proto: str, port: int, count: int) -> dict[str, Any]:
    out = netns.run(topo.client_ns, [
        sys.executable, "-m", "lab.peer6", proto, "--vip", VIP6, "--port", str(port),
        "--count", str(count), "--timeout", "2"], env=netns.python_env(),
        cwd=netns.REPO_ROOT, timeout=60 + 2 * count).stdout
    return dict(json.loads(out))


def answered(res: dict[str, Any], port: int) -> dict[str, int]:
    """Answers per backend, each having seen the client's own address (DNAT66) and
    answered from the VIP."""
    assert res["errors"] == 0, res
    for name, peer_seen, _, peer in res["answers"]:
        assert (peer_seen, peer) == (C6, f"[{VIP6}]:{port}"), (name, peer_seen, peer)
    names: dict[str, int] = {}
    for a in res["answers"]:
        names[a[0]] = names.get(a[0], 0) + 1
    return names


def ping6(topo: Any, count: int) -> int:
    res = netns.run(topo.client_ns, ["ping", "-6", "-n", "-c", str(count), "-i", "0.2",
                                     "-W", "1", VIP6], check=False, timeout=30)
    got = [line for line in res.stdout.splitlines() if "received" in line]
    return int(got[0].split(",")[1].split()[0]) if got else 0


def test_ipv6_services_through_policyd_land_carry_traffic_are_repaired_and_removed(tmp_path):
    from policyd import cli

    with open_cluster(nodes=2, prefix="xc6", disable_ipv6=False) as c:
        node1_topo = c.topos[0]
        ipv6_links(node1_topo)
        start_servers(node1_topo, node1_topo.backend_ns, PORT)
        c.policy.RegisterNode(ppb.RegisterNodeRequest(node=ppb.Node(
            name="node1", address=c.nodes["node1"].address, labels={"v6dns": "yes"})),
            timeout=5)

        # web6 through ApplyService (every node), dns6 through xlbctl apply -f (node1)
        web = c.policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
            name="web6", vip=VIP6, port=80, protocol=tpb.PROTOCOL_TCP,
            endpoints=[tpb.Endpoint(address=be6(i), port=PORT, weight=i) for i in (1, 2)])),
            timeout=5)
        doc = tmp_path / "dns6.yaml"
        doc.write_text(DNS6)
        assert cli.main(["--server", c.policyd.address, "apply", "-f", str(doc)]) == 0
        want = int(c.policy.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5).generation)
        assert want > web.revision
        for name in c.nodes:
            c.wait_state(name, SYNCED, generation=want)
        one, two = held(c, "node1"), held(c, "node2")
        tcp, udp = (VIP6, 80, tpb.PROTOCOL_TCP), (VIP6, 53, tpb.PROTOCOL_UDP)
        assert set(one) == {tcp, udp} and set(two) == {tcp}
        assert one[tcp] == two[tcp]  # the same service on both nodes, as applied
        assert [(e.address, e.port, e.weight) for e in one[tcp].endpoints] == [
            (be6(1), PORT, 1), (be6(2), PORT, 2)]
        assert [(e.address, e.port) for e in one[udp].endpoints] == [
            (be6(1), PORT), (be6(2), PORT)]

        # real IPv6 traffic through node1: weights 1:2 over 9 connections, 4 datagrams
        # round-robin; ping6 of the VIP answered by the datapath
        assert answered(peer6(node1_topo, "tcp", 80, 9), 80) == {"be1": 3, "be2": 6}
        assert answered(peer6(node1_topo, "udp", 53, 4), 53) == {"be1": 2, "be2": 2}
        assert ping6(node1_topo, 2) == 2

        # a hand edit through node1's dpd (web6 down to one endpoint) is repaired
        edited = dpb.Service()
        edited.CopyFrom(one[tcp])
        del edited.endpoints[1:]
        # (not read back: the next drift check may come first; the reply says it happened)
        assert c.datapath("node1").PutServices(dpb.PutServicesRequest(services=[edited]),
                                               timeout=5).written == 1
        wait_until(lambda: held(c, "node1")[tcp] == two[tcp], 15, "web6 repaired on node1")
        wait_until(lambda: c.status("node1").drift_repaired_total >= 1, 15, "drift counted")
        assert answered(peer6(node1_topo, "tcp", 80, 3), 80) == {"be1": 1, "be2": 2}

        # deleted in policyd: gone from every node, the VIP no longer answers ping6
        c.policy.DeleteService(ppb.DeleteServiceRequest(name="web6"), timeout=5)
        assert cli.main(["--server", c.policyd.address, "delete", "service", "dns6"]) == 0
        want = int(c.policy.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5).generation)
        for name in c.nodes:
            c.wait_state(name, SYNCED, generation=want)
            assert held(c, name) == {}
        assert ping6(node1_topo, 2) == 0
