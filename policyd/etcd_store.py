"""policyd's desired state replicated through etcd: every replica's Store is a copy of one
log of store operations that etcd holds.

How it works:

- etcd holds, under a prefix (default ``/xlb/policyd/``), ``log/<index>`` (20 digits,
  from 1, consecutive): each one committed store write (``apply_services``,
  ``delete_rules``, ``register_node``, ...: every public ``apply_*``, ``delete_*``,
  ``register_*``, ``deregister_*`` method of ``policyd.store.Store``), with its
  arguments and the wall-clock time the writer stamped it with.
- Each replica keeps a ``Store`` in memory (SQLite ``:memory:`` plus the Store's own
  in-memory indexes) and applies the log to it in order (``catch_up``), so every
  replica's Store passes through the same states, revisions and object generations, and
  its listeners (Watch) see the same changes at the same revisions.
- A write runs the Store's own method (validation, compare-and-swap on the objects'
  generations, conflicts: the same code and errors as the SQLite store). When the method
  reaches its transaction, the entry is written to etcd in one etcd transaction that
  succeeds only if ``log/<applied + 1>`` does not exist yet (compare-and-swap on the
  store's log position: the generations the method checked are those of the latest
  state) and, when a fence is set (the leader's election key, policyd.ha), only while
  that key is still the one this replica created. Only then does the local SQLite
  transaction commit and the in-memory state move: an acknowledged write is in etcd.
  A write that loses the race (another entry took the index) is rolled back, the replica
  catches up and the method runs again on the new state (its CAS checks apply anew).
- An etcd failure during a write is UNAVAILABLE and leaves the local state as it was; if
  the entry did reach etcd after all, the replica applies it from the log like any other.
- A follower learns of new entries through an etcd watch on the log (``follow``), with a
  periodic re-read as a safety net.
- Snapshots: every ``snapshot_every`` entries (default 1000) the leader writes its state
  at log index N (the SQLite image, zlib-compressed, in chunks under
  ``snapshot/<N>/``, then the pointer ``snapshot`` naming N) and deletes the log entries
  up to the previous snapshot's index and older snapshots' chunks, all fenced like a
  write. A replica starting loads the latest snapshot (read at the pointer's etcd
  revision, so a newer one written meanwhile does not tear it) and applies the log from
  N + 1. A running replica that finds its next entry deleted (it fell more than a
  snapshot interval behind) cannot catch up in place: ``Compacted``, and ``on_compacted``
  runs (xlb-policyd exits 1 and its supervisor starts it again, from the snapshot).

An entry is JSON: the write's name, its time and its arguments as data (strings,
integers, lists, tuples, sets, maps, and specs as the protobuf messages the SQLite
store keeps them as, base64). Reading one back runs no code of the entry's choosing: it
names one of the Store's write methods and holds nothing but those values, each spec
validated again as a request's would be. Every replica must run the same policyd
version (the log holds method calls).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog

from policyd.etcd import (
    Etcd,
    EtcdError,
    compare_created,
    op_delete_range,
    op_put,
    prefix_end,
)
from policyd.store import SPEC_MESSAGES, Store
from xlbcore.errors import UnavailableError, XlbError, quote

log = structlog.get_logger()

DEFAULT_PREFIX = b"/xlb/policyd/"
WRITE_PREFIXES = ("apply_", "delete_", "register_", "deregister_")
RANGE_PAGE = 500  # log entries read per request
WATCH_IDLE = 1.0  # seconds without news before a follower re-reads the log anyway
RETRIES = 3  # runs of a write that keeps losing the race for the next log index
SNAPSHOT_EVERY = 1000  # log entries between the leader's snapshots
SNAPSHOT_CHUNK = 512 * 1024  # bytes of a snapshot chunk (etcd takes 1.5 MiB a request)


class NotLeaderError(UnavailableError):
    """This replica's fence (its leadership) is gone: the write was not made."""


class Compacted(EtcdError):
    """The log entries this replica needs next were compacted away: start it again."""


class _Behind(XlbError):
    """The next log index is taken: catch up and run the write again."""


_KIND_OF = {cls: kind for kind, (cls, *_) in SPEC_MESSAGES.items()}


