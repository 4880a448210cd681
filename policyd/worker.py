"""One node's reconcile worker: a thread whose cost follows what changed, not what exists.

What the worker keeps per node: ``known`` (what it believes the node holds), the node's
table identity (datapath_id, instance_id) and table ``generation`` as last seen (dpd
bumps the generation by one on every write call, whoever makes it), and ``applied``:
the desired-state generation whose changes it has pushed.

- **Change pass** (woken by every change): the store's change log names the keys
  changed since ``applied``; only those are compared with ``known`` and written. The
  requests are bytes built once per service (policyd.nodeclient) and shared by every
  node. O(changed).
- **Drift check** (every ``resync_interval``, jittered): one ``GetSummary`` call
  (``GetServicesSummary`` on a dpd without it); O(1). Each of our writes must move the
  generation by exactly one; a summary or a reply that says otherwise (a hand edit
  through dpd's API, a restart, a new datapath) schedules a read-back.
- **Read-back**: ``ListServicesPage`` pages (each its own call and deadline), at most
  ``readback_concurrency`` pages in flight across all nodes (``ReadGate``). Between
  pages the worker applies pending changes first, so a change never waits behind a
  read-back. A failed page resumes from its cursor. When the last page is in, the
  worker checks that the only writes since the first page were its own (the generation
  moved by exactly their count), overlays them, and compares everything once (the only
  O(services) step, and it follows an O(services) read).
- **Failures**: a failed call sets the node to ERROR at once and the worker backs off
  (exponential, jittered); the channel's connectivity wakes it when the node is READY
  again, cutting the backoff short. What was written before the failure is kept.

Firewall rules and routes go the same way beside services (policyd.objects): the change
pass writes the rules and routes changed since ``applied``, the drift check's one
GetSummary call gives every table's summary (services, firewall, routes), and a table
is read back only when its summary differs from what the worker last saw and did.

``ReconcilerSettings.on_pass``, when set, is called after every pass (in the worker's
thread) with the node's name and a ``PassReport``: what the pass did and how long each
part took. Benchmarks and tests observe passes through it.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import structlog

from policyd.diff import diff_services
from policyd.health import NodeHealth
from policyd.nodeclient import (
    BATCH_BYTES,
    BATCH_COUNT,
    NodeClient,
    Page,
    Summary,
    describe_error,
    open_channel,
    service_body,
)
from policyd.objects import BLOCKLIST, MIRRORS, POLICERS, ROUTES, RULES, ObjectSync
from policyd.status import NodeProgress
from policyd.store import NodeRecord, Store
from xlbcore.service import ServiceKey, ServiceSpec

log = structlog.get_logger()


@dataclass(frozen=True)
class SyncResult:
    services: int  # services the node holds now
    put: int
    deleted: int
    full: bool = True  # the pass compared everything (after a read-back)
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
    # bulk transfers (read-back pages, batches of large writes) in flight, all nodes
    readback_concurrency: int = 4
    page_size: int = 2000  # services per ListServicesPage
    jitter: float = 0.25  # resync and backoff delays vary by +-this fraction
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
        if self.readback_concurrency < 1 or self.page_size < 1:
            raise ValueError("readback_concurrency and page_size must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")


# -- decisions (pure) -------------------------------------------------------------------


def backoff_delay(failures: int, initial: float = 0.2, maximum: float = 10.0) -> float:
    """Delay before the next attempt after `failures` consecutive failures (0: none)."""
    if failures <= 0:
        return 0.0
    return min(maximum, initial * 2.0 ** min(failures - 1, 64))


def jittered(delay: float, fraction: float, rand: Callable[[], float] = random.random) -> float:
    """`delay` varied uniformly by +-`fraction`: workers that start together spread out."""
    return delay * (1.0 + fraction * (2.0 * rand() - 1.0))


class ReadGate:
    """At most `slots` bulk transfers in flight across all workers: read-back pages and
    the batches of large writes (more than ``page_size`` services, e.g. a node refilled
    with everything). A worker that finds no slot for a page registers its wake event and
    goes on with other work (changes); a released slot wakes the longest waiter. Small
    writes (the usual change) never wait for a slot."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self.slots = slots
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()

    def try_acquire(self, wake: threading.Event) -> bool:
        with self._lock:
            if self._free > 0:
                self._free -= 1
                if wake in self._waiters:
                    self._waiters.remove(wake)
                return True
            if wake not in self._waiters:
                self._waiters.append(wake)
            return False

    def acquire(self, event: threading.Event, stop: threading.Event) -> bool:
        """Wait for a slot (False: `stop` was set first)."""
        while not stop.is_set():
            event.clear()
            if self.try_acquire(event):
                return True
            event.wait(0.5)
        self.forget(event)
        return False

    def release(self) -> None:
        with self._lock:
            self._free += 1
            if self._waiters:
                self._waiters.popleft().set()

    def forget(self, wake: threading.Event) -> None:
        with self._lock:
            if wake in self._waiters:
                self._waiters.remove(wake)

    @property
    def in_use(self) -> int:
        with self._lock:
            return self.slots - self._free


