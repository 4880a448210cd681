"""Endpoint health through policyd onto two real nodes (each its own namespaces, dpd and
backends): the check reaches both nodes; a backend killed behind one node is DOWN on
that node only, in GetSyncStatus (counts and with_health) and GetService (node_health)."""

from __future__ import annotations

import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import require_root
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

VIP = "198.19.0.10"


class HcCluster:
    def __init__(self, policy) -> None:
        self.policy = policy
        self.topos: list = []
        self.procs: list = []  # each node's backend processes
        self.nodes: dict = {}


@pytest.fixture
def hc_cluster() -> Iterator[HcCluster]:
    require_root()
    from lab.daemons import Dpd, Policyd
    from lab.servers import start_backends
    from lab.topology import Topology
    from xlb.policy.v1 import policy_pb2_grpc

    workdir = Path(tempfile.mkdtemp(prefix="hc-cluster-"))
    policyd = Policyd(workdir, resync_interval=0.5)
    channel = None
    c: HcCluster | None = None
    try:
        policyd.start()
        channel = grpc.insecure_channel(policyd.address)
        c = HcCluster(policy_pb2_grpc.PolicyStub(channel))
        for i in (1, 2):
            topo = Topology(backends=2, vip=VIP, prefix="hc" + secrets.token_hex(2))
            c.topos.append(topo)
            c.procs.append(start_backends(topo, port=8080, udp_port=0))
            name = f"node{i}"
            c.nodes[name] = Dpd(name, topo.lb_ns, topo.lb_ifaces, workdir).start()
            c.policy.RegisterNode(ppb.RegisterNodeRequest(
                node=ppb.Node(name=name, address=c.nodes[name].address)), timeout=5)
        yield c
    finally:
        sys.stderr.write(f"--- policyd log ---\n{policyd.log_text()[-4000:]}\n")
        if c is not None:
            for dpd in c.nodes.values():
                dpd.cleanup()
            for topo in c.topos:
                topo.cleanup()
        if channel is not None:
            channel.close()
        policyd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def node_health(c: HcCluster) -> dict[str, ppb.NodeSyncStatus]:
    reply = c.policy.GetSyncStatus(ppb.GetSyncStatusRequest(with_health=True), timeout=5)
    return {n.node: n for n in reply.nodes}


def wait(c: HcCluster, what: str, predicate, timeout: float = 30.0):
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