def _data(value: Any) -> Any:
    """`value` (a write's argument) as JSON data; TypeError for what a log entry does not
    hold."""
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is list:
        return [_data(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_data(v) for v in value]}
    if isinstance(value, set | frozenset):
        return {"set": [_data(v) for v in value]}
    if isinstance(value, Mapping):
        return {"map": [[_data(k), _data(v)] for k, v in value.items()]}
    kind = _KIND_OF.get(type(value))
    if kind is None:
        raise TypeError(f"log entry: a {type(value).__name__} cannot be written")
    message, fill = SPEC_MESSAGES[kind][1], SPEC_MESSAGES[kind][3]
    blob = fill(message(), value).SerializeToString(deterministic=True)
    return {"spec": kind, "message": base64.b64encode(blob).decode("ascii")}


def _value(data: Any) -> Any:
    """What _data made `data` from; ValueError (or ValidationError, a spec that does
    not parse) for anything else."""
    if data is None or type(data) in (bool, int, str):
        return data
    if type(data) is list:
        return [_value(v) for v in data]
    if type(data) is dict:
        if data.keys() == {"tuple"} and type(data["tuple"]) is list:
            return tuple(_value(v) for v in data["tuple"])
        if data.keys() == {"set"} and type(data["set"]) is list:
            return frozenset(_value(v) for v in data["set"])
        if data.keys() == {"map"} and type(data["map"]) is list:
            return {_value(k): _value(v) for k, v in data["map"]}
        kind = data.get("spec")
        if data.keys() == {"spec", "message"} and kind in SPEC_MESSAGES:
            message, parse = SPEC_MESSAGES[kind][1], SPEC_MESSAGES[kind][2]
            return parse(message.FromString(base64.b64decode(data["message"], validate=True)))
    raise ValueError(f"log entry: {quote(json.dumps(data))} is not an argument")


def encode_entry(op: str, args: tuple[Any, ...], kwargs: dict[str, Any], now: int) -> bytes:
    return json.dumps({"op": op, "time_ns": now, "args": [_data(a) for a in args],
                       "kwargs": {k: _data(v) for k, v in kwargs.items()}}).encode()


def decode_entry(data: bytes) -> tuple[str, tuple[Any, ...], dict[str, Any], int]:
    entry = json.loads(data)
    op = entry["op"]
    if not (isinstance(op, str) and op in _WRITES):
        raise ValueError(f"log entry: unknown operation {quote(str(op))}")
    args, kwargs = entry["args"], entry.get("kwargs")
    if type(args) is not list or type(kwargs) is not dict:
        raise ValueError("log entry: its arguments are not a list and a map (an entry "
                         "of an older policyd: every replica must run the same version)")
    return op, tuple(map(_value, args)), {str(k): _value(v) for k, v in kwargs.items()}, \
        int(entry["time_ns"])


_WRITES: dict[str, Callable[..., Any]] = {
    name: getattr(Store, name) for name in dir(Store)
    if name.startswith(WRITE_PREFIXES) and callable(getattr(Store, name))
}


