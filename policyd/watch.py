"""Watch and WatchSyncStatus: fan-out of changes to a few streaming watchers, each with a
bounded queue (pure Python; the servicer turns them into streams).

- ``Fanout``: watchers, each a ``Watcher`` with a queue of at most ``queue_limit``
  items. Publishing never blocks: a watcher whose queue would pass the bound is marked
  ``overflowed``, its queue dropped, and its stream ends with RESOURCE_EXHAUSTED (it
  watches again from the last revision it saw). At most ``max_watchers`` at once (each
  stream holds one of the server's handler threads): more is RESOURCE_EXHAUSTED.
  ``close`` (policyd stopping) wakes every watcher, whose stream ends with UNAVAILABLE.
- ``ObjectWatch``: the store's committed changes (policyd.store listeners) with a
  history of the last ``history`` changes, so a watcher may resume from a revision
  (the store's generation); the initial state is read under the store's lock together
  with the watcher's registration, so nothing is missed or sent twice.
- ``StatusWatch``: the nodes' status (policyd.status.NodeStatus), published when it
  changes (timestamps aside), and per object when a node starts or stops refusing it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from policyd.status import NodeStatus, ObjectError, SyncState
from policyd.store import Change, Store
from xlbcore.errors import Exhausted, ValidationError, XlbError, quote

E = TypeVar("E")

QUEUE_LIMIT = 10_000  # events a watcher may lag behind before it is dropped
MAX_WATCHERS = 4  # streams of each kind at once (each holds one of 16 gRPC handler threads)
HISTORY = 10_000  # changes kept to resume a Watch from a revision
KINDS = ("service", "firewall_rule", "route", "blocklist", "mirror", "policer")


class OutOfRange(XlbError):
    """A Watch from a revision older than the history (-> OUT_OF_RANGE)."""


class Stopping(XlbError):
    """policyd is stopping (-> UNAVAILABLE)."""


class Watcher(Generic[E]):
    """One stream's queue."""

    def __init__(self, limit: int, accept: Callable[[E], bool]) -> None:
        self.limit = limit
        self.accept = accept
        self.overflowed = False
        self.closed = False
        self._queue: deque[E] = deque()
        self._cond = threading.Condition()

    def push(self, items: Iterable[E]) -> None:
        """Queue what this watcher wants of `items`; never blocks."""
        with self._cond:
            if self.overflowed or self.closed:
                return
            for item in items:
                if not self.accept(item):
                    continue
                if len(self._queue) >= self.limit:
                    self.overflowed = True
                    self._queue.clear()
                    break
                self._queue.append(item)
            self._cond.notify_all()

    def get(self, timeout: float) -> list[E]:
        """What is queued (waiting at most `timeout` for something); raises Exhausted
        when the watcher fell behind, Stopping when closed."""
        with self._cond:
            if not self._queue and not self.overflowed and not self.closed:
                self._cond.wait(timeout)
            if self.overflowed:
                raise Exhausted(f"this watcher fell more than {self.limit} events behind and"
                                " was dropped; watch again from the last revision it saw")
            if self.closed:
                raise Stopping("policyd is stopping; watch again once it is back")
            items = list(self._queue)
            self._queue.clear()
            return items

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)


class Fanout(Generic[E]):
    def __init__(self, queue_limit: int = QUEUE_LIMIT, max_watchers: int = MAX_WATCHERS,
                 what: str = "watchers") -> None:
        self.queue_limit = queue_limit
        self.max_watchers = max_watchers
        self._what = what
        self._watchers: list[Watcher[E]] = []
        self._lock = threading.Lock()
        self.closed = False

    def add(self, accept: Callable[[E], bool] = lambda _item: True) -> Watcher[E]:
        with self._lock:
            if self.closed:
                raise Stopping("policyd is stopping")
            if len(self._watchers) >= self.max_watchers:
                raise Exhausted(f"{len(self._watchers)} {self._what} already; at most"
                                f" {self.max_watchers} at once")
            watcher: Watcher[E] = Watcher(self.queue_limit, accept)
            self._watchers.append(watcher)
            return watcher

    def remove(self, watcher: Watcher[E]) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def publish(self, items: list[E]) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.push(items)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.close()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._watchers)


Event = tuple[int, Change]  # (revision, change)


def check_kinds(kinds: Iterable[str], field: str = "kinds") -> frozenset[str]:
    out = set()
    for i, kind in enumerate(kinds):
        if kind not in KINDS:
            raise ValidationError(f"{field}[{i}]: {quote(kind)} is not one of {', '.join(KINDS)}")
        out.add(kind)
    return frozenset(out)


