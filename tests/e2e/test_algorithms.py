"""Endpoint selection with real sockets: session persistence keeps every TCP connection
of one client on one backend (round-robin spreads them without it); a priority group's
backend killed (health check) moves the traffic to the backup group, and it comes back
when the backend does."""

from __future__ import annotations

import secrets
import signal
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from tests.conftest import require_root
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

VIP = "198.19.0.10"


class Lab:
    def __init__(self, topo, dpd, stub, procs) -> None:
        self.topo, self.dpd, self.stub, self.procs = topo, dpd, stub, procs


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_root()
    from lab.daemons import Dpd
    from lab.servers import start_backends
    from lab.topology import Topology
    from xlb.dpd.v1 import datapath_pb2_grpc

    topo = Topology(backends=3, vip=VIP, prefix="al" + secrets.token_hex(2))
    dpd = channel = None
    try:
        procs = start_backends(topo, port=8080)
        dpd = Dpd("al", topo.lb_ns, topo.lb_ifaces, topo.workdir,
                  extra=["--max-services", "16", "--max-backends", "64", "--ct-size", "16384"])
        dpd.start()
        channel = grpc.insecure_channel(dpd.address)
        yield Lab(topo, dpd, datapath_pb2_grpc.DatapathStub(channel), procs)
    finally:
        if dpd is not None:
            sys.stderr.write(f"--- dpd log ---\n{dpd.log_text()[-6000:]}\n")
        if channel is not None:
            channel.close()
        if dpd is not None:
            dpd.cleanup()
        topo.cleanup()


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


def wait_state(lab: Lab, address: str, state: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    seen = {}
    while time.monotonic() < end:
        (svc,) = lab.stub.ListServices(pb.ListServicesRequest(), timeout=5)
        seen = {e.address: e.health for e in svc.endpoint_status}
        if seen.get(address) == state:
            return
        time.sleep(0.02)
    raise AssertionError(f"{address} not in state {state} after {deadline}s: {seen}")


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
