"""Services applied to policyd reach every node's datapath; nodes that lose their state
get it back from policyd on their own."""

from __future__ import annotations

import grpc
import pytest

from lab.client import run_tcp_who
from tests.cluster.conftest import VIP
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

SYNCED = ppb.SYNC_STATE_SYNCED


def apply_web(cluster, weights=(1, 1), port=80):
    return cluster.policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
        name="web", vip=VIP, port=port, protocol=tpb.PROTOCOL_TCP,
        endpoints=[tpb.Endpoint(address=f"198.18.{i}.2", port=8080, weight=w)
                   for i, w in enumerate(weights, start=1)],
    )), timeout=5)


def node_services(cluster, name):
    stub = cluster.datapath(name)
    return [(s.vip, s.port, [(e.address, e.weight) for e in s.endpoints])
            for s in stub.ListServices(dpb.ListServicesRequest(), timeout=5)]


def test_applied_service_reaches_every_node_and_carries_traffic(cluster):
    svc = apply_web(cluster)
    for name in cluster.nodes:
        st = cluster.wait_state(name, SYNCED, generation=svc.revision)
        assert st.services == 1
        assert node_services(cluster, name) == [
            (VIP, 80, [("198.18.1.2", 1), ("198.18.2.2", 1)])]
    for topo in cluster.topos:
        seen = run_tcp_who(topo, VIP, 80, count=10)
        assert seen.get("errors") == 0 and seen["be1"] == 5 and seen["be2"] == 5, seen

    changed = apply_web(cluster, weights=(1, 0))
    assert changed.revision > svc.revision
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=changed.revision)
    for topo in cluster.topos:
        assert run_tcp_who(topo, VIP, 80, count=6) == {"be1": 6, "errors": 0}

    cluster.policy.DeleteService(ppb.DeleteServiceRequest(name="web"), timeout=5)
    gen = cluster.policy.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5).generation
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=gen)
        assert node_services(cluster, name) == []


def test_node_rebuilt_with_wiped_pins_gets_services_back_without_any_call(cluster):
    svc = apply_web(cluster)
    cluster.wait_state("node1", SYNCED, generation=svc.revision)
    dpd = cluster.nodes["node1"]
    dpd.kill()
    dpd.wipe_pins()
    dpd.start()
    # no call to policyd or dpd: the periodic resync finds the empty node and fills it
    topo = cluster.topos[0]
    import time

    end = time.monotonic() + 20
    while node_services(cluster, "node1") == [] and time.monotonic() < end:
        time.sleep(0.2)
    assert node_services(cluster, "node1") == [(VIP, 80, [("198.18.1.2", 1), ("198.18.2.2", 1)])]
    seen = run_tcp_who(topo, VIP, 80, count=10)
    assert seen.get("errors") == 0 and seen["be1"] == 5 and seen["be2"] == 5, seen


def test_unreachable_node_reports_error_then_recovers(cluster):
    dpd = cluster.nodes["node2"]
    dpd.stop()
    svc = apply_web(cluster)
    st = cluster.wait_state("node2", ppb.SYNC_STATE_ERROR)
    assert st.message and st.observed_generation < svc.revision
    cluster.wait_state("node1", SYNCED, generation=svc.revision)
    dpd.start()
    cluster.wait_state("node2", SYNCED, generation=svc.revision)
    assert run_tcp_who(cluster.topos[1], VIP, 80, count=4).get("errors") == 0


def test_bad_service_is_refused_by_policyd_and_no_node_changes(cluster):
    apply_web(cluster)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED)
    with pytest.raises(grpc.RpcError) as err:
        cluster.policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
            name="bad", vip="0.0.0.0", port=80, protocol=tpb.PROTOCOL_TCP,
            endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080)])), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    names = [s.name for s in cluster.policy.ListServices(ppb.ListServicesRequest(), timeout=5)]
    assert names == ["web"]


@pytest.mark.resync(60)
def test_rebuilt_node_is_refilled_on_the_next_change_not_the_next_resync(cluster):
    svc = apply_web(cluster)
    cluster.wait_state("node1", SYNCED, generation=svc.revision)
    dpd = cluster.nodes["node1"]
    dpd.kill()
    dpd.wipe_pins()
    dpd.start()
    # policyd still believes node1 holds "web"; the next change's reply carries a new
    # datapath id, which makes policyd read the node back instead of trusting its cache
    other = cluster.policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
        name="dns", vip=VIP, port=53, protocol=tpb.PROTOCOL_UDP,
        endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080)])), timeout=5)
    cluster.wait_state("node1", SYNCED, generation=other.revision, timeout=10)
    assert sorted(s[1] for s in node_services(cluster, "node1")) == [53, 80]
