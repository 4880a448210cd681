"""Maglev with real sockets: through dpd's API on one node (listed back, traffic to both
backends, each flow where an independently built table says, kept over a restart), and
through policyd onto two nodes, which send the same flows to the same backend."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from dpd import maglev
from lab import netns
from lab.client import run_tcp_who, run_udp_who
from tests.cluster.conftest import cluster  # noqa: F401 - the two-node fixture
from tests.datapath.test_maglev import flow_hash
from tests.e2e.conftest import VIP
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

MAGLEV = tpb.ALGORITHM_MAGLEV

# N TCP connections from fixed source ports, each asking WHO: {port: backend name}
FIXED_PORTS = r"""
import json, socket, sys
vip, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
for port in range(first, first + n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(3)
    s.bind(("0.0.0.0", port))
    s.connect((vip, 80))
    s.sendall(b"WHO\n")
    out[port] = s.recv(100).decode().split(" ", 1)[0].strip()
    s.close()
print(json.dumps(out))
"""


def service(topo, weights=(1, 1), proto=tpb.PROTOCOL_TCP, port=80):
    return pb.Service(vip=VIP, port=port, protocol=proto, algorithm=MAGLEV,
                      endpoints=[tpb.Endpoint(address=ip, port=8080, weight=w)
                                 for ip, w in zip(topo.backend_ips, weights, strict=False)])


def put(lab, *services):
    return lab.stub.PutServices(pb.PutServicesRequest(services=list(services)), timeout=10)


def test_maglev_service_through_dpd_api(lab):
    put(lab, service(lab.topo), service(lab.topo, proto=tpb.PROTOCOL_UDP, port=53))
    listed = list(lab.stub.ListServices(pb.ListServicesRequest(), timeout=10))
    assert [s.algorithm for s in listed] == [MAGLEV, MAGLEV]
    tcp = run_tcp_who(lab.topo, VIP, 80, count=40)
    assert tcp.get("errors") == 0 and tcp.get("be1", 0) > 0 and tcp.get("be2", 0) > 0, tcp
    udp = run_udp_who(lab.topo, VIP, 53, count=40)
    assert udp.get("errors") == 0 and udp.get("be1", 0) > 0 and udp.get("be2", 0) > 0, udp
    # every flow went where a table built here, independently, sends it
    eps = sorted((ip, 8080, 1) for ip in lab.topo.backend_ips)
    table = maglev.build(eps)
    entries = [e for e in lab.stub.ListConntrack(pb.ListConntrackRequest(), timeout=10)
               if e.direction == pb.DIRECTION_ORIGINAL]
    assert len(entries) >= 40
    for e in entries:
        proto = socket.IPPROTO_TCP if e.protocol == tpb.PROTOCOL_TCP else socket.IPPROTO_UDP
        want = eps[table[flow_hash(e.src, e.dst, e.src_port, e.dst_port, proto) % len(table)]]
        assert (e.nat_address, e.nat_port) == want[:2], e


def test_maglev_weights_and_restart(lab):
    put(lab, service(lab.topo, weights=(1, 0)))
    tcp = run_tcp_who(lab.topo, VIP, 80, count=20)
    assert tcp == {"be1": 20, "errors": 0}, tcp
    put(lab, service(lab.topo, weights=(1, 1)))
    lab.dpd.stop()
    lab.dpd.start()
    listed = list(lab.stub.ListServices(pb.ListServicesRequest(), timeout=10))
    assert [(s.algorithm, [e.weight for e in s.endpoints]) for s in listed] == [(MAGLEV, [1, 1])]
    tcp = run_tcp_who(lab.topo, VIP, 80, count=30)
    assert tcp.get("errors") == 0 and tcp.get("be1", 0) > 0 and tcp.get("be2", 0) > 0, tcp


def test_two_nodes_send_the_same_flows_to_the_same_backend(cluster):  # noqa: F811
    from policyd.client import make_service
    from xlb.policy.v1 import policy_pb2 as ppb

    topo = cluster.topos[0]
    svc = make_service("web", VIP, 80, "tcp", [f"{ip}:8080" for ip in topo.backend_ips],
                       algorithm="maglev")
    cluster.policy.ApplyService(ppb.ApplyServiceRequest(service=svc), timeout=10)
    got = cluster.policy.GetService(ppb.GetServiceRequest(name="web"), timeout=10)
    assert got.algorithm == MAGLEV
    for name in cluster.nodes:
        cluster.wait_state(name, ppb.SYNC_STATE_SYNCED)
        listed = list(cluster.datapath(name).ListServices(pb.ListServicesRequest(), timeout=10))
        assert [s.algorithm for s in listed] == [MAGLEV]
    picks = []
    for t in cluster.topos:
        proc = t.run(t.client_ns, [sys.executable, "-c", FIXED_PORTS, VIP, "21000", "40"],
                     env=netns.python_env(), timeout=120)
        picks.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert picks[0] == picks[1]
    assert set(picks[0].values()) == {"be1", "be2"}
