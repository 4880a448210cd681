"""Reconcile the desired services onto every registered node's dpd.

One worker thread per node, each with its own gRPC channel to the node's
``xlb.dpd.v1.Datapath``. A pass is level-triggered and idempotent:

1. take a snapshot of the desired state (generation + services, read atomically),
2. read what the node holds (``ListServices``),
3. diff, then ``DeleteServices`` and ``PutServices`` the difference in batches,
4. record the snapshot's generation as the node's observed generation.

A change made while a pass runs bumps the generation past the snapshot's, so the node
shows PENDING until the next pass (which the change's wake-up triggers) picks it up.

A pass runs when the worker starts, when woken (every change to the desired state;
bursts coalesce into one pass), and every ``resync_interval`` seconds, which repairs
drift (a node that restarted empty, a hand edit through dpd's API). A failed pass sets
the node to ERROR with the error's text and is retried with exponential backoff
(``backoff_initial`` doubling up to ``backoff_max``, reset by a success); wake-ups do
not cut a backoff short.

Deregistering a node stops its worker and leaves the node's datapath as it is: policyd
no longer manages it, and its services keep serving until someone deletes them through
dpd (or registers the node again). Stopping the reconciler closes every channel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import structlog

from dpd.model import (
    ServiceKey,
    ServiceSpec,
    ValidationError,
    fill_service_key,
    parse_service,
    parse_service_key,
)
from policyd.diff import diff_services
from policyd.errors import NotFoundError
from policyd.messages import spec_to_dpd
from policyd.status import NodeProgress, NodeStatus, node_status
from policyd.store import NodeRecord, Store
from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc

log = structlog.get_logger()

T = TypeVar("T")


@dataclass(frozen=True)
class ReconcilerSettings:
    resync_interval: float = 10.0  # seconds between passes when nothing happens
    backoff_initial: float = 0.2  # first retry delay after a failed pass
    backoff_max: float = 10.0  # retry delay cap
    batch_size: int = 1000  # services per PutServices / keys per DeleteServices
    rpc_timeout: float = 10.0  # deadline of each call to dpd
    coalesce: float = 0.05  # after a wake-up, wait this long for more changes

    def __post_init__(self) -> None:
        for name in ("resync_interval", "backoff_initial", "backoff_max", "rpc_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


# -- decisions (pure) -------------------------------------------------------------------


def backoff_delay(failures: int, initial: float = 0.2, maximum: float = 10.0) -> float:
    """Delay before the next attempt after `failures` consecutive failures (0: none)."""
    if failures <= 0:
        return 0.0
    return min(maximum, initial * 2.0 ** min(failures - 1, 64))


def next_wait(failures: int, settings: ReconcilerSettings) -> float:
    """How long a worker waits before its next pass."""
    if failures:
        return backoff_delay(failures, settings.backoff_initial, settings.backoff_max)
    return settings.resync_interval


def describe_error(exc: BaseException) -> str:
    """A one-line, person-readable reason for a failed pass."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else None
        name = code.name if code is not None else "RPC_ERROR"
        return f"{name}: {details or 'no details'}"
    return f"{type(exc).__name__}: {exc}"


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- one pass ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncResult:
    services: int  # services the node holds now
    put: int
    deleted: int


def read_actual(stub: Any, timeout: float) -> dict[ServiceKey, ServiceSpec | None]:
    """The node's services by key; None for an entry that is not a valid service
    (it gets replaced or deleted). Entries without even a valid key are logged and
    left alone: they cannot be addressed."""
    actual: dict[ServiceKey, ServiceSpec | None] = {}
    for msg in stub.ListServices(datapath_pb2.ListServicesRequest(), timeout=timeout):
        try:
            key = parse_service_key(msg)
        except ValidationError as exc:
            log.warning("node.unreadable_service", error=str(exc))
            continue
        try:
            actual[key] = parse_service(msg)
        except ValidationError:
            actual[key] = None
    return actual


def sync_node(
    stub: Any,
    desired: Mapping[ServiceKey, ServiceSpec],
    *,
    batch_size: int = 1000,
    timeout: float = 10.0,
) -> SyncResult:
    """Make the node behind `stub` (a Datapath stub or a stand-in with the same three
    methods) hold exactly `desired`. Raises grpc.RpcError when a call fails."""
    actual = read_actual(stub, timeout)
    plan = diff_services(desired, actual)
    for keys in batches(plan.to_delete, batch_size):
        request = datapath_pb2.DeleteServicesRequest()
        for key in keys:
            fill_service_key(request.keys.add(), key)
        stub.DeleteServices(request, timeout=timeout)
    for specs in batches(plan.to_put, batch_size):
        stub.PutServices(
            datapath_pb2.PutServicesRequest(services=[spec_to_dpd(s) for s in specs]),
            timeout=timeout,
        )
    return SyncResult(services=len(desired), put=len(plan.to_put), deleted=len(plan.to_delete))


# -- threads ----------------------------------------------------------------------------