class ObjectWatch:
    """The store's changes for Watch (see the module docstring)."""

    def __init__(self, store: Store, *, queue_limit: int = QUEUE_LIMIT,
                 max_watchers: int = MAX_WATCHERS, history: int = HISTORY) -> None:
        self._store = store
        self.fanout: Fanout[Event] = Fanout(queue_limit, max_watchers, "watchers")
        self._history: deque[Event] = deque()
        self._history_max = history
        self.floor = store.generation  # the history has every change after this revision
        store.add_listener(self._on_change)

    def _on_change(self, revision: int, changes: list[Change]) -> None:
        # under the store's lock: ordered with subscriptions
        events = [(revision, c) for c in changes]
        self._history.extend(events)
        while len(self._history) > self._history_max:
            dropped, _ = self._history.popleft()
            self.floor = dropped
        self.fanout.publish(events)

    def subscribe(self, from_revision: int, kinds: frozenset[str]
                  ) -> tuple[Watcher[Event], list[Event], int]:
        """(watcher, the events to send first, the revision they reach). From 0: the
        current state as PUT events; from N: the changes after N in the history."""
        wanted = kinds or frozenset(KINDS)

        def accept(event: Event) -> bool:
            return event[1].kind in wanted

        def read() -> tuple[Watcher[Event], list[Event], int]:
            revision = self._store.generation
            if from_revision < 0:
                raise ValidationError(f"from_revision: {from_revision} is negative")
            if from_revision > revision:
                raise OutOfRange(f"from_revision: {from_revision} is ahead of the store's"
                                 f" revision {revision}")
            if from_revision == 0:
                initial: list[Event] = []
                store = self._store
                reads: tuple[tuple[str, Callable[[], list[Any]]], ...] = (
                    ("service", store.list_services), ("firewall_rule", store.list_rules),
                    ("route", store.list_routes), ("blocklist", store.list_blocklists),
                    ("mirror", store.list_mirrors), ("policer", store.list_policers))
                for kind, listing in reads:
                    if kind in wanted:
                        initial.extend((o.revision, Change(kind, o.name, o, False))
                                       for o in listing())
            elif from_revision < self.floor:
                raise OutOfRange(
                    f"from_revision: {from_revision} is older than policyd's history (it"
                    f" reaches back to {self.floor}); watch from 0 for the current state")
            else:
                initial = [e for e in self._history if e[0] > from_revision and accept(e)]
            return self.fanout.add(accept), initial, revision

        return self._store.read_locked(read)

    def close(self) -> None:
        self._store.remove_listener(self._on_change)
        self.fanout.close()


@dataclass(frozen=True)
class ObjectStatus:
    """An object's status on a node (xlb.policy.v1.ObjectSyncStatus)."""

    node: str
    kind: str
    name: str
    state: SyncState
    message: str = ""


# (desired revision, what): a node's status, an object's, or the name of a removed node
StatusEvent = tuple[int, NodeStatus | ObjectStatus | str]


def _comparable(status: NodeStatus) -> NodeStatus:
    return replace(status, last_sync_ns=0, last_attempt_ns=0)


class StatusWatch:
    """The nodes' status for WatchSyncStatus: what changed, as it changes."""

    def __init__(self, *, queue_limit: int = QUEUE_LIMIT,
                 max_watchers: int = MAX_WATCHERS) -> None:
        self.fanout: Fanout[StatusEvent] = Fanout(queue_limit, max_watchers, "status watchers")
        self._last: dict[str, NodeStatus] = {}
        self._lock = threading.Lock()

    def update(self, status: NodeStatus) -> None:
        """A node's status now; published when it differs from the last one (timestamps
        aside), with an ObjectStatus for each object it started or stopped refusing."""
        with self._lock:
            previous = self._last.get(status.node)
            if previous is not None and _comparable(previous) == _comparable(status):
                return
            self._last[status.node] = status
            events: list[StatusEvent] = [(status.desired_generation, status)]
            events.extend((status.desired_generation, o)
                          for o in object_changes(status.node,
                                                  previous.errors if previous else (),
                                                  status.errors))
            self.fanout.publish(events)

    def removed(self, node: str, generation: int) -> None:
        with self._lock:
            if self._last.pop(node, None) is not None:
                self.fanout.publish([(generation, node)])

    def subscribe(self, node: str, current: Mapping[str, NodeStatus]
                  ) -> tuple[Watcher[StatusEvent], list[StatusEvent]]:
        """(watcher, the events to send first: every node's status now and its objects
        in ERROR). `current`: the reconciler's statuses now."""

        def accept(event: StatusEvent) -> bool:
            what = event[1]
            name = what if isinstance(what, str) else what.node
            return not node or name == node

        with self._lock:
            initial: list[StatusEvent] = []
            for now in current.values():
                status = self._last.setdefault(now.node, now)  # the last one published
                event: StatusEvent = (status.desired_generation, status)
                if accept(event):
                    initial.append(event)
                    initial.extend((status.desired_generation, o)
                                   for o in object_changes(status.node, (), status.errors))
            return self.fanout.add(accept), initial

    def close(self) -> None:
        self.fanout.close()


def object_changes(node: str, before: Iterable[ObjectError],
                   after: Iterable[ObjectError]) -> list[ObjectStatus]:
    """ERROR for each object refused now and not before (or with another reason),
    SYNCED for each refused before and not now."""
    was = {(e.kind, e.name): e for e in before}
    now = {(e.kind, e.name): e for e in after}
    out = [ObjectStatus(node, e.kind, e.name, SyncState.ERROR, e.message)
           for k, e in now.items() if was.get(k) != e]
    out.extend(ObjectStatus(node, kind, name, SyncState.SYNCED)
               for (kind, name) in was if (kind, name) not in now)
    return out