def plan_changes(
    keys: Iterable[ServiceKey],
    desired: Mapping[ServiceKey, ServiceSpec | None],
    known: Mapping[ServiceKey, ServiceSpec | None] | None,
) -> tuple[list[ServiceSpec], list[ServiceKey]]:
    """(puts, deletes) that bring `keys` on the node from `known` (None: unknown, write
    every key) to `desired`. O(len(keys))."""
    puts: list[ServiceSpec] = []
    deletes: list[ServiceKey] = []
    for k in keys:
        want = desired.get(k)
        if known is not None and k in known:
            have = known[k]
            if want is None:
                deletes.append(k)
            elif have != want:
                puts.append(want)
        elif want is not None:
            puts.append(want)
        elif known is None:
            deletes.append(k)
    return puts, deletes


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


class _ReadBack:
    """A read-back in progress: pages read so far and our writes since it began."""

    def __init__(self) -> None:
        self.ident: tuple[str, str] | None = None
        self.first_gen = 0
        self.max_gen = 0
        self.after: ServiceKey | None = None
        self.entries: dict[ServiceKey, ServiceSpec | None] = {}
        self.ours: list[int] = []  # generations after our writes (same identity)
        self.touched: dict[ServiceKey, ServiceSpec | None] = {}  # our writes' effect
        self.pages = 0
        self.seconds = 0.0
        self.index: dict[bytes, ServiceSpec] | None = None


