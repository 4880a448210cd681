"""Index allocation for per-service and per-endpoint counter slots (pure Python)."""

from __future__ import annotations

from collections.abc import Iterable

from xlbcore.errors import Exhausted


class IdPool:
    """Integers 0..size-1. Reservations are tentative until commit() or rollback().

    Ids index counter slots, so a released id is "dirty" (its slot holds old counts) and
    must be zeroed before reuse. With `assume_dirty` (maps reused from an earlier dpd)
    every free id is dirty until it has been zeroed once."""

    def __init__(self, size: int, used: Iterable[int] = (), assume_dirty: bool = False) -> None:
        self.size = size
        self._used = set(used)
        self._next = 0
        self._pending: list[int] = []
        self._dirty: set[int] = set()
        self._assume_dirty = assume_dirty
        self._clean: set[int] = set()

    def take_dirty(self, ids: Iterable[int]) -> list[int]:
        """Those of `ids` whose slots must be zeroed; they count as clean afterwards."""
        if not self._dirty and not self._assume_dirty:
            return []
        out = [i for i in ids
               if i in self._dirty or (self._assume_dirty and i not in self._clean)]
        self._dirty.difference_update(out)
        if self._assume_dirty:
            self._clean.update(out)
        return out

    @property
    def free(self) -> int:
        return self.size - len(self._used)

    def in_use(self) -> int:
        return len(self._used)

    def reserve(self, count: int, what: str) -> list[int]:
        if count > self.free:
            raise Exhausted(
                f"{what}: {count} more needed, {self.free} of {self.size} free"
            )
        start = self._next
        if start + count <= self.size and self._used.isdisjoint(range(start, start + count)):
            # the common case, a run of free ids: no Python step per id
            out = list(range(start, start + count))
            self._used.update(out)
            self._next = (start + count) % self.size
            self._pending.extend(out)
            return out
        out = []
        while len(out) < count:
            i = self._next
            self._next = (self._next + 1) % self.size
            if i not in self._used:
                self._used.add(i)
                out.append(i)
        self._pending.extend(out)
        return out

    def commit(self) -> None:
        self._pending.clear()

    def rollback(self) -> None:
        for i in self._pending:
            self._used.discard(i)
        self._pending.clear()

    def release(self, ids: Iterable[int]) -> None:
        for i in ids:
            self._used.discard(i)
            self._dirty.add(i)