CHANNEL_OPTIONS = [
    # grpc's own reconnect backoff defaults to 1 s .. 120 s; keep it within ours so a
    # node that comes back is noticed on the next retry.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class NodeWorker:
    """Reconciles one node in its own thread until stopped."""

    def __init__(
        self,
        node: NodeRecord,
        store: Store,
        settings: ReconcilerSettings,
        channel_factory: Callable[[str], grpc.Channel] = open_channel,
    ) -> None:
        self.name = node.name
        self.address = node.address
        self._store = store
        self._settings = settings
        self._channel = channel_factory(node.address)
        self._stub = datapath_pb2_grpc.DatapathStub(self._channel)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = NodeProgress()
        self._log = log.bind(node=node.name, address=node.address)
        self._thread = threading.Thread(
            target=self._run, name=f"reconcile-{node.name}", daemon=True
        )

    @property
    def progress(self) -> NodeProgress:
        with self._lock:
            return self._progress

    def _record(self, **changes: Any) -> NodeProgress:
        with self._lock:
            previous = self._progress
            self._progress = replace(previous, **changes)
            return previous

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def signal_stop(self) -> None:
        """Ask the thread to end; an RPC in flight is cancelled by closing the channel."""
        self._stop.set()
        self._wake.set()
        self._channel.close()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._log.warning("node.worker_stuck", timeout=timeout)

    def stop(self, timeout: float | None = 5.0) -> None:
        self.signal_stop()
        self.join(timeout)

    def _run(self) -> None:
        self._log.info("node.worker_started")
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            ok = self.reconcile_once()
            if self._stop.is_set():
                break
            failures = 0 if ok else failures + 1
            delay = next_wait(failures, self._settings)
            if failures:
                self._stop.wait(delay)
            elif self._wake.wait(delay) and not self._stop.is_set():
                self._stop.wait(self._settings.coalesce)  # let a burst of changes land
        self._log.info("node.worker_stopped")

    def reconcile_once(self) -> bool:
        """One pass; records the outcome. True on success."""
        self._record(last_attempt_ns=time.time_ns())
        try:
            snapshot = self._store.snapshot()
            result = sync_node(
                self._stub,
                snapshot.services,
                batch_size=self._settings.batch_size,
                timeout=self._settings.rpc_timeout,
            )
        except Exception as exc:
            if self._stop.is_set():
                return False
            message = describe_error(exc)
            previous = self._record(error=message)
            if not isinstance(exc, grpc.RpcError):
                self._log.exception("node.sync_crashed", error=message)
            elif message != previous.error:
                self._log.warning("node.sync_failed", error=message)
            else:
                self._log.debug("node.sync_failed", error=message)
            return False
        previous = self._record(
            observed_generation=snapshot.generation,
            error="",
            last_sync_ns=time.time_ns(),
            services=result.services,
        )
        changed = result.put or result.deleted or previous.error or not previous.last_sync_ns
        (self._log.info if changed else self._log.debug)(
            "node.synced",
            generation=snapshot.generation,
            services=result.services,
            put=result.put,
            deleted=result.deleted,
        )
        return True


class Reconciler:
    """Keeps one NodeWorker per node registered in the store."""

    def __init__(
        self,
        store: Store,
        settings: ReconcilerSettings | None = None,
        channel_factory: Callable[[str], grpc.Channel] = open_channel,
    ) -> None:
        self._store = store
        self._settings = settings or ReconcilerSettings()
        self._channel_factory = channel_factory
        self._workers: dict[str, NodeWorker] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def settings(self) -> ReconcilerSettings:
        return self._settings

    def start(self) -> None:
        self.refresh_nodes()

    def refresh_nodes(self) -> None:
        """Match the workers to the store's nodes: start new ones, restart moved ones
        (address changed), stop removed ones; wake everyone (the generation moved)."""
        stopping: list[NodeWorker] = []
        with self._lock:
            if self._closed:
                return
            nodes = {n.name: n for n in self._store.list_nodes()}
            for name, worker in list(self._workers.items()):
                node = nodes.get(name)
                if node is None or node.address != worker.address:
                    stopping.append(self._workers.pop(name))
                    worker.signal_stop()
            for worker in self._workers.values():
                worker.wake()
            for name, node in nodes.items():
                if name not in self._workers:  # a new worker makes its first pass at once
                    worker = NodeWorker(node, self._store, self._settings, self._channel_factory)
                    self._workers[name] = worker
                    worker.start()
        for worker in stopping:
            worker.join(self._settings.rpc_timeout)

    def wake_all(self) -> None:
        with self._lock:
            for worker in self._workers.values():
                worker.wake()

    def status(self, name: str = "") -> tuple[int, list[NodeStatus]]:
        """(desired generation, status of every node or of node `name`)."""
        with self._lock:
            generation = self._store.generation
            nodes = self._store.list_nodes()
            if name:
                nodes = [n for n in nodes if n.name == name]
                if not nodes:
                    raise NotFoundError(f"node {name!r} not found")
            progress = {
                n.name: self._workers[n.name].progress if n.name in self._workers else None
                for n in nodes
            }
        return generation, [
            node_status(n.name, progress[n.name] or NodeProgress(), generation) for n in nodes
        ]

    def stop(self) -> None:
        """Stop every worker and close its channel. The reconciler stays stopped."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.signal_stop()
        for worker in workers:
            worker.join(self._settings.rpc_timeout)
