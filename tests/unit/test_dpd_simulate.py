"""xlb-dpd --datapath memory --simulate N: N simulated nodes from one process, each its
own API over in-memory maps on its own socket, with a table generation and summary."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc

from lab.daemons import wait_serving
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.dpd.v1 import datapath_pb2_grpc
from xlb.types.v1 import types_pb2


def test_simulated_nodes_serve_their_own_tables(sockdir):
    argv = [sys.executable, "-m", "dpd.main", "--datapath", "memory", "--name", "sim",
            "--simulate", "2", "--listen", f"unix:{sockdir}/sim-{{i}}.sock",
            "--max-services", "64", "--max-backends", "256", "--ct-size", "64"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for i in (0, 1):
            wait_serving(f"unix:{sockdir}/sim-{i}.sock", 60, proc)
        with grpc.insecure_channel(f"unix:{sockdir}/sim-0.sock") as a, \
                grpc.insecure_channel(f"unix:{sockdir}/sim-1.sock") as b:
            one, two = datapath_pb2_grpc.DatapathStub(a), datapath_pb2_grpc.DatapathStub(b)
            before = one.GetServicesSummary(pb.GetServicesSummaryRequest(), timeout=5)
            svc = pb.Service(vip="198.19.0.1", port=80, protocol=types_pb2.PROTOCOL_TCP,
                             endpoints=[types_pb2.Endpoint(address="198.18.1.2", port=80)])
            put = one.PutServices(pb.PutServicesRequest(services=[svc]), timeout=5)
            assert put.generation == before.generation + 1
            assert (put.datapath_id, put.instance_id) == (before.datapath_id,
                                                          before.instance_id)
            again = one.PutServices(pb.PutServicesRequest(services=[svc]), timeout=5)
            assert again.generation == put.generation + 1  # every write call counts
            page = one.ListServicesPage(pb.ListServicesPageRequest(limit=10), timeout=5)
            assert [s.vip for s in page.services] == ["198.19.0.1"] and not page.more
            assert page.generation == again.generation
            other = two.GetServicesSummary(pb.GetServicesSummaryRequest(), timeout=5)
            assert other.services == 0 and other.datapath_id != before.datapath_id
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
