"""A real node: client, lb and two backend namespaces, xlb-dpd attached to the lb's
interfaces, test servers on the backends. Everything is removed afterwards."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.root

VIP = "198.19.0.10"


@dataclass
class Lab:
    topo: object
    dpd: object
    channel: grpc.Channel
    stub: object


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_root()
    from lab.daemons import Dpd
    from lab.servers import start_backends
    from lab.topology import Topology
    from xlb.dpd.v1 import datapath_pb2_grpc

    topo = Topology(backends=2, vip=VIP)
    dpd = None
    channel = None
    try:
        start_backends(topo, port=8080)
        dpd = Dpd("lb", topo.lb_ns, topo.lb_ifaces, topo.workdir,
                  extra=["--max-services", "16", "--max-backends", "64", "--ct-size", "16384"])
        dpd.start()
        channel = grpc.insecure_channel(dpd.address)
        yield Lab(topo, dpd, channel, datapath_pb2_grpc.DatapathStub(channel))
    finally:
        if dpd is not None:  # shown by pytest only when the test failed
            sys.stderr.write(f"--- dpd log ---\n{dpd.log_text()[-6000:]}\n")
        if channel is not None:
            channel.close()
        if dpd is not None:
            dpd.cleanup()
        topo.cleanup()
