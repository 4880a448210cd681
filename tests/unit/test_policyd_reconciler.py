"""Reconciler decisions without threads or gRPC: backoff, state, one sync pass."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from policyd.nodeclient import (
    BATCH_BYTES,
    BATCH_COUNT,
    NodeClient,
    describe_error,
    encoded_batches,
    service_field,
)
from policyd.status import NodeProgress, SyncState, node_status, sync_state
from policyd.worker import ReconcilerSettings, backoff_delay, sync_node
from xlb.dpd.v1 import datapath_pb2
from xlb.types.v1 import types_pb2
from xlbcore.service import EndpointSpec, Proto, ServiceSpec


def test_backoff_doubles_from_initial_to_cap():
    delays = [backoff_delay(n, 0.2, 10.0) for n in range(9)]
    assert delays == [0.0, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert backoff_delay(10_000, 0.2, 10.0) == 10.0


@pytest.mark.parametrize("field", ["resync_interval", "backoff_initial", "rpc_timeout"])
def test_settings_reject_nonpositive(field):
    with pytest.raises(ValueError, match=field):
        ReconcilerSettings(**{field: 0})


@pytest.mark.parametrize(
    ("progress", "desired", "state"),
    [
        (NodeProgress(), 0, SyncState.PENDING),  # never synced, even at generation 0
        (NodeProgress(observed_generation=3, last_sync_ns=1), 3, SyncState.SYNCED),
        (NodeProgress(observed_generation=3, last_sync_ns=1), 4, SyncState.PENDING),
        (NodeProgress(observed_generation=5, last_sync_ns=1), 4, SyncState.SYNCED),
        (NodeProgress(observed_generation=3, last_sync_ns=1, error="UNAVAILABLE: x"), 3,
         SyncState.ERROR),
    ],
)  # fmt: skip
def test_sync_state(progress, desired, state):
    assert sync_state(progress, desired) is state


def test_node_status_carries_the_progress():
    progress = NodeProgress(observed_generation=2, error="boom", last_sync_ns=5, services=4)
    status = node_status("n1", progress, 3)
    assert (status.node, status.state, status.desired_generation) == ("n1", SyncState.ERROR, 3)
    assert (status.observed_generation, status.message, status.services) == (2, "boom", 4)


class FakeRpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


def test_describe_error():
    assert describe_error(FakeRpcError()) == "UNAVAILABLE: connection refused"
    assert describe_error(ValueError("bad")) == "ValueError: bad"


class StubDatapath:
    """Stands in for a DatapathStub: same three methods, records the calls."""

    def __init__(self, services: list[datapath_pb2.Service] | None = None) -> None:
        self.services = list(services or [])
        self.puts: list[int] = []
        self.deletes: list[list[tuple[str, int, int]]] = []

    def ListServices(self, request: Any, timeout: float) -> list[datapath_pb2.Service]:  # noqa: N802
        return list(self.services)

    def PutServices(self, request: Any, timeout: float) -> None:  # noqa: N802
        self.puts.append(len(request.services))

    def DeleteServices(self, request: Any, timeout: float) -> None:  # noqa: N802
        self.deletes.append([(k.vip, k.port, k.protocol) for k in request.keys])


def spec(i: int) -> ServiceSpec:
    return ServiceSpec(
        f"198.19.{i // 250}.{i % 250 + 1}",
        80,
        Proto.TCP,
        endpoints=(EndpointSpec("198.18.1.2", 80),),
    )


def test_sync_batches_puts():
    desired = {s.key: s for s in (spec(i) for i in range(2500))}
    stub = StubDatapath()
    result = sync_node(NodeClient(stub, batch_size=1000), desired)
    assert stub.puts == [1000, 1000, 500]
    assert stub.deletes == []
    assert (result.services, result.put, result.deleted) == (2500, 2500, 0)


def test_sync_deletes_extra_and_skips_equal():
    keep = spec(1)
    on_node = [
        datapath_pb2.Service(
            vip=keep.vip, port=80, protocol=types_pb2.PROTOCOL_TCP,
            endpoints=[types_pb2.Endpoint(address="198.18.1.2", port=80)],  # weight absent = 1
        ),
        datapath_pb2.Service(
            vip="198.19.9.9", port=53, protocol=types_pb2.PROTOCOL_UDP,
            endpoints=[types_pb2.Endpoint(address="198.18.1.2", port=53)],
        ),
        # no endpoints: not a valid service, but its key is; it is not desired -> deleted
        datapath_pb2.Service(vip="198.19.9.8", port=1, protocol=types_pb2.PROTOCOL_TCP),
        # not even a valid key: left alone
        datapath_pb2.Service(vip="garbage", port=1, protocol=types_pb2.PROTOCOL_TCP),
    ]  # fmt: skip
    stub = StubDatapath(on_node)
    result = sync_node(NodeClient(stub, batch_size=1), {keep.key: keep})
    assert stub.puts == []
    assert stub.deletes == [[("198.19.9.8", 1, 1)], [("198.19.9.9", 53, 2)]]
    assert (result.put, result.deleted, result.services) == (0, 2, 1)


def test_sync_propagates_rpc_errors():
    class Down(StubDatapath):
        def ListServices(self, request: Any, timeout: float) -> list[datapath_pb2.Service]:  # noqa: N802
            raise FakeRpcError()

    with pytest.raises(grpc.RpcError):
        sync_node(NodeClient(Down()), {spec(0).key: spec(0)})


def put_requests(specs: list[ServiceSpec], max_count: int = BATCH_COUNT,
                 max_bytes: int = BATCH_BYTES) -> list[datapath_pb2.PutServicesRequest]:
    """The PutServices requests policyd sends for `specs` (encoded once, as bytes)."""
    return [datapath_pb2.PutServicesRequest.FromString(body) for body, _ in
            encoded_batches([service_field(s) for s in specs], max_count, max_bytes)]


def test_put_requests_split_by_count_and_bytes():
    specs = [spec(i) for i in range(10)]
    assert [len(r.services) for r in put_requests(specs, max_count=4)] == [4, 4, 2]
    one = len(service_field(specs[0]))
    sizes = [len(r.services) for r in put_requests(specs, max_count=100, max_bytes=3 * one)]
    assert sizes == [3, 3, 3, 1]
    # a service bigger than the byte budget still goes, alone
    assert [len(r.services) for r in put_requests(specs[:3], max_bytes=1)] == [1, 1, 1]
    sent = [s for r in put_requests(specs, max_count=3) for s in r.services]
    assert [(s.vip, s.port, s.endpoints[0].weight) for s in sent] == [
        (x.vip, x.port, 1) for x in specs
    ]


def test_default_batches_fit_dpd_message_limit():
    big = [
        ServiceSpec(
            f"198.19.{i // 250}.{i % 250 + 1}",
            80,
            Proto.TCP,
            endpoints=tuple(
                EndpointSpec(f"198.18.{j // 250}.{j % 250 + 1}", 80) for j in range(64)
            ),
        )
        for i in range(3000)
    ]
    requests = put_requests(big)
    assert len(requests) > 1
    assert all(r.ByteSize() <= 4 * 1024 * 1024 for r in requests)
    assert sum(len(r.services) for r in requests) == 3000


def test_sync_with_known_state_skips_listing():
    class NoList(StubDatapath):
        def ListServices(self, request: Any, timeout: float) -> list[datapath_pb2.Service]:  # noqa: N802
            raise AssertionError("an incremental pass must not list the node")

    a, b, c = spec(1), spec(2), spec(3)
    stub = NoList()
    result = sync_node(NodeClient(stub), {a.key: a, c.key: c}, known={a.key: a, b.key: b})
    assert (result.full, result.put, result.deleted) == (False, 1, 1)
    assert stub.puts == [1]
    assert stub.deletes == [[(b.vip, b.port, 1)]]
    desired = {a.key: a}
    nothing = sync_node(NodeClient(stub), desired, known=desired)
    assert (nothing.put, nothing.deleted, nothing.calls) == (0, 0, 0)
