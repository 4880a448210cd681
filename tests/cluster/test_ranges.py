"""A port range through policyd onto a real dpd node (docs/services.md): it lands as
applied (port and port_last), carries TCP to the port the client chose beside an
exact-port service at its first port, and a hand delete through dpd is repaired at the
next drift check."""

from __future__ import annotations

import pytest

from lab.client import run_tcp_who
from tests.cluster.conftest import VIP, open_cluster, wait_until
from tests.e2e.test_ranges import start_port_servers
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root


def test_a_range_through_policyd_lands_carries_traffic_and_is_repaired():
    with open_cluster(nodes=1, prefix="xcr") as c:
        (topo,) = c.topos
        start_port_servers(topo, (8000, 8042))
        reply = c.policy.ApplyServices(ppb.ApplyServicesRequest(services=[
            ppb.Service(name="games", vip=VIP, port=8000, port_last=8099,
                        protocol=tpb.PROTOCOL_TCP,
                        endpoints=[tpb.Endpoint(address="198.18.1.2"),
                                   tpb.Endpoint(address="198.18.2.2")]),
            ppb.Service(name="first", vip=VIP, port=8000, protocol=tpb.PROTOCOL_TCP,
                        endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080)]),
        ]), timeout=5)
        c.wait_state("node1", ppb.SYNC_STATE_SYNCED, generation=reply.generation)
        dpd = c.datapath("node1")

        def held():
            return sorted((s.port, s.port_last, [(e.address, e.port) for e in s.endpoints])
                          for s in dpd.ListServices(dpb.ListServicesRequest(), timeout=5))

        want = [(8000, 0, [("198.18.1.2", 8080)]),
                (8000, 8099, [("198.18.1.2", 0), ("198.18.2.2", 0)])]
        assert held() == want
        assert run_tcp_who(topo, VIP, 8042, count=4) == {"be1:8042": 2, "be2:8042": 2,
                                                         "errors": 0}
        assert run_tcp_who(topo, VIP, 8000, count=2) == {"be1": 2, "errors": 0}

        # (whether a connection in between fails depends on when the next drift check
        # comes: the node's answer is what tells the delete happened)
        gone = dpd.DeleteServices(dpb.DeleteServicesRequest(keys=[tpb.ServiceKey(
            vip=VIP, port=8000, port_last=8099, protocol=tpb.PROTOCOL_TCP)]), timeout=5)
        assert gone.deleted == 1
        wait_until(lambda: held() == want, 15, "the range repaired")
        assert run_tcp_who(topo, VIP, 8042, count=4)["errors"] == 0
