"""A service of 1,024 endpoints on a real node: the backend namespace holds 1,024
addresses (198.19.128.0/22 on its loopback, routed to it from the lb), a server there
answers each TCP connection with the address it was reached on, and 2,048 connections
from the client through the VIP (round-robin) reach every one of the 1,024 addresses
exactly twice; then one endpoint is removed and a 1,023-endpoint round reaches every
address but that one."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from tests.e2e.conftest import VIP, open_lab

pytestmark = pytest.mark.root

N = 1024
PREFIX = "198.19.128.0/22"


def ep_addr(i: int) -> str:
    return f"198.19.{128 + i // 256}.{i % 256}"


# in the backend namespace: each connection is answered with the address it reached
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(c.getsockname()[0].encode() + b"\\n")
    c.close()
"""

# in the client namespace: `count` connections to the VIP, one after the other; the
# answers (or the error) as JSON
CLIENT = """
import json, socket, sys
vip, count = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(count):
    try:
        with socket.create_connection((vip, 80), timeout=2) as c:
            out.append(c.makefile().readline().strip())
    except OSError as e:
        out.append("error: " + type(e).__name__)
print(json.dumps(out))
"""


def addresses_on_backend(topo) -> None:
    """1,024 addresses on the backend's loopback; the lb routes their prefix to it."""
    be = topo.backend_ns[0]
    batch = "".join(f"addr add {ep_addr(i)}/32 dev lo\n" for i in range(N))
    topo.run(be, ["ip", "-batch", "-"], input=batch)
    topo.run(topo.lb_ns, ["ip", "route", "add", PREFIX, "via", topo.backend_ips[0]])


def connect(lab, count: int) -> Counter[str]:
    res = lab.topo.run(lab.topo.client_ns, [sys.executable, "-c", CLIENT, VIP, str(count)],
                       timeout=120)
    return Counter(json.loads(res.stdout))


def put(lab, n: int, skip: int = -1) -> None:
    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.types.v1 import types_pb2 as tpb

    eps = [tpb.Endpoint(address=ep_addr(i), port=8080) for i in range(n) if i != skip]
    lab.stub.PutServices(pb.PutServicesRequest(services=[pb.Service(
        vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP, algorithm=tpb.ALGORITHM_ROUND_ROBIN,
        endpoints=eps)]), timeout=30)


def test_2048_connections_reach_each_of_1024_endpoint_addresses_twice():
    with open_lab(prefix="xme", backends=1, servers=False, before_dpd=addresses_on_backend,
                  extra=["--max-backends", "4096"]) as lab:
        server = lab.topo.popen(lab.topo.backend_ns[0], [sys.executable, "-u", "-c", SERVER],
                                stdout=-1, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        put(lab, N)
        got = connect(lab, 2 * N)
        assert got == Counter({ep_addr(i): 2 for i in range(N)})
        # one endpoint leaves: a round of the others reaches each of them once
        put(lab, N, skip=300)
        got = connect(lab, N - 1)
        assert got == Counter({ep_addr(i): 1 for i in range(N) if i != 300})
