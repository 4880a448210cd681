"""Index allocation for per-service and per-endpoint counter slots (no root, no maps).

The pool is a bitmap (numpy bools), so a bulk write's reservation of tens of thousands
of ids is a few array operations, not a Python step (or a set insertion) per id.

A released id rests in quarantine for its grace (dpd/grace.py, 5 ms) before it can be
reserved again: a packet that read the old service's value just before it was deleted
or replaced counts against the old id's slots (svc_stats_map, ep_stats_map, rr_map,
ep_conn_map, svc_cfg_map), never a new service's, and those slots are zeroed when the id
is taken again. A reservation that fits only with ids still resting waits for them (at
most the grace) rather than fail."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from dpd.grace import Quarantine
from xlbcore.errors import Exhausted


def _as_ids(ids: Iterable[int]) -> np.ndarray:
    if isinstance(ids, np.ndarray):
        return ids.astype(np.intp, copy=False)
    if isinstance(ids, range):
        return np.arange(ids.start, ids.stop, ids.step, dtype=np.intp)
    return np.fromiter(ids, np.intp)


class IdPool:
    """Integers 0..size-1. Reservations are tentative until commit() or rollback().

    Ids index counter slots, so a released id is "dirty" (its slot holds old counts) and
    must be zeroed before reuse. With `assume_dirty` (maps reused from an earlier dpd)
    every free id is dirty until it has been zeroed once."""

    def __init__(self, size: int, used: Iterable[int] = (), assume_dirty: bool = False,
                 grace_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.size = size
        self._used = np.zeros(size, bool)
        self._used[_as_ids(used)] = True
        self._n_used = int(np.count_nonzero(self._used))
        self._next = 0
        self._pending: list[np.ndarray] = []
        # dirty: its slot holds counts (released, or never zeroed when assume_dirty)
        self._dirty = (np.ones if assume_dirty else np.zeros)(size, bool)  # zeros: calloc
        self._n_dirty = size if assume_dirty else 0  # an upper bound: 0 means none
        # released ids in their grace: still marked used (not reservable), not in use
        self._resting = np.zeros(size, bool)
        self.quarantine: Quarantine[np.ndarray] = Quarantine(grace_s, clock, sleep)

    def take_dirty(self, ids: Iterable[int]) -> list[int]:
        """Those of `ids` whose slots must be zeroed; they count as clean afterwards."""
        if not self._n_dirty:
            return []
        arr = _as_ids(ids)
        out = np.unique(arr[self._dirty[arr]])  # each once: the count stays a bound
        self._dirty[out] = False
        self._n_dirty -= len(out)
        return out.tolist()

    @property
    def free(self) -> int:
        """Ids not in use: free, or released and resting (reservable after a wait)."""
        return self.size - self._n_used

    def in_use(self) -> int:
        return self._n_used

    def reserve(self, count: int, what: str) -> list[int]:
        """`count` free ids (the next ones from where the last reservation ended,
        wrapping), held until commit() or rollback(); Exhausted when there are fewer."""
        return self.reserve_array(count, what).tolist()

    def reserve_array(self, count: int, what: str) -> np.ndarray:
        """reserve, as an array of ids (np.intp)."""
        if count > self.free:
            raise Exhausted(
                f"{what}: {count} more needed, {self.free} of {self.size} free"
            )
        self._unrest(self.quarantine.due())
        while count > self.size - self._n_used - self.quarantine.held:
            self._unrest(self.quarantine.wait() or ())  # some are resting: wait for them
        start = self._next
        if start + count <= self.size and not self._used[start:start + count].any():
            out = np.arange(start, start + count, dtype=np.intp)  # a run of free ids
        else:
            free = np.flatnonzero(~self._used)
            at = int(np.searchsorted(free, start))
            out = np.concatenate((free[at:], free[:at]))[:count]
        if count:
            self._used[out] = True
            self._n_used += count
            self._next = (int(out[-1]) + 1) % self.size
            self._pending.append(out)
        return out

    def commit(self) -> None:
        self._pending.clear()

    def rollback(self) -> None:
        for ids in self._pending:
            self._used[ids] = False
            self._n_used -= len(ids)
        self._pending.clear()

    def release(self, ids: Iterable[int]) -> None:
        """Give back ids in use: each can be reserved again after its grace."""
        arr = np.unique(_as_ids(ids))
        held = arr[self._used[arr] & ~self._resting[arr]]
        self._n_used -= len(held)
        self._dirty[arr] = True
        self._n_dirty += len(arr)
        if self.quarantine.grace_s:
            self._resting[held] = True
            self.quarantine.add(held, len(held))
        else:
            self._used[held] = False

    def _unrest(self, batches: Iterable[np.ndarray]) -> None:
        """Make resting ids (their grace passed) free."""
        for ids in batches:
            self._used[ids] = self._resting[ids] = False
