"""policyd replicas on a real etcd, in process (nodes: in-memory dpds): one leader takes
writes, a follower serves reads from etcd and the nodes' sync status as the leader
publishes it, and refuses writes and WatchEvents with UNAVAILABLE naming the leader; a
stopped leader hands over and the follower carries on from the same state."""

from __future__ import annotations

import time

import grpc
import pytest

from policyd.server import PolicydConfig, PolicyServer
from tests.etcd_server import run_etcd
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.policy.v1 import policy_pb2_grpc
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.service import parse_service


def service(name: str, port: int, weight: int = 1) -> ppb.Service:
    return ppb.Service(name=name, vip="198.19.0.10", port=port, protocol=tpb.PROTOCOL_TCP,
                       endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080,
                                               weight=weight)])


@pytest.fixture
def replicas(sockdir, fast):
    with run_etcd() as url:
        servers: list[PolicyServer] = []
        channels: list[grpc.Channel] = []

        def start(name: str) -> policy_pb2_grpc.PolicyStub:
            srv = PolicyServer(PolicydConfig(listen=f"unix:{sockdir}/{name}.sock",
                                             store=url, replica=name,
                                             reconciler=fast)).start()
            servers.append(srv)
            channels.append(grpc.insecure_channel(srv.address))
            return policy_pb2_grpc.PolicyStub(channels[-1])

        try:
            yield start, servers
        finally:
            for ch in channels:
                ch.close()
            for srv in servers:
                srv.stop(0)


def same_status(follower: ppb.GetSyncStatusResponse, leader: ppb.GetSyncStatusResponse
                ) -> bool:
    """The follower's answer (asked first) is the leader's but for times, which are at
    most the leader's and set."""
    a, b = ppb.GetSyncStatusResponse(), ppb.GetSyncStatusResponse()
    a.CopyFrom(follower)
    b.CopyFrom(leader)
    for x, y in zip(a.nodes, b.nodes, strict=False):
        for field in ("last_sync_time", "last_attempt_time"):
            early, late = getattr(x, field).ToNanoseconds(), getattr(y, field).ToNanoseconds()
            if not 0 < early <= late:
                return False
            x.ClearField(field)
            y.ClearField(field)
    return a == b