class NodeWorker:
    """Reconciles one node in its own thread until stopped."""

    def __init__(
        self,
        node: NodeRecord,
        store: Store,
        settings: ReconcilerSettings,
        channel_factory: Callable[[str], grpc.Channel] = open_channel,
        gate: ReadGate | None = None,
        on_progress: Callable[[str, NodeProgress], None] | None = None,
    ) -> None:
        self.name = node.name
        self.address = node.address
        self.labels = node.labels
        self._labels: dict[str, str] = dict(node.labels)  # this thread's view
        self._relabel_to: dict[str, str] | None = None  # set by relabel(), taken by step()
        self._on_progress = on_progress
        self._reads = 0  # service read-backs finished (the first finds foreign state)
        self._store = store
        self._settings = settings
        self._gate = gate or ReadGate(settings.readback_concurrency)
        self._node = NodeClient.connect(
            node.address,
            channel_factory,
            timeout=settings.rpc_timeout,
            batch_size=settings.batch_size,
            batch_bytes=settings.batch_bytes,
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._slot = threading.Event()  # waiting for a bulk slot (large writes)
        self._lock = threading.Lock()
        self._progress = NodeProgress()
        # Used by this thread only (see the module docstring).
        self._known: dict[ServiceKey, ServiceSpec | None] | None = None
        self._synced = False  # a full compare ran since `known` was last voided
        self._ident: tuple[str, str] | None = None  # (datapath_id, instance_id)
        self._node_gen = 0  # the node's table generation after our last look or write
        self._applied = store.generation  # desired generation whose changes are pushed
        self._need_read = True
        self._readback: _ReadBack | None = None
        self._check_due = 0.0  # time.monotonic() of the next drift check
        self._ready_kick = False  # the channel became READY: cut a backoff short
        self._conn_state: grpc.ChannelConnectivity | None = None
        self._log = log.bind(node=node.name, address=node.address)
        self._rules = ObjectSync(RULES, self._node, store, node.name, self._labels)
        self._routes = ObjectSync(ROUTES, self._node, store, node.name, self._labels)
        self._blocklist = ObjectSync(BLOCKLIST, self._node, store, node.name, self._labels)
        self._mirrors = ObjectSync(MIRRORS, self._node, store, node.name, self._labels)
        self._policers = ObjectSync(POLICERS, self._node, store, node.name, self._labels)
        self._objects: tuple[ObjectSync[Any], ...] = (self._rules, self._routes,
                                                      self._blocklist, self._mirrors,
                                                      self._policers)
        self._no_tables = False  # the node has no GetSummary (GetServicesSummary then)
        self.health = NodeHealth()  # its endpoints' health (policyd/health.py)
        self._thread = threading.Thread(
            target=self._run, name=f"reconcile-{node.name}", daemon=True
        )
        channel = self._node.channel
        if channel is not None:
            channel.subscribe(self._on_connectivity, try_to_connect=True)

    # -- plumbing ------------------------------------------------------------------------

    @property
    def progress(self) -> NodeProgress:
        with self._lock:
            return self._progress

    def _record(self, **changes: Any) -> NodeProgress:
        with self._lock:
            previous = self._progress
            self._progress = progress = replace(previous, **changes)
        if self._on_progress is not None and progress != previous:
            try:
                self._on_progress(self.name, progress)
            except Exception:
                self._log.exception("node.progress_observer_failed")
        return previous

    def relabel(self, labels: tuple[tuple[str, str], ...]) -> None:
        """The node's labels changed: its next step moves the objects with a node
        selector onto or off it (O(objects with a selector))."""
        with self._lock:
            self.labels = labels
            self._relabel_to = dict(labels)
        self._record(relabeling=True)  # PENDING until the objects have moved
        self._wake.set()

    def _relabel_pass(self, labels: dict[str, str]) -> None:
        started = time.perf_counter()
        self._labels.clear()
        self._labels.update(labels)  # shared with the ObjectSyncs
        services, rules, routes = self._store.selected_specs(labels)
        puts, deletes = plan_changes(services, services, self._known)
        calls, rpc_s = self._write(puts, deletes)
        calls += self._rules.apply_changes(rules).calls
        blocklist, mirrors = self._store.selected_xdp(labels)
        calls += self._blocklist.apply_changes(blocklist).calls
        calls += self._mirrors.apply_changes(mirrors).calls
        calls += self._policers.apply_changes(self._store.selected_policers(labels)).calls
        w = self._routes.apply_changes(routes)
        calls += w.calls
        if w.calls:
            self._observe_tables(self._node.tables())
        self._log.info("node.relabeled", labels=labels, put=len(puts), deleted=len(deletes),
                       calls=calls, seconds=round(time.perf_counter() - started, 4))
        with self._lock:
            again = self._relabel_to is not None  # relabeled once more meanwhile
        self._record(relabeling=again, **self._object_status())

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        """grpc's callback (its own thread): READY wakes the worker at once; a lost
        connection is retried right away (grpc's reconnect backoff, under a second)."""
        if self._stop.is_set():
            return
        if state is grpc.ChannelConnectivity.READY:
            self._ready_kick = True
            self._check_due = 0.0
            self._wake.set()
        elif state is not grpc.ChannelConnectivity.CONNECTING:
            self._check_due = 0.0  # connection lost: find out now (ERROR at once)
            self._wake.set()
        self._conn_state = state

    def signal_stop(self, close: bool = True) -> None:
        """Ask the thread to end; an RPC in flight is cancelled by closing the channel
        (``close_channel``, here unless `close` is False)."""
        self._stop.set()
        self._wake.set()
        self._slot.set()
        self._gate.forget(self._wake)
        channel = self._node.channel
        if channel is not None:
            try:
                channel.unsubscribe(self._on_connectivity)
            except Exception:
                pass
        if close:
            self.close_channel()

    def close_channel(self) -> None:
        self._node.close()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._log.warning("node.worker_stuck", timeout=timeout)

    def stop(self, timeout: float | None = 5.0) -> None:
        self.signal_stop()
        self.join(timeout)

    def _observe(self, report: PassReport) -> None:
        observer = self._settings.on_pass
        if observer is None:
            return
        try:
            observer(self.name, report)
        except Exception:
            self._log.exception("node.observer_failed")

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        self._log.info("node.worker_started")
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                busy = self.step()
            except Exception as exc:
                if self._stop.is_set():
                    break
                failures += 1
                self._failed(exc)
                self._backoff(failures)
                continue
            failures = 0
            if busy or self._stop.is_set():
                continue
            delay = max(0.0, self._check_due - time.monotonic())
            if self._wake.wait(delay) and self._settings.coalesce and not self._stop.is_set():
                self._stop.wait(self._settings.coalesce)  # let a burst of changes land
        self._gate.forget(self._wake)
        self._log.info("node.worker_stopped")

    def _backoff(self, failures: int) -> None:
        """Wait out the backoff; a READY channel (or a stop) cuts it short, changes do
        not (the node is failing: they are applied once it answers)."""
        s = self._settings
        end = time.monotonic() + jittered(
            backoff_delay(failures, s.backoff_initial, s.backoff_max), s.jitter)
        self._ready_kick = False
        if self._conn_state is not grpc.ChannelConnectivity.READY:
            # Not connected: a wait-for-ready call connects (grpc retries within 0.2 s)
            # and returns as soon as the node answers.
            try:
                self._node.summary(timeout=max(0.01, end - time.monotonic()),
                                   wait_for_ready=True)
                self._ready_kick = True
            except Exception:
                pass
        while not self._stop.is_set() and not self._ready_kick:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)
            self._wake.clear()
        self._check_due = 0.0  # look at the node first thing

    def _failed(self, exc: BaseException) -> None:
        message = describe_error(exc)
        self._observe(PassReport(time.perf_counter(), time.perf_counter(), self._applied,
                                 0.0, None, message))
        previous = self._record(error=message, last_attempt_ns=time.time_ns())
        if not isinstance(exc, grpc.RpcError):
            self._log.exception("node.sync_crashed", error=message)
        elif message != previous.error:
            self._log.warning("node.sync_failed", error=message)
        else:
            self._log.debug("node.sync_failed", error=message)

    def step(self) -> bool:
        """Do the most urgent piece of work; True when more is waiting. Raises when a
        call fails. Order: a relabel, pending changes, then a read-back page, then the
        drift check."""
        with self._lock:
            relabel, self._relabel_to = self._relabel_to, None
        if relabel is not None:
            try:
                self._relabel_pass(relabel)
            except BaseException:
                with self._lock:  # retried after the backoff (unless relabeled again)
                    if self._relabel_to is None:
                        self._relabel_to = relabel
                raise
            return True
        if self._store.generation > self._applied:
            self._change_pass()
            return True
        for objects in self._objects:
            if objects.need_read:  # a bulk read too: one of the shared slots
                if not self._gate.try_acquire(self._wake):
                    self._check_due = max(self._check_due, time.monotonic()
                                          + self._settings.resync_interval)
                    return False
                try:
                    self._read_objects(objects)
                finally:
                    self._gate.release()
                return True
        if self._need_read or self._readback is not None:
            if self._readback is None:
                self._readback = _ReadBack()
            if not self._gate.try_acquire(self._wake):
                # woken when a slot frees (or by a change); no drift check meanwhile
                self._check_due = max(self._check_due, time.monotonic()
                                      + self._settings.resync_interval)
                return False
            try:
                done = self._read_page(self._readback)
            finally:
                self._gate.release()
            if done:
                self._finish_readback()
            return True
        now = time.monotonic()
        if now >= self._check_due:
            self._check_due = now + jittered(self._settings.resync_interval,
                                             self._settings.jitter)
            self._drift_check()
            return True
        return False

    # -- writes --------------------------------------------------------------------------

    def _seen_write(self, reply: Any) -> bool:
        """Account for one write's reply; False when someone else wrote too (or the node
        is another one now)."""
        ident = (reply.datapath_id, reply.instance_id)
        generation = int(reply.generation)
        ours = ident == self._ident and generation == self._node_gen + 1
        if ident != self._ident:
            self._new_identity(ident)
        elif not ours:
            self._need_read = True  # a write that was not ours: read the node back
        self._node_gen = generation
        rb = self._readback
        if rb is not None and rb.ident == ident:
            rb.ours.append(generation)
        return ours

    def _new_identity(self, ident: tuple[str, str]) -> None:
        if self._ident is not None:
            self._log.warning("node.datapath_replaced", was=self._ident, now=ident)
        self._ident = ident
        self._record(epoch=self._progress.epoch + 1)
        self._no_tables = False  # a new dpd may have GetSummary
        self._known = None  # whatever we believed is void
        self._synced = False
        self._need_read = True
        if self._readback is not None and self._readback.ident not in (None, ident):
            self._readback = None  # restart it on the new table

    def _write(self, puts: list[ServiceSpec], deletes: list[ServiceKey]) -> tuple[int, float]:
        """Delete then put; `known` and a read-back's overlay follow every reply."""
        calls = 0
        seconds = 0.0

        def deleted(reply: Any, keys: list[ServiceKey]) -> None:
            self._seen_write(reply)
            known, rb = self._known, self._readback
            for k in keys:
                if known is not None:
                    known.pop(k, None)
                if rb is not None:
                    rb.touched[k] = None

        def put(reply: Any, specs: list[ServiceSpec]) -> None:
            self._seen_write(reply)
            known, rb = self._known, self._readback
            for spec in specs:
                if known is not None:
                    known[spec.key] = spec
                if rb is not None:
                    rb.touched[spec.key] = spec

        bulk = len(puts) + len(deletes) > self._settings.page_size
        if bulk and not self._gate.acquire(self._slot, self._stop):
            raise grpc.RpcError("stopping")
        try:
            if deletes:
                w = self._node.delete_services(deletes, on_reply=deleted)
                calls, seconds = calls + w.calls, seconds + w.seconds
            if puts:
                w = self._node.put_services(puts, on_reply=put)
                calls, seconds = calls + w.calls, seconds + w.seconds
        finally:
            if bulk:
                self._gate.release()
        if bulk:
            gc.freeze()  # what the node holds is long-lived: out of the GC's full passes
        return calls, seconds

    def _change_pass(self) -> None:
        """Push what changed since ``applied``: O(changed), no snapshot of everything."""
        started = time.perf_counter()
        since = self._applied
        self._record(last_attempt_ns=time.time_ns())
        labels = self._labels
        changed = self._store.changed_specs(self._applied, labels)
        if changed is None:  # the change log does not reach back: compare everything
            generation, services = self._store.read_locked(
                lambda: (self._store.generation, self._store.desired_services(labels)))
            count = len(services)
            keys: Iterable[ServiceKey] = set(services) | set(self._known or ())
            desired: Mapping[ServiceKey, ServiceSpec | None] = services
        else:
            generation, desired, count = changed
            keys = desired
        snapshot_s = time.perf_counter() - started
        diffed = time.perf_counter()
        puts, deletes = plan_changes(keys, desired, self._known)
        planned = time.perf_counter()
        calls, rpc_s = self._write(puts, deletes)
        calls += self._push_objects(since)
        self._applied = generation
        result = SyncResult(
            services=count, put=len(puts), deleted=len(deletes), full=False,
            calls=calls, datapath_id=self._ident[0] if self._ident else "",
            diff_s=planned - diffed, convert_s=time.perf_counter() - planned - rpc_s,
            rpc_s=rpc_s)
        self._synced_at(generation, result, started, snapshot_s)

    # -- firewall rules and routes ---------------------------------------------------------

    def _push_objects(self, since: int) -> int:
        """Write the rules and routes changed after `since`; calls made. After route
        writes, one GetSummary takes the new FIB digest as the baseline (a rule write's
        reply says all there is to know)."""
        calls = 0
        digest_moved = False
        for objects in self._objects:
            made = objects.push(since).calls
            calls += made
            digest_moved = digest_moved or bool(made and objects.kind.digest)
        if digest_moved:
            self._observe_tables(self._node.tables())
        return calls

    def _observe_tables(self, tables: Mapping[str, Any] | None) -> None:
        for objects in self._objects:
            objects.observe(tables)
        self.health.observe(tables, self._node)

    def _read_objects(self, objects: ObjectSync[Any]) -> None:
        """Read one kind back, compare everything once and repair: O(objects), only when
        its summary said so (or at the start)."""
        started = time.perf_counter()
        self._record(last_attempt_ns=time.time_ns())
        w = objects.read_back(self._report_foreign)
        if w is not None and w.calls and objects.kind.digest:
            self._observe_tables(self._node.tables())
        drift: dict[str, Any] = {}
        if w is not None:
            (self._log.info if w.put or w.deleted or w.refused else self._log.debug)(
                "node.objects_read_back", kind=objects.kind.kind, held=objects.count,
                put=w.put, deleted=w.deleted, refused=w.refused,
                seconds=round(time.perf_counter() - started, 4))
            if w.drift is not None:
                drift = self._drift(w.drift, w.put + w.deleted)
        self._record(error="", **self._object_status(), **drift)
        if self._synced and all(o.synced for o in self._objects):
            self._record(observed_generation=self._applied, last_sync_ns=time.time_ns())

    def _drift(self, found: int, repaired: int) -> dict[str, Any]:
        """Status fields after a read-back that was not the node's first."""
        if found:
            self._log.info("node.drift_repaired", found=found, repaired=repaired)
        return {"drift_found": found, "drift_repaired": repaired,
                "drift_repaired_total": self._progress.drift_repaired_total + repaired}

    def _report_foreign(self, kind: str, keys: list[str]) -> None:
        """What the node held that policyd does not want, at its first read: reported
        (status and one event per object) before it is removed."""
        if not keys:
            return
        for key in keys:
            self._log.warning("node.foreign_object", kind=kind, key=key, action="removing")
        foreign = tuple(f for f in self._progress.foreign if f[0] != kind)
        self._record(foreign=foreign + tuple((kind, k) for k in keys))

    def _object_status(self) -> dict[str, Any]:
        return {"firewall_rules": self._rules.count, "routes": self._routes.count,
                "blocklist_prefixes": self._blocklist.count, "mirrors": self._mirrors.count,
                "policers": self._policers.count,
                "errors": tuple(e for o in self._objects for e in o.refused.values())}

    def _synced_at(self, generation: int, result: SyncResult, started: float,
                   snapshot_s: float) -> None:
        self._observe(PassReport(started, time.perf_counter(), generation, snapshot_s, result))
        changes: dict[str, Any] = {"error": "", **self._object_status()}
        if self._synced and all(o.synced for o in self._objects):
            changes.update(observed_generation=generation, last_sync_ns=time.time_ns(),
                           services=result.services)
        previous = self._record(**changes)
        noisy = result.full or previous.error or not previous.last_sync_ns
        (self._log.info if noisy else self._log.debug)(
            "node.synced", generation=generation, services=result.services, put=result.put,
            deleted=result.deleted, full=result.full, calls=result.calls,
            seconds=round(time.perf_counter() - started, 4), list_s=round(result.list_s, 4),
            rpc_s=round(result.rpc_s, 4), synced=self._synced)

    # -- drift ---------------------------------------------------------------------------

    def _drift_check(self) -> None:
        for objects in self._objects:
            objects.retry_refused()
        tables = None if self._no_tables else self._node.tables()
        self._no_tables = tables is None  # an older dpd: asked again after a restart
        services = tables.get("services") if tables is not None else None
        if services is not None:
            summary = Summary(services.datapath_id, services.instance_id, services.generation,
                              services.count)
        else:
            summary = self._node.summary()
        self._observe_tables(tables)
        if summary.ident != self._ident:
            self._new_identity(summary.ident)
            self._node_gen = summary.generation
        elif summary.generation != self._node_gen:
            self._log.info("node.drift_suspected", expected=self._node_gen,
                           generation=summary.generation)
            self._need_read = True
        if not self._need_read:
            previous = self._record(error="", last_attempt_ns=time.time_ns(),
                                    **self._object_status())
            if previous.error and self._synced and all(o.synced for o in self._objects):
                self._record(last_sync_ns=time.time_ns(), observed_generation=self._applied)

    def _read_page(self, rb: _ReadBack) -> bool:
        """Read the next page of `rb`; True when it was the last."""
        before = time.perf_counter()
        if rb.index is None:  # the desired services by their bytes: parse only the others
            rb.index = {service_body(spec): spec
                        for spec in self._store.snapshot().services.values()}
        page: Page = self._node.list_page(rb.after, self._settings.page_size, rb.index)
        rb.seconds += time.perf_counter() - before
        if rb.ident is None or page.ident != rb.ident:
            if rb.ident is not None:
                self._log.info("node.readback_restarted", reason="new table")
                self._readback = rb = _ReadBack()
            rb.ident, rb.first_gen = page.ident, page.generation
            if page.ident != self._ident:
                self._new_identity(page.ident)
                self._readback = rb  # _new_identity may have dropped it
                self._node_gen = page.generation
        rb.entries.update(page.services)
        rb.after = page.last
        rb.max_gen = max(rb.max_gen, page.generation)
        rb.pages += 1
        return not page.more

    def _finish_readback(self) -> None:
        rb = self._readback
        assert rb is not None
        started = time.perf_counter()
        self._readback = None
        final = max([rb.max_gen, self._node_gen] if self._ident == rb.ident else [rb.max_gen])
        ours = sum(1 for g in rb.ours if g > rb.first_gen)
        if final - rb.first_gen != ours:
            # someone else wrote while we read: the pages may disagree; read again
            self._log.info("node.readback_raced", first=rb.first_gen, final=final, ours=ours)
            self._need_read = True
            return
        known = rb.entries
        for k, spec in rb.touched.items():
            if spec is None:
                known.pop(k, None)
            else:
                known[k] = spec
        labels = self._labels
        generation, desired = self._store.read_locked(
            lambda: (self._store.generation, self._store.desired_services(labels)))
        for k, spec in known.items():  # share the desired objects: memory per node
            want = desired.get(k)
            if want is not None and want is not spec and want == spec:
                known[k] = want
        self._known = known
        self._node_gen = final
        self._need_read = False
        if len(known) > self._settings.page_size:
            gc.freeze()
        snapshot_s = time.perf_counter() - started
        listed = time.perf_counter()
        plan = diff_services(desired, known)
        diffed = time.perf_counter()
        first = self._reads == 0
        if first:
            self._report_foreign("service", [str(k) for k in plan.to_delete])
        calls, rpc_s = self._write(list(plan.to_put), list(plan.to_delete))
        self._reads += 1
        if not first:
            changes = len(plan.to_put) + len(plan.to_delete)
            self._record(**self._drift(changes, changes))
        if generation > self._applied:  # rules and routes changed meanwhile too
            calls += self._push_objects(self._applied)
        self._applied = max(self._applied, generation)
        self._synced = True
        self._check_due = time.monotonic() + jittered(self._settings.resync_interval,
                                                      self._settings.jitter)
        result = SyncResult(
            services=len(desired), put=len(plan.to_put),
            deleted=len(plan.to_delete), full=True, calls=calls,
            datapath_id=rb.ident[0] if rb.ident else "", list_s=rb.seconds,
            diff_s=diffed - listed, convert_s=time.perf_counter() - diffed - rpc_s,
            rpc_s=rpc_s)
        self._synced_at(generation, result, started, snapshot_s)

