"""Runs of consecutive entries in an array map, allocated and freed (no root, no maps).

Each service holds one run of ep_map (its endpoints) and one of slot_map (its slot
table). A changed endpoint set is written to a fresh run before the service points at
it, and the old run is freed after, so a run is never rewritten while a service uses it.

First fit over the free runs kept sorted by start, neighbours merged when freed: a table
filled and emptied in any order ends as one free run again. Allocation of n entries when
no free run holds n raises Exhausted, and `reserve` takes several runs all or none.

A freed run is quarantined for `grace_s` (dpd/grace.py, 5 ms) before it can be handed
out again: a slow-path packet on another CPU that read a service's old nat value just
before the flip may still be reading the old run (its selection in lb.h), and must not
find it rewritten for another service (5 ms is also more than the firewall's 2 ms for
its old generation: the endpoint runs are read a little later in a packet's path).
Allocation takes back the runs whose grace has passed; one that fits only with runs
still in their grace waits for them (at most grace_s) rather than fail. Runs given back
that no service ever pointed at (`discard`) are free at once. A restarted dpd starts
with nothing quarantined: it was down for far longer than the grace.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate

import numpy as np

from dpd.grace import Quarantine
from xlbcore.errors import Exhausted


class Extents:
    def __init__(self, size: int, used: Iterable[tuple[int, int]] = (),
                 what: str = "entries", grace_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """`size` entries; `used`: (start, length) runs already held (a restarted dpd's
        services), which must not overlap. `grace_s`: a freed run's quarantine (None:
        dpd.grace.GRACE_S; 0: none); `clock` and `sleep` measure and wait it out."""
        self.size = size
        self.what = what
        # freed runs in their grace, each batch with its entries (`grace_s`, `clock`,
        # `sleep` and `waits` are the quarantine's)
        self.quarantine: Quarantine[list[tuple[int, int]]] = Quarantine(grace_s, clock, sleep)
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
        """Entries no one holds: free, or freed and still in their grace."""
        return sum(self._lens) + self.quarantine.held

    def quarantined(self) -> int:
        """Entries freed and still in their grace (after taking back the due ones)."""
        self._reclaim()
        return self.quarantine.held

    def largest(self) -> int:
        """The longest run that can be handed out now."""
        self._reclaim()
        return max(self._lens, default=0)

    def _reclaim(self) -> None:
        """Make the quarantined runs whose grace has passed free."""
        for runs in self.quarantine.due():
            self.discard(runs)

    def _wait(self) -> bool:
        """Wait out the grace of the oldest quarantined runs and make them free; False
        when none are quarantined."""
        due = self.quarantine.wait()
        for runs in due or ():
            self.discard(runs)
        return due is not None

    def alloc(self, n: int) -> int:
        """The start of a free run of `n` entries (n > 0), now held; Exhausted when no
        free run is that long, also once the quarantined runs are free."""
        self._reclaim()
        while True:
            start = self._alloc(n)
            if start is not None:
                return start
            if self.free_entries() < n or not self._wait():
                raise self._exhausted(n)

    def _exhausted(self, n: int) -> Exhausted:
        largest = self.largest()
        grace = (f", {self.quarantine.held} of them freed less than "
                 f"{self.quarantine.grace_s * 1000:g} ms ago") if self.quarantine.held else ""
        return Exhausted(f"{self.what}: no room for {n} consecutive entries "
                         f"({self.free_entries()} free of {self.size}{grace}, largest free "
                         f"run {largest})")

    def _alloc(self, n: int) -> int | None:
        """First fit of `n` among the free runs, None when none is that long."""
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
        return None

    def reserve(self, sizes: Sequence[int]) -> list[int]:
        """Starts of runs of each of `sizes`, all or none (Exhausted: none held, also
        once the quarantined runs are free)."""
        self._reclaim()
        while True:
            try:
                return self._reserve(sizes)
            except Exhausted:
                if self.free_entries() < sum(sizes) or not self._wait():
                    raise

    def reserve_array(self, sizes: Sequence[int] | np.ndarray) -> np.ndarray:
        """reserve, as an array of starts (np.int64); a batch that fits the first free
        run is placed without a Python step per run."""
        per = np.asarray(sizes, np.int64)
        self._reclaim()
        if len(per) and per.min() > 0 and (start := self._take_first(int(per.sum()))) is not None:
            return start + np.cumsum(per) - per
        return np.asarray(self.reserve(per.tolist()), np.int64)

    def _take_first(self, total: int) -> int | None:
        """The start of `total` entries taken from the first free run when it holds
        them (where first fit puts a batch's runs one by one: back to back from its
        start, so the batch is placed in one step); None when it does not."""
        if not self._lens or self._lens[0] < total:
            return None
        start = self._starts[0]
        if self._lens[0] == total:
            del self._starts[0], self._lens[0]
        else:
            self._starts[0] = start + total
            self._lens[0] -= total
        return start

    def _reserve(self, sizes: Sequence[int]) -> list[int]:
        if sizes and min(sizes) > 0 and (start := self._take_first(sum(sizes))) is not None:
            return list(accumulate(sizes[:-1], initial=start))
        out: list[int] = []
        for n in sizes:
            at = self._alloc(n) if n > 0 else 0
            if at is None:
                self.discard(list(zip(out, sizes, strict=False)))
                raise self._exhausted(n)
            out.append(at)
        return out

    def free(self, runs: Iterable[tuple[int, int]]) -> None:
        """Give back runs (start, length) held by alloc that a service may have pointed
        at until now: reusable once the grace has passed. Length 0 is nothing. A run
        freed twice is found when its grace ends (ValueError)."""
        if not self.quarantine.grace_s:
            self.discard(runs)
            return
        held = [(s, n) for s, n in runs if n > 0]
        if held:
            self.quarantine.add(held, sum(n for _, n in held))

    def discard(self, runs: Iterable[tuple[int, int]]) -> None:
        """Give back runs (start, length) held by alloc that no service ever pointed at
        (or whose grace has passed): free at once. Length 0 is nothing."""
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
