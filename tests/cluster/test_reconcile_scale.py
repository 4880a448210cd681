"""Reconciling that costs what changed, on real nodes: hand edits through dpd's API are
found by the cheap drift check and repaired, a node that serves again is reconciled when
its connection is READY (not when its backoff ends), and a change reaches every node
while another node's read-back is stuck."""

from __future__ import annotations

import signal

import pytest

from tests.cluster.conftest import VIP
from tests.cluster.test_reconcile import SYNCED, apply_web, node_services
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

WEB = [(VIP, 80, [("198.18.1.2", 1), ("198.18.2.2", 1)])]


def wait_services(cluster, name, expected, timeout=30.0):
    import time

    end = time.monotonic() + timeout
    while True:
        seen = node_services(cluster, name)
        if seen == expected:
            return
        if time.monotonic() > end:
            raise AssertionError(f"{name} holds {seen}, not {expected}")
        time.sleep(0.1)


def test_hand_edit_through_dpd_is_repaired(cluster):
    svc = apply_web(cluster)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=svc.revision)
    stub = cluster.datapath("node1")
    stub.PutServices(dpb.PutServicesRequest(services=[
        dpb.Service(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP,
                    endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080, weight=9)]),
        dpb.Service(vip=VIP, port=81, protocol=tpb.PROTOCOL_TCP,
                    endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080)]),
    ]), timeout=5)
    assert node_services(cluster, "node1") != WEB
    wait_services(cluster, "node1", WEB)  # resync interval 1 s: the summary moved
    assert node_services(cluster, "node2") == WEB


@pytest.mark.policyd_args("--backoff-initial", "300", "--backoff-max", "300")
def test_node_serving_again_is_synced_without_waiting_out_its_backoff(cluster):
    first = apply_web(cluster)
    cluster.wait_state("node2", SYNCED, generation=first.generation)
    dpd = cluster.nodes["node2"]
    dpd.stop()
    changed = apply_web(cluster, weights=(1, 0))
    cluster.wait_state("node2", ppb.SYNC_STATE_ERROR)  # a 300 s backoff starts
    dpd.start()
    # the channel turns READY: the worker goes at once (well inside 300 s)
    cluster.wait_state("node2", SYNCED, generation=changed.revision, timeout=60)
    assert node_services(cluster, "node2") == [(VIP, 80, [("198.18.1.2", 1),
                                                          ("198.18.2.2", 0)])]


@pytest.mark.nodes(3)
@pytest.mark.policyd_args("--readback-concurrency", "1")
def test_change_lands_everywhere_while_a_read_back_is_stuck(cluster):
    first = apply_web(cluster)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=first.generation)
    frozen = cluster.nodes["node3"]
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)  # its calls hang until their deadline
    try:
        cluster.policy.DeregisterNode(ppb.DeregisterNodeRequest(name="node3"), timeout=5)
        cluster.policy.RegisterNode(ppb.RegisterNodeRequest(
            node=ppb.Node(name="node3", address=frozen.address)), timeout=5)
        # node3's new worker starts with a read-back that hangs, holding the only slot;
        # node1 drifts, so it wants a read-back too, and waits for the slot
        cluster.datapath("node1").DeleteServices(dpb.DeleteServicesRequest(
            keys=[tpb.ServiceKey(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP)]), timeout=5)
        changed = apply_web(cluster, weights=(1, 0))
        for name in ("node1", "node2"):
            cluster.wait_state(name, SYNCED, generation=changed.revision)
        assert cluster.status("node3").observed_generation < changed.revision
        want = [(VIP, 80, [("198.18.1.2", 1), ("198.18.2.2", 0)])]
        assert node_services(cluster, "node1") == want
        assert node_services(cluster, "node2") == want
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    cluster.wait_state("node3", SYNCED, generation=changed.revision)
    assert node_services(cluster, "node3") == want
