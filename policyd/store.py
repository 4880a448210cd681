"""Durable desired state of policyd in SQLite: services, nodes and a global generation.

- ``generation`` is one counter for the whole desired state. Every change to a service
  or a node bumps it by one, in the same transaction as the change; a service records
  the generation it was last changed at. Re-applying an identical service, or
  re-registering a node at the same address, is not a change and bumps nothing.
- A service name is unique, and so is (vip, port, protocol) across services: applying
  a second name for the same key raises ConflictError and writes nothing.
- Services are stored as their canonical ``xlb.policy.v1.Service`` bytes (what
  ``dpd.model.fill_service`` writes), with the key in columns for the uniqueness rule.
- One connection, one lock: safe to share between the gRPC threads and the reconcilers.
  WAL journal, synchronous=FULL: a change that returned is on disk.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dpd.model import ServiceKey, ServiceSpec, fill_service, parse_service, proto_to_api
from policyd.errors import ConflictError, NotFoundError
from xlb.policy.v1 import policy_pb2

SCHEMA_VERSION = 1

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
    protocol       INTEGER NOT NULL,   -- xlb.policy.v1.Protocol value
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


@dataclass(frozen=True)
class NodeRecord:
    name: str
    address: str
    register_time_ns: int


@dataclass(frozen=True)
class Snapshot:
    """The desired services and the generation they are at, read atomically."""

    generation: int
    services: dict[ServiceKey, ServiceSpec]


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

    # -- plumbing -----------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction under the lock; rolled back on any exception."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @staticmethod
    def _bump(cur: sqlite3.Cursor) -> int:
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
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            return int(row[0])

    # -- services -------------------------------------------------------------------

    @staticmethod
    def _service_row(row: tuple[str, bytes, int, int]) -> StoredService:
        name, blob, generation, update_ns = row
        return StoredService(name, decode_spec(blob), int(generation), int(update_ns))

    def apply_service(self, name: str, spec: ServiceSpec) -> tuple[StoredService, bool]:
        """Create or replace service `name`. Returns (stored, changed).

        Raises ConflictError when another service already holds spec's (vip, port,
        protocol); nothing is written then.
        """
        protocol = proto_to_api(spec.proto)
        with self._tx() as cur:
            row = cur.execute(
                "SELECT name, spec, generation, update_time_ns FROM services WHERE name = ?",
                (name,),
            ).fetchone()
            if row is not None:
                current = self._service_row(row)
                if current.spec == spec:
                    return current, False
            holder = cur.execute(
                "SELECT name FROM services WHERE vip = ? AND port = ? AND protocol = ?"
                " AND name != ?",
                (spec.vip, spec.port, protocol, name),
            ).fetchone()
            if holder is not None:
                raise ConflictError(
                    f"service {holder[0]!r} already uses {spec.key}; delete it or change"
                    " the vip, port or protocol"
                )
            generation = self._bump(cur)
            now = time.time_ns()
            cur.execute(
                "INSERT INTO services"
                " (name, vip, port, protocol, spec, generation, update_time_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET vip = excluded.vip, port = excluded.port,"
                " protocol = excluded.protocol, spec = excluded.spec,"
                " generation = excluded.generation, update_time_ns = excluded.update_time_ns",
                (name, spec.vip, spec.port, protocol, encode_spec(name, spec), generation, now),
            )
            return StoredService(name, spec, generation, now), True

    def delete_service(self, name: str) -> int:
        """Delete service `name`; returns the new generation. NotFoundError if missing."""
        with self._tx() as cur:
            cur.execute("DELETE FROM services WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFoundError(f"service {name!r} not found")
            return self._bump(cur)

    def get_service(self, name: str) -> StoredService:
        with self._lock:
            row = self._conn.execute(
                "SELECT name, spec, generation, update_time_ns FROM services WHERE name = ?",
                (name,),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"service {name!r} not found")
        return self._service_row(row)

    def list_services(self) -> list[StoredService]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, spec, generation, update_time_ns FROM services ORDER BY name"
            ).fetchall()
        return [self._service_row(r) for r in rows]

    def snapshot(self) -> Snapshot:
        """The generation and the desired services at that generation, in one read."""
        with self._lock:
            generation = self.generation
            services = self.list_services()
        return Snapshot(generation, {s.spec.key: s.spec for s in services})

    # -- nodes ----------------------------------------------------------------------

    def register_node(self, name: str, address: str) -> tuple[NodeRecord, bool]:
        """Add node `name` or move it to `address`. Returns (record, changed)."""
        with self._tx() as cur:
            row = cur.execute(
                "SELECT name, address, register_time_ns FROM nodes WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[1] == address:
                return NodeRecord(row[0], row[1], int(row[2])), False
            self._bump(cur)
            now = time.time_ns()
            cur.execute(
                "INSERT INTO nodes (name, address, register_time_ns) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET address = excluded.address,"
                " register_time_ns = excluded.register_time_ns",
                (name, address, now),
            )
            return NodeRecord(name, address, now), True

    def deregister_node(self, name: str) -> int:
        """Remove node `name`; returns the new generation. NotFoundError if missing."""
        with self._tx() as cur:
            cur.execute("DELETE FROM nodes WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFoundError(f"node {name!r} not found")
            return self._bump(cur)

    def get_node(self, name: str) -> NodeRecord:
        with self._lock:
            row = self._conn.execute(
                "SELECT name, address, register_time_ns FROM nodes WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"node {name!r} not found")
        return NodeRecord(row[0], row[1], int(row[2]))

    def list_nodes(self) -> list[NodeRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, address, register_time_ns FROM nodes ORDER BY name"
            ).fetchall()
        return [NodeRecord(r[0], r[1], int(r[2])) for r in rows]
