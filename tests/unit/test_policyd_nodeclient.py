"""A read-back of a node's services ends by its deadline, whatever the node does:
a node that sends GOAWAY (graceful stop) while its stream handler is wedged, and one
that stops at once. (A watchdog timer used to cancel such streams; grpc's core already
enforces the deadline, which this checks.)"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from policyd.nodeclient import read_actual
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.dpd.v1 import datapath_pb2_grpc
from xlb.types.v1 import types_pb2


class _Wedged(datapath_pb2_grpc.DatapathServicer):
    """Streams one service, then blocks, ignoring cancellation."""

    def __init__(self) -> None:
        self.streaming = threading.Event()
        self.release = threading.Event()

    def ListServices(self, request: Any, context: Any) -> Any:  # noqa: N802
        yield pb.Service(vip="198.19.0.1", port=80, protocol=types_pb2.PROTOCOL_TCP)
        self.streaming.set()
        self.release.wait(10)


@pytest.mark.parametrize("grace,limit", [(5.0, 1.5), (0.0, 0.5)])
def test_read_back_ends_by_its_deadline_after_the_nodes_goaway(sockdir: Path, grace, limit):
    servicer = _Wedged()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    datapath_pb2_grpc.add_DatapathServicer_to_server(servicer, server)
    address = f"unix:{sockdir}/dpd.sock"
    server.add_insecure_port(address)
    server.start()
    channel = grpc.insecure_channel(address)
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            read_actual(datapath_pb2_grpc.DatapathStub(channel), timeout=1.0)
        except grpc.RpcError as err:
            outcome["code"] = err.code()
        outcome["at"] = time.monotonic()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert servicer.streaming.wait(5)
        stopped_at = time.monotonic()
        server.stop(grace)  # GOAWAY now; with grace the wedged stream stays open
        reader.join(3)
        assert not reader.is_alive()
        assert outcome["at"] - stopped_at < limit, outcome
        # the deadline, or the node's shutdown when it lands on the same instant
        assert outcome["code"] in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                   grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        servicer.release.set()
        server.stop(0).wait(5)
        channel.close()
