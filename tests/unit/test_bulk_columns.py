"""The bulk fast path (dpd/bulkput.py parse_bulk + ServiceTable.put_bulk) gives what the
full path (parse_services + ServiceTable.put) gives: on random batches, the same
ServiceSpecs, the same bytes in every map, the same ListServices (specs, pages, summary),
through later replaces, deletes, health changes and a restart; and for every batch
parse_services refuses, parse_bulk takes nothing (the servicer then runs parse_services,
whose error is the answer)."""

from __future__ import annotations

import random

import pytest

from dpd.bulkput import parse_bulk
from dpd.loader import Settings
from dpd.memory import MemoryDatapath
from dpd.services import ServiceTable
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import ValidationError
from xlbcore.service import ServiceKey, parse_services

EP_ADDRESSES = ["198.18.1.2", "198.18.1.3", "198.18.1.10", "198.18.2.1", "198.18.10.7",
                "198.18.1.20"]
SPACED = [" 198.18.1.4", "198.18.10.8 "]  # parse_services strips them
BAD_ADDRESSES = ["127.0.0.1", "1.2.3", "198.018.1.4", "0.0.0.0", "224.0.0.1", "2001:db8::1", "x"]


def random_service(rng: random.Random, bad: bool, plain: bool) -> pb.Service:
    eps = []
    pool = EP_ADDRESSES + (SPACED if rng.random() < 0.02 else []) + (BAD_ADDRESSES if bad else [])
    pairs = [(a, p) for a in pool
             for p in [8080, 8081, 1, 65535] + ([0, 70000] if bad else [])]
    chosen = rng.sample(pairs, rng.choice([1, 2, 3, 4, 7]))
    if bad and rng.random() < 0.2:
        chosen.append(chosen[0])  # listed twice
    for address, port in chosen:
        ep = tpb.Endpoint(address=address, port=port)
        w = rng.choice([None, 0, 1, 5, 1000] + ([1001] if bad else []))
        if w is not None:
            ep.weight = w
        if not plain:
            ep.priority = rng.choice([0, 0, 0, 0, 1])
        eps.append(ep)
    msg = pb.Service(
        vip=f"198.19.{rng.randrange(4)}.{rng.randrange(1, 60)}" + rng.choice(["", "", " "]),
        port=rng.choice([80, 443, 8080, 1, 65535] + ([0, 65536] if bad else [])),
        protocol=rng.choice([tpb.PROTOCOL_TCP, tpb.PROTOCOL_UDP, tpb.PROTOCOL_SCTP]
                            + ([0, 9] if bad else [])),
        algorithm=rng.choice([0, 1, 2, 4, 5] + ([3] if not plain else []) + ([6] if bad else [])),
        persistence_timeout_s=rng.choice([0, 0, 1, 65535] + ([65536] if bad else [])),
        mode=rng.choice([0, 1] + ([2] if not plain else []) + ([9] if bad else [])),
        endpoints=eps)
    if bad and rng.random() < 0.1:
        msg.vip = rng.choice(BAD_ADDRESSES)
    if not plain and rng.random() < 0.1:
        msg.health.kind = tpb.HEALTH_CHECK_KIND_TCP
    return msg


def batch(rng: random.Random, n: int, bad: bool = False, plain: bool = True) -> list[pb.Service]:
    out, seen = [], set()
    while len(out) < n:
        msg = random_service(rng, bad and rng.random() < 0.2, plain)
        if (msg.vip.strip(), msg.port, msg.protocol) not in seen:
            seen.add((msg.vip.strip(), msg.port, msg.protocol))
            out.append(msg)
    if bad and rng.random() < 0.2 and out:  # a key twice
        out.append(out[0])
    return out


def tables() -> tuple[MemoryDatapath, ServiceTable, MemoryDatapath, ServiceTable]:
    s = Settings(name="m", max_services=1024, max_backends=65536, ct_size=64)
    a, b = MemoryDatapath(s), MemoryDatapath(s)
    ta, tb = ServiceTable(a), ServiceTable(b)
    for t in (ta, tb):  # freed runs reusable at once: where runs go is not a matter of time
        for q in (t.ep_space.quarantine, t.slot_space.quarantine, t.svc_ids.quarantine,
                  t.stat_ids.quarantine):
            q.grace_s = 0
    return a, ta, b, tb


def put_fast(t: ServiceTable, msgs: list[pb.Service]) -> tuple[int, bool]:
    """As dpd's PutServices: the bulk path when it takes the batch, else the full one."""
    bulk = parse_bulk(msgs)
    n = t.put_bulk(bulk) if bulk is not None else None
    if n is not None:
        return n, True
    return t.put(bulk.specs() if bulk is not None else parse_services(msgs, "services")), False


def maps_bytes(dp: MemoryDatapath) -> dict[str, list[tuple[bytes, bytes]]]:
    return {name: sorted((bytes(k), bytes(v)) for k, v in m.items())
            for name, m in dp.maps.items()}


