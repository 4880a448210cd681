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
    ext = Extents(100)
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
        a, b = Extents(size), Extents(size)
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
