"""A quarantine for map entries and indexes given back while the datapath may still use
them (no root, no maps).

A BPF program that read a service's old value just before dpd replaced or deleted it
still uses what that value pointed at (its ep_map and slot_map runs, its counter slots)
until it ends. Such a program runs under RCU with migration disabled and never sleeps;
a TC run takes microseconds. So what dpd gives back waits GRACE_S (5 ms, over a
thousand times a run) before it can be handed out again: a late packet then reads the
old run as it was and counts against the old slots, never another service's.

Whoever holds a Quarantine hands back what is `due()` (its grace passed) to its free
pool before allocating, and, when only quarantined things would do, `wait()`s for the
oldest (at most the grace) rather than fail.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

GRACE_S = 0.005  # a TC program's run is microseconds

T = TypeVar("T")


class Quarantine(Generic[T]):
    """Batches given back, each with its size, until their grace has passed."""

    def __init__(self, grace_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.grace_s = GRACE_S if grace_s is None else grace_s
        self.clock = clock
        self.sleep = sleep
        self.held = 0  # the sizes of the batches in their grace
        self.waits = 0  # wait()s that found something to wait for
        self._batches: deque[tuple[float, int, T]] = deque()  # (due, size, batch)

    def add(self, batch: T, size: int) -> None:
        """Quarantine `batch` (of `size`) from now."""
        self._batches.append((self.clock() + self.grace_s, size, batch))
        self.held += size

    def due(self, now: float | None = None) -> list[T]:
        """The batches whose grace has passed (by `now`), out of the quarantine."""
        batches = self._batches
        out: list[T] = []
        if batches:
            if now is None:
                now = self.clock()
            while batches and batches[0][0] <= now:
                _, size, batch = batches.popleft()
                self.held -= size
                out.append(batch)
        return out

    def wait(self) -> list[T] | None:
        """Wait out the oldest batch's grace: the batches due then (at least that one);
        None, at once, when nothing is quarantined."""
        if not self._batches:
            return None
        due = self._batches[0][0]
        delay = due - self.clock()
        if delay > 0:
            self.sleep(delay)
        self.waits += 1
        return self.due(max(due, self.clock()))
