"""policyd replicas on a real etcd, in process (no nodes): one leader takes writes, a
follower serves reads from etcd and refuses writes and sync status with UNAVAILABLE naming
the leader; a stopped leader hands over and the follower carries on from the same state."""

from __future__ import annotations

import time

import grpc
import pytest

from policyd.server import PolicydConfig, PolicyServer
from tests.etcd_server import run_etcd
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.policy.v1 import policy_pb2_grpc
from xlb.types.v1 import types_pb2 as tpb


def service(name: str, port: int, weight: int = 1) -> ppb.Service:
    return ppb.Service(name=name, vip="198.19.0.10", port=port, protocol=tpb.PROTOCOL_TCP,
                       endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080,
                                               weight=weight)])


@pytest.fixture
def replicas(tmp_path):
    with run_etcd() as url:
        servers: list[PolicyServer] = []
        channels: list[grpc.Channel] = []

        def start(name: str) -> policy_pb2_grpc.PolicyStub:
            srv = PolicyServer(PolicydConfig(listen=f"unix:{tmp_path}/{name}.sock",
                                             store=url, replica=name)).start()
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
        follower.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
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
