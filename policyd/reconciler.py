"""Reconcile the desired services onto every registered node's dpd: the registry of
workers.

``Reconciler`` keeps one ``NodeWorker`` (policyd.worker: the thread, the pass, backoff)
per node registered in the store, each with its own ``NodeClient`` (policyd.nodeclient:
the calls to the node's ``xlb.dpd.v1.Datapath``), and answers for their status.

A node's labels changing (RegisterNode again with other labels) does not restart its
worker: the worker moves the objects with a node selector onto or off the node.
Every change of a node's status goes to ``status_watch`` (policyd.watch: WatchSyncStatus).

Deregistering a node stops its worker and leaves the node's datapath as it is: policyd
no longer manages it, and its services keep serving until someone deletes them through
dpd (or registers the node again). Stopping the reconciler closes every channel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from policyd.health import NodeHealth
from policyd.nodeclient import open_channel
from policyd.status import NodeProgress, NodeStatus, node_status
from policyd.store import Store
from policyd.watch import StatusWatch
from policyd.worker import NodeWorker, PassReport, ReadGate, ReconcilerSettings, SyncResult
from xlbcore.errors import NotFoundError, quote

__all__ = ["PassReport", "Reconciler", "ReconcilerSettings", "SyncResult"]


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
        # read-backs of all nodes share a few slots (see policyd.worker)
        self._gate = ReadGate(self._settings.readback_concurrency)
        self._lock = threading.Lock()
        self._closed = False
        self.status_watch = StatusWatch()

    @property
    def settings(self) -> ReconcilerSettings:
        return self._settings

    @property
    def channel_factory(self) -> Callable[[str], grpc.Channel]:
        """How the nodes are dialled (their TLS): for whatever else talks to them."""
        return self._channel_factory

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
                elif node.labels != worker.labels:
                    worker.relabel(node.labels)
            for worker in self._workers.values():
                worker.wake()
            for name, node in nodes.items():
                if name not in self._workers:  # a new worker makes its first pass at once
                    worker = NodeWorker(node, self._store, self._settings, self._channel_factory,
                                        self._gate, self._progressed)
                    self._workers[name] = worker
                    worker.start()
        for worker in stopping:
            worker.join(self._settings.rpc_timeout)
            if worker.name not in nodes:
                self.status_watch.removed(worker.name, self._store.generation)

    def _progressed(self, name: str, progress: NodeProgress) -> None:
        """A worker recorded progress (its thread): publish the node's status."""
        self.status_watch.update(node_status(name, progress, self._store.generation))

    def statuses(self) -> dict[str, NodeStatus]:
        """Every node's status now, by name."""
        return {s.node: s for s in self.status()[1]}

    def wake_all(self) -> None:
        with self._lock:
            for worker in self._workers.values():
                worker.wake()

    def node_health(self) -> dict[str, NodeHealth]:
        """Every node's endpoint health as its worker last read it, by node name."""
        with self._lock:
            return {name: w.health for name, w in self._workers.items()}

    def status(self, name: str = "") -> tuple[int, list[NodeStatus]]:
        """(desired generation, status of every node or of node `name`)."""
        with self._lock:
            generation = self._store.generation
            nodes = self._store.list_nodes()
            if name:
                nodes = [n for n in nodes if n.name == name]
                if not nodes:
                    raise NotFoundError(f"node {quote(name)} not found")
            progress = {
                n.name: self._workers[n.name].progress if n.name in self._workers else None
                for n in nodes
            }
        return generation, [
            node_status(n.name, progress[n.name] or NodeProgress(), generation) for n in nodes
        ]

    def stop(self, timeout: float = 0.5) -> None:
        """Stop every worker and close its channel (which cancels its call in flight);
        wait at most `timeout` seconds in all for the threads to end (they are daemon
        threads: one stuck elsewhere does not hold the process). The reconciler stays
        stopped."""
        self.status_watch.close()
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.signal_stop(close=False)
        # closing a channel takes a few ms: hundreds of nodes close in parallel
        if len(workers) > 8:
            with ThreadPoolExecutor(8, thread_name_prefix="close") as pool:
                list(pool.map(lambda w: w.close_channel(), workers))
        else:
            for worker in workers:
                worker.close_channel()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
