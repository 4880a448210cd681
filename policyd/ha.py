"""policyd replicas on etcd: leader election with an etcd lease, and what followers refuse.

- Every replica campaigns for one key, ``<prefix>leader``, created in an etcd transaction
  only if absent and bound to a lease of ``ttl`` seconds (default 2) that the leader
  renews every ttl/3. The replica that created it is the leader: it catches its store up
  to the end of the log, fences its store's writes with the key (a write commits only
  while the key is the one it created), then starts reconciling (``on_elected``).
- The others poll the key every ``poll`` seconds (default 0.25). When the leader dies its
  lease expires within ttl seconds and the key goes with it; the next poll of a follower
  creates it anew: takeover within ttl + poll + the catch-up (well under 5 s with ttl 2).
- A leader that cannot renew its lease for ttl seconds, or is told it has expired, has
  lost: ``on_lost`` runs (xlb-policyd exits; a supervisor restarts it as a follower). It
  never reconciles without holding the key, and its fenced writes fail once the key is
  gone.
- Followers serve Get*, List* and Watch from their copy of the store (kept current by
  policyd.etcd_store's watch), GetSyncStatus and WatchSyncStatus from the status the
  leader publishes in etcd (policyd.ha_status), and refuse, with UNAVAILABLE naming the
  leader, every write (what xlbcore.auth calls admin) and WatchEvents (the nodes' event
  streams are the leader's). Refusing rather than forwarding keeps one path for a write,
  with the caller's own credentials, and tells the caller where to go.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from policyd.etcd import Etcd, EtcdError, compare_created, op_get, op_put, response_kvs
from policyd.etcd_store import EtcdStore
from xlbcore.auth import required_role
from xlbcore.tls import ROLE_ADMIN

log = structlog.get_logger()

DEFAULT_TTL = 2  # seconds: etcd leases are whole seconds
DEFAULT_POLL = 0.25
# reads that only the leader can answer (the nodes' event streams it holds)
LEADER_READS = frozenset({"WatchEvents"})


@dataclass(frozen=True)
class Leader:
    name: str
    address: str


class Election:
    """Campaign for leadership of the replicas of one store prefix (a thread)."""

    def __init__(self, store: EtcdStore, name: str, address: str, *, ttl: int = DEFAULT_TTL,
                 poll: float = DEFAULT_POLL,
                 on_elected: Callable[[], None] = lambda: None,
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.etcd: Etcd = store.etcd
        self.key = store.prefix + b"leader"
        self.name = name
        self.address = address
        self.ttl = ttl
        self.poll = poll
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease = 0
        self._lock = threading.Lock()
        self._leading = False  # elected and caught up: writes are taken
        self._leader: Leader | None = None  # the last leader seen (maybe us)

    @property
    def leading(self) -> bool:
        with self._lock:
            return self._leading

    @property
    def lease(self) -> int:
        """The etcd lease of this replica's leadership; 0 when it does not lead."""
        with self._lock:
            return self._lease if self._leading else 0

    @property
    def leader(self) -> Leader | None:
        with self._lock:
            return self._leader

    def start(self) -> Election:
        """Campaign once now (a lone replica leads when this returns), then go on in a
        thread: renewing the lease as the leader, polling the key as a follower."""
        elected = False
        try:
            elected = self._campaign()
        except EtcdError as exc:
            log.warning("policyd.election_etcd_error", replica=self.name, error=str(exc))
        self._thread = threading.Thread(target=self._lead if elected else self._run,
                                        name="election", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop campaigning; a leader gives its key up at once (revokes its lease) so a
        follower takes over at its next poll instead of after the ttl."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl + 2)
        with self._lock:
            leading, lease, self._leading = self._leading, self._lease, False
        self.store.set_fence([])
        if lease:
            try:
                self.etcd.revoke(lease)
                if leading:
                    log.info("policyd.leadership_released", replica=self.name)
            except EtcdError:
                pass

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._campaign():
                    self._lead()
                    return
            except EtcdError as exc:
                log.warning("policyd.election_etcd_error", replica=self.name, error=str(exc))
            self._stop.wait(self.poll)

    def _campaign(self) -> bool:
        """Try to create the leader key once; True when this replica now leads."""
        if not self._lease:
            self._lease = self.etcd.grant(self.ttl)
        value = json.dumps({"name": self.name, "address": self.address}).encode()
        ok, answer = self.etcd.txn([compare_created(self.key, 0)],
                                   [op_put(self.key, value, self._lease)], [op_get(self.key)])
        if ok:
            revision = int(answer["header"]["revision"])  # the key's create revision
        else:
            kvs = response_kvs(answer, 0)
            if not (kvs and kvs[0].lease == self._lease):
                self._saw(kvs)
                if self.etcd.keepalive(self._lease) == 0:  # keep our lease for the next try
                    self._lease = 0
                return False
            revision = kvs[0].create_revision  # ours already: a catch-up had failed
        self.store.set_fence([compare_created(self.key, revision)])
        self.store.catch_up()  # everything the previous leader committed
        with self._lock:
            self._leader = Leader(self.name, self.address)
            self._leading = True
        log.info("policyd.elected", replica=self.name, address=self.address,
                 applied=self.store.applied, generation=self.store.generation)
        self._on_elected()
        return True

    def _saw(self, kvs: list[Any]) -> None:
        leader = None
        if kvs:
            try:
                info = json.loads(kvs[0].value)
                leader = Leader(str(info["name"]), str(info["address"]))
            except (ValueError, KeyError, TypeError):
                leader = Leader("?", "?")
        with self._lock:
            changed, self._leader = leader != self._leader, leader
        if changed and leader is not None:
            log.info("policyd.follower", replica=self.name, leader=leader.name,
                     leader_address=leader.address)

    def _lead(self) -> None:
        """Renew the lease every ttl/3 until stopped or lost."""
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            try:
                remaining = self.etcd.keepalive(self._lease)
            except EtcdError as exc:
                if time.monotonic() - renewed < self.ttl:
                    log.warning("policyd.lease_renew_failed", replica=self.name, error=str(exc))
                    continue
                remaining = 0
            if remaining > 0:
                renewed = time.monotonic()
                continue
            with self._lock:
                self._leading = False
                self._leader = None
            self.store.set_fence([])
            self._lease = 0
            log.error("policyd.leadership_lost", replica=self.name,
                      note="the lease expired; this replica stops reconciling")
            self._on_lost()
            return


class FollowerInterceptor(grpc.ServerInterceptor):
    """Refuses, on a replica that does not lead, the calls only the leader answers."""

    def __init__(self, election: Callable[[], Election | None]) -> None:
        self._election = election

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        name = method.rsplit("/", 1)[-1]
        if not method.startswith("/xlb.policy.") or (
                name not in LEADER_READS and required_role(method) != ROLE_ADMIN):
            return continuation(details)
        election = self._election()
        if election is None or election.leading:
            return continuation(details)
        leader = election.leader
        where = (f"the leader is replica {leader.name} at {leader.address}"
                 if leader is not None else "no leader is elected yet; retry shortly")
        message = (f"policyd replica {election.name} is a follower: {name} goes to the"
                   f" leader; {where}")
        handler = continuation(details)
        if handler is None:
            return None

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAVAILABLE, message)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)
