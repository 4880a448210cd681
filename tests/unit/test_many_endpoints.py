"""1,024 endpoints per service through dpd's and policyd's APIs (no root): 1,024 are
taken and read back, 1,025 are INVALID_ARGUMENT with nothing changed; a full endpoint
map is RESOURCE_EXHAUSTED with the service as it was; and the run allocator behind
ep_map and slot_map (dpd/extents.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dpd.extents import Extents
from dpd.services import ServiceTable
from tests.unit.conftest import MemoryDatapathServicer, serve_datapath
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import Exhausted


def ep_addr(i: int) -> str:
    return f"198.19.{128 + i // 256}.{i % 256}"


def svc(n: int, vip: str = "198.19.0.10", weight: int = 1) -> pb.Service:
    return pb.Service(vip=vip, port=80, protocol=tpb.PROTOCOL_TCP,
                      endpoints=[tpb.Endpoint(address=ep_addr(i), port=8080, weight=weight)
                                 for i in range(n)])


@pytest.fixture
def dpd(sockdir: Path) -> Iterator[tuple[MemoryDatapathServicer, object]]:
    servicer = MemoryDatapathServicer()  # room for 4,096 endpoints
    with contextlib.closing(servicer), serve_datapath(sockdir, servicer) as stub:
        yield servicer, stub


def test_dpd_takes_1024_endpoints_and_refuses_1025(dpd):
    servicer, stub = dpd
    stub.PutServices(pb.PutServicesRequest(services=[svc(1024)]), timeout=10)
    (got,) = list(stub.ListServices(pb.ListServicesRequest(), timeout=10))
    assert sorted(e.address for e in got.endpoints) == sorted(map(ep_addr, range(1024)))
    before = servicer.snapshot()
    with pytest.raises(grpc.RpcError) as err:
        stub.PutServices(pb.PutServicesRequest(services=[svc(1025)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1025 endpoints, at most 1024" in err.value.details()
    assert len(err.value.details()) < 200
    assert servicer.snapshot() == before


def test_a_full_endpoint_map_is_resource_exhausted_and_the_service_stays(dpd):
    servicer, stub = dpd
    table = servicer.node.services
    vips = [f"198.19.0.{10 + i}" for i in range(4)]
    stub.PutServices(pb.PutServicesRequest(services=[svc(1024, v) for v in vips]), timeout=10)
    assert table.ep_space.free_entries() == 0  # 4 x 1,024: ep_map is full
    before = servicer.snapshot()
    held = table.held_selection(next(k for k, _ in table.entries()))
    # a new weight for every endpoint of one service: its new set needs a fresh run
    # beside the old one, and there is none
    with pytest.raises(grpc.RpcError) as err:
        stub.PutServices(pb.PutServicesRequest(services=[svc(1024, vips[0], weight=2)]),
                         timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ep_map" in err.value.details()
    assert servicer.snapshot() == before
    assert table.held_selection(next(k for k, _ in table.entries())) == held
    # room again: the change goes through
    stub.DeleteServices(pb.DeleteServicesRequest(keys=[
        pb.ServiceKey(vip=vips[3], port=80, protocol=tpb.PROTOCOL_TCP)]), timeout=10)
    stub.PutServices(pb.PutServicesRequest(services=[svc(1024, vips[0], weight=2)]),
                     timeout=10)
    assert {e.weight for s in stub.ListServices(pb.ListServicesRequest(), timeout=10)
            if s.vip == vips[0] for e in s.endpoints} == {2}


def test_a_replaced_set_is_not_reused_within_its_grace_and_space_in_grace_waits(dpd):
    """A changed endpoint set's old run is not handed to the next write during its grace
    (a packet may still read it); a put that fits only there waits, never
    RESOURCE_EXHAUSTED; a restarted dpd holds nothing in quarantine."""
    servicer, stub = dpd
    table = servicer.node.services
    now = [1000.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    for space in (table.ep_space, table.slot_space):  # a clock that stands still
        space.quarantine.clock, space.quarantine.sleep = (lambda: now[0]), sleep
    vips = [f"198.19.0.{10 + i}" for i in range(4)]
    stub.PutServices(pb.PutServicesRequest(services=[svc(1024, v) for v in vips[:2]]
                                           + [svc(512, vips[2])]), timeout=10)
    (first,) = [e for _, e in table.entries() if e.spec.vip == vips[0]]
    old_run = range(first.ep_base, first.ep_base + 1024)
    stub.PutServices(pb.PutServicesRequest(services=[svc(1024, vips[0], weight=2)]),
                     timeout=10)  # onto the last free 1,024: the old run in its grace
    assert table.ep_space.quarantined() == 1024
    stub.PutServices(pb.PutServicesRequest(services=[svc(4, vips[3])]), timeout=10)
    (small,) = [e for _, e in table.entries() if e.spec.vip == vips[3]]
    assert small.ep_base not in old_run and slept == []  # first fit would be old_run[0]
    # 1,024 more fit only in the run still in its grace: the put waits, then takes it
    stub.PutServices(pb.PutServicesRequest(services=[svc(1024, vips[2])]), timeout=10)
    assert slept == [pytest.approx(0.005)]
    (third,) = [e for _, e in table.entries() if e.spec.vip == vips[2]]
    assert third.ep_base == old_run[0]
    assert sorted(len(s.endpoints) for s in
                  stub.ListServices(pb.ListServicesRequest(), timeout=10)) == [4, 1024, 1024, 1024]
    # the 512 run just freed is in its grace; a table read back from the maps is not
    assert table.ep_space.quarantined() == 512
    again = ServiceTable(servicer.node.dp)
    assert again.ep_space.quarantined() == 0 and again.slot_space.quarantined() == 0
    assert again.ep_space.free_entries() == table.ep_space.free_entries()


def test_policyd_takes_1024_endpoints_and_refuses_1025(policyd, client_for):
    client = client_for(policyd())
    eps = [f"{ep_addr(i)}:8080" for i in range(1025)]
    client.apply_service("big", "198.19.0.10", 80, "tcp", eps[:1024])
    (got,) = client.list_services()
    assert len(got.endpoints) == 1024
    with pytest.raises(grpc.RpcError) as err:
        client.apply_service("big", "198.19.0.10", 80, "tcp", eps)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1024" in err.value.details() and len(err.value.details()) < 200
    assert [len(s.endpoints) for s in client.list_services()] == [1024]


def test_extents_first_fit_merge_on_free_and_all_or_nothing():
    x = Extents(16, grace_s=0)
    a, b, c = x.alloc(4), x.alloc(4), x.alloc(4)
    assert (a, b, c) == (0, 4, 8) and x.free_entries() == 4
    x.free([(b, 4)])
    assert x.alloc(2) == 4 and x.largest() == 4  # first fit: the hole
    with pytest.raises(Exhausted, match="no room for 5"):
        x.reserve([2, 5])  # 2 would fit, 5 not: neither is held
    assert x.free_entries() == 6
    x.free([(a, 4), (4, 2), (c, 4)])
    assert x.free_entries() == 16 and x.largest() == 16  # merged back into one run
    with pytest.raises(ValueError, match="freed twice"):
        x.free([(3, 2)])


def test_extents_start_from_the_runs_a_restarted_dpd_reads():
    x = Extents(10, used=[(2, 3), (7, 1)])
    assert x.free_entries() == 6 and x.largest() == 2
    assert x.reserve([2, 2, 2]) == [0, 5, 8]
    with pytest.raises(ValueError, match="overlaps"):
        Extents(10, used=[(2, 3), (4, 1)])