def until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_follower_reads_refuses_writes_and_takes_over(replicas):
    start, servers = replicas
    leader = start("p1")
    follower = start("p2")
    assert servers[0].election.leading and not servers[1].election.leading

    applied = leader.ApplyService(ppb.ApplyServiceRequest(service=service("web", 80)),
                                  timeout=5)
    assert applied.generation == 1
    got = until(lambda: follower.GetService(ppb.GetServiceRequest(name="web"), timeout=5))
    assert got.endpoints[0].port == 8080 and got.generation == 1
    assert got.revision == applied.revision

    with pytest.raises(grpc.RpcError) as err:
        follower.ApplyService(ppb.ApplyServiceRequest(service=service("dns", 53)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "p2 is a follower" in err.value.details()
    assert f"leader is replica p1 at {servers[0].address}" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        next(follower.WatchEvents(ppb.WatchEventsRequest(), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "WatchEvents goes to the leader" in err.value.details()
    assert [s.name for s in leader.ListServices(ppb.ListServicesRequest(), timeout=5)] == ["web"]

    servers[0].stop(0)  # a graceful stop gives the lease up: the follower's next poll wins
    until(lambda: servers[1].election.leading, timeout=5)
    again = follower.ApplyService(ppb.ApplyServiceRequest(service=service("web", 80, 3)),
                                  timeout=5)
    assert (again.generation, again.revision) == (2, 2)
    assert follower.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5).generation == 2


def test_a_watch_on_a_follower_streams_the_leaders_writes(replicas):
    start, _ = replicas
    leader = start("p1")
    follower = start("p2")
    stream = follower.Watch(ppb.WatchRequest(), timeout=10)
    first = next(stream)  # the (empty) current state ends with CURRENT
    assert first.type == ppb.EVENT_TYPE_CURRENT and first.revision == 0
    leader.ApplyService(ppb.ApplyServiceRequest(service=service("web", 80)), timeout=5)
    leader.DeleteService(ppb.DeleteServiceRequest(name="web"), timeout=5)
    seen = [(e.type, e.revision, e.kind, e.name) for e in (next(stream), next(stream))]
    stream.cancel()
    assert seen == [(ppb.EVENT_TYPE_PUT, 1, "service", "web"),
                    (ppb.EVENT_TYPE_DELETE, 2, "service", "web")]


def test_a_leader_whose_lease_is_gone_stops_and_exits_1(tmp_path):
    """xlb-policyd as a process: its lease revoked behind its back (as when etcd expired
    it), it stops reconciling and exits with status 1 for its supervisor to restart."""
    import json
    import subprocess
    import sys

    from lab.daemons import Policyd
    from policyd.etcd import Etcd

    with run_etcd() as url:
        p = Policyd(tmp_path, extra=["--store", url, "--replica-name", "solo"]).start()
        try:
            etcd = Etcd(url)
            leader = etcd.get(b"/xlb/policyd/leader")
            assert leader is not None and json.loads(leader.value)["name"] == "solo"
            etcd.revoke(leader.lease)
            assert p.proc is not None
            assert p.proc.wait(timeout=15) == 1
            assert "policyd.leadership_lost" in p.log_text()
        except (AssertionError, subprocess.TimeoutExpired):
            sys.stderr.write(p.log_text()[-3000:])
            raise
        finally:
            p.stop()


def test_a_follower_serves_the_nodes_sync_status_the_leader_publishes(replicas, fake_node):
    start, servers = replicas
    leader = start("p1")
    follower = start("p2")
    node = fake_node("n1").start()
    leader.RegisterNode(ppb.RegisterNodeRequest(node=ppb.Node(name="n1",
                                                              address=node.address)),
                        timeout=5)
    web = leader.ApplyService(ppb.ApplyServiceRequest(service=service("web", 80)), timeout=5)

    def status(stub: policy_pb2_grpc.PolicyStub) -> ppb.GetSyncStatusResponse:
        return stub.GetSyncStatus(ppb.GetSyncStatusRequest(node="n1"), timeout=5)

    until(lambda: status(leader).nodes[0].state == ppb.SYNC_STATE_SYNCED)
    # the follower answers what the leader answers, field for field; its times are the
    # leader's as last published (a drift check moves them every resync: 0.2 s here)
    until(lambda: same_status(status(follower), status(leader)))
    got = status(follower)
    assert (got.generation, got.nodes[0].state, got.nodes[0].observed_generation,
            got.nodes[0].services) == (web.revision, ppb.SYNC_STATE_SYNCED, web.revision, 1)

    stream = follower.WatchSyncStatus(ppb.WatchSyncStatusRequest(node="n1"), timeout=20)
    first = next(stream)
    assert first.node.node == "n1" and first.node.state == ppb.SYNC_STATE_SYNCED
    assert next(stream).current
    node.stop()  # the node goes away: the leader's status turns ERROR, and the follower's
    while True:
        event = next(stream)
        if event.HasField("node") and event.node.state == ppb.SYNC_STATE_ERROR:
            break
    stream.cancel()
    assert event.node.message and event.node.message == status(leader).nodes[0].message
    with pytest.raises(grpc.RpcError) as err:
        follower.GetSyncStatus(ppb.GetSyncStatusRequest(node="n9"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_dead_leaders_status_is_not_served_as_current(tmp_path):
    """The records live on the leader's lease: once it is gone (the leader died) a
    replica answers PENDING saying no leader reports, not the last record."""
    from policyd.etcd import Etcd
    from policyd.etcd_store import EtcdStore
    from policyd.ha_status import NO_LEADER, StatusMirror, encode_record
    from policyd.status import NodeStatus, SyncState

    with run_etcd() as url:
        etcd = Etcd(url)
        store = EtcdStore(Etcd(url), b"/t/")
        mirror = StatusMirror(etcd, b"/t/", store)
        try:
            store.register_node("n1", "198.18.0.1:50051")
            mirror.start()
            lease = etcd.grant(30)
            synced = NodeStatus("n1", SyncState.SYNCED, 0, 0, "", 5, 6, 0)
            etcd.put(b"/t/status/n1", encode_record(synced, (2, 1, 0)), lease)
            until(lambda: mirror.status("n1")[1][0].state == SyncState.SYNCED)
            assert mirror.node_health()["n1"].counts() == (2, 1, 0)
            store.apply_service("web", parse_service(service("web", 80)))  # generation 1
            assert mirror.status("n1")[1][0].state == SyncState.PENDING  # synced to 0 only
            etcd.revoke(lease)
            until(lambda: mirror.status("n1")[1][0].message == NO_LEADER)
            assert mirror.status("n1")[0] == 1
            assert mirror.status("n1")[1][0].state == SyncState.PENDING
        finally:
            mirror.close()
            store.close()
            etcd.close()
