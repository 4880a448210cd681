"""One node's reconcile worker: a thread that makes passes, and the pass itself.

A pass is idempotent:

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

``ReconcilerSettings.on_pass``, when set, is called after every pass (in the worker's
thread) with the node's name and a ``PassReport``: what the pass did and how long each
part took. Benchmarks and tests observe passes through it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import structlog

from policyd.diff import diff_services
from policyd.nodeclient import (
    BATCH_BYTES,
    BATCH_COUNT,
    NodeClient,
    describe_error,
    open_channel,
)
from policyd.status import NodeProgress
from policyd.store import NodeRecord, Store
from xlbcore.service import ServiceKey, ServiceSpec

log = structlog.get_logger()


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


@dataclass(frozen=True)
class PassReport:
    """One pass as ``on_pass`` sees it. Times are ``time.perf_counter()`` values."""

    started: float  # the pass began (before the snapshot)
    ended: float  # the pass ended (the node's calls returned or one failed)
    generation: int  # the snapshot's generation (0 if the snapshot failed)
    snapshot_s: float  # taking the snapshot of the desired state
    result: SyncResult | None  # None: the pass failed
    error: str = ""  # why it failed (as the node's status shows it)


PassObserver = Callable[[str, PassReport], None]


@dataclass(frozen=True)
class ReconcilerSettings:
    resync_interval: float = 10.0  # seconds between passes when nothing happens
    backoff_initial: float = 0.2  # first retry delay after a failed pass
    backoff_max: float = 10.0  # retry delay cap
    batch_size: int = BATCH_COUNT  # services per PutServices / keys per DeleteServices
    batch_bytes: int = BATCH_BYTES  # and at most this many bytes per PutServices
    rpc_timeout: float = 10.0  # deadline of each call to dpd
    coalesce: float = 0.0  # after a wake-up, wait this long for more changes (0: none)
    # called after every pass, in the node's worker thread: on_pass(node name, report)
    on_pass: PassObserver | None = field(default=None, compare=False, repr=False)

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


# -- one pass ---------------------------------------------------------------------------


def sync_node(
    node: NodeClient,
    desired: Mapping[ServiceKey, ServiceSpec],
    *,
    known: Mapping[ServiceKey, ServiceSpec | None] | None = None,
) -> SyncResult:
    """Make `node` hold exactly `desired`. `known`: what the node holds, when the caller
    knows (an incremental pass); None reads it with ListServices. Raises grpc.RpcError
    when a call fails."""
    clock = time.perf_counter
    started = clock()
    actual = node.list_services() if known is None else known
    listed = clock()
    plan = diff_services(desired, actual)
    diffed = clock()
    deletes = node.delete_services(plan.to_delete)
    puts = node.put_services(plan.to_put)
    rpc = deletes.seconds + puts.seconds
    return SyncResult(
        services=len(desired),
        put=len(plan.to_put),
        deleted=len(plan.to_delete),
        full=known is None,
        calls=deletes.calls + puts.calls,
        datapath_id=puts.datapath_id or deletes.datapath_id,
        list_s=listed - started,
        diff_s=diffed - listed,
        convert_s=clock() - diffed - rpc,
        rpc_s=rpc,
    )


# -- the thread -------------------------------------------------------------------------


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
        self._node = NodeClient.connect(
            node.address,
            channel_factory,
            timeout=settings.rpc_timeout,
            batch_size=settings.batch_size,
            batch_bytes=settings.batch_bytes,
        )
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
        self._node.close()

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

    def _observe(self, report: PassReport) -> None:
        observer = self._settings.on_pass
        if observer is None:
            return
        try:
            observer(self.name, report)
        except Exception:
            self._log.exception("node.observer_failed")

    def reconcile_once(self) -> bool:
        """One pass; records the outcome. True on success."""
        self._record(last_attempt_ns=time.time_ns())
        now = time.monotonic()
        full = self._known is None or now >= self._full_due
        known, self._known = self._known, None  # unknown until this pass succeeds
        started = time.perf_counter()
        generation = 0
        snapshot_s = 0.0
        try:
            snapshot = self._store.snapshot()
            snapshot_s = time.perf_counter() - started
            generation = snapshot.generation
            result = sync_node(self._node, snapshot.services, known=None if full else known)
        except Exception as exc:
            message = describe_error(exc)
            self._observe(
                PassReport(started, time.perf_counter(), generation, snapshot_s, None, message)
            )
            if self._stop.is_set():
                return False
            previous = self._record(error=message)
            if not isinstance(exc, grpc.RpcError):
                self._log.exception("node.sync_crashed", error=message)
            elif message != previous.error:
                self._log.warning("node.sync_failed", error=message)
            else:
                self._log.debug("node.sync_failed", error=message)
            return False
        self._observe(PassReport(started, time.perf_counter(), generation, snapshot_s, result))
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
