"""Runs of consecutive entries in an array map, allocated and freed (pure Python).

Each service holds one run of ep_map (its endpoints) and one of slot_map (its slot
table). A changed endpoint set is written to a fresh run before the service points at
it, and the old run is freed after, so a run is never rewritten while a service uses it.

First fit over the free runs kept sorted by start, neighbours merged when freed: a table
filled and emptied in any order ends as one free run again. Allocation of n entries when
no free run holds n raises Exhausted, and `reserve` takes several runs all or none.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from itertools import accumulate

from xlbcore.errors import Exhausted


class Extents:
    def __init__(self, size: int, used: Iterable[tuple[int, int]] = (),
                 what: str = "entries") -> None:
        """`size` entries; `used`: (start, length) runs already held (a restarted dpd's
        services), which must not overlap."""
        self.size = size
        self.what = what
        self._starts: list[int] = []  # free runs, sorted by start
        self._lens: list[int] = []
        at = 0
        for start, n in sorted((s, n) for s, n in used if n > 0):
            if start < at or start + n > size:
                raise ValueError(f"{what}: run {start}+{n} overlaps another or the end")
            if start > at:
                self._starts.append(at)
                self._lens.append(start - at)
            at = start + n
        if at < size:
            self._starts.append(at)
            self._lens.append(size - at)

    def free_entries(self) -> int:
        return sum(self._lens)

    def largest(self) -> int:
        return max(self._lens, default=0)

    def alloc(self, n: int) -> int:
        """The start of a free run of `n` entries (n > 0), now held; Exhausted when no
        free run is that long."""
        lens = self._lens
        for i, have in enumerate(lens):
            if have >= n:
                start = self._starts[i]
                if have == n:
                    del self._starts[i], lens[i]
                else:
                    self._starts[i] = start + n
                    lens[i] = have - n
                return start
        raise Exhausted(f"{self.what}: no room for {n} consecutive entries "
                        f"({self.free_entries()} free of {self.size}, largest free run "
                        f"{self.largest()})")

    def reserve(self, sizes: Sequence[int]) -> list[int]:
        """Starts of runs of each of `sizes`, all or none (Exhausted: none held)."""
        if sizes and self._lens and min(sizes) > 0:
            total = sum(sizes)
            if self._lens[0] >= total:
                # the first free run holds them all: where first fit puts each one by
                # one (back to back from its start), in one step
                start = self._starts[0]
                if self._lens[0] == total:
                    del self._starts[0], self._lens[0]
                else:
                    self._starts[0] = start + total
                    self._lens[0] -= total
                return list(accumulate(sizes[:-1], initial=start))
        out: list[int] = []
        try:
            for n in sizes:
                out.append(self.alloc(n) if n > 0 else 0)
        except Exhausted:
            self.free(list(zip(out, sizes, strict=False)))
            raise
        return out

    def free(self, runs: Iterable[tuple[int, int]]) -> None:
        """Give back runs (start, length) held by alloc; length 0 is nothing."""
        starts, lens = self._starts, self._lens
        for start, n in runs:
            if n <= 0:
                continue
            i = bisect.bisect_left(starts, start)
            if (i < len(starts) and starts[i] < start + n) or \
                    (i > 0 and starts[i - 1] + lens[i - 1] > start):
                raise ValueError(f"{self.what}: run {start}+{n} freed twice")
            merge_prev = i > 0 and starts[i - 1] + lens[i - 1] == start
            merge_next = i < len(starts) and starts[i] == start + n
            if merge_prev and merge_next:
                lens[i - 1] += n + lens[i]
                del starts[i], lens[i]
            elif merge_prev:
                lens[i - 1] += n
            elif merge_next:
                starts[i] = start
                lens[i] += n
            else:
                starts.insert(i, start)
                lens.insert(i, n)
