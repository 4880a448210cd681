"""Endpoint health through policyd onto two real nodes (each its own namespaces, dpd and
backends): the check reaches both nodes; a backend killed behind one node is DOWN on
that node only, in GetSyncStatus (counts and with_health) and GetService (node_health)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.cluster.conftest import VIP, Cluster, open_cluster
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root


@pytest.fixture
def hc_cluster() -> Iterator[Cluster]:
    with open_cluster(resync=0.5, prefix="hc", udp_port=0,
                      workdir_prefix="hc-cluster-") as c:
        yield c


def node_health(c: Cluster) -> dict[str, ppb.NodeSyncStatus]:
    reply = c.policy.GetSyncStatus(ppb.GetSyncStatusRequest(with_health=True), timeout=5)
    return {n.node: n for n in reply.nodes}


def wait(c: Cluster, what: str, predicate, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while True:
        got = node_health(c)
        if predicate(got):
            return got
        if time.monotonic() > end:
            raise AssertionError(f"{what}: {got}")
        time.sleep(0.1)


def test_endpoint_health_per_node_through_policyd(hc_cluster):
    c = hc_cluster
    be1, be2 = c.topos[0].backend_ips
    c.policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
        name="web", vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP,
        endpoints=[tpb.Endpoint(address=ip, port=8080) for ip in (be1, be2)],
        health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP, interval_ms=200,
                               timeout_ms=100))), timeout=5)
    wait(c, "both endpoints UP on both nodes",
         lambda s: all(n.endpoints_up == 2 for n in s.values()) and len(s) == 2)

    c.procs[0][1].send_signal(signal.SIGKILL)  # be2 behind node1 only
    got = wait(c, "be2 DOWN on node1", lambda s: s["node1"].endpoints_down == 1)
    assert (got["node2"].endpoints_up, got["node2"].endpoints_down) == (2, 0)
    (svc,) = got["node1"].service_health
    assert svc.service == "web"
    assert [(e.address, e.health) for e in svc.endpoints] == [
        (be1, tpb.HEALTH_STATE_UP), (be2, tpb.HEALTH_STATE_DOWN)]
    assert svc.endpoints[1].reason == "Connection refused"
    stored = c.policy.GetService(ppb.GetServiceRequest(name="web"), timeout=5)
    by_node = {n.node: [e.health for e in n.endpoints] for n in stored.node_health}
    assert by_node == {"node1": [tpb.HEALTH_STATE_UP, tpb.HEALTH_STATE_DOWN],
                       "node2": [tpb.HEALTH_STATE_UP, tpb.HEALTH_STATE_UP]}
    # health moved no service generation: both nodes stay SYNCED, nothing was repaired
    assert all(n.state == ppb.SYNC_STATE_SYNCED for n in got.values())
