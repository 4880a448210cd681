"""Node labels and object selectors across two real dpd nodes: each object reaches only
the nodes its selector matches, carries traffic there, and moves when a node is
relabeled; WatchSyncStatus and Watch follow it."""

from __future__ import annotations

import time

import pytest

from lab.client import run_tcp_who
from tests.cluster.conftest import VIP
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

SYNCED = ppb.SYNC_STATE_SYNCED


def service(name: str, port: int, zone: str) -> ppb.Service:
    return ppb.Service(name=name, vip=VIP, port=port, protocol=tpb.PROTOCOL_TCP,
                       endpoints=[tpb.Endpoint(address=f"198.18.{i}.2", port=8080)
                                  for i in (1, 2)],
                       node_selector={"zone": zone})


def ports(cluster, name: str) -> list[int]:
    stub = cluster.datapath(name)
    return sorted(s.port for s in stub.ListServices(dpb.ListServicesRequest(), timeout=5))


def relabel(cluster, name: str, **labels: str) -> None:
    cluster.policy.RegisterNode(ppb.RegisterNodeRequest(node=ppb.Node(
        name=name, address=cluster.nodes[name].address, labels=labels)), timeout=5)


def wait_ports(cluster, name: str, want: list[int], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while ports(cluster, name) != want:
        assert time.monotonic() < end, f"{name} holds {ports(cluster, name)}, not {want}"
        time.sleep(0.1)


def test_objects_reach_only_matching_nodes_and_move_with_labels(cluster):
    relabel(cluster, "node1", zone="east")
    relabel(cluster, "node2", zone="west")
    reply = cluster.policy.ApplyServices(ppb.ApplyServicesRequest(services=[
        service("east-web", 80, "east"), service("west-web", 81, "west")]), timeout=5)
    rule = cluster.policy.ApplyFirewallRule(ppb.ApplyFirewallRuleRequest(rule=ppb.FirewallRule(
        name="west-no-telnet", node_selector={"zone": "west"}, spec=tpb.FirewallRuleSpec(
            priority=10, action=tpb.FIREWALL_ACTION_DROP, match=tpb.FirewallMatch(
                protocol=tpb.PROTOCOL_TCP, dst_ports=tpb.PortRange(first=23, last=23))))),
        timeout=5)
    generation = max(reply.generation, rule.revision)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=generation)
    assert ports(cluster, "node1") == [80] and ports(cluster, "node2") == [81]
    assert cluster.status("node1").firewall_rules == 0
    assert cluster.status("node2").firewall_rules == 1
    east, west = cluster.topos
    seen = run_tcp_who(east, VIP, 80, count=6)
    assert seen.get("errors") == 0 and seen["be1"] == 3 and seen["be2"] == 3, seen
    seen = run_tcp_who(west, VIP, 81, count=6)
    assert seen.get("errors") == 0 and seen["be1"] == 3 and seen["be2"] == 3, seen

    # follow node2's status while it moves east
    stream = cluster.policy.WatchSyncStatus(ppb.WatchSyncStatusRequest(node="node2"),
                                            timeout=60)
    try:
        first = next(stream)
        assert first.node.node == "node2" and first.node.state == SYNCED
        assert next(stream).current
        relabel(cluster, "node2", zone="east")
        wait_ports(cluster, "node2", [80])
        end = time.monotonic() + 20
        while True:  # the relabel's pass shows in the stream: no rules on node2 now
            event = next(stream)
            if event.HasField("node") and event.node.firewall_rules == 0:
                break
            assert time.monotonic() < end, event
    finally:
        stream.cancel()
    assert [n.labels["zone"] for n in cluster.policy.ListNodes(ppb.ListNodesRequest(),
                                                               timeout=5)] == ["east", "east"]
    seen = run_tcp_who(west, VIP, 80, count=6)  # node2 serves the east service now
    assert seen.get("errors") == 0 and seen["be1"] == 3 and seen["be2"] == 3, seen
    assert ports(cluster, "node1") == [80]

    # the west service moves when its selector changes, and Watch sees it
    watch = cluster.policy.Watch(ppb.WatchRequest(from_revision=generation,
                                                  kinds=["service"]), timeout=60)
    try:
        moved = cluster.policy.ApplyService(ppb.ApplyServiceRequest(
            service=service("west-web", 81, "east"), expected_generation=1), timeout=5)
        assert moved.generation == 2
        event = next(watch)
        assert (event.type, event.name, event.revision) == (
            ppb.EVENT_TYPE_PUT, "west-web", moved.revision)
        assert dict(event.service.node_selector) == {"zone": "east"}
    finally:
        watch.cancel()
    for name in cluster.nodes:
        wait_ports(cluster, name, [80, 81])
        cluster.wait_state(name, SYNCED, generation=moved.revision)
