"""Endpoint selection with real sockets: session persistence keeps every TCP connection
of one client on one backend (round-robin spreads them without it); a priority group's
backend killed (health check) moves the traffic to the backup group, and it comes back
when the backend does."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import VIP, Lab, open_lab, wait_state
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(prefix="al", backends=3, name="al") as lab:
        yield lab


def who(lab: Lab, port: int, count: int = 24) -> dict[str, int]:
    from lab.client import run_tcp_who

    got = run_tcp_who(lab.topo, VIP, port, count=count)
    assert got.pop("errors", 0) == 0, got
    return got


def test_persistence_keeps_one_clients_connections_on_one_backend(lab):
    eps = [tpb.Endpoint(address=ip, port=8080) for ip in lab.topo.backend_ips]
    lab.stub.PutServices(pb.PutServicesRequest(services=[
        pb.Service(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP, endpoints=eps,
                   persistence_timeout_s=60),
        pb.Service(vip=VIP, port=81, protocol=tpb.PROTOCOL_TCP, endpoints=eps)]), timeout=10)
    (svc,) = [s for s in lab.stub.ListServices(pb.ListServicesRequest(), timeout=5)
              if s.port == 80]
    assert svc.persistence_timeout_s == 60
    sticky = who(lab, 80)
    assert len(sticky) == 1 and sum(sticky.values()) == 24, sticky  # one backend, all 24
    assert set(who(lab, 80, 8)) == set(sticky)  # and again
    spread = who(lab, 81)  # the same client without persistence: round-robin
    assert spread == {"be1": 8, "be2": 8, "be3": 8}, spread


def test_a_killed_backend_moves_traffic_to_the_backup_group_and_back(lab):
    from lab import netns
    from lab.servers import wait_listening

    topo = lab.topo
    be1, be2, be3 = topo.backend_ips
    lab.stub.PutServices(pb.PutServicesRequest(services=[pb.Service(
        vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP,
        endpoints=[tpb.Endpoint(address=be1, port=8080, priority=0),
                   tpb.Endpoint(address=be2, port=8080, priority=1),
                   tpb.Endpoint(address=be3, port=8080, priority=1)],
        health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP, interval_ms=200,
                               timeout_ms=100, rise=2, fall=2))]), timeout=10)
    (svc,) = lab.stub.ListServices(pb.ListServicesRequest(), timeout=5)
    assert {(e.address, e.priority) for e in svc.endpoints} == {(be1, 0), (be2, 1), (be3, 1)}
    for ip in (be1, be2, be3):
        wait_state(lab, ip, tpb.HEALTH_STATE_UP)
    assert who(lab, 80) == {"be1": 24}  # the preferred group alone

    lab.procs[0].send_signal(signal.SIGKILL)
    lab.procs[0].wait(timeout=5)
    wait_state(lab, be1, tpb.HEALTH_STATE_DOWN)
    assert who(lab, 80) == {"be2": 12, "be3": 12}  # the backup group, no failure

    argv = [sys.executable, "-m", "lab.servers", "--name", "be1", "--tcp-port", "8080",
            "--udp-port", "0", "--bind", "0.0.0.0"]
    proc = topo.popen(topo.backend_ns[0], argv, env=netns.python_env())
    wait_listening(topo, topo.backend_ns[0], 8080, "tcp", proc)
    wait_state(lab, be1, tpb.HEALTH_STATE_UP)
    assert who(lab, 80) == {"be1": 24}  # back to the preferred group
