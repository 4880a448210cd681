"""Index allocation for per-service and per-endpoint counter slots (pure Python)."""

from __future__ import annotations

from collections.abc import Iterable


class Exhausted(Exception):
    """A datapath table is full. Nothing was written."""


class IdPool:
    """Integers 0..size-1. Reservations are tentative until commit() or rollback()."""

    def __init__(self, size: int, used: Iterable[int] = ()) -> None:
        self.size = size
        self._used = set(used)
        self._next = 0
        self._pending: list[int] = []

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
        out: list[int] = []
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