def same(da: MemoryDatapath, a: ServiceTable, db: MemoryDatapath, b: ServiceTable) -> None:
    assert b.summary() == a.summary()  # before anything makes b's entries
    assert b.count() == a.count()
    assert maps_bytes(db) == maps_bytes(da)
    assert b.specs() == a.specs()  # ListServices: the same services, the same order
    assert b.page(None, 7) == a.page(None, 7)
    assert [(k, e.svc_id, e.ep_ids, e.ep_base, e.slot_base, e.n_slots)
            for k, e in b.entries()] == [(k, e.svc_id, e.ep_ids, e.ep_base, e.slot_base,
                                          e.n_slots) for k, e in a.entries()]


@pytest.mark.parametrize("seed", range(20))
def test_random_batches_write_what_the_full_path_writes(seed: int) -> None:
    rng = random.Random(seed)
    da, a, db, b = tables()
    took = 0
    for step in range(4):
        msgs = batch(rng, rng.choice([1, 5, 30, 80]), plain=rng.random() < 0.7)
        specs = parse_services(msgs, "services")
        bulk = parse_bulk(msgs)
        if bulk is not None:
            assert bulk.specs() == specs
            assert [(s.columns, s.grouped) for s in bulk.specs()] == \
                [(s.columns, s.grouped) for s in specs]
        n, fast = put_fast(b, msgs)
        took += fast
        assert n == a.put(specs)
        if step % 2:  # sometimes read in between, sometimes pile up bulk puts
            same(da, a, db, b)
        if rng.random() < 0.3:  # deletes of some held keys (and one not held)
            keys = [s.key for s in rng.sample(specs, min(3, len(specs)))] + \
                [ServiceKey("198.19.9.9", 9, specs[0].proto)]
            assert b.delete(keys) == a.delete(keys)
        if rng.random() < 0.3:  # health takes an endpoint out (only checked services move)
            s = rng.choice(specs)
            changes = {s.key: frozenset({(s.endpoints[0].address, s.endpoints[0].port)})}
            assert b.set_down(changes) == a.set_down(changes)
    same(da, a, db, b)
    assert b.lc_stat_ids() == a.lc_stat_ids()
    # a restarted dpd reads back the same services
    da.reused = db.reused = True
    assert ServiceTable(db).specs() == ServiceTable(da).specs()
    if seed < 5:
        assert took  # the fast path is taken at all


def test_lc_stat_ids_and_summary_without_making_entries() -> None:
    rng = random.Random(7)
    da, a, db, b = tables()
    msgs = batch(rng, 50)
    for m in msgs:
        m.algorithm = tpb.ALGORITHM_LEAST_CONNECTIONS
        for ep in m.endpoints:
            ep.address = ep.address.strip()  # what the bulk path takes
    a.put(parse_services(msgs, "services"))
    n, fast = put_fast(b, msgs)
    assert fast and n == len(msgs)
    assert b.summary() == a.summary()
    assert b.lc_stat_ids() == a.lc_stat_ids()
    assert b.ct_timeouts() == a.ct_timeouts() == {}
    assert b._bulk  # still columns: neither read made the entries
    same(da, a, db, b)


@pytest.mark.parametrize("seed", range(200))
def test_bad_batches_are_left_to_parse_services(seed: int) -> None:
    rng = random.Random(1000 + seed)
    msgs = batch(rng, rng.choice([1, 3, 10]), bad=True, plain=rng.random() < 0.7)
    try:
        specs = parse_services(msgs, "services")
    except ValidationError:
        assert parse_bulk(msgs) is None
        return
    bulk = parse_bulk(msgs)
    assert bulk is None or bulk.specs() == specs


def test_a_held_key_goes_the_full_way() -> None:
    rng = random.Random(3)
    da, a, db, b = tables()
    msgs = batch(rng, 20)
    for m in msgs:
        for ep in m.endpoints:
            ep.address = ep.address.strip()
    a.put(parse_services(msgs, "services"))
    assert put_fast(b, msgs)[1]
    msgs[0].endpoints[0].weight = 7  # one replaced, the rest the same
    a.put(parse_services(msgs, "services"))
    assert put_fast(b, msgs) == (20, False)
    same(da, a, db, b)


@pytest.mark.parametrize("seed", range(6))
def test_batches_of_one_weight_per_service_write_what_the_full_path_writes(seed: int) -> None:
    """The usual batch (each service's endpoints of one weight) finds its slot tables
    without a weight tuple per service: one table for all, or a few by count and weight."""
    rng = random.Random(500 + seed)
    da, a, db, b = tables()
    msgs = batch(rng, rng.choice([1, 40, 120]))
    one = seed % 2 == 0  # every service alike (count and weight), or a few kinds
    for m in msgs:
        w = 1 if one else rng.choice([0, 1, 5, 1000])
        del m.endpoints[(2 if one else rng.choice([1, 2, 3])):]
        for ep in m.endpoints:
            ep.address = ep.address.strip()
            ep.weight = w
    a.put(parse_services(msgs, "services"))
    n, fast = put_fast(b, msgs)
    assert fast and n == len(msgs)
    same(da, a, db, b)
