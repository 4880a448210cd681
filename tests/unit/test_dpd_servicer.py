"""dpd's gRPC API over in-memory maps (no root): status codes, short error messages,
all-or-nothing batches, GetNode and GetStats."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.unit.conftest import MemoryDatapathServicer, serve_datapath
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb


@pytest.fixture
def dpd(sockdir: Path) -> Iterator[tuple[MemoryDatapathServicer, object]]:
    servicer = MemoryDatapathServicer()
    with contextlib.closing(servicer), serve_datapath(sockdir, servicer) as stub:
        yield servicer, stub


def svc(i: int, vip: str = "") -> pb.Service:
    return pb.Service(vip=vip or f"198.19.{i // 200}.{1 + i % 200}", port=80,
                      protocol=tpb.PROTOCOL_TCP,
                      endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080)])


def test_bad_input_is_invalid_argument_with_a_short_message(dpd):
    servicer, stub = dpd
    with pytest.raises(grpc.RpcError) as err:
        stub.PutServices(pb.PutServicesRequest(services=[svc(0), svc(1, vip="9" * 100_000)]),
                         timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "services[1].vip" in err.value.details() and len(err.value.details()) < 200
    assert servicer.snapshot() == {}  # the valid one was not written either


def test_a_full_table_is_resource_exhausted_with_nothing_written(dpd):
    servicer, stub = dpd
    stub.PutServices(pb.PutServicesRequest(services=[svc(i) for i in range(1000)]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        stub.PutServices(pb.PutServicesRequest(services=[svc(i) for i in range(1000, 1030)]),
                         timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "24 of 1024 free" in err.value.details()
    assert len(servicer.snapshot()) == 1000


def test_get_node_lists_maps_and_get_stats_the_global_counters(dpd):
    _, stub = dpd
    stub.PutServices(pb.PutServicesRequest(services=[svc(0)]), timeout=5)
    node = stub.GetNode(pb.GetNodeRequest(), timeout=5)
    maps = {m.name: m for m in node.maps}
    assert maps["nat_v4_map"].used == 1 and maps["nat_v4_map"].max_entries == 1024
    assert "tc_packet_func" not in maps and node.services == 1
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert {"pass", "slow_path", "new_flow", "drop_no_endpoint", "drop_ct_insert",
            "tailcall_fail"} <= set(stats.global_counters)
    assert len(stats.services) == 1 and stats.services[0].service.vip == "198.19.0.1"


def test_attach_on_a_node_without_programs_is_failed_precondition(dpd):
    _, stub = dpd
    with pytest.raises(grpc.RpcError) as err:
        stub.AttachInterface(pb.AttachInterfaceRequest(name="veth0"), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
