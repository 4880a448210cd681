"""The nodes' sync status for every replica on etcd: the leader publishes it, followers
serve it (GetSyncStatus, WatchSyncStatus) from etcd.

- The leader (``StatusPublisher``) writes one compact JSON record per node,
  ``<prefix>status/<node>``: the node's status as its reconciler last recorded it (the
  fields of xlb.policy.v1.NodeSyncStatus but the desired generation) and its endpoint
  health counts. A record is written only when it changed (a pass, a drift check, a
  health change): in steady state about one put per node per resync interval. Every
  record is bound to the leader's election lease: when the leader dies its records go
  with its lease (within the ttl), so a dead leader's status is never served as current.
- Every replica (``StatusMirror``) watches those keys and keeps the records in memory;
  a follower answers from them (``ReplicaStatus``), the leader from its reconciler. The
  state is worked out against the replica's own store generation as the leader does:
  a record that says SYNCED at an observed generation below it is PENDING. A registered
  node without a record (no leader, or one that has not published yet) is PENDING with
  a message saying so.

Why publish rather than forward the call to the leader: a follower checks its caller's
own credentials (the role checks of xlbcore.auth) and answers from etcd, so no replica
needs a client identity towards another, client certificates (which cannot be passed
on) work as well as tokens, and status is served while the leader is unreachable from
the follower's network.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import structlog

from policyd.etcd import Etcd, EtcdError, prefix_end
from policyd.reconciler import Reconciler
from policyd.status import NodeStatus, ObjectError, SyncState
from policyd.store import Store
from policyd.watch import StatusWatch, Stopping
from xlbcore.errors import Exhausted, NotFoundError, quote

log = structlog.get_logger()

PUBLISH_IDLE = 0.5  # seconds the publisher waits for a status event before it re-reads
MIRROR_IDLE = 1.0  # seconds without news before a mirror re-reads the records anyway
NO_LEADER = ("no leader reports this node's status (none is elected, or it has not"
             " published yet)")


class StatusSource(Protocol):
    """What GetSyncStatus and WatchSyncStatus read (a Reconciler is one)."""

    @property
    def status_watch(self) -> StatusWatch: ...

    def status(self, name: str = "") -> tuple[int, list[NodeStatus]]: ...

    def statuses(self) -> dict[str, NodeStatus]: ...

    def node_health(self) -> dict[str, Any]: ...


def encode_record(status: NodeStatus, health: tuple[int, int, int]) -> bytes:
    fields = asdict(status)
    del fields["desired_generation"]  # each replica's own store generation
    fields["state"] = int(status.state)
    fields["health"] = list(health)
    return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()


def decode_record(data: bytes) -> tuple[NodeStatus, tuple[int, int, int]]:
    """(status with desired_generation 0, (up, down, unknown)); ValueError when bad."""
    try:
        fields = json.loads(data)
        up, down, unknown = (int(n) for n in fields.pop("health"))
        fields["state"] = SyncState(int(fields["state"]))
        fields["errors"] = tuple(ObjectError(**e) for e in fields["errors"])
        fields["foreign"] = tuple((str(k), str(v)) for k, v in fields["foreign"])
        return NodeStatus(desired_generation=0, **fields), (up, down, unknown)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"status record: {exc}") from None


def at_generation(status: NodeStatus, generation: int) -> NodeStatus:
    """A published status as of store generation `generation`."""
    state = status.state
    if state == SyncState.SYNCED and status.observed_generation < generation:
        state = SyncState.PENDING
    return NodeStatus(**{**asdict(status), "state": state, "errors": status.errors,
                         "foreign": status.foreign, "desired_generation": generation})


def unknown_status(node: str, generation: int) -> NodeStatus:
    return NodeStatus(node=node, state=SyncState.PENDING, desired_generation=generation,
                      observed_generation=0, message=NO_LEADER, last_sync_ns=0,
                      last_attempt_ns=0, services=0)


class PublishedHealth:
    """A node's endpoint health counts as the leader published them (no per-endpoint
    listing: that stays with the leader)."""

    def __init__(self, counts: tuple[int, int, int]) -> None:
        self._counts = counts

    def counts(self) -> tuple[int, int, int]:
        return self._counts

    def services(self) -> dict[Any, Any]:
        return {}


class StatusPublisher:
    """On the leader: write each node's status record when it changes (a thread)."""

    def __init__(self, etcd: Etcd, prefix: bytes, reconciler: Reconciler,
                 lease: Callable[[], int]) -> None:
        self.etcd = etcd
        self._prefix = prefix + b"status/"
        self._reconciler = reconciler
        self._lease = lease
        self._written: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.puts = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="status-publish",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(PUBLISH_IDLE + 2)

    def _run(self) -> None:
        fanout = self._reconciler.status_watch.fanout
        try:
            watcher = fanout.add()
        except Stopping:
            return
        try:
            while not self._stop.is_set():
                try:
                    self.publish_once()
                except EtcdError as exc:
                    log.warning("policyd.status_publish_failed", error=str(exc)[:200])
                    self._written.clear()  # write everything again once etcd answers
                try:
                    watcher.get(PUBLISH_IDLE)
                except Stopping:
                    return
                except Exhausted:
                    fanout.remove(watcher)
                    watcher = fanout.add()
        finally:
            fanout.remove(watcher)

    def publish_once(self) -> None:
        """Write the records that changed since last written, delete those of nodes no
        longer registered. EtcdError when etcd refuses (the lease gone included)."""
        lease = self._lease()
        if not lease:
            return
        health = self._reconciler.node_health()
        now: dict[str, bytes] = {}
        for name, status in self._reconciler.statuses().items():
            node = health.get(name)
            now[name] = encode_record(status, node.counts() if node is not None else (0, 0, 0))
        for name, record in now.items():
            if self._written.get(name) != record:
                self.etcd.put(self._prefix + name.encode(), record, lease)
                self._written[name] = record
                self.puts += 1
        for name in [n for n in self._written if n not in now]:
            self.etcd.delete(self._prefix + name.encode())
            del self._written[name]


