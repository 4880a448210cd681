"""Durable desired state of policyd in SQLite: services, firewall rules, routes, nodes and
a global revision.

- The store's ``generation`` (the API's "revision") is one counter for the objects:
  every change to a service, rule or route bumps it by one, in the same transaction as
  the change; nodes do not move it. It orders the change logs, Watch and the nodes'
  desired/observed generations. Re-applying an identical object is not a change and
  bumps nothing.
- Each object also has its own ``generation``: 1 when created, +1 each time it changes
  (its spec, its node selector, a rule's flush flag), kept when an apply changes
  nothing; ``revision`` is the store's generation at its last change. An apply may name
  the generations it expects (compare-and-swap): any mismatch raises
  GenerationConflict (ABORTED) and writes nothing.
- Objects carry an optional node selector (policyd.selectors), nodes carry labels; a
  selector change is an object change (logged like a spec change), so nodes take or
  drop the object in the next change pass. Reads for a node (``changed_specs``,
  ``desired_services``, ... with ``labels``) leave out what the node's labels do not
  select; with no selector anywhere they return the shared mappings as before.
- One dpd address is one node: registering a second name at an address another node
  has raises ConflictError.
- Listeners (``add_listener``) get every committed change (kind, name, object as stored
  or last stored, deleted?) at its revision, in order, under the store's lock: Watch's
  source.
- A batch (``apply_services``, ``delete_services``) is one transaction and one bump:
  all of it is written, at one new generation, or none of it.
- A service name is unique, and so is its key (vip, port, protocol, port_last) across
  services: applying a second name for the same key raises ConflictError and writes
  nothing. An exact-port service and a port range starting at the same port are two
  keys (the exact port wins on the node); two port ranges of one (vip, protocol) that
  overlap raise PreconditionError naming both services (ValidationError when both are
  in the batch), and nothing is written.
- Services are stored as their canonical ``xlb.policy.v1.Service`` bytes (what
  ``xlbcore.service.fill_service`` writes), with the key in columns for the uniqueness rule.
- One connection, one lock: safe to share between the gRPC threads and the reconcilers.
  WAL journal, synchronous=FULL: a change that returned is on disk.
- A change log in memory (``changes_since``) tells which service keys changed after a
  generation, so a reconcile pass costs what changed. It starts empty when the store
  opens and keeps the last CHANGE_LOG_KEYS keys; older questions get None ("unknown:
  compare everything").
- Firewall rules and routes (``apply_rules``, ``apply_routes``, ...) follow the same
  rules: name, spec, generation, update time; batches in one transaction at one bump;
  specs stored as their canonical ``xlb.types.v1`` bytes. A route's prefix is unique
  among routes (ConflictError otherwise). Their change logs name what a node is keyed
  by: a rule's name, a route's prefix.
- Blocklists and mirrors (``apply_blocklists``, ``apply_mirrors``, ...; policyd.xdp_objects)
  follow them too. A mirror's node key is its interface (unique among mirrors); a
  blocklist has one node key per prefix and a prefix may belong to several blocklists:
  a node takes the union, and a prefix's change is logged whenever an object holding it
  changes (the node then puts it, or deletes it when no object it selects holds it).
- Policers (``apply_policers``, ...; policyd.policer_objects) follow rules: the node key
  is the name.
- The store is the only writer of its file. It reads the services once when it opens
  and keeps them parsed in memory, updated after each commit, so reads and snapshots
  never decode or re-validate a stored service again.
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
import time
from collections.abc import (
    Callable,
    Collection,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from policyd.selectors import Labels, from_text, matches, to_text
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2
from xlbcore.errors import (
    ConflictError,
    NotFoundError,
    PreconditionError,
    ValidationError,
    XlbError,
    quote,
)
from xlbcore.firewall import RuleSpec, fill_rule, parse_rule
from xlbcore.route import RouteSpec, fill_route, parse_route
from xlbcore.service import (
    Proto,
    ServiceKey,
    ServiceSpec,
    fill_service,
    parse_service,
    proto_to_api,
)

from policyd.xdp_objects import (  # isort: skip (beside the shared models)
    BlocklistSpec,
    MirrorSpec,
    blocklist_keys,
    fill_blocklist,
    fill_mirror,
    mirror_key,
    parse_blocklist,
    parse_mirror,
)
from policyd.policer_objects import (  # isort: skip
    PolicerSpec,
    fill_policer,
    parse_policer,
    policer_key,
)

# 2: firewall_rules and routes; 3: object generations, selectors, labels; 4: blocklists
# and mirrors; 5: policers; 6: services.port_last, in the services' UNIQUE key
SCHEMA_VERSION = 6
CHANGE_LOG_KEYS = 1_000_000  # keys a change log remembers (per kind)

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
    object_generation INTEGER NOT NULL DEFAULT 1,
    selector       TEXT NOT NULL DEFAULT '',
    port_last      INTEGER NOT NULL DEFAULT 0,  -- a port range's last port (schema 6)
    UNIQUE (vip, port, port_last, protocol)
);
CREATE TABLE IF NOT EXISTS firewall_rules (
    name           TEXT PRIMARY KEY,
    spec           BLOB NOT NULL,      -- canonical xlb.types.v1.FirewallRuleSpec
    generation     INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL,
    flush          INTEGER NOT NULL DEFAULT 0  -- FirewallRule.flush_existing
);
CREATE TABLE IF NOT EXISTS routes (
    name           TEXT PRIMARY KEY,
    prefix         TEXT NOT NULL UNIQUE,  -- canonical
    spec           BLOB NOT NULL,         -- canonical xlb.types.v1.RouteSpec
    generation     INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL,
    flush          INTEGER NOT NULL DEFAULT 0  -- unused: routes have no flows to end
);
CREATE TABLE IF NOT EXISTS blocklists (
    name              TEXT PRIMARY KEY,
    spec              BLOB NOT NULL,   -- canonical xlb.policy.v1.BlocklistSpec
    generation        INTEGER NOT NULL,
    update_time_ns    INTEGER NOT NULL,
    flush             INTEGER NOT NULL DEFAULT 0,  -- unused
    object_generation INTEGER NOT NULL DEFAULT 1,
    selector          TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS mirrors (
    name              TEXT PRIMARY KEY,
    spec              BLOB NOT NULL,   -- canonical xlb.policy.v1.MirrorSpec
    generation        INTEGER NOT NULL,
    update_time_ns    INTEGER NOT NULL,
    flush             INTEGER NOT NULL DEFAULT 0,  -- unused
    object_generation INTEGER NOT NULL DEFAULT 1,
    selector          TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS policers (
    name              TEXT PRIMARY KEY,
    spec              BLOB NOT NULL,   -- canonical xlb.policy.v1.PolicerSpec
    generation        INTEGER NOT NULL,
    update_time_ns    INTEGER NOT NULL,
    flush             INTEGER NOT NULL DEFAULT 0,  -- unused
    object_generation INTEGER NOT NULL DEFAULT 1,
    selector          TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS nodes (
    name             TEXT PRIMARY KEY,
    address          TEXT NOT NULL,
    register_time_ns INTEGER NOT NULL
);
"""