class EtcdStore(Store):
    """A Store whose writes are committed to an etcd log and which applies the log."""

    def __init__(self, etcd: Etcd, prefix: bytes = DEFAULT_PREFIX, *,
                 snapshot_every: int = SNAPSHOT_EVERY) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self._log_prefix = prefix + b"log/"
        self._snapshot_key = prefix + b"snapshot"
        self.snapshot_every = snapshot_every  # 0: this replica never writes one
        self.snapshot_index = 0  # the log index of the latest snapshot loaded or written
        self.on_compacted: Callable[[], None] | None = None  # see Compacted
        self.applied = 0  # the last log index applied to this replica's state
        self._entry: bytes | None = None  # the entry of the write running (under the lock)
        self._replaying = False
        self._time: int | None = None  # the time of the entry being written or replayed
        self._fence: list[dict[str, Any]] = []  # extra compares of every write (leadership)
        self._following: threading.Thread | None = None
        self._stop = threading.Event()
        image = self._read_snapshot()
        if image is None:
            super().__init__(":memory:")
        else:
            self._open_image(*image)
        self.catch_up()

    # -- snapshots ------------------------------------------------------------------

    def _chunks(self, index: int) -> bytes:
        return self.prefix + b"snapshot/%020d/" % index

    def _read_snapshot(self) -> tuple[int, bytes] | None:
        """(index, SQLite image) of the latest snapshot, None when there is none."""
        kvs, revision = self.etcd.range(self._snapshot_key, self._snapshot_key + b"\0")
        if not kvs:
            return None
        meta = json.loads(kvs[0].value)
        index = int(meta["index"])
        start = self._chunks(index)
        chunks, _ = self.etcd.range(start, prefix_end(start), revision=revision)
        data = b"".join(kv.value for kv in chunks)
        if len(chunks) != int(meta["chunks"]) or hashlib.sha256(data).hexdigest() != meta[
                "sha256"]:
            raise EtcdError(f"store: snapshot {index} is incomplete in etcd")
        return index, zlib.decompress(data)

    def _open_image(self, index: int, image: bytes) -> None:
        """Open the Store on a snapshot's SQLite image, then hold it in memory."""
        workdir = tempfile.mkdtemp(prefix="xlb-policyd-snapshot-")
        try:
            path = os.path.join(workdir, "store.db")
            with open(path, "wb") as f:
                f.write(image)
            super().__init__(path)  # reads the image (and migrates an older schema)
            memory = sqlite3.connect(":memory:", check_same_thread=False,
                                     isolation_level=None)
            self._conn.backup(memory)
            self._conn.close()
            self._conn, self.path = memory, ":memory:"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.applied = self.snapshot_index = index
        log.info("store.snapshot_loaded", index=index, bytes=len(image),
                 generation=self.generation)

    def write_snapshot(self) -> int:
        """Write the state at ``applied`` as the latest snapshot, then delete the log up to
        the previous snapshot and older snapshots' chunks (fenced: NotLeaderError once
        this replica no longer leads). Its log index."""
        with self._lock:
            index, image = self.applied, self._conn.serialize()
            fence = list(self._fence)
        data = zlib.compress(image, 6)
        start = self._chunks(index)
        chunks = [data[i:i + SNAPSHOT_CHUNK] for i in range(0, len(data), SNAPSHOT_CHUNK)]
        for n, chunk in enumerate(chunks):
            if not self.etcd.txn(fence, [op_put(start + b"%06d" % n, chunk)])[0]:
                raise NotLeaderError("store: no longer the leader; snapshot not written")
        before = self.etcd.get(self._snapshot_key)
        previous = int(json.loads(before.value)["index"]) if before is not None else 0
        meta = json.dumps({"index": index, "chunks": len(chunks), "bytes": len(image),
                           "sha256": hashlib.sha256(data).hexdigest()}).encode()
        ops = [op_put(self._snapshot_key, meta),
               op_delete_range(self.prefix + b"snapshot/", start)]
        if previous:
            ops.append(op_delete_range(self._key(1), self._key(min(previous, index) + 1)))
        if not self.etcd.txn(fence, ops)[0]:
            raise NotLeaderError("store: no longer the leader; snapshot not written")
        self.snapshot_index = index
        log.info("store.snapshot_written", index=index, bytes=len(image),
                 compressed=len(data), log_deleted_to=min(previous, index))
        return index

    def _maybe_snapshot(self) -> None:
        if not (self._fence and self.snapshot_every
                and self.applied - self.snapshot_index >= self.snapshot_every):
            return
        try:
            self.write_snapshot()
        except UnavailableError as exc:  # etcd away, or no longer the leader: the write
            # itself is committed (the caller must hear so); the next write tries again
            log.warning("store.snapshot_failed", error=str(exc)[:200])

    # -- the log --------------------------------------------------------------------

    def _key(self, index: int) -> bytes:
        return self._log_prefix + b"%020d" % index

    def set_fence(self, compares: list[dict[str, Any]]) -> None:
        """Make every write also require `compares` (etcd compares; [] for none)."""
        with self._lock:
            self._fence = list(compares)

    def catch_up(self) -> int:
        """Apply every log entry past ``applied``; the etcd revision read at. EtcdError
        when etcd cannot be read (the state stays as it was)."""
        while True:
            kvs, revision = self.etcd.range(self._key(self.applied + 1),
                                            prefix_end(self._log_prefix), RANGE_PAGE)
            with self._lock:
                for kv in kvs:
                    index = int(kv.key[len(self._log_prefix):])
                    if index <= self.applied:
                        continue  # applied meanwhile (our own write, or another catch-up)
                    if index != self.applied + 1:  # deleted by a snapshot (a gap else)
                        log.error("store.compacted_past", applied=self.applied,
                                  next_in_log=index,
                                  note="this replica must start again from the snapshot")
                        raise Compacted(f"store: log entries {self.applied + 1}..{index - 1}"
                                        " were compacted; restart this replica")
                    self._replay(index, kv.value)
            if len(kvs) < RANGE_PAGE:
                return revision

    def _replay(self, index: int, data: bytes) -> None:
        try:
            op, args, kwargs, now = decode_entry(data)
        except Exception as exc:
            log.error("store.log_unreadable", index=index, error=str(exc)[:200])
            self.applied = index
            return
        self._replaying, self._time = True, now
        try:
            _WRITES[op](self, *args, **kwargs)
        except Exception as exc:  # the writer ran it on the same state: never expected
            log.error("store.replay_failed", index=index, op=op, error=str(exc)[:200])
        finally:
            self._replaying, self._time = False, None
            self.applied = index

    def _write(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        method = _WRITES[op]
        with self._lock:
            if self._replaying or self._entry is not None:  # nested: part of the outer one
                return method(self, *args, **kwargs)
            for _ in range(RETRIES):
                self._time = time.time_ns()
                self._entry = encode_entry(op, args, kwargs, self._time)
                try:
                    result = method(self, *args, **kwargs)
                except _Behind:
                    self.catch_up()
                    continue
                finally:
                    self._entry, self._time = None, None
                self._maybe_snapshot()
                return result
        raise UnavailableError("store: other writes kept taking the next log entry; retry")

    def _now(self) -> int:
        """The Store's clock: the time stamped in the log entry being written or
        replayed, so that every replica stores the same update times."""
        return self._time if self._time is not None else super()._now()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        with super()._tx() as cur:
            yield cur
            if self._entry is not None and not self._replaying:
                self._commit(self._entry)
                self._entry = None

    def _commit(self, entry: bytes) -> None:
        """Write `entry` at the next index, or raise (the caller's SQLite transaction then
        rolls back and the in-memory state is untouched)."""
        index = self.applied + 1
        key = self._key(index)
        ok, _ = self.etcd.txn([compare_created(key, 0), *self._fence], [op_put(key, entry)])
        if ok:
            self.applied = index
            return
        if self.etcd.get(key) is not None:
            raise _Behind(f"log entry {index} is taken")
        raise NotLeaderError("store: this replica is no longer the leader; write to the leader")

    # -- following ------------------------------------------------------------------

    def follow(self) -> None:
        """Apply new log entries as they appear (a thread), until ``close``."""
        if self._following is None:
            self._following = threading.Thread(target=self._follow, name="store-follow",
                                               daemon=True)
            self._following.start()

    def _follow(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                revision = self.catch_up()
                if failing:
                    log.info("store.etcd_back", url=self.etcd.url, applied=self.applied)
                failing = False
            except Compacted:
                if self.on_compacted is not None:
                    self.on_compacted()
                return
            except EtcdError as exc:
                if not failing:
                    log.warning("store.etcd_unreachable", url=self.etcd.url, error=str(exc))
                failing = True
                self._stop.wait(0.2)
                continue
            for _ in self.etcd.watch(self._log_prefix, revision + 1, WATCH_IDLE):
                if self._stop.is_set():
                    return
                try:
                    self.catch_up()
                except Compacted:
                    if self.on_compacted is not None:
                        self.on_compacted()
                    return
                except EtcdError:
                    break

    def close(self) -> None:
        self._stop.set()
        self.etcd.abort_watches()
        if self._following is not None:
            self._following.join(WATCH_IDLE + 1)
        super().close()
        self.etcd.close()


def _logged(op: str) -> Callable[..., Any]:
    @functools.wraps(_WRITES[op])
    def write(self: EtcdStore, *args: Any, **kwargs: Any) -> Any:
        return self._write(op, args, kwargs)
    return write


for _op in _WRITES:
    setattr(EtcdStore, _op, _logged(_op))
