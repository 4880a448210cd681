"""Durable desired state of policyd in SQLite: services, nodes and a global generation.

- ``generation`` is one counter for the whole desired state. Every change to a service
  or a node bumps it by one, in the same transaction as the change; a service records
  the generation it was last changed at. Re-applying an identical service, or
  re-registering a node at the same address, is not a change and bumps nothing.
- A batch (``apply_services``, ``delete_services``) is one transaction and one bump:
  all of it is written, at one new generation, or none of it.
- A service name is unique, and so is (vip, port, protocol) across services: applying
  a second name for the same key raises ConflictError and writes nothing.
- Services are stored as their canonical ``xlb.policy.v1.Service`` bytes (what
  ``xlbcore.service.fill_service`` writes), with the key in columns for the uniqueness rule.
- One connection, one lock: safe to share between the gRPC threads and the reconcilers.
  WAL journal, synchronous=FULL: a change that returned is on disk.
- A change log in memory (``changes_since``) tells which service keys changed after a
  generation, so a reconcile pass costs what changed. It starts empty when the store
  opens and keeps the last CHANGE_LOG_KEYS keys; older questions get None ("unknown:
  compare everything").
- The store is the only writer of its file. It reads the services once when it opens
  and keeps them parsed in memory, updated after each commit, so reads and snapshots
  never decode or re-validate a stored service again.
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from xlb.policy.v1 import policy_pb2
from xlbcore.errors import ConflictError, NotFoundError, ValidationError, quote
from xlbcore.service import ServiceKey, ServiceSpec, fill_service, parse_service, proto_to_api

SCHEMA_VERSION = 1
CHANGE_LOG_KEYS = 1_000_000  # service keys the change log remembers

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
CREATE TABLE IF NOT EXISTS services (
    name           TEXT PRIMARY KEY,
    vip            TEXT NOT NULL,
    port           INTEGER NOT NULL,
    protocol       INTEGER NOT NULL,   -- xlb.types.v1.Protocol value
    spec           BLOB NOT NULL,      -- canonical xlb.policy.v1.Service (no output fields)
    generation     INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL,
    UNIQUE (vip, port, protocol)
);
CREATE TABLE IF NOT EXISTS nodes (
    name             TEXT PRIMARY KEY,
    address          TEXT NOT NULL,
    register_time_ns INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class StoredService:
    name: str
    spec: ServiceSpec
    generation: int
    update_time_ns: int
    # encode_spec(name, spec), as stored; lets replies skip building the message
    blob: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True)
class NodeRecord:
    name: str
    address: str
    register_time_ns: int


@dataclass(frozen=True)
class Snapshot:
    """The desired services and the generation they are at, read atomically.

    ``services`` is read-only and shared: snapshots taken while no service changes
    (node changes bump the generation too) return the same mapping object.
    """

    generation: int
    services: Mapping[ServiceKey, ServiceSpec]


@dataclass(frozen=True)
class BatchResult:
    """What ``apply_services`` / ``delete_services`` did."""

    services: list[StoredService]  # apply: as stored, in the order given; delete: empty
    generation: int  # the store's generation afterwards
    changed: int  # services written or deleted (0: nothing changed, no bump)


def encode_spec(name: str, spec: ServiceSpec) -> bytes:
    msg = fill_service(policy_pb2.Service(name=name), spec)
    return bytes(msg.SerializeToString(deterministic=True))


def decode_spec(blob: bytes) -> ServiceSpec:
    return parse_service(policy_pb2.Service.FromString(blob))


class Store:
    """Desired state in an SQLite file (``:memory:`` for a throw-away store)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA busy_timeout = 5000")
        if self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._conn.close()
            raise RuntimeError(
                f"{self.path}: store schema version {version} is newer than this policyd"
                f" understands ({SCHEMA_VERSION})"
            )
        with self._tx() as cur:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._closed = False
        # In-memory copy of the services table (see the module docstring).
        self._generation = int(
            self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        )
        self._services: dict[str, StoredService] = {}
        self._holders: dict[ServiceKey, str] = {}
        self._desired: Mapping[ServiceKey, ServiceSpec] | None = None
        # change log: generations (ascending) and the keys each changed
        self._log_gens: list[int] = []
        self._log_keys: list[tuple[ServiceKey, ...]] = []
        self._log_size = 0
        self._log_floor = self._generation  # changes after this generation are logged
        rows = self._conn.execute(
            "SELECT name, spec, generation, update_time_ns FROM services"
        ).fetchall()
        for row in rows:
            stored = self._service_row(row)
            self._services[stored.name] = stored
            self._holders[stored.spec.key] = stored.name

    # -- plumbing -----------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction under the lock; rolled back on any exception."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # COMMIT itself may have failed
                    cur.execute("ROLLBACK")
                raise

    @staticmethod
    def _bump(cur: sqlite3.Cursor) -> int:
        """Bump the generation inside the transaction `cur`. The caller sets
        ``_generation`` to the result once the transaction has committed."""
        cur.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        return int(cur.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generation -----------------------------------------------------------------

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    # -- services -------------------------------------------------------------------

    @staticmethod
    def _service_row(row: tuple[str, bytes, int, int]) -> StoredService:
        name, blob, generation, update_ns = row
        return StoredService(name, decode_spec(blob), int(generation), int(update_ns), blob)

    def apply_service(self, name: str, spec: ServiceSpec) -> tuple[StoredService, bool]:
        """Create or replace service `name`. Returns (stored, changed).

        Raises ConflictError when another service already holds spec's (vip, port,
        protocol); nothing is written then.
        """
        result = self.apply_services([(name, spec)], field="")
        return result.services[0], bool(result.changed)

    def apply_services(
        self, items: Sequence[tuple[str, ServiceSpec]], *, field: str = "services"
    ) -> BatchResult:
        """Create or replace every (name, spec) of `items`, all or nothing.

        Names and keys must be unique within `items` (ValidationError otherwise; the
        servicer checks this first with better words). A service whose key another
        stored service keeps (one not in `items`) raises ConflictError, naming
        ``field[i]``. Services equal to their stored form are left as they are, with
        their generation; the others are written in one transaction at one new
        generation. Nothing changed: no transaction, no bump.
        """
        names = {name for name, _ in items}
        keys = [spec.key for _, spec in items]  # a ServiceKey is built on each .key
        if len(names) != len(items) or len(set(keys)) != len(items):
            raise ValidationError(f"{field or 'services'}: names and keys must be unique")
        with self._lock:
            changed: list[int] = []
            for i, (name, spec) in enumerate(items):
                current = self._services.get(name)
                if current is not None and current.spec == spec:
                    continue
                holder = self._holders.get(keys[i])
                if holder is not None and holder != name and holder not in names:
                    where = f"{field}[{i}]: " if field else ""
                    raise ConflictError(
                        f"{where}service {quote(holder)} already uses {keys[i]}; delete it or"
                        " change the vip, port or protocol"
                    )
                changed.append(i)
            if not changed:
                return BatchResult([self._services[name] for name, _ in items], self._generation, 0)
            now = time.time_ns()
            with self._tx() as cur:
                generation = self._bump(cur)
                # Delete first, then insert: keys may move between services of the batch
                # (a swap), which row-by-row upserts would trip on UNIQUE.
                cur.executemany(
                    "DELETE FROM services WHERE name = ?",
                    [(items[i][0],) for i in changed if items[i][0] in self._services],
                )
                blobs = {i: encode_spec(*items[i]) for i in changed}
                rows = [
                    (
                        items[i][0],
                        items[i][1].vip,
                        items[i][1].port,
                        proto_to_api(items[i][1].proto),
                        blobs[i],
                        generation,
                        now,
                    )
                    for i in changed
                ]
                cur.executemany(
                    "INSERT INTO services"
                    " (name, vip, port, protocol, spec, generation, update_time_ns)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            # Committed: bring the in-memory copy along.
            touched: list[ServiceKey] = []
            for i in changed:
                old = self._services.get(items[i][0])
                touched.append(keys[i])
                if old is not None and old.spec.key != keys[i]:
                    touched.append(old.spec.key)
                if old is not None and self._holders.get(old.spec.key) == old.name:
                    del self._holders[old.spec.key]
            self._log_change(generation, touched)
            for i in changed:
                name, spec = items[i]
                self._services[name] = StoredService(name, spec, generation, now, blobs[i])
                self._holders[keys[i]] = name
            self._generation = generation
            self._desired = None
            return BatchResult(
                [self._services[name] for name, _ in items], generation, len(changed)
            )

    def delete_service(self, name: str) -> int:
        """Delete service `name`; returns the new generation. NotFoundError if missing."""
        return self.delete_services([name]).generation

    def delete_services(self, names: Sequence[str]) -> BatchResult:
        """Delete every service of `names` (unique) in one transaction at one new
        generation; NotFoundError, deleting nothing, if any is missing."""
        if len(set(names)) != len(names):
            raise ValidationError("names: a name is listed twice")
        with self._lock:
            missing = [name for name in names if name not in self._services]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise NotFoundError(f"service {quote(missing[0])} not found{more}")
            if not names:
                return BatchResult([], self._generation, 0)
            with self._tx() as cur:
                generation = self._bump(cur)
                cur.executemany("DELETE FROM services WHERE name = ?", [(n,) for n in names])
            touched = []
            for name in names:
                old = self._services.pop(name)
                touched.append(old.spec.key)
                if self._holders.get(old.spec.key) == name:
                    del self._holders[old.spec.key]
            self._log_change(generation, touched)
            self._generation = generation
            self._desired = None
            return BatchResult([], generation, len(names))

    def get_service(self, name: str) -> StoredService:
        with self._lock:
            stored = self._services.get(name)
        if stored is None:
            raise NotFoundError(f"service {quote(name)} not found")
        return stored

    def list_services(self) -> list[StoredService]:
        with self._lock:
            services = list(self._services.values())
        services.sort(key=lambda s: s.name)
        return services

    def _log_change(self, generation: int, keys: list[ServiceKey]) -> None:
        self._log_gens.append(generation)
        self._log_keys.append(tuple(keys))
        self._log_size += len(keys)
        drop = 0
        while self._log_size > CHANGE_LOG_KEYS and drop < len(self._log_gens) - 1:
            self._log_size -= len(self._log_keys[drop])
            self._log_floor = self._log_gens[drop]
            drop += 1
        if drop:
            del self._log_gens[:drop]
            del self._log_keys[:drop]

    def changes_since(self, generation: int, upto: int | None = None) -> set[ServiceKey] | None:
        """The keys of services changed (applied or deleted) after `generation` and up
        to `upto` (default: now); None when the log does not reach back that far.
        O(changes), not O(services)."""
        with self._lock:
            if generation < self._log_floor:
                return None
            start = bisect.bisect_right(self._log_gens, generation)
            end = len(self._log_gens) if upto is None else bisect.bisect_right(
                self._log_gens, upto)
            out: set[ServiceKey] = set()
            for keys in self._log_keys[start:end]:
                out.update(keys)
            return out

    def changed_specs(
        self, generation: int
    ) -> tuple[int, dict[ServiceKey, ServiceSpec | None], int] | None:
        """(generation now, {key changed after `generation`: its spec now, None when
        deleted}, services now), read atomically in O(changes); None when the change
        log does not reach back that far."""
        with self._lock:
            keys = self.changes_since(generation)
            if keys is None:
                return None
            holders, services = self._holders, self._services
            specs: dict[ServiceKey, ServiceSpec | None] = {}
            for k in keys:
                name = holders.get(k)
                specs[k] = services[name].spec if name is not None else None
            return self._generation, specs, len(holders)

    def snapshot(self) -> Snapshot:
        """The generation and the desired services at that generation, in one read.

        The services mapping is built once per change of the services and shared."""
        with self._lock:
            if self._desired is None:
                services = self._services
                self._desired = MappingProxyType(
                    {key: services[name].spec for key, name in self._holders.items()}
                )
            return Snapshot(self._generation, self._desired)

    # -- nodes ----------------------------------------------------------------------

    def register_node(self, name: str, address: str) -> tuple[NodeRecord, bool]:
        """Add node `name` or move it to `address`. Returns (record, changed)."""
        with self._lock:
            with self._tx() as cur:
                row = cur.execute(
                    "SELECT name, address, register_time_ns FROM nodes WHERE name = ?", (name,)
                ).fetchone()
                if row is not None and row[1] == address:
                    return NodeRecord(row[0], row[1], int(row[2])), False
                generation = self._bump(cur)
                now = time.time_ns()
                cur.execute(
                    "INSERT INTO nodes (name, address, register_time_ns) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET address = excluded.address,"
                    " register_time_ns = excluded.register_time_ns",
                    (name, address, now),
                )
            self._generation = generation
            return NodeRecord(name, address, now), True

    def deregister_node(self, name: str) -> int:
        """Remove node `name`; returns the new generation. NotFoundError if missing."""
        with self._lock:
            with self._tx() as cur:
                cur.execute("DELETE FROM nodes WHERE name = ?", (name,))
                if cur.rowcount == 0:
                    raise NotFoundError(f"node {quote(name)} not found")
                generation = self._bump(cur)
            self._generation = generation
            return generation

    def get_node(self, name: str) -> NodeRecord:
        with self._lock:
            row = self._conn.execute(
                "SELECT name, address, register_time_ns FROM nodes WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"node {quote(name)} not found")
        return NodeRecord(row[0], row[1], int(row[2]))

    def list_nodes(self) -> list[NodeRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, address, register_time_ns FROM nodes ORDER BY name"
            ).fetchall()
        return [NodeRecord(r[0], r[1], int(r[2])) for r in rows]
