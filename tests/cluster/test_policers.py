"""Policers through policyd onto two real dpd processes: a Policer whose node selector
picks node1 lands there only (read back with ListPolicers; node1's client traffic is
charged to it, node2 has no policer), a policer deleted by hand through node1's dpd is
put back at the next drift check, a change of rate reaches the node, and a delete in
policyd removes it (the interface is no longer policed)."""

from __future__ import annotations

import pytest

from lab.client import run_udp_who
from tests.cluster.conftest import VIP, wait_until
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

SYNCED = ppb.SYNC_STATE_SYNCED


def policers(cluster, name: str) -> dict[str, dpb.Policer]:
    return {p.name: p for p in cluster.datapath(name).ListPolicers(
        dpb.ListPolicersRequest(), timeout=5)}


def generation(cluster) -> int:
    return int(cluster.policy.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5).generation)


def test_a_policer_reaches_the_selected_node_is_repaired_and_removed(cluster):
    svc = cluster.policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
        name="dns", vip=VIP, port=53, protocol=tpb.PROTOCOL_UDP,
        endpoints=[tpb.Endpoint(address=f"198.18.{i}.2", port=8080) for i in (1, 2)])),
        timeout=5)
    node1 = cluster.nodes["node1"]
    cluster.policy.RegisterNode(ppb.RegisterNodeRequest(node=ppb.Node(
        name="node1", address=node1.address, labels={"policed": "yes"})), timeout=5)
    reply = cluster.policy.ApplyPolicer(ppb.ApplyPolicerRequest(policer=ppb.Policer(
        name="c0-in", node_selector={"policed": "yes"},
        spec=ppb.PolicerSpec(rate_bps=100_000_000, burst_bytes=1_000_000,
                             interfaces=["c0"]))), timeout=5)
    assert reply.generation == 1
    st = cluster.wait_state("node1", SYNCED, generation=reply.revision)
    assert st.policers == 1
    got = policers(cluster, "node1")
    assert list(got) == ["c0-in"]
    assert (got["c0-in"].rate_bps, got["c0-in"].burst_bytes, list(got["c0-in"].interfaces)) == (
        100_000_000, 1_000_000, ["c0"])
    st = cluster.wait_state("node2", SYNCED, generation=reply.revision)
    assert (st.policers, policers(cluster, "node2")) == (0, {})
    cluster.wait_state("node1", SYNCED, generation=svc.revision)

    # node1's client traffic is charged to the policer (well under its rate: all passes)
    node1_topo, node2_topo = cluster.topos
    assert run_udp_who(node1_topo, VIP, 53, count=5).get("errors") == 0
    c0 = policers(cluster, "node1")["c0-in"]
    assert c0.passed.packets >= 5 and c0.dropped.packets == 0
    assert run_udp_who(node2_topo, VIP, 53, count=3).get("errors") == 0

    # a hand delete through node1's dpd is repaired at the next drift check
    cluster.datapath("node1").DeletePolicers(dpb.DeletePolicersRequest(names=["c0-in"]),
                                             timeout=5)
    wait_until(lambda: "c0-in" in policers(cluster, "node1"), 15, "node1 repaired")
    wait_until(lambda: cluster.status("node1").drift_repaired_total >= 1, 15, "drift counted")

    # a new rate reaches the node
    reply = cluster.policy.ApplyPolicer(ppb.ApplyPolicerRequest(policer=ppb.Policer(
        name="c0-in", node_selector={"policed": "yes"},
        spec=ppb.PolicerSpec(rate_bps=50_000_000, burst_bytes=1_000_000,
                             interfaces=["c0"])), expected_generation=1), timeout=5)
    assert reply.generation == 2
    cluster.wait_state("node1", SYNCED, generation=reply.revision)
    assert policers(cluster, "node1")["c0-in"].rate_bps == 50_000_000

    # deleted in policyd: gone from node1, its interface no longer policed
    cluster.policy.DeletePolicer(ppb.DeletePolicerRequest(name="c0-in"), timeout=5)
    want = generation(cluster)
    for name in cluster.nodes:
        st = cluster.wait_state(name, SYNCED, generation=want)
        assert (st.policers, policers(cluster, name)) == (0, {})
    assert run_udp_who(node1_topo, VIP, 53, count=3).get("errors") == 0
