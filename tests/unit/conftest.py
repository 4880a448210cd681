"""Fixtures for the policyd unit tests: dpd nodes that serve dpd's real API (servicer,
tables, validation) over in-memory maps (dpd.memory), and an in-process policyd.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TextIO, cast

import grpc
import pytest

from dpd.loader import Settings
from dpd.memory import MemoryDatapath
from dpd.node import Node
from dpd.servicer import DatapathServicer
from policyd.client import PolicyClient
from policyd.reconciler import ReconcilerSettings
from policyd.server import PolicydConfig, PolicyServer
from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlbcore.logs import configure_logging
from xlbcore.server import start_server
from xlbcore.service import fill_service

FAST = ReconcilerSettings(
    resync_interval=0.2, backoff_initial=0.05, backoff_max=0.3, rpc_timeout=2.0, coalesce=0.01
)

ServiceTuple = tuple[str, int, int]


def poll_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def memory_node(**settings: Any) -> Node:
    """A dpd node over in-memory maps (16 services, 64 backends, 64 conntrack entries
    unless `settings` say otherwise), no conntrack aging."""
    limits: dict[str, Any] = {"max_services": 16, "max_backends": 64, "ct_size": 64}
    return Node(MemoryDatapath(Settings(name="unit", **{**limits, **settings})),
                ct_aging_interval=0)


class RecordsAttach:
    """Mixed into a module's NoFilters: the interfaces a filter is attached on (`on`)."""

    def __init__(self) -> None:
        super().__init__()
        self.on: set[int] = set()

    def attach(self, ifindex: int) -> None:
        self.on.add(ifindex)

    def detach(self, ifindex: int) -> None:
        self.on.discard(ifindex)


@contextlib.contextmanager
def serve_datapath(sockdir: Path, servicer: DatapathServicer
                   ) -> Iterator[datapath_pb2_grpc.DatapathStub]:
    """`servicer` served on a unix socket in `sockdir`: a stub to it; the channel and the
    server end afterwards (the servicer's node is the caller's to close)."""
    server = start_server(f"unix:{sockdir}/dpd.sock", "xlb.dpd.v1.Datapath",
                          lambda s: datapath_pb2_grpc.add_DatapathServicer_to_server(servicer, s))
    channel = grpc.insecure_channel(server.address)
    try:
        yield datapath_pb2_grpc.DatapathStub(channel)
    finally:
        channel.close()
        server.stop(0)


