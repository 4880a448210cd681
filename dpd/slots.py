"""Weighted slot tables for endpoint selection (pure Python).

The datapath picks slot `i` of a service's table (round-robin cursor or flow hash)
and sends the flow to the endpoint stored there, so each endpoint's share of slots is
its share of new flows. Tables are exact when the reduced weights sum to at most
XLB_SLOTS, and proportional (largest remainder) beyond that. The order interleaves
endpoints (smooth weighted round-robin) so that consecutive flows spread out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dpd import abi

SLOTS = abi.load().const("XLB_SLOTS")  # slots per service, from the ABI header


def slot_counts(weights: Sequence[int], size: int = SLOTS) -> list[int]:
    """How many slots each endpoint gets; all zero when every weight is 0."""
    live = [w for w in weights if w > 0]
    if not live:
        return [0] * len(weights)
    g = math.gcd(*live)
    reduced = [w // g for w in weights]
    total = sum(reduced)
    if total <= size:
        return reduced
    quotas = [w * size / total for w in reduced]
    counts = [int(q) for q in quotas]
    # Every endpoint with weight > 0 keeps at least one slot.
    for i, w in enumerate(reduced):
        if w > 0 and counts[i] == 0:
            counts[i] = 1
    short = size - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: quotas[i] - int(quotas[i]), reverse=True)
    for i in order:
        if short <= 0:
            break
        if reduced[i] > 0:
            counts[i] += 1
            short -= 1
    while short < 0:  # the minimum-one rule overfilled: take from the largest
        big = max(range(len(counts)), key=lambda i: counts[i])
        counts[big] -= 1
        short += 1
    return counts


def build_slots(weights: Sequence[int], size: int = SLOTS) -> list[int]:
    """The slot table: endpoint indexes, interleaved by smooth weighted round-robin."""
    counts = slot_counts(weights, size)
    total = sum(counts)
    current = [0] * len(counts)
    table: list[int] = []
    for _ in range(total):
        for i, c in enumerate(counts):
            current[i] += c
        best = max(range(len(counts)), key=lambda i: current[i])
        current[best] -= total
        table.append(best)
    return table
