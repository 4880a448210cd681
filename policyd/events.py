"""xlb.policy.v1 WatchEvents: every node's events (dpd's WatchEvents) in one stream, each
tagged with its node. A mixin of policyd.servicer.PolicyServicer.

Each client stream opens one dpd WatchEvents per node it asked for (its own threads and
channels, made by the reconciler's channel factory: the same TLS as reconciling), and
merges them into one bounded queue: a client that reads slower than the nodes send
loses events, counted and reported in the stream as a DROPPED event ("dropped N"), as
dpd does. A node whose stream fails (down, restarted) is dialled again every second
while the client stays; its events in between are not replayed. At most
``MAX_WATCHERS`` such streams at once (RESOURCE_EXHAUSTED beyond).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import Exhausted, NotFoundError, ValidationError, quote
from xlbcore.rpc import rpc

if TYPE_CHECKING:
    from policyd.reconciler import Reconciler
    from policyd.store import Store

log = structlog.get_logger("policyd.events")

MAX_WATCHERS = 4
QUEUE = 4096
RETRY = 1.0
WATCHABLE = {v for k, v in tpb.EventKind.items()
             if k not in ("EVENT_KIND_UNSPECIFIED", "EVENT_KIND_DROPPED")}


class Merged:
    """One client's merged stream: a bounded queue fed by one thread per node."""

    def __init__(self, targets: list[tuple[str, str]], kinds: list[int],
                 channel_factory: Callable[[str], grpc.Channel], maxlen: int = QUEUE) -> None:
        self.kinds = kinds
        self.maxlen = maxlen
        self.queue: collections.deque[tpb.Event] = collections.deque()
        self.dropped = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._calls: dict[str, Any] = {}
        self._factory = channel_factory
        self._threads = [threading.Thread(target=self._follow, args=t, daemon=True,
                                          name=f"events-{t[0]}") for t in targets]
        for th in self._threads:
            th.start()

    def put(self, ev: tpb.Event) -> None:
        with self._cond:
            if len(self.queue) >= self.maxlen:
                self.dropped += 1
            else:
                self.queue.append(ev)
            self._cond.notify()

    def _follow(self, node: str, address: str) -> None:
        while not self._stop.is_set():
            channel = self._factory(address)
            try:
                stub = datapath_pb2_grpc.DatapathStub(channel)
                call = stub.WatchEvents(datapath_pb2.WatchEventsRequest(
                    kinds=[tpb.EventKind.ValueType(k) for k in self.kinds]))
                with self._cond:
                    self._calls[node] = call
                if self._stop.is_set():
                    call.cancel()
                for ev in call:
                    ev.node = node
                    if ev.kind == tpb.EVENT_KIND_DROPPED:
                        ev.reason = f"dropped {ev.count} on {node}"
                    self.put(ev)
            except grpc.RpcError as e:
                if not self._stop.is_set():
                    log.info("node_events_lost", node=node, code=e.code().name)  # type: ignore[attr-defined]
            finally:
                with self._cond:
                    self._calls.pop(node, None)
                channel.close()
            self._stop.wait(RETRY)

    def next(self, timeout: float) -> tpb.Event | None:
        with self._cond:
            deadline = time.monotonic() + timeout
            while True:
                if self.dropped:
                    n, self.dropped = self.dropped, 0
                    return tpb.Event(kind=tpb.EVENT_KIND_DROPPED, time_unix_ns=time.time_ns(),
                                     count=n, reason=f"dropped {n}")
                if self.queue:
                    return self.queue.popleft()
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            calls = list(self._calls.values())
            self._cond.notify_all()
        for c in calls:
            c.cancel()
        for th in self._threads:
            th.join(timeout=5)


class NodeEventsRpcs:
    _store: Store
    _reconciler: Reconciler
    POLL: float
    _event_watchers = 0
    _event_lock = threading.Lock()

    @rpc
    def WatchEvents(self, request: Any, context: Any) -> Iterator[tpb.Event]:  # noqa: N802
        kinds = []
        for i, k in enumerate(request.kinds):
            if k not in WATCHABLE:
                raise ValidationError(f"kinds[{i}]: {quote(k)} is not an EventKind to watch "
                                      "(TRAP, FLOW_REFUSED, POLICER_DROP, HEALTH)")
            kinds.append(int(k))
        nodes = {n.name: n.address for n in self._store.list_nodes()}
        for i, name in enumerate(request.nodes):
            if name not in nodes:
                raise NotFoundError(f"nodes[{i}]: no node {quote(name)} is registered")
        wanted = list(dict.fromkeys(request.nodes)) or sorted(nodes)
        with NodeEventsRpcs._event_lock:
            if NodeEventsRpcs._event_watchers >= MAX_WATCHERS:
                raise Exhausted(f"WatchEvents: {MAX_WATCHERS} event watchers already; "
                                "close one first")
            NodeEventsRpcs._event_watchers += 1
        # the reconciler's factory: the nodes' TLS, as reconciling dials them
        factory = self._reconciler.channel_factory
        merged = Merged([(n, nodes[n]) for n in wanted], kinds, factory)
        try:
            while context.is_active():
                ev = merged.next(getattr(self, "POLL", 0.5))
                if ev is not None:
                    yield ev
        finally:
            merged.close()
            with NodeEventsRpcs._event_lock:
                NodeEventsRpcs._event_watchers -= 1