class MemoryDatapathServicer(DatapathServicer):
    """dpd's real Datapath servicer and tables over in-memory maps (no kernel), counting
    the calls policyd makes; clearing `gate` holds ListServices and ListServicesPage
    (both counted as "ListServices": a read-back) until it is set again."""

    def __init__(self) -> None:
        node = Node(MemoryDatapath(Settings(name="unit", max_services=1024, max_backends=4096,
                                            ct_size=64)), ct_aging_interval=0)
        super().__init__(node)
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {"ListServices": 0, "PutServices": 0, "DeleteServices": 0,
                                      "ListServicesPage": 0, "GetServicesSummary": 0,
                                      "GetSummary": 0, "PutFirewallRules": 0,
                                      "DeleteFirewallRules": 0, "ListFirewallRules": 0,
                                      "PutRoutes": 0, "DeleteRoutes": 0, "ListRoutes": 0}
        # (method, rule names or route prefixes) of every rule and route write, in order
        self.writes: list[tuple[str, list[str]]] = []
        self.flushing: list[list[str]] = []  # rule writes that asked for flush_existing
        self.gate = threading.Event()
        self.gate.set()

    def _count(self, method: str) -> None:
        with self.lock:
            self.calls[method] += 1

    def ListServices(self, request: Any, context: Any) -> Iterator[datapath_pb2.Service]:  # noqa: N802
        self._count("ListServices")
        self.gate.wait(30)
        yield from super().ListServices(request, context)

    def ListServicesPage(self, request: Any, context: Any) -> datapath_pb2.ServicesPage:  # noqa: N802
        self._count("ListServices")
        self._count("ListServicesPage")
        self.gate.wait(30)
        return cast(datapath_pb2.ServicesPage, super().ListServicesPage(request, context))

    def GetServicesSummary(self, request: Any, context: Any) -> datapath_pb2.ServicesSummary:  # noqa: N802
        self._count("GetServicesSummary")
        return cast(datapath_pb2.ServicesSummary, super().GetServicesSummary(request, context))

    def GetSummary(self, request: Any, context: Any) -> datapath_pb2.GetSummaryResponse:  # noqa: N802
        self._count("GetSummary")
        return cast(datapath_pb2.GetSummaryResponse, super().GetSummary(request, context))

    def _wrote(self, method: str, items: list[str], flush: bool = False) -> None:
        with self.lock:
            self.calls[method] += 1
            self.writes.append((method, items))
            if flush:
                self.flushing.append(items)

    def PutFirewallRules(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._wrote("PutFirewallRules", [r.name for r in request.rules], request.flush_existing)
        return super().PutFirewallRules(request, context)

    def DeleteFirewallRules(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._wrote("DeleteFirewallRules", list(request.names))
        return super().DeleteFirewallRules(request, context)

    def ListFirewallRules(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._count("ListFirewallRules")
        yield from super().ListFirewallRules(request, context)

    def PutRoutes(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._wrote("PutRoutes", [r.prefix for r in request.routes])
        return super().PutRoutes(request, context)

    def DeleteRoutes(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._wrote("DeleteRoutes", list(request.prefixes))
        return super().DeleteRoutes(request, context)

    def ListRoutes(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._count("ListRoutes")
        yield from super().ListRoutes(request, context)

    def PutServices(self, request: Any, context: Any) -> datapath_pb2.PutServicesResponse:  # noqa: N802
        self._count("PutServices")
        return cast(datapath_pb2.PutServicesResponse, super().PutServices(request, context))

    def DeleteServices(self, request: Any, context: Any) -> datapath_pb2.DeleteServicesResponse:  # noqa: N802
        self._count("DeleteServices")
        return cast(datapath_pb2.DeleteServicesResponse, super().DeleteServices(request, context))

    def snapshot(self) -> dict[ServiceTuple, datapath_pb2.Service]:
        """What the node's maps hold, as ListServices gives it, by (vip, port, protocol)."""
        out = {}
        for spec in self.node.list_services():
            msg = fill_service(datapath_pb2.Service(), spec)
            out[(msg.vip, msg.port, msg.protocol)] = msg
        return out

    def close(self) -> None:
        self.node.close()


class FakeNode:
    """A dpd serving its real API over in-memory maps on a unix socket; it can be
    stopped and started again (empty: a node whose maps were recreated)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.address = f"unix:{path}"
        self.datapath = MemoryDatapathServicer()
        self._server: grpc.Server | None = None

    def start(self, *, empty: bool = False) -> FakeNode:
        if empty:
            self.datapath.close()
            self.datapath = MemoryDatapathServicer()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        datapath_pb2_grpc.add_DatapathServicer_to_server(self.datapath, server)
        server.add_insecure_port(self.address)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        self.datapath.gate.set()
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (pytest swaps it per test to capture it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True, scope="session")
def _log_to_stderr() -> None:
    """Daemon logs go to stderr, as in production, so stdout stays the CLI's."""
    configure_logging("kv", "debug", stream=cast(TextIO, _CurrentStderr()))


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """The daemons' log output (kv, debug) for one test, instead of stderr."""
    stream = io.StringIO()
    configure_logging("kv", "debug", stream=stream)
    try:
        yield stream
    finally:
        configure_logging("kv", "debug", stream=cast(TextIO, _CurrentStderr()))


@pytest.fixture
def fast() -> ReconcilerSettings:
    """Reconciler settings the policyd fixture uses by default (short intervals)."""
    return FAST


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """wait_for(predicate, timeout=10, what=...) -> the predicate's first truthy value."""
    return poll_until


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="xlbt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_node(sockdir: Path) -> Iterator[Callable[[str], FakeNode]]:
    """fake_node(name) -> a FakeNode (not started) whose socket lives in sockdir."""
    nodes: list[FakeNode] = []

    def make(name: str) -> FakeNode:
        node = FakeNode(sockdir / f"{name}.sock")
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


@pytest.fixture
def policyd(sockdir: Path, tmp_path: Path) -> Iterator[Callable[..., PolicyServer]]:
    """policyd(db=None, settings=FAST, interceptors=()) -> a started in-process PolicyServer."""
    servers: list[PolicyServer] = []

    def start(db: Path | None = None, settings: ReconcilerSettings = FAST,
              interceptors: tuple[grpc.ServerInterceptor, ...] = ()) -> PolicyServer:
        config = PolicydConfig(
            listen=f"unix:{sockdir}/policyd.sock",
            db_path=str(db or tmp_path / "policyd.db"),
            reconciler=settings,
            interceptors=interceptors,
        )
        server = PolicyServer(config).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def client_for() -> Iterator[Callable[[PolicyServer], PolicyClient]]:
    clients: list[PolicyClient] = []

    def make(server: PolicyServer) -> PolicyClient:
        client = PolicyClient(server.address, timeout=5.0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
