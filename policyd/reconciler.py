"""Reconcile the desired services onto every registered node's dpd.

One worker thread per node, each with its own gRPC channel to the node's
``xlb.dpd.v1.Datapath``. A pass is idempotent:

1. take a snapshot of the desired state (generation + services, read atomically),
2. know what the node holds: a *full* pass reads it (``ListServices``); an
   *incremental* pass takes what the node held after the previous successful pass
   (the desired services of that pass),
3. diff, then ``DeleteServices`` and ``PutServices`` the difference in batches,
4. record the snapshot's generation as the node's observed generation.

A change made while a pass runs bumps the generation past the snapshot's, so the node
shows PENDING until the next pass (which the change's wake-up triggers) picks it up.

A pass runs when the worker starts, when woken (every change to the desired state; the
pass starts at once, and changes that land while it runs make one more pass), and every
``resync_interval`` seconds. Passes are full when the worker starts, after a failed
pass, and once ``resync_interval`` has passed since the last full one; the others are
incremental, so a change costs what it changes, not a read-back of every service on the
node (10,000 services stream back in about a second). Full passes repair drift (a node
that restarted empty, a hand edit through dpd's API) within ``resync_interval``. A
failed pass sets the node to ERROR with the error's text and is retried with
exponential backoff (``backoff_initial`` doubling up to ``backoff_max``, reset by a
success); wake-ups do not cut a backoff short.

Deregistering a node stops its worker and leaves the node's datapath as it is: policyd
no longer manages it, and its services keep serving until someone deletes them through
dpd (or registers the node again). Stopping the reconciler closes every channel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import structlog

from policyd.diff import diff_services
from policyd.status import NodeProgress, NodeStatus, node_status
from policyd.store import NodeRecord, Store
from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlbcore.errors import NotFoundError
from xlbcore.service import (
    ServiceKey,
    ServiceSpec,
    ValidationError,
    fill_service,
    fill_service_key,
    parse_service,
    parse_service_key,
)

log = structlog.get_logger()

T = TypeVar("T")


# dpd's gRPC server takes messages up to grpc's default 4 MiB; stay well below it (a
# service with 64 endpoints is ~1.2 KiB, so 5000 of them would not fit in one call).
BATCH_BYTES = 3 * 1024 * 1024


@dataclass(frozen=True)
class ReconcilerSettings:
    resync_interval: float = 10.0  # seconds between passes when nothing happens
    backoff_initial: float = 0.2  # first retry delay after a failed pass
    backoff_max: float = 10.0  # retry delay cap
    batch_size: int = 5000  # services per PutServices / keys per DeleteServices
    batch_bytes: int = BATCH_BYTES  # and at most this many bytes per PutServices
    rpc_timeout: float = 10.0  # deadline of each call to dpd
    coalesce: float = 0.0  # after a wake-up, wait this long for more changes (0: none)

    def __post_init__(self) -> None:
        for name in ("resync_interval", "backoff_initial", "backoff_max", "rpc_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.batch_bytes < 1:
            raise ValueError("batch_bytes must be at least 1")
        if self.coalesce < 0:
            raise ValueError("coalesce must not be negative")


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
    full: bool = True  # the node was read back (ListServices)
    calls: int = 0  # PutServices + DeleteServices calls made
    datapath_id: str = ""  # the node's table identity, from its last reply ("" if none)
    # seconds spent: ListServices (and reading it), diff, building requests, in the calls
    list_s: float = 0.0
    diff_s: float = 0.0
    convert_s: float = 0.0
    rpc_s: float = 0.0


def read_actual(stub: Any, timeout: float) -> dict[ServiceKey, ServiceSpec | None]:
    """The node's services by key; None for an entry that is not a valid service
    (it gets replaced or deleted). Entries without even a valid key are logged and
    left alone: they cannot be addressed."""
    actual: dict[ServiceKey, ServiceSpec | None] = {}
    call = stub.ListServices(datapath_pb2.ListServicesRequest(), timeout=timeout)
    # A stream whose server went away mid-call (GOAWAY during shutdown) has been seen to
    # outlive its deadline; cancel it then, so the pass fails and is retried.
    cancel = getattr(call, "cancel", None)
    watchdog = threading.Timer(timeout + 2.0, cancel) if cancel else None
    if watchdog:
        watchdog.daemon = True
        watchdog.start()
    try:
        for msg in call:
            _read_one(actual, msg)
    finally:
        if watchdog:
            watchdog.cancel()
    return actual


def _read_one(actual: dict[ServiceKey, ServiceSpec | None], msg: Any) -> None:
    try:
        key = parse_service_key(msg)
    except ValidationError as exc:
        log.warning("node.unreadable_service", error=str(exc))
        return
    try:
        actual[key] = parse_service(msg)
    except ValidationError:
        actual[key] = None


def put_requests(
    specs: Iterable[ServiceSpec], max_count: int = 5000, max_bytes: int = BATCH_BYTES
) -> Iterator[datapath_pb2.PutServicesRequest]:
    """PutServices requests for `specs`, in order, each with at most `max_count`
    services and (unless one service alone is bigger) at most `max_bytes` bytes."""
    request = datapath_pb2.PutServicesRequest()
    size = 0
    for spec in specs:
        msg = fill_service(request.services.add(), spec)
        grown = msg.ByteSize() + 8  # + tag and length prefix (generously)
        if len(request.services) > 1 and (
            len(request.services) > max_count or size + grown > max_bytes
        ):
            del request.services[-1]
            yield request
            request = datapath_pb2.PutServicesRequest()
            fill_service(request.services.add(), spec)
            size = 0
        size += grown
    if request.services:
        yield request


def sync_node(
    stub: Any,
    desired: Mapping[ServiceKey, ServiceSpec],
    *,
    known: Mapping[ServiceKey, ServiceSpec | None] | None = None,
    batch_size: int = 5000,
    batch_bytes: int = BATCH_BYTES,
    timeout: float = 10.0,
) -> SyncResult:
    """Make the node behind `stub` (a Datapath stub or a stand-in with the same three
    methods) hold exactly `desired`. `known`: what the node holds, when the caller knows
    (an incremental pass); None reads it with ListServices. Raises grpc.RpcError when a
    call fails."""
    clock = time.perf_counter
    started = clock()
    actual = read_actual(stub, timeout) if known is None else known
    listed = clock()
    plan = diff_services(desired, actual)
    diffed = clock()
    rpc = 0.0
    calls = 0
    datapath_id = ""

    def call(method: Callable[..., Any], request: Any) -> None:
        nonlocal rpc, calls, datapath_id
        before = clock()
        reply = method(request, timeout=timeout)
        rpc += clock() - before
        calls += 1
        datapath_id = getattr(reply, "datapath_id", "") or datapath_id

    for keys in batches(plan.to_delete, batch_size):
        request = datapath_pb2.DeleteServicesRequest()
        for key in keys:
            fill_service_key(request.keys.add(), key)
        call(stub.DeleteServices, request)
    for put in put_requests(plan.to_put, batch_size, batch_bytes):
        call(stub.PutServices, put)
    return SyncResult(
        services=len(desired),
        put=len(plan.to_put),
        deleted=len(plan.to_delete),
        full=known is None,
        calls=calls,
        datapath_id=datapath_id,
        list_s=listed - started,
        diff_s=diffed - listed,
        convert_s=clock() - diffed - rpc,
        rpc_s=rpc,
    )


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
        # What the node held after the last successful pass (None: unknown, read it) and
        # when the next full pass is due (time.monotonic()); used by this thread only.
        self._known: Mapping[ServiceKey, ServiceSpec] | None = None
        self._datapath_id = ""  # the node's table identity from its last reply
        self._full_due = 0.0
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
            if failures:
                self._stop.wait(next_wait(failures, self._settings))
                continue
            delay = max(0.0, self._full_due - time.monotonic())  # until the next full pass
            if self._wake.wait(delay) and self._settings.coalesce and not self._stop.is_set():
                self._stop.wait(self._settings.coalesce)  # let a burst of changes land
        self._log.info("node.worker_stopped")

    def reconcile_once(self) -> bool:
        """One pass; records the outcome. True on success."""
        self._record(last_attempt_ns=time.time_ns())
        now = time.monotonic()
        full = self._known is None or now >= self._full_due
        known, self._known = self._known, None  # unknown until this pass succeeds
        try:
            started = time.perf_counter()
            snapshot = self._store.snapshot()
            snapshot_s = time.perf_counter() - started
            result = sync_node(
                self._stub,
                snapshot.services,
                known=None if full else known,
                batch_size=self._settings.batch_size,
                batch_bytes=self._settings.batch_bytes,
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
        seen, self._datapath_id = self._datapath_id, result.datapath_id or self._datapath_id
        if not full and seen and result.datapath_id and result.datapath_id != seen:
            # The node's table was created anew since we last looked (pins removed, node
            # rebuilt): what we assumed it held is void. Read it back now.
            self._log.warning("node.datapath_replaced", was=seen, now=result.datapath_id)
            return self.reconcile_once()
        self._known = snapshot.services
        if full:
            self._full_due = now + self._settings.resync_interval
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
            full=result.full,
            calls=result.calls,
            seconds=round(time.perf_counter() - started, 4),
            snapshot_s=round(snapshot_s, 4),
            list_s=round(result.list_s, 4),
            diff_s=round(result.diff_s, 4),
            convert_s=round(result.convert_s, 4),
            rpc_s=round(result.rpc_s, 4),
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
