"""Maglev lookup tables (pure Python), weighted, the same on every node.

Maglev (Eisenbud et al., NSDI 2016) gives each endpoint a permutation of the table's M
entries (M prime) from two hashes of the endpoint's identity: offset = h1 % M and
skip = h2 % (M - 1) + 1. Endpoints take turns claiming the next entry of their
permutation that is still free until the table is full. Weighted (as Katran and Cilium
do): an endpoint takes turns in proportion to its weight (the heaviest every round), so
its share of entries, hence of new flows, follows its weight; weight 0 takes none.

The table depends only on the endpoints' (address, port, weight) and M: the hashes use
a fixed key, and endpoints take their turns in the order of their identity, not in the
order they were given nor by any id, so two nodes build identical tables and pick the
same endpoint for the same flow. Removing one of N endpoints moves about 1/N of the
entries: those it held, and few others (docs/maglev.md).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Sequence

from dpd import abi

CAPACITY = abi.load().const("XLB_MAGLEV_SIZE")  # entries the datapath's table holds
DEFAULT_SIZE = CAPACITY
_SEED = b"xlb-maglev-v1"  # fixed: every node must hash endpoints the same way


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def check_size(size: int) -> int:
    """`size` if it is a usable table size (a prime in [3, CAPACITY]), else ValueError."""
    if not 3 <= size <= CAPACITY or not is_prime(size):
        raise ValueError(f"Maglev table size {size}: must be a prime between 3 and {CAPACITY}")
    return size


def _identity(address: str, port: int) -> bytes:
    """An endpoint's bytes: its address (4 bytes, IPv6 16) and port."""
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address) + port.to_bytes(2, "big")
    return socket.inet_aton(address) + port.to_bytes(2, "big")


def permutation(address: str, port: int, size: int) -> tuple[int, int]:
    """(offset, skip) of an endpoint's permutation of a table of `size` entries."""
    d = hashlib.blake2b(_identity(address, port), digest_size=16, key=_SEED).digest()
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def build(endpoints: Sequence[tuple[str, int, int]], size: int = DEFAULT_SIZE) -> list[int]:
    """The lookup table for endpoints given as (address, port, weight): `size` entries,
    each an index into `endpoints`. Empty when no endpoint has a weight > 0."""
    check_size(size)
    live = sorted((_identity(a, p), i, w) for i, (a, p, w) in enumerate(endpoints) if w > 0)
    if not live:
        return []
    idx = [i for _, i, _ in live]
    weights = [w for _, _, w in live]
    pos: list[int] = []
    skips: list[int] = []
    for i in idx:
        off, skip = permutation(endpoints[i][0], endpoints[i][1], size)
        pos.append(off)
        skips.append(skip)
    wmax = max(weights)
    credit = [0] * len(idx)
    table = [-1] * size
    filled = 0
    n = len(idx)
    while True:
        for k in range(n):
            credit[k] += weights[k]
            if credit[k] < wmax:
                continue
            credit[k] -= wmax
            c, skip = pos[k], skips[k]
            while table[c] >= 0:
                c += skip
                if c >= size:
                    c -= size
            table[c] = idx[k]
            c += skip
            pos[k] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return table
