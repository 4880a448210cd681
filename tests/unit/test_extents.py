"""Extents.reserve: a batch gets the runs first fit gives one by one (its one-step path
for a batch that fits the first free run included), all or none."""

from __future__ import annotations

import random

import pytest

from dpd.extents import Extents
from xlbcore.errors import Exhausted


def one_by_one(ext: Extents, sizes: list[int]) -> list[int]:
    """What reserve must give: first fit of each run in turn (all or none)."""
    out: list[int] = []
    try:
        for n in sizes:
            out.append(ext.alloc(n) if n > 0 else 0)
    except Exhausted:
        ext.free(list(zip(out, sizes, strict=False)))
        raise
    return out


def free_runs(ext: Extents) -> list[tuple[int, int]]:
    return list(zip(ext._starts, ext._lens, strict=True))


def test_batch_into_an_empty_space_is_back_to_back() -> None:
    ext = Extents(100, grace_s=0)
    assert ext.reserve([4, 1, 3]) == [0, 4, 5]
    assert free_runs(ext) == [(8, 92)]
    assert ext.reserve([92]) == [8]  # the exact fit takes the run
    assert free_runs(ext) == []
    with pytest.raises(Exhausted):
        ext.reserve([1])


def test_same_runs_as_first_fit_one_by_one() -> None:
    rng = random.Random(8)
    for _ in range(200):
        size = rng.randint(1, 300)
        a, b = Extents(size, grace_s=0), Extents(size, grace_s=0)
        held: list[tuple[int, int]] = []
        for _ in range(30):
            if held and rng.random() < 0.4:  # free some runs, leaving holes
                rng.shuffle(held)
                gone, held = held[:rng.randint(1, len(held))], held
                held = held[len(gone):]
                a.free(gone)
                b.free(gone)
            else:
                sizes = [rng.choice([0, 1, 2, 4, 8, 16]) for _ in range(rng.randint(1, 12))]
                try:
                    want = one_by_one(b, sizes)
                except Exhausted:
                    with pytest.raises(Exhausted):
                        a.reserve(sizes)
                else:
                    assert a.reserve(sizes) == want
                    held += [(s, n) for s, n in zip(want, sizes, strict=True) if n]
            assert free_runs(a) == free_runs(b)


# -- the grace period of freed runs ---------------------------------------------------


class Clock:
    """A fake monotonic clock; its sleep moves it on and records the wait."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def graced(size: int, clock: Clock, used: list[tuple[int, int]] | None = None) -> Extents:
    return Extents(size, used or (), grace_s=0.005, clock=clock, sleep=clock.sleep)


def test_a_freed_run_is_not_handed_out_before_the_grace_and_is_after() -> None:
    clock = Clock()
    ext = graced(12, clock)
    a, b = ext.alloc(4), ext.alloc(4)
    assert (a, b) == (0, 4)
    ext.free([(a, 4)])  # a service pointed at it until now
    assert ext.quarantined() == 4 and ext.free_entries() == 8
    clock.now += 0.0049
    assert ext.alloc(2) == 8  # first fit would be 0: still in its grace
    assert ext.reserve([1, 1]) == [10, 11]
    clock.now += 0.0001
    assert ext.quarantined() == 0
    assert ext.alloc(3) == 0 and ext.reserve([1]) == [3]  # the grace has passed
    assert clock.slept == [] and ext.quarantine.waits == 0


def test_a_freed_batch_waits_in_the_bulk_path_too() -> None:
    clock = Clock()
    ext = graced(100, clock)
    starts = ext.reserve([4] * 10)
    ext.free([(s, 4) for s in starts[:5]])
    assert ext.reserve([4] * 5) == list(range(40, 60, 4))  # not the freed runs
    clock.now += 0.005
    assert ext.reserve([4] * 5) == list(range(0, 20, 4))  # merged and first fit again
    assert clock.slept == []


def test_an_allocation_that_needs_quarantined_space_waits_rather_than_fails() -> None:
    clock = Clock()
    ext = graced(8, clock)
    a = ext.alloc(8)
    ext.free([(a, 8)])
    clock.now += 0.002
    assert ext.alloc(8) == 0  # only after the rest of the grace
    assert clock.slept == [pytest.approx(0.003)] and ext.quarantine.waits == 1
    ext.free([(0, 8)])
    assert ext.reserve([2, 6]) == [0, 2]  # reserve too
    assert clock.slept[1:] == [pytest.approx(0.005)] and ext.quarantine.waits == 2


def test_the_wait_is_for_the_oldest_runs_that_make_room_only() -> None:
    clock = Clock()
    ext = graced(12, clock)
    a, b, c = ext.reserve([4, 4, 4])
    ext.free([(a, 4)])
    clock.now += 0.003
    ext.free([(b, 4)])
    assert ext.alloc(4) == a  # a's grace ends 2 ms on; b's would be 5
    assert clock.slept == [pytest.approx(0.002)]
    assert ext.quarantined() == 4  # b still in its grace
    assert ext.alloc(4) == b and clock.slept[1:] == [pytest.approx(0.003)]


def test_no_wait_when_even_the_quarantined_runs_would_not_do() -> None:
    clock = Clock()
    ext = graced(8, clock)
    a, _ = ext.reserve([4, 4])
    ext.free([(a, 4)])
    with pytest.raises(Exhausted, match="no room for 5"):
        ext.alloc(5)  # 4 quarantined + 0 free: waiting would not help
    with pytest.raises(Exhausted, match="4 free of 8, 4 of them freed less than 5 ms ago"):
        ext.reserve([4, 4])
    assert clock.slept == [] and ext.quarantined() == 4
    clock.now += 0.005
    assert ext.alloc(4) == a


def test_a_full_space_with_nothing_quarantined_fails_at_once() -> None:
    clock = Clock()
    ext = graced(8, clock)
    ext.alloc(6)
    ext.alloc(2)
    with pytest.raises(Exhausted, match="0 free of 8"):
        ext.reserve([1])
    assert clock.slept == []


def test_runs_given_back_unused_are_free_at_once() -> None:
    clock = Clock()
    ext = graced(8, clock)
    a = ext.alloc(8)
    ext.discard([(a, 8)])  # no service ever pointed at it (a failed put)
    assert ext.alloc(8) == 0 and clock.slept == []


def test_a_run_freed_twice_is_found_when_its_grace_ends() -> None:
    clock = Clock()
    ext = graced(8, clock)
    a = ext.alloc(4)
    ext.free([(a, 4)])
    ext.free([(a, 4)])
    clock.now += 0.005
    with pytest.raises(ValueError, match="freed twice"):
        ext.alloc(1)


def test_a_restart_starts_with_nothing_quarantined() -> None:
    clock = Clock()
    ext = graced(12, clock, used=[(4, 4)])  # the runs a restarted dpd reads back
    assert ext.quarantined() == 0 and ext.free_entries() == 8
    assert ext.reserve([4, 4]) == [0, 8] and clock.slept == []
