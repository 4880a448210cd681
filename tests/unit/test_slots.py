from collections import Counter

import pytest

from dpd.slots import SLOTS, build_slots, slot_counts


def test_equal_weights_one_slot_each_interleaved():
    assert build_slots([1, 1, 1]) == [0, 1, 2]


def test_weights_are_exact_when_small():
    table = build_slots([3, 1])
    assert Counter(table) == {0: 3, 1: 1}
    assert table[:2] != [0, 0] or table[2] != 0  # not all of endpoint 0 first


def test_common_factor_is_reduced():
    assert slot_counts([100, 200]) == [1, 2]


def test_zero_weight_endpoint_gets_no_slots():
    table = build_slots([2, 0, 1])
    assert 1 not in table
    assert Counter(table) == {0: 2, 2: 1}


def test_all_drained_gives_empty_table():
    assert build_slots([0, 0]) == []


@pytest.mark.parametrize("weights", [[1000, 1], [7, 11, 13, 17, 19, 23], [500, 300, 200, 7]])
def test_large_weights_fill_table_proportionally(weights):
    counts = slot_counts(weights)
    assert sum(counts) <= SLOTS
    assert all(c >= 1 for c in counts)
    total = sum(weights)
    for w, c in zip(weights, counts, strict=True):
        assert abs(c / sum(counts) - w / total) < 0.02 or c == 1


def test_smooth_order_spreads_heavy_endpoint():
    table = build_slots([5, 1, 1])
    # endpoint 0 never takes more than 3 consecutive slots
    run = longest = 0
    for e in table:
        run = run + 1 if e == 0 else 0
        longest = max(longest, run)
    assert longest <= 3
