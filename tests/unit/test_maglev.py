"""Maglev tables (dpd/maglev.py) and their upkeep by the service table, on in-memory
maps: the same table on every node, weights, minimal disruption, make-before-break."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dpd import abi, maglev
from dpd.loader import Settings
from dpd.memory import MemoryDatapath
from dpd.node import Node
from dpd.services import ServiceTable
from xlbcore.service import Algorithm, EndpointSpec, Proto, ServiceSpec

ABI = abi.load()
M = maglev.DEFAULT_SIZE


def eps(n: int, weight: int = 1) -> list[tuple[str, int, int]]:
    return [(f"198.18.{1 + i // 200}.{1 + i % 200}", 8080, weight) for i in range(n)]


def test_default_size_is_a_prime_within_the_datapath_table():
    assert maglev.is_prime(M) and M <= ABI.const("XLB_MAGLEV_SIZE")
    for bad in (0, 1, 2, 4, 16384, 65537, ABI.const("XLB_MAGLEV_SIZE") + 2):
        with pytest.raises(ValueError):
            maglev.check_size(bad)
    assert maglev.check_size(251) == 251


def test_every_entry_names_a_live_endpoint_and_shares_follow_weights():
    e = [("198.18.1.1", 80, 2), ("198.18.1.2", 80, 1), ("198.18.1.3", 80, 1),
         ("198.18.1.4", 80, 0)]
    t = maglev.build(e)
    assert len(t) == M
    c = Counter(t)
    assert set(c) == {0, 1, 2}  # weight 0: no entry
    assert abs(c[0] / M - 0.5) < 0.01 and abs(c[1] / M - 0.25) < 0.01
    assert maglev.build([("198.18.1.1", 80, 0)]) == []
    assert maglev.build([]) == []


def test_table_depends_only_on_the_endpoints_not_their_order():
    e = eps(20)
    t = maglev.build(e, 1021)
    order = list(range(20))
    random.Random(7).shuffle(order)
    shuffled = [e[i] for i in order]
    t2 = maglev.build(shuffled, 1021)
    # same endpoint at every entry (indexes are into each caller's own list)
    assert [e[i] for i in t] == [shuffled[i] for i in t2]
    assert maglev.build(e, 1021) == t  # and twice the same


def disruption(n: int, size: int = M) -> tuple[float, float, bool]:
    """Remove one of n endpoints: (fraction of entries that changed endpoint, fraction
    moved among entries the removed endpoint did not hold, all of its entries moved)."""
    e = eps(n)
    before = [e[i] for i in maglev.build(e, size)]
    gone = e[n // 2]
    rest = [x for x in e if x != gone]
    after = [rest[i] for i in maglev.build(rest, size)]
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    kept_owner = [(a, b) for a, b in zip(before, after, strict=True) if a != gone]
    extra = sum(a != b for a, b in kept_owner)
    return moved / size, extra / size, all(b != gone for b in after)


@pytest.mark.parametrize("n", [3, 10, 50])
def test_removing_one_of_n_endpoints_moves_about_one_nth(n):
    moved, extra, all_moved = disruption(n)
    assert all_moved
    assert moved < 2 / n  # 1/n must move (the removed endpoint's share): near-minimal
    assert extra < 1 / n  # few entries of the other endpoints change hands


def test_service_table_writes_the_table_before_the_service_and_frees_it():
    node = Node(MemoryDatapath(Settings(name="mem", max_services=8, max_backends=32,
                                        ct_size=64)), ct_aging_interval=0)
    try:
        t: ServiceTable = node.services  # type: ignore[attr-defined]
        mg = t.maglev
        e3 = tuple(EndpointSpec(a, p, w) for a, p, w in eps(3))
        spec = ServiceSpec("198.19.0.10", 80, Proto.TCP, Algorithm.MAGLEV, endpoints=e3)
        node.put_services([spec])
        keys = [k for k, _ in mg.items()]
        assert len(keys) == 1
        val = t._maglev.unpack(mg.get(keys[0]))
        assert val["size"] == M
        assert list(val["ep"][:M]) == maglev.build(eps(3))
        # a change: the new table under the other key, the old one deleted
        node.put_services([ServiceSpec("198.19.0.10", 80, Proto.TCP, Algorithm.MAGLEV,
                                       endpoints=e3[:2])])
        keys2 = [k for k, _ in mg.items()]
        assert len(keys2) == 1 and keys2 != keys
        assert node.list_services()[0].algorithm == Algorithm.MAGLEV
        # a restarted dpd reads which key is in use from the service's flags
        again = ServiceTable(node.dp)  # type: ignore[attr-defined]
        assert [k for k, _ in mg.items()] == keys2
        assert dict(again.entries())[spec.key].maglev_b == dict(t.entries())[spec.key].maglev_b
        # to round-robin: no table; and back, then deleted: none
        node.put_services([ServiceSpec("198.19.0.10", 80, Proto.TCP, Algorithm.ROUND_ROBIN,
                                       endpoints=e3)])
        assert list(mg.items()) == []
        node.put_services([spec])
        assert len(list(mg.items())) == 1
        node.delete_services([spec.key])
        assert list(mg.items()) == []
    finally:
        node.close()


def test_xlbctl_and_the_model_know_maglev():
    from policyd.client import make_service
    from xlb.types.v1 import types_pb2 as tpb
    from xlbcore.service import parse_algorithm

    svc = make_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:8080"], "maglev")
    assert svc.algorithm == tpb.ALGORITHM_MAGLEV == ABI.const("XLB_ALGO_MAGLEV")
    assert parse_algorithm(tpb.ALGORITHM_MAGLEV) == Algorithm.MAGLEV