class StatusMirror:
    """On every replica: the published records, followed through an etcd watch."""

    def __init__(self, etcd: Etcd, prefix: bytes, store: Store) -> None:
        self.etcd = Etcd(etcd.url, etcd.timeout)  # its own watch, stopped on its own
        self._prefix = prefix + b"status/"
        self._store = store
        self._lock = threading.Lock()
        self._records: dict[str, tuple[NodeStatus, tuple[int, int, int]]] = {}
        self.status_watch = StatusWatch()
        self._known: set[str] = set()  # the nodes whose status was last published
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="status-mirror",
                                            daemon=True)
            self._thread.start()

    def signal_stop(self) -> None:
        """Stop following and end the WatchSyncStatus streams; ``close`` waits."""
        self._stop.set()
        self.status_watch.close()
        self.etcd.abort_watches()

    def close(self) -> None:
        self.signal_stop()
        if self._thread is not None:
            self._thread.join(MIRROR_IDLE + 1)
        self.etcd.close()

    def refresh(self) -> int:
        """Read every record; the etcd revision read at. EtcdError when etcd is away."""
        kvs, revision = self.etcd.range(self._prefix, prefix_end(self._prefix))
        records = {}
        for kv in kvs:
            name = kv.key[len(self._prefix):].decode(errors="replace")
            try:
                records[name] = decode_record(kv.value)
            except ValueError as exc:
                log.error("policyd.status_record_unreadable", node=name, error=str(exc))
        with self._lock:
            self._records = records
        generation, current = self.status()
        for status in current:
            self.status_watch.update(status)
        names = {s.node for s in current}
        for gone in self._known - names:  # deregistered
            self.status_watch.removed(gone, generation)
        self._known = names
        return revision

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                revision = self.refresh()
            except EtcdError:
                self._stop.wait(0.2)
                continue
            for _ in self.etcd.watch(self._prefix, revision + 1, MIRROR_IDLE):
                if self._stop.is_set():
                    return
                try:
                    self.refresh()
                except EtcdError:
                    break

    def status(self, name: str = "") -> tuple[int, list[NodeStatus]]:
        """(the store's generation, the status of every node or of node `name`)."""
        generation = self._store.generation
        nodes = self._store.list_nodes()
        if name:
            nodes = [n for n in nodes if n.name == name]
            if not nodes:
                raise NotFoundError(f"node {quote(name)} not found")
        with self._lock:
            records = dict(self._records)
        out = []
        for n in nodes:
            record = records.get(n.name)
            out.append(at_generation(record[0], generation) if record is not None
                       else unknown_status(n.name, generation))
        return generation, out

    def statuses(self) -> dict[str, NodeStatus]:
        return {s.node: s for s in self.status()[1]}

    def node_health(self) -> dict[str, Any]:
        with self._lock:
            return {name: PublishedHealth(r[1]) for name, r in self._records.items()}


class ReplicaStatus:
    """GetSyncStatus' and WatchSyncStatus' source on a replica: the reconciler while
    this replica leads, the published records while it follows."""

    def __init__(self, leading: Callable[[], bool], reconciler: Reconciler,
                 mirror: StatusMirror) -> None:
        self._leading = leading
        self._reconciler = reconciler
        self.mirror = mirror

    def _source(self) -> StatusSource:
        return self._reconciler if self._leading() else self.mirror

    @property
    def status_watch(self) -> StatusWatch:
        return self._source().status_watch

    def status(self, name: str = "") -> tuple[int, list[NodeStatus]]:
        return self._source().status(name)

    def statuses(self) -> dict[str, NodeStatus]:
        return self._source().statuses()

    def node_health(self) -> dict[str, Any]:
        return self._source().node_health()