# Columns added by schema 3 (and added to older stores when they open); ``generation``
# columns hold the store's revision at the object's last change.
_ADDED_COLUMNS = (
    ("services", "object_generation", "INTEGER NOT NULL DEFAULT 1"),
    ("services", "selector", "TEXT NOT NULL DEFAULT ''"),
    ("firewall_rules", "object_generation", "INTEGER NOT NULL DEFAULT 1"),
    ("firewall_rules", "selector", "TEXT NOT NULL DEFAULT ''"),
    ("routes", "object_generation", "INTEGER NOT NULL DEFAULT 1"),
    ("routes", "selector", "TEXT NOT NULL DEFAULT ''"),
    ("nodes", "labels", "TEXT NOT NULL DEFAULT ''"),
)


_SERVICE_COLUMNS = ("name, vip, port, protocol, spec, generation, update_time_ns,"
                    " object_generation, selector")


def _migrate_services(cur: sqlite3.Cursor) -> None:
    """A store from before schema 6: rebuild the services table with port_last in its
    UNIQUE key (SQLite cannot change a constraint in place), port_last read from each
    stored service (a schema-5 policyd may have stored ranges already)."""
    columns = {r[1] for r in cur.execute("PRAGMA table_info(services)")}
    if "port_last" in columns:
        return
    cur.execute("ALTER TABLE services RENAME TO services_v5")
    cur.execute(_SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS services"):
                        _SCHEMA.index(");", _SCHEMA.index("CREATE TABLE IF NOT EXISTS services"))
                        + 1])
    rows = cur.execute(f"SELECT {_SERVICE_COLUMNS} FROM services_v5").fetchall()
    cur.executemany(
        f"INSERT INTO services ({_SERVICE_COLUMNS}, port_last)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(*r, policy_pb2.Service.FromString(r[4]).port_last) for r in rows])
    cur.execute("DROP TABLE services_v5")


class GenerationConflict(XlbError):
    """An apply's expected generation is not the stored one (-> ABORTED)."""


@dataclass(frozen=True)
class Change:
    """One committed change, as listeners see it."""

    kind: str  # "service", "firewall_rule", "route"
    name: str
    obj: Any  # StoredService / StoredObject: as stored now, or (deleted) as last stored
    deleted: bool


Listener = Callable[[int, list[Change]], None]


@dataclass(frozen=True)
class StoredService:
    name: str
    spec: ServiceSpec
    generation: int  # the object's own generation
    update_time_ns: int
    # encode_spec(name, spec), as stored; lets replies skip building the message
    blob: bytes = field(default=b"", compare=False, repr=False)
    selector: Labels = ()
    revision: int = 0  # the store's generation at the last change


@dataclass(frozen=True)
class NodeRecord:
    name: str
    address: str
    register_time_ns: int
    labels: Labels = ()


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


# Each kind of object's spec: its class, the message it is stored as (SQLite, and the
# etcd log's entries), and the functions between the two. parse(fill(message, spec))
# gives the spec back.
SPEC_MESSAGES: dict[str, tuple[type, Any, Callable[[Any], Any], Callable[[Any, Any], Any]]] = {
    "service": (ServiceSpec, policy_pb2.Service, parse_service, fill_service),
    "firewall_rule": (RuleSpec, types_pb2.FirewallRuleSpec, parse_rule, fill_rule),
    "route": (RouteSpec, types_pb2.RouteSpec, parse_route, fill_route),
    "blocklist": (BlocklistSpec, policy_pb2.BlocklistSpec, parse_blocklist, fill_blocklist),
    "mirror": (MirrorSpec, policy_pb2.MirrorSpec, parse_mirror, fill_mirror),
    "policer": (PolicerSpec, policy_pb2.PolicerSpec, parse_policer, fill_policer),
}


def encode_spec(name: str, spec: ServiceSpec) -> bytes:
    msg = fill_service(policy_pb2.Service(name=name), spec)
    return bytes(msg.SerializeToString(deterministic=True))


def decode_spec(blob: bytes) -> ServiceSpec:
    return parse_service(policy_pb2.Service.FromString(blob))


class ChangeLog:
    """The keys changed at each generation, in memory, for one kind of object. Keeps the
    last CHANGE_LOG_KEYS keys; asked about a generation older than that (or than the
    store's opening), it answers None: unknown, compare everything."""

    def __init__(self, floor: int) -> None:
        self._gens: list[int] = []  # ascending
        self._keys: list[tuple[Hashable, ...]] = []
        self._size = 0
        self.floor = floor  # changes after this generation are logged

    def add(self, generation: int, keys: Sequence[Hashable]) -> None:
        self._gens.append(generation)
        self._keys.append(tuple(keys))
        self._size += len(keys)
        drop = 0
        while self._size > CHANGE_LOG_KEYS and drop < len(self._gens) - 1:
            self._size -= len(self._keys[drop])
            self.floor = self._gens[drop]
            drop += 1
        if drop:
            del self._gens[:drop]
            del self._keys[:drop]

    def since(self, generation: int, upto: int | None = None) -> set[Any] | None:
        if generation < self.floor:
            return None
        start = bisect.bisect_right(self._gens, generation)
        end = len(self._gens) if upto is None else bisect.bisect_right(self._gens, upto)
        out: set[Any] = set()
        for keys in self._keys[start:end]:
            out.update(keys)
        return out


S = TypeVar("S", RuleSpec, RouteSpec, BlocklistSpec, MirrorSpec, PolicerSpec, str)
T = TypeVar("T")


@dataclass(frozen=True)
class StoredObject(Generic[S]):
    """A stored firewall rule (``spec``: RuleSpec) or route (RouteSpec)."""

    name: str
    spec: S
    generation: int  # the object's own generation
    update_time_ns: int
    flush: bool = False  # rules: FirewallRule.flush_existing
    blob: bytes = field(default=b"", compare=False, repr=False)  # the canonical spec bytes
    selector: Labels = ()
    revision: int = 0  # the store's generation at the last change


StoredRule = StoredObject[RuleSpec]
StoredRoute = StoredObject[RouteSpec]
StoredBlocklist = StoredObject[BlocklistSpec]
StoredMirror = StoredObject[MirrorSpec]
StoredPolicer = StoredObject[PolicerSpec]


@dataclass(frozen=True)
class ObjectBatch(Generic[S]):
    """What a batch of rules or routes did (as BatchResult for services)."""

    objects: list[StoredObject[S]]  # apply: as stored, in the order given; delete: empty
    generation: int
    changed: int


@dataclass(frozen=True)
class ObjectChanges(Generic[S]):
    """Node keys (a rule's name, a route's prefix) changed after a generation, each with
    its desired spec now (None: to delete) and the name that holds it."""

    generation: int
    specs: dict[str, S | None]
    names: dict[str, str]  # node key -> object name, for the keys still desired
    count: int  # objects desired now
    flush: frozenset[str] = frozenset()  # the keys whose object asks for flush_existing


@dataclass(frozen=True)
class Desired(Generic[S]):
    """Every object of a kind, read atomically: by node key, with their names."""

    generation: int
    specs: Mapping[str, S]
    names: Mapping[str, str]  # node key -> object name
    flush: frozenset[str]  # the keys whose object asks for flush_existing


class _Objects(Generic[S]):
    """One kind of object beside services (firewall rules, routes), in memory and in its
    table; the Store calls it under its lock and inside its transactions."""

    shared = False  # node keys are one per object and unique (see _SharedObjects)

    def __init__(self, kind: str, table: str, message: Any, parse: Callable[[Any], S],
                 fill: Callable[[Any, S], Any], node_key: Callable[[str, S], str],
                 floor: int, event_kind: str) -> None:
        self.kind = kind  # "firewall rule", "route"
        self.event_kind = event_kind  # "firewall_rule", "route"
        self.table = table
        self._message = message
        self._parse: Callable[[Any], S] = parse
        self._fill: Callable[[Any, S], Any] = fill
        self.node_key: Callable[[str, S], str] = node_key
        self.objects: dict[str, StoredObject[S]] = {}
        self.holders: dict[str, str] = {}  # node key -> name
        self.flushing: set[str] = set()  # node keys of the objects with flush set
        self.selected: set[str] = set()  # node keys of the objects with a node selector
        self.log = ChangeLog(floor)
        self._desired: Mapping[str, S] | None = None

    def encode(self, spec: S) -> bytes:
        return bytes(self._fill(self._message(), spec).SerializeToString(deterministic=True))

    def decode(self, blob: bytes) -> S:
        return self._parse(self._message.FromString(blob))

    def load(self, rows: list[tuple[str, bytes, int, int, int, int, str]]) -> None:
        for name, blob, revision, update_ns, flush, generation, selector in rows:
            obj = StoredObject(name, self.decode(blob), int(generation), int(update_ns),
                               bool(flush), blob, from_text(selector), int(revision))
            self.objects[name] = obj
            key = self.node_key(name, obj.spec)
            self.holders[key] = name
            if obj.flush:
                self.flushing.add(key)
            if obj.selector:
                self.selected.add(key)

    def committed(self, generation: int, now: int,
                  written: list[tuple[str, S, bytes, bool, Labels]],
                  deleted: Sequence[str]) -> list[Change]:
        touched: list[str] = []
        changes: list[Change] = []
        gens: dict[str, int] = {}
        for name in [*deleted, *(w[0] for w in written)]:
            was = self.objects.pop(name, None)
            if was is not None:
                gens[name] = was.generation
                key = self.node_key(name, was.spec)
                touched.append(key)
                if name in deleted:
                    changes.append(Change(self.event_kind, name, was, True))
                if self.holders.get(key) == name:
                    del self.holders[key]
                    self.flushing.discard(key)
                    self.selected.discard(key)
        for name, spec, blob, flush, selector in written:
            key = self.node_key(name, spec)
            touched.append(key)
            obj = StoredObject(name, spec, gens.get(name, 0) + 1, now, flush, blob,
                               selector, generation)
            self.objects[name] = obj
            changes.append(Change(self.event_kind, name, obj, False))
            self.holders[key] = name
            if flush:
                self.flushing.add(key)
            if selector:
                self.selected.add(key)
        self.log.add(generation, touched)
        self._desired = None
        return changes

    def _wanted(self, key: str, labels: Mapping[str, str] | None) -> S | None:
        """The spec a node with `labels` wants at `key` (None: none; labels None: any)."""
        name = self.holders.get(key)
        if name is None:
            return None
        obj = self.objects[name]
        if labels is not None and obj.selector and not matches(obj.selector, labels):
            return None
        return obj.spec

    def desired(self, labels: Mapping[str, str] | None = None) -> Mapping[str, S]:
        """Node key -> spec of every object (shared until the next change); with
        `labels`, of those a node with these labels takes (a copy, when any object has
        a selector)."""
        if self._desired is None:
            objects = self.objects
            self._desired = MappingProxyType(
                {key: objects[name].spec for key, name in self.holders.items()})
        if labels is None or not self.selected:
            return self._desired
        out = dict(self._desired)
        for key in self.selected:
            if self._wanted(key, labels) is None:
                del out[key]
        return out

    def everything(self, generation: int,
                   labels: Mapping[str, str] | None = None) -> Desired[S]:
        return Desired(generation, self.desired(labels), dict(self.holders),
                       frozenset(self.flushing))

    def changes(self, since: int, generation: int,
                labels: Mapping[str, str] | None = None) -> ObjectChanges[S] | None:
        keys = self.log.since(since)
        if keys is None:
            return None
        return self.at_keys(keys, generation, labels)

    def at_keys(self, keys: Iterable[str], generation: int,
                labels: Mapping[str, str] | None = None) -> ObjectChanges[S]:
        specs: dict[str, S | None] = {}
        names: dict[str, str] = {}
        for k in keys:
            specs[k] = spec = self._wanted(k, labels)
            if spec is not None:
                names[k] = self.holders[k]
        return ObjectChanges(generation, specs, names, len(self.holders),
                             frozenset(k for k in specs if k in self.flushing))


def _rule_key(name: str, spec: RuleSpec) -> str:
    return name


def _route_key(name: str, spec: RouteSpec) -> str:
    return spec.prefix


class _SharedObjects(_Objects[BlocklistSpec]):
    """Objects with many node keys each, which several objects may share (blocklists:
    a node key is a prefix, its node spec the prefix itself, and a node takes the
    union). ``owners`` holds every object of a key; a key is ``selected`` while one of
    its owners has a node selector; a node wants a key when one of its owners selects
    the node."""

    shared = True

    def __init__(self, kind: str, table: str, message: Any,
                 parse: Callable[[Any], BlocklistSpec], fill: Callable[[Any, BlocklistSpec], Any],
                 node_keys: Callable[[str, BlocklistSpec], tuple[str, ...]], floor: int,
                 event_kind: str) -> None:
        super().__init__(kind, table, message, parse, fill, lambda _n, _s: "", floor,
                         event_kind)
        self.node_keys = node_keys
        self.owners: dict[str, set[str]] = {}
        self._key_desired: Mapping[str, Any] | None = None

    def _own(self, obj: StoredObject[BlocklistSpec]) -> list[str]:
        keys = list(self.node_keys(obj.name, obj.spec))
        for key in keys:
            self.owners.setdefault(key, set()).add(obj.name)
            if obj.selector:
                self.selected.add(key)
        return keys

    def _disown(self, obj: StoredObject[BlocklistSpec]) -> list[str]:
        keys = list(self.node_keys(obj.name, obj.spec))
        for key in keys:
            owners = self.owners.get(key)
            if owners is None:
                continue
            owners.discard(obj.name)
            if not owners:
                del self.owners[key]
                self.selected.discard(key)
            elif not any(self.objects[n].selector for n in owners if n in self.objects):
                self.selected.discard(key)
        return keys

    def load(self, rows: list[tuple[str, bytes, int, int, int, int, str]]) -> None:
        for name, blob, revision, update_ns, _flush, generation, selector in rows:
            obj = StoredObject(name, self.decode(blob), int(generation), int(update_ns),
                               False, blob, from_text(selector), int(revision))
            self.objects[name] = obj
            self._own(obj)

    def committed(self, generation: int, now: int,
                  written: list[tuple[str, BlocklistSpec, bytes, bool, Labels]],
                  deleted: Sequence[str]) -> list[Change]:
        touched: list[str] = []
        changes: list[Change] = []
        gens: dict[str, int] = {}
        gone = set(deleted)
        for name in [*deleted, *(w[0] for w in written)]:
            was = self.objects.pop(name, None)
            if was is not None:
                gens[name] = was.generation
                touched.extend(self._disown(was))
                if name in gone:
                    changes.append(Change(self.event_kind, name, was, True))
        for name, spec, blob, _flush, selector in written:
            obj = StoredObject(name, spec, gens.get(name, 0) + 1, now, False, blob,
                               selector, generation)
            self.objects[name] = obj
            touched.extend(self._own(obj))
            changes.append(Change(self.event_kind, name, obj, False))
        self.log.add(generation, touched)
        self._key_desired = None
        return changes

    def _wanted(self, key: str, labels: Mapping[str, str] | None) -> Any:
        owners = self.owners.get(key)
        if not owners:
            return None
        if labels is None or key not in self.selected:
            return key
        for name in owners:
            selector = self.objects[name].selector
            if not selector or matches(selector, labels):
                return key
        return None

    def desired(self, labels: Mapping[str, str] | None = None) -> Mapping[str, Any]:
        if self._key_desired is None:
            self._key_desired = MappingProxyType({key: key for key in self.owners})
        if labels is None or not self.selected:
            return self._key_desired
        out = dict(self._key_desired)
        for key in self.selected:
            if self._wanted(key, labels) is None:
                del out[key]
        return out

    def everything(self, generation: int,
                   labels: Mapping[str, str] | None = None) -> Desired[Any]:
        return Desired(generation, self.desired(labels),
                       {key: min(names) for key, names in self.owners.items()}, frozenset())

    def at_keys(self, keys: Iterable[str], generation: int,
                labels: Mapping[str, str] | None = None) -> ObjectChanges[Any]:
        specs: dict[str, Any] = {}
        names: dict[str, str] = {}
        for k in keys:
            specs[k] = spec = self._wanted(k, labels)
            if spec is not None:
                names[k] = min(self.owners[k])
        return ObjectChanges(generation, specs, names, len(self.owners))


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
            for table in ("firewall_rules", "routes"):  # stores from before the column
                columns = {r[1] for r in cur.execute(f"PRAGMA table_info({table})")}
                if "flush" not in columns:
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN flush INTEGER NOT NULL"
                                " DEFAULT 0")
            for table, column, decl in _ADDED_COLUMNS:  # stores from before schema 3
                columns = {r[1] for r in cur.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            _migrate_services(cur)  # stores from before schema 6
            cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._closed = False
        # In-memory copy of the services table (see the module docstring).
        self._generation = int(
            self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        )
        self._services: dict[str, StoredService] = {}
        self._holders: dict[ServiceKey, str] = {}
        self._desired: Mapping[ServiceKey, ServiceSpec] | None = None
        self._log = ChangeLog(self._generation)  # service keys changed, by generation
        self._selected: set[ServiceKey] = set()  # keys of services with a node selector
        # (vip, protocol) -> {key: name} of the port-range services (the overlap rule)
        self._ranges: dict[tuple[str, Proto], dict[ServiceKey, str]] = {}
        self._listeners: list[Listener] = []
        rows = self._conn.execute(
            "SELECT name, spec, generation, update_time_ns, object_generation, selector"
            " FROM services"
        ).fetchall()
        for row in rows:
            stored = self._service_row(row)
            self._services[stored.name] = stored
            self._hold(stored.spec.key, stored.name)
            if stored.selector:
                self._selected.add(stored.spec.key)
        self._rules: _Objects[RuleSpec] = _Objects(
            "firewall rule", "firewall_rules", *SPEC_MESSAGES["firewall_rule"][1:],
            _rule_key, self._generation, "firewall_rule")
        self._routes: _Objects[RouteSpec] = _Objects(
            "route", "routes", *SPEC_MESSAGES["route"][1:], _route_key, self._generation,
            "route")
        self._blocklists = _SharedObjects(
            "blocklist", "blocklists", *SPEC_MESSAGES["blocklist"][1:], blocklist_keys,
            self._generation, "blocklist")
        self._mirrors: _Objects[MirrorSpec] = _Objects(
            "mirror", "mirrors", *SPEC_MESSAGES["mirror"][1:], mirror_key, self._generation,
            "mirror")
        self._policers: _Objects[PolicerSpec] = _Objects(
            "policer", "policers", *SPEC_MESSAGES["policer"][1:], policer_key,
            self._generation, "policer")
        objects: _Objects[Any]
        for objects in (self._rules, self._routes, self._blocklists, self._mirrors,
                        self._policers):
            objects.load(self._conn.execute(
                "SELECT name, spec, generation, update_time_ns, flush, object_generation,"
                f" selector FROM {objects.table}"
            ).fetchall())

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

    def _now(self) -> int:
        """The wall-clock time every write stamps (update and register times): the one
        clock of the store (policyd.etcd_store answers the log entry's time here)."""
        return time.time_ns()

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
        """The store's revision: moved by every change to an object (not by nodes)."""
        with self._lock:
            return self._generation

    # -- listeners (Watch) ------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(revision, changes)` after each committed change, under the
        store's lock (keep it short; never call the store from it)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def read_locked(self, read: Callable[[], T]) -> T:
        """Run `read` under the store's lock: nothing commits meanwhile (a consistent
        view of the current state and a listener registered at the same revision)."""
        with self._lock:
            return read()

    def _emit(self, revision: int, changes: list[Change]) -> None:
        for listener in self._listeners:
            listener(revision, changes)

    @staticmethod
    def _check_expected(current: Mapping[str, Any], expected: Mapping[str, int] | None,
                        names: Sequence[str], field: str, kind: str) -> None:
        """GenerationConflict when an expected generation differs from the stored one."""
        if not expected:
            return
        for i, name in enumerate(names):
            if name not in expected:
                continue
            stored = current.get(name)
            have = stored.generation if stored is not None else 0
            if have != expected[name]:
                where = f"{field}[{i}]: " if field else ""
                now = f"is at generation {have}" if stored is not None else "does not exist"
                raise GenerationConflict(
                    f"{where}{kind} {quote(name)} {now}, not {expected[name]}: it changed"
                    " since it was read; read it again and retry")

    # -- services -------------------------------------------------------------------

    @staticmethod
    def _service_row(row: tuple[str, bytes, int, int, int, str]) -> StoredService:
        name, blob, revision, update_ns, generation, selector = row
        return StoredService(name, decode_spec(blob), int(generation), int(update_ns), blob,
                             from_text(selector), int(revision))

    def apply_service(self, name: str, spec: ServiceSpec, *, selector: Labels = (),
                      expected: int | None = None) -> tuple[StoredService, bool]:
        """Create or replace service `name`. Returns (stored, changed).

        Raises ConflictError when another service already holds spec's (vip, port,
        protocol), GenerationConflict when `expected` is not the stored generation (0:
        the service must not exist); nothing is written then.
        """
        result = self.apply_services(
            [(name, spec)], field="", selectors={name: selector} if selector else None,
            expected=None if expected is None else {name: expected})
        return result.services[0], bool(result.changed)

    def apply_services(
        self, items: Sequence[tuple[str, ServiceSpec]], *, field: str = "services",
        selectors: Mapping[str, Labels] | None = None,
        expected: Mapping[str, int] | None = None,
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
        selectors = selectors or {}
        with self._lock:
            self._check_expected(self._services, expected, [n for n, _ in items], field,
                                 "service")
            changed: list[int] = []
            for i, (name, spec) in enumerate(items):
                current = self._services.get(name)
                if (current is not None and current.spec == spec
                        and current.selector == selectors.get(name, ())):
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
            self._check_ranges(items, changed, names, field)
            now = self._now()
            with self._tx() as cur:
                generation = self._bump(cur)
                # Delete first, then insert: keys may move between services of the batch
                # (a swap), which row-by-row upserts would trip on UNIQUE.
                cur.executemany(
                    "DELETE FROM services WHERE name = ?",
                    [(items[i][0],) for i in changed if items[i][0] in self._services],
                )
                blobs = {i: encode_spec(*items[i]) for i in changed}
                gens = {i: self._services[items[i][0]].generation + 1
                        if items[i][0] in self._services else 1 for i in changed}
                rows = [
                    (
                        items[i][0],
                        items[i][1].vip,
                        items[i][1].port,
                        proto_to_api(items[i][1].proto),
                        blobs[i],
                        generation,
                        now,
                        gens[i],
                        to_text(selectors.get(items[i][0], ())),
                        items[i][1].port_last,
                    )
                    for i in changed
                ]
                cur.executemany(
                    "INSERT INTO services"
                    " (name, vip, port, protocol, spec, generation, update_time_ns,"
                    " object_generation, selector, port_last)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    self._unhold(old.spec.key)
                    self._selected.discard(old.spec.key)
            self._log_change(generation, touched)
            events: list[Change] = []
            for i in changed:
                name, spec = items[i]
                selector = selectors.get(name, ())
                stored = StoredService(name, spec, gens[i], now, blobs[i], selector,
                                       generation)
                self._services[name] = stored
                self._hold(keys[i], name)
                if selector:
                    self._selected.add(keys[i])
                events.append(Change("service", name, stored, False))
            self._generation = generation
            self._desired = None
            self._emit(generation, events)
            return BatchResult(
                [self._services[name] for name, _ in items], generation, len(changed)
            )

    def _hold(self, key: ServiceKey, name: str) -> None:
        self._holders[key] = name
        if key.port_last:
            self._ranges.setdefault((key.vip, key.proto), {})[key] = name

    def _unhold(self, key: ServiceKey) -> None:
        del self._holders[key]
        if key.port_last:
            held = self._ranges[(key.vip, key.proto)]
            del held[key]
            if not held:
                del self._ranges[(key.vip, key.proto)]

    def _check_ranges(self, items: Sequence[tuple[str, ServiceSpec]], changed: list[int],
                      names: set[str], field: str) -> None:
        """Refuse port ranges of one (vip, protocol) that would overlap once `items` are
        stored: PreconditionError naming the stored service a range of ``field[i]``
        overlaps, ValidationError when both are in `items`. O(ranges of the touched
        (vip, protocol) pairs)."""
        pairs = {(items[i][1].vip, items[i][1].proto) for i in changed
                 if items[i][1].port_last}
        for pair in pairs:
            # who holds what afterwards: the stored ranges of names not in the batch...
            after: list[tuple[ServiceKey, str, int]] = [
                (k, n, -1) for k, n in self._ranges.get(pair, {}).items() if n not in names]
            # ...and the batch's own
            after += [(spec.key, n, i) for i, (n, spec) in enumerate(items)
                      if spec.port_last and (spec.vip, spec.proto) == pair]
            after.sort(key=lambda a: (a[0].port, a[0].port_last))
            reach = after[0]
            for this in after[1:]:
                if this[0].port <= reach[0].port_last and max(this[2], reach[2]) >= 0:
                    new, other = (this, reach) if this[2] >= 0 else (reach, this)
                    where = f"{field}[{new[2]}]: " if field else ""
                    text = (f"{where}service {quote(new[1])}'s port range {new[0]} overlaps"
                            f" service {quote(other[1])}'s {other[0]}; port ranges of one vip"
                            " and protocol must not overlap")
                    if other[2] >= 0:
                        raise ValidationError(text)
                    raise PreconditionError(text + " (delete or change that one first)")
                if this[0].port_last > reach[0].port_last:
                    reach = this

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
            events: list[Change] = []
            for name in names:
                old = self._services.pop(name)
                touched.append(old.spec.key)
                events.append(Change("service", name, old, True))
                if self._holders.get(old.spec.key) == name:
                    self._unhold(old.spec.key)
                    self._selected.discard(old.spec.key)
            self._log_change(generation, touched)
            self._generation = generation
            self._desired = None
            self._emit(generation, events)
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
        self._log.add(generation, keys)

    def changes_since(self, generation: int, upto: int | None = None) -> set[ServiceKey] | None:
        """The keys of services changed (applied or deleted) after `generation` and up
        to `upto` (default: now); None when the log does not reach back that far.
        O(changes), not O(services)."""
        with self._lock:
            return self._log.since(generation, upto)

    def changed_specs(
        self, generation: int, labels: Mapping[str, str] | None = None
    ) -> tuple[int, dict[ServiceKey, ServiceSpec | None], int] | None:
        """(generation now, {key changed after `generation`: its spec now, None when
        deleted or (with `labels`) not selected for a node with these labels}, services
        now), read atomically in O(changes); None when the change log does not reach
        back that far."""
        with self._lock:
            keys = self.changes_since(generation)
            if keys is None:
                return None
            return self._generation, self._service_specs(keys, labels), len(self._holders)

    def _service_specs(self, keys: Iterable[ServiceKey], labels: Mapping[str, str] | None
                       ) -> dict[ServiceKey, ServiceSpec | None]:
        holders, services = self._holders, self._services
        specs: dict[ServiceKey, ServiceSpec | None] = {}
        for k in keys:
            name = holders.get(k)
            if name is None:
                specs[k] = None
                continue
            stored = services[name]
            selected = labels is None or not stored.selector or matches(stored.selector, labels)
            specs[k] = stored.spec if selected else None
        return specs

    def selected_specs(self, labels: Mapping[str, str]
                       ) -> tuple[dict[ServiceKey, ServiceSpec | None],
                                  ObjectChanges[RuleSpec], ObjectChanges[RouteSpec]]:
        """For a node whose labels changed to `labels`: every object that has a node
        selector (the only ones a relabel can move), with its spec when the node takes
        it, else None; O(objects with a selector). Services by key, rules and routes as
        ``changed_rules`` answers."""
        with self._lock:
            return (self._service_specs(self._selected, labels),
                    self._rules.at_keys(self._rules.selected, self._generation, labels),
                    self._routes.at_keys(self._routes.selected, self._generation, labels))

    def desired_services(self, labels: Mapping[str, str] | None = None
                         ) -> Mapping[ServiceKey, ServiceSpec]:
        """The services a node with `labels` takes (None: all): the shared snapshot when
        no service has a selector, else a copy without those it does not select."""
        with self._lock:
            snapshot = self.snapshot()
            if labels is None or not self._selected:
                return snapshot.services
            out = dict(snapshot.services)
            for k, spec in self._service_specs(self._selected, labels).items():
                if spec is None:
                    out.pop(k, None)
            return out

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

    # -- firewall rules and routes ---------------------------------------------------

    def apply_rules(self, items: Sequence[tuple[str, RuleSpec]], *, field: str = "rules",
                    flush: Collection[str] = (), selectors: Mapping[str, Labels] | None = None,
                    expected: Mapping[str, int] | None = None) -> ObjectBatch[RuleSpec]:
        """Create or replace every (name, spec) of `items` (names unique), all or nothing,
        at one new generation; unchanged rules keep theirs, and nothing changed bumps
        nothing. `flush`: the names whose rule has flush_existing set; `selectors`:
        node selectors by name; `expected`: generations by name (compare-and-swap)."""
        return self._apply(self._rules, items, field, flush, selectors, expected)

    def delete_rules(self, names: Sequence[str]) -> ObjectBatch[RuleSpec]:
        """Delete every rule of `names` at one new generation; NotFoundError, deleting
        nothing, if any is missing."""
        return self._delete(self._rules, names)

    def get_rule(self, name: str) -> StoredRule:
        return self._get(self._rules, name)

    def list_rules(self) -> list[StoredRule]:
        return self._list(self._rules)

    def apply_routes(self, items: Sequence[tuple[str, RouteSpec]], *,
                     field: str = "routes", selectors: Mapping[str, Labels] | None = None,
                     expected: Mapping[str, int] | None = None) -> ObjectBatch[RouteSpec]:
        """As ``apply_rules``; a prefix that a stored route not in `items` holds raises
        ConflictError naming ``field[i]``."""
        return self._apply(self._routes, items, field, (), selectors, expected)

    def delete_routes(self, names: Sequence[str]) -> ObjectBatch[RouteSpec]:
        return self._delete(self._routes, names)

    def get_route(self, name: str) -> StoredRoute:
        return self._get(self._routes, name)

    def list_routes(self) -> list[StoredRoute]:
        return self._list(self._routes)

    def changed_rules(self, generation: int, labels: Mapping[str, str] | None = None
                      ) -> ObjectChanges[RuleSpec] | None:
        """Rules changed after `generation`, by name, with their specs now (None: deleted,
        or not selected for a node with `labels`); O(changes). None when the change log
        does not reach back that far."""
        with self._lock:
            return self._rules.changes(generation, self._generation, labels)

    def changed_routes(self, generation: int, labels: Mapping[str, str] | None = None
                       ) -> ObjectChanges[RouteSpec] | None:
        """Routes changed after `generation`, by prefix (as a node keys them)."""
        with self._lock:
            return self._routes.changes(generation, self._generation, labels)

    def desired_rules(self, labels: Mapping[str, str] | None = None) -> Desired[RuleSpec]:
        """Every rule by name (that a node with `labels` takes), read atomically."""
        with self._lock:
            return self._rules.everything(self._generation, labels)

    def desired_routes(self, labels: Mapping[str, str] | None = None) -> Desired[RouteSpec]:
        """Every route by prefix (as a node keys them), read atomically."""
        with self._lock:
            return self._routes.everything(self._generation, labels)

    # -- blocklists and mirrors (policyd.xdp_objects) ------------------------------------

    def apply_blocklists(self, items: Sequence[tuple[str, BlocklistSpec]], *,
                         field: str = "blocklists",
                         selectors: Mapping[str, Labels] | None = None,
                         expected: Mapping[str, int] | None = None
                         ) -> ObjectBatch[BlocklistSpec]:
        """As ``apply_rules``; prefixes may be shared between blocklists."""
        return self._apply(self._blocklists, items, field, (), selectors, expected)

    def delete_blocklists(self, names: Sequence[str]) -> ObjectBatch[BlocklistSpec]:
        return self._delete(self._blocklists, names)

    def get_blocklist(self, name: str) -> StoredBlocklist:
        return self._get(self._blocklists, name)

    def list_blocklists(self) -> list[StoredBlocklist]:
        return self._list(self._blocklists)

    def apply_mirrors(self, items: Sequence[tuple[str, MirrorSpec]], *,
                      field: str = "mirrors", selectors: Mapping[str, Labels] | None = None,
                      expected: Mapping[str, int] | None = None) -> ObjectBatch[MirrorSpec]:
        """As ``apply_routes``: a mirrored interface that another stored mirror holds
        raises ConflictError naming ``field[i]``."""
        return self._apply(self._mirrors, items, field, (), selectors, expected)

    def delete_mirrors(self, names: Sequence[str]) -> ObjectBatch[MirrorSpec]:
        return self._delete(self._mirrors, names)

    def get_mirror(self, name: str) -> StoredMirror:
        return self._get(self._mirrors, name)

    def list_mirrors(self) -> list[StoredMirror]:
        return self._list(self._mirrors)

    def changed_blocklist(self, generation: int, labels: Mapping[str, str] | None = None
                          ) -> ObjectChanges[Any] | None:
        """Prefixes changed after `generation` (by a blocklist holding them), each with
        itself when a node with `labels` wants it now (some blocklist it selects holds
        it), else None; O(prefixes of the changed blocklists)."""
        with self._lock:
            return self._blocklists.changes(generation, self._generation, labels)

    def desired_blocklist(self, labels: Mapping[str, str] | None = None) -> Desired[Any]:
        """The union of the prefixes (of the blocklists a node with `labels` takes)."""
        with self._lock:
            return self._blocklists.everything(self._generation, labels)

    def changed_mirrors(self, generation: int, labels: Mapping[str, str] | None = None
                        ) -> ObjectChanges[MirrorSpec] | None:
        """Mirrors changed after `generation`, by mirrored interface."""
        with self._lock:
            return self._mirrors.changes(generation, self._generation, labels)

    def desired_mirrors(self, labels: Mapping[str, str] | None = None) -> Desired[MirrorSpec]:
        with self._lock:
            return self._mirrors.everything(self._generation, labels)

    def selected_xdp(self, labels: Mapping[str, str]
                     ) -> tuple[ObjectChanges[Any], ObjectChanges[MirrorSpec]]:
        """As ``selected_specs`` for blocklists (by prefix) and mirrors."""
        with self._lock:
            return (self._blocklists.at_keys(self._blocklists.selected, self._generation,
                                             labels),
                    self._mirrors.at_keys(self._mirrors.selected, self._generation, labels))

    # -- policers (policyd.policer_objects) ------------------------------------------------

    def apply_policers(self, items: Sequence[tuple[str, PolicerSpec]], *,
                       field: str = "policers", selectors: Mapping[str, Labels] | None = None,
                       expected: Mapping[str, int] | None = None) -> ObjectBatch[PolicerSpec]:
        """As ``apply_rules`` (the node key is the name)."""
        return self._apply(self._policers, items, field, (), selectors, expected)

    def delete_policers(self, names: Sequence[str]) -> ObjectBatch[PolicerSpec]:
        return self._delete(self._policers, names)

    def get_policer(self, name: str) -> StoredPolicer:
        return self._get(self._policers, name)

    def list_policers(self) -> list[StoredPolicer]:
        return self._list(self._policers)

    def changed_policers(self, generation: int, labels: Mapping[str, str] | None = None
                         ) -> ObjectChanges[PolicerSpec] | None:
        """Policers changed after `generation`, by name."""
        with self._lock:
            return self._policers.changes(generation, self._generation, labels)

    def desired_policers(self, labels: Mapping[str, str] | None = None
                         ) -> Desired[PolicerSpec]:
        with self._lock:
            return self._policers.everything(self._generation, labels)

    def selected_policers(self, labels: Mapping[str, str]) -> ObjectChanges[PolicerSpec]:
        """As ``selected_specs`` for policers."""
        with self._lock:
            return self._policers.at_keys(self._policers.selected, self._generation, labels)

    def _apply(self, objects: _Objects[S], items: Sequence[tuple[str, S]],
               field: str, flush: Collection[str], selectors: Mapping[str, Labels] | None,
               expected: Mapping[str, int] | None) -> ObjectBatch[S]:
        names = {name for name, _ in items}
        keys = [objects.node_key(name, spec) for name, spec in items]
        if len(names) != len(items) or (not objects.shared and len(set(keys)) != len(items)):
            raise ValidationError(f"{field or objects.table}: names and prefixes must be unique")
        selectors = selectors or {}
        with self._lock:
            self._check_expected(objects.objects, expected, [n for n, _ in items], field,
                                 objects.kind)
            changed: list[int] = []
            for i, (name, spec) in enumerate(items):
                current = objects.objects.get(name)
                if (current is not None and current.spec == spec
                        and current.flush == (name in flush)
                        and current.selector == selectors.get(name, ())):
                    continue
                holder = objects.holders.get(keys[i])
                if holder is not None and holder != name and holder not in names:
                    where = f"{field}[{i}]: " if field else ""
                    raise ConflictError(
                        f"{where}{objects.kind} {quote(holder)} already uses"
                        f" {quote(keys[i])}; delete it or change this one")
                changed.append(i)
            if not changed:
                return ObjectBatch([objects.objects[name] for name, _ in items],
                                   self._generation, 0)
            now = self._now()
            written = [(items[i][0], items[i][1], objects.encode(items[i][1]),
                        items[i][0] in flush, selectors.get(items[i][0], ())) for i in changed]
            gens = {w[0]: objects.objects[w[0]].generation + 1 if w[0] in objects.objects
                    else 1 for w in written}
            with self._tx() as cur:
                generation = self._bump(cur)
                cur.executemany(f"DELETE FROM {objects.table} WHERE name = ?",
                                [(w[0],) for w in written])
                if objects is self._routes:
                    cur.executemany(
                        "INSERT INTO routes (name, prefix, spec, generation, update_time_ns,"
                        " object_generation, selector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(w[0], keys[i], w[2], generation, now, gens[w[0]], to_text(w[4]))
                         for i, w in zip(changed, written, strict=True)])
                else:
                    cur.executemany(
                        f"INSERT INTO {objects.table} (name, spec, generation, update_time_ns,"
                        " flush, object_generation, selector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(w[0], w[2], generation, now, int(w[3]), gens[w[0]], to_text(w[4]))
                         for w in written])
            events = objects.committed(generation, now, written, ())
            self._generation = generation
            self._emit(generation, events)
            return ObjectBatch([objects.objects[name] for name, _ in items], generation,
                               len(changed))

    def _delete(self, objects: _Objects[S], names: Sequence[str]) -> ObjectBatch[S]:
        if len(set(names)) != len(names):
            raise ValidationError("names: a name is listed twice")
        with self._lock:
            missing = [name for name in names if name not in objects.objects]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise NotFoundError(f"{objects.kind} {quote(missing[0])} not found{more}")
            if not names:
                return ObjectBatch([], self._generation, 0)
            with self._tx() as cur:
                generation = self._bump(cur)
                cur.executemany(f"DELETE FROM {objects.table} WHERE name = ?",
                                [(n,) for n in names])
            events = objects.committed(generation, self._now(), [], names)
            self._generation = generation
            self._emit(generation, events)
            return ObjectBatch([], generation, len(names))

    def _get(self, objects: _Objects[S], name: str) -> StoredObject[S]:
        with self._lock:
            stored = objects.objects.get(name)
        if stored is None:
            raise NotFoundError(f"{objects.kind} {quote(name)} not found")
        return stored

    def _list(self, objects: _Objects[S]) -> list[StoredObject[S]]:
        with self._lock:
            out = list(objects.objects.values())
        out.sort(key=lambda o: o.name)
        return out

    # -- nodes ----------------------------------------------------------------------

    def register_node(self, name: str, address: str,
                      labels: Labels = ()) -> tuple[NodeRecord, bool]:
        """Add node `name`, or move it to `address` or other `labels`. Returns (record,
        changed). ConflictError when another node has `address`. Nodes do not move the
        store's revision (the objects' generations are theirs alone)."""
        with self._lock:
            with self._tx() as cur:
                other = cur.execute("SELECT name FROM nodes WHERE address = ? AND name != ?",
                                    (address, name)).fetchone()
                if other is not None:
                    raise ConflictError(
                        f"node.address: {quote(address)} is node {quote(other[0])}'s; one dpd"
                        " is one node (deregister it first, or use its name)")
                row = cur.execute(
                    "SELECT name, address, register_time_ns, labels FROM nodes WHERE name = ?",
                    (name,)).fetchone()
                if row is not None and row[1] == address and from_text(row[3]) == labels:
                    return NodeRecord(row[0], row[1], int(row[2]), labels), False
                now = self._now()
                if row is not None and row[1] == address:
                    now = int(row[2])  # relabeled, not registered anew
                cur.execute(
                    "INSERT INTO nodes (name, address, register_time_ns, labels)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                    " address = excluded.address, register_time_ns = excluded.register_time_ns,"
                    " labels = excluded.labels",
                    (name, address, now, to_text(labels)),
                )
            return NodeRecord(name, address, now, labels), True

    def deregister_node(self, name: str) -> int:
        """Remove node `name`; returns the store's generation (unchanged). NotFoundError if
        missing."""
        with self._lock:
            with self._tx() as cur:
                cur.execute("DELETE FROM nodes WHERE name = ?", (name,))
                if cur.rowcount == 0:
                    raise NotFoundError(f"node {quote(name)} not found")
            return self._generation

    def get_node(self, name: str) -> NodeRecord:
        with self._lock:
            row = self._conn.execute(
                "SELECT name, address, register_time_ns, labels FROM nodes WHERE name = ?",
                (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"node {quote(name)} not found")
        return NodeRecord(row[0], row[1], int(row[2]), from_text(row[3]))

    def list_nodes(self) -> list[NodeRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, address, register_time_ns, labels FROM nodes ORDER BY name"
            ).fetchall()
        return [NodeRecord(r[0], r[1], int(r[2]), from_text(r[3])) for r in rows]
