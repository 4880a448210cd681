"""dpd's bulk path gives what the one-by-one path gives: parse_services (a fast path
for valid services) equals parse_service on every message and raises the same error
for every bad one; ServiceTable's column-wise encoding writes exactly the bytes the
ABI codec packs field by field; restarts, pages and id runs are unchanged."""

from __future__ import annotations

import gc
import random
import socket
from dataclasses import replace

import pytest

from dpd.abi import load
from dpd.ids import IdPool
from dpd.loader import Settings
from dpd.maps import MapError
from dpd.memory import MemoryDatapath
from dpd.services import ServiceTable
from dpd.slots import build_slots
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore import gcpause
from xlbcore import service as service_module
from xlbcore.errors import Exhausted, ValidationError
from xlbcore.service import (
    Algorithm,
    EndpointSpec,
    HealthKind,
    HealthSpec,
    Mode,
    Proto,
    ServiceSpec,
    parse_service,
    parse_services,
)

ADDRESSES = ["198.18.1.2", " 198.18.1.3", "198.18.1.10", "198.18.2.1", "127.0.0.1",
             "1.2.3", "0.0.0.0", "198.18.1.2 ", "224.0.0.1", "10.0.0.1"]


def random_service(rng: random.Random, bad: bool) -> pb.Service:
    eps = []
    for _ in range(rng.choice([1, 2, 3, 4, 7])):
        ep = tpb.Endpoint(address=rng.choice(ADDRESSES[:4] if not bad else ADDRESSES),
                          port=rng.choice([8080, 8081, 1, 65535] + ([0, 70000] if bad else [])))
        w = rng.choice([None, 0, 1, 5, 1000] + ([1001] if bad else []))
        if w is not None:
            ep.weight = w
        ep.priority = rng.choice([0, 0, 0, 1, 255] + ([256] if bad else []))
        eps.append(ep)
    return pb.Service(
        vip=rng.choice(["198.19.0.1", "198.19.0.2 ", "198.19.3.4"]
                       + (["127.0.0.1", "x"] if bad else [])),
        port=rng.choice([80, 443] + ([0, 65536] if bad else [])),
        protocol=rng.choice([tpb.PROTOCOL_TCP, tpb.PROTOCOL_UDP] + ([0, 9] if bad else [])),
        algorithm=rng.choice([0, 1, 2, 3, 4, 5] + ([6] if bad else [])),
        persistence_timeout_s=rng.choice([0, 0, 1, 65535] + ([65536] if bad else [])),
        mode=rng.choice([0, 1] + ([9] if bad else [])),  # other modes: parse_service
        endpoints=eps)


def outcome(fn, *args):
    try:
        return fn(*args)
    except ValidationError as e:
        return ("error", str(e))


@pytest.mark.parametrize("bad", [False, True])
def test_parse_services_is_parse_service_for_every_message(bad):
    rng = random.Random(7)
    fast = refused = anyport = 0
    for _ in range(3000):
        msg = random_service(rng, bad)
        got = outcome(parse_services, [msg], "services")
        assert got == outcome(lambda m: [parse_service(m, "services[0]")], msg)
        fast += service_module._service_fast(msg) is not None
        refused += isinstance(got, tuple)
        if not isinstance(got, tuple) and got[0].port == 0:  # any-port: parse_service's
            anyport += 1
        elif not isinstance(got, tuple):  # what it made ahead is what the spec makes
            made = got[0].__dict__
            assert made.get("columns") == replace(got[0]).columns
            assert made.get("grouped") == replace(got[0]).grouped
    assert fast + refused + anyport == 3000  # every other valid service: the fast path
    assert (fast > 0 and refused > 2000) if bad else fast > 2000


def test_parse_services_names_the_first_key_given_twice():
    a = pb.Service(vip="198.19.0.1", port=80, protocol=tpb.PROTOCOL_TCP,
                   endpoints=[tpb.Endpoint(address="198.18.1.2", port=1)])
    b = pb.Service()
    b.CopyFrom(a)
    b.port = 81
    with pytest.raises(ValidationError, match=r"services: tcp://198.19.0.1:80 appears"):
        parse_services([a, b, b, a], "services")
    bad = pb.Service()
    bad.CopyFrom(a)
    bad.endpoints[0].port = 0
    with pytest.raises(ValidationError, match=r"services\[2\].endpoints\[0\].port"):
        parse_services([a, b, bad], "services")


def spec(i: int, n: int, algorithm: Algorithm = Algorithm.ROUND_ROBIN) -> ServiceSpec:
    eps = tuple(sorted(EndpointSpec(f"198.{18 + j // 256}.{j % 256}.{i % 250 + 1}", 8000 + j,
                                    (i + j) % 4)
                       for j in range(n)))
    return ServiceSpec(f"198.19.{i // 250}.{i % 250 + 1}", 80 + i % 3, Proto.TCP, algorithm,
                       endpoints=eps)


@pytest.fixture
def table():
    return ServiceTable(MemoryDatapath(Settings(name="m", max_services=512,
                                                max_backends=8192, ct_size=64)),
                        maglev_size=251)


def restarted(table: ServiceTable) -> ServiceTable:
    """A new table over the same maps, as a restarted dpd makes."""
    dp = MemoryDatapath(Settings(name="m", max_services=512, max_backends=8192, ct_size=64))
    for name, m in (("maglev_v4_map", table.maglev), ("nat_v4_map", table.nat),
                    ("svc_stats_map", table.svc_stats), ("ep_stats_map", table.ep_stats),
                    ("rr_map", table.rr), ("vip_v4_map", table.vips),
                    ("svc_cfg_map", table.cfg), ("ep_conn_map", table.ep_conn),
                    ("ep_map", table.ep_map), ("slot_map", table.slot_map)):
        dp.maps[name] = m
    dp.reused = True
    return ServiceTable(dp, maglev_size=251)


def reference_value(t: ServiceTable, e, selected: tuple[int, ...] | None = None
                    ) -> tuple[bytes, list[bytes], list[int]]:
    """The nat_v4_map value and ep_map rows as the ABI codecs pack them, field by field,
    and the slot table from the `selected` weights (default: the configured ones)."""
    abi = load()
    weights = [ep.weight for ep in e.spec.endpoints]
    sel = weights if selected is None else list(selected)
    slots = build_slots(sel, t.n_slots)
    down = t.down(e.spec.key) if e.spec.health else ()  # XLB_EP_DOWN (2): health's
    nat = abi.structs["xlb_nat_val"].codec.pack(
        svc_id=e.svc_id, algo=int(e.spec.algorithm), mode=int(e.spec.mode),
        n_eps=len(weights), flags=t._maglev_flag if e.maglev_b else 0, n_slots=len(slots),
        persist_s=e.spec.persistence_s,
        snat_addr=socket.inet_aton(e.spec.snat_addr) if e.spec.snat_addr else bytes(4),
        ep_base=e.ep_base, slot_base=e.slot_base)
    eps = [abi.structs["xlb_ep"].codec.pack(
        addr=socket.inet_aton(ep.address), port=ep.port, weight=ep.weight, stat_id=sid,
        flags=(1 if w > 0 else 0) | (2 if (ep.address, ep.port) in down else 0),
        prio=ep.priority)
        for ep, sid, w in zip(e.spec.endpoints, e.ep_ids, sel, strict=True)]
    return nat, eps, slots


def held_value(t: ServiceTable, e) -> tuple[bytes, list[bytes], list[int]]:
    """What the maps hold for `e`: its nat_v4_map value, ep_map rows and slot table."""
    nat = t.nat.get(t.key_bytes(e.spec))
    eps = [t.ep_map.get((e.ep_base + i).to_bytes(4, "little")) for i in range(len(e.ep_ids))]
    held = t.held_selection(e.spec.key)
    assert nat is not None and held is not None
    return nat, eps, held[0]


def check_runs(t: ServiceTable) -> None:
    """No two services share an ep_map or slot_map entry, and every entry no service
    holds is free."""
    for space, runs in ((t.ep_space, [(e.ep_base, len(e.ep_ids)) for _, e in t.entries()]),
                        (t.slot_space, [(e.slot_base, -(-e.n_slots // 4))
                                        for _, e in t.entries()])):
        held = sorted(r for r in runs if r[1])
        for (a, n), (b, _) in zip(held, held[1:], strict=False):
            assert a + n <= b
        assert space.free_entries() == space.size - sum(n for _, n in held)


def test_bulk_encoding_writes_what_the_codec_packs_and_a_restart_reads_it_back(table):
    specs = [spec(i, n) for i, n in enumerate([1, 2, 3, 4, 5, 17, 64] * 40 + [1024] * 2)]
    specs[3] = spec(3, 5, Algorithm.MAGLEV)
    table.put(specs)
    # changes: endpoints added and removed, a weight, maglev flipping its key
    changed = [spec(i, n) for i, n in enumerate([2, 1, 4, 3, 5, 16, 64] * 5 + [1023])]
    changed[3] = spec(3, 4, Algorithm.MAGLEV)
    table.put(changed)
    entries = dict(table.entries())
    assert len(dict(table.nat.items())) == len(entries) == len(specs)
    for e in entries.values():
        assert held_value(table, e) == reference_value(table, e)
    check_runs(table)
    again = restarted(table)
    assert {k: (e.spec, e.svc_id, e.ep_ids, e.maglev_b) for k, e in again.entries()} == {
        k: (e.spec, e.svc_id, e.ep_ids, e.maglev_b) for k, e in entries.items()}
    stat = [sid for e in entries.values() for sid in e.ep_ids]
    assert len(stat) == len(set(stat))  # every endpoint its own counter slot


def random_spec(rng: random.Random, i: int) -> ServiceSpec:
    n = rng.choice([1, 2, 3, 4, 4, 4, 7, 17, 64]) if rng.random() > 0.01 else 1024
    weights = rng.choice([[1] * n, [0] * n,
                          [rng.choice([0, 1, 2, 5, 999, 1000]) for _ in range(n)]])
    grouped = rng.random() < 0.2
    eps = sorted(EndpointSpec(f"10.{rng.randrange(256)}.{j // 250}.{j % 250 + 1}",
                              rng.choice([1, 80, 8080, 65535]), w,
                              rng.choice([0, 1, 255]) if grouped else 0)
                 for j, w in enumerate(weights))
    mode = rng.choice([Mode.DNAT, Mode.FULLNAT])
    return ServiceSpec(f"198.19.{i // 250}.{i % 250 + 1}", rng.choice([80, 443]),
                       rng.choice(list(Proto)), rng.choice(list(Algorithm)), mode,
                       endpoints=tuple(eps),
                       health=rng.choice([None, HealthSpec(HealthKind.TCP)]),
                       snat_addr=rng.choice(["", "198.18.9.9"]) if mode == Mode.FULLNAT else "",
                       persistence_s=rng.choice([0, 0, 30, 65535]))


def test_batch_encoder_writes_what_the_codec_packs_for_random_services():
    """NatValues (one numpy array per batch) against Codec.pack, service by service:
    random endpoint counts and weights (0 included), every algorithm, priority groups,
    endpoints out of selection (health), SNAT addresses, persistence, rewrites of what
    is held, and the services a restart reads back."""
    rng = random.Random(11)
    t = ServiceTable(MemoryDatapath(Settings(name="m", max_services=2048,
                                             max_backends=262144, ct_size=64)),
                     maglev_size=251)
    for round_ in range(4):
        specs = [random_spec(rng, i) for i in rng.sample(range(600), 300)]
        t.put(specs)
        entries = sorted(t.entries(), key=lambda kv: str(kv[0]))
        changes = {}
        for key, e in rng.sample(entries, 60):
            eps = e.spec.endpoints
            changes[key] = frozenset((ep.address, ep.port)
                                     for ep in rng.sample(eps, rng.randrange(len(eps) + 1)))
        t.set_down(changes)
        for key, e in t.entries():
            want = reference_value(t, e, t._effective(e))
            assert held_value(t, e) == want, (round_, key)
        check_runs(t)
    again = restarted(t)
    assert {k: (e.spec, e.ep_ids) for k, e in again.entries()} == {
        k: (e.spec, e.ep_ids) for k, e in t.entries()}
    # what health took out of selection is read back (XLB_EP_DOWN)
    assert {k: again.down(k) for k, _ in t.entries()} == {
        k: t.down(k) & {(ep.address, ep.port) for ep in e.spec.endpoints}
        if e.spec.health else frozenset() for k, e in t.entries()}
    check_runs(again)
    t.delete([k for k, _ in t.entries()])  # every run freed
    assert t.ep_space.free_entries() == t.ep_space.size
    assert t.slot_space.free_entries() == t.slot_space.size


def test_put_batch_raw_splits_for_an_in_memory_map_and_checks_sizes(table):
    m = table.vips
    m.put_batch_raw(b"\x01\x02\x03\x04\x05\x06\x07\x08",
                    memoryview(b"\x01\0\0\0\x02\0\0\0"))
    assert dict(m.items()) == {b"\x01\x02\x03\x04": b"\x01\0\0\0",
                               b"\x05\x06\x07\x08": b"\x02\0\0\0"}
    with pytest.raises(MapError, match="not whole entries"):
        m.put_batch_raw(b"\x01\x02\x03\x04", b"\x01\0\0")


def test_pages_follow_vip_port_protocol_order(table):
    specs = [spec(i, 1) for i in range(300)]
    table.put(specs)
    want = sorted((s.key for s in specs),
                  key=lambda k: (socket.inet_aton(k.vip), k.port, int(k.proto)))
    got, after = [], None
    while True:
        _, page, more = table.page(after, 7)
        got += [s.key for s in page]
        if not more:
            break
        after = page[-1].key
    assert got == want


def test_id_runs_skip_ids_in_use_and_wrap():
    pool = IdPool(8, used=[2, 5])
    assert pool.reserve(2, "x") == [0, 1]  # a free run
    assert pool.reserve(3, "x") == [3, 4, 6]  # 5 is in use
    pool.commit()
    pool.release([0, 1])
    assert pool.reserve(2, "x") == [7, 0]  # wraps around


def test_gc_pause_nests_and_restores():
    assert gc.isenabled()
    with gcpause.paused():
        with gcpause.paused(freeze=True):
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
    gc.unfreeze()
    with gcpause.paused(active=False):
        assert gc.isenabled()


def test_id_pool_counts_and_rolls_back_scattered_reservations():
    pool = IdPool(6, used=[1, 3], assume_dirty=True)
    assert (pool.in_use(), pool.free) == (2, 4)
    ids = pool.reserve(3, "x")  # not a run: 0, 2, 4
    assert ids == [0, 2, 4] and pool.free == 1
    pool.rollback()
    assert pool.free == 4 and pool.reserve(4, "x") == [5, 0, 2, 4]  # on from where it was
    pool.commit()
    assert sorted(pool.take_dirty([5, 0, 2])) == [0, 2, 5]  # a reused map's: zero once
    assert pool.take_dirty([0, 2, 5]) == []
    pool.release([0, 0, 4])  # each counted once
    assert pool.in_use() == 4 and pool.take_dirty([0, 4]) == [0, 4]


def test_a_released_id_rests_for_its_grace_and_a_reservation_that_needs_it_waits():
    now, slept = [100.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pool = IdPool(4, grace_s=0.005, clock=lambda: now[0], sleep=sleep)
    ids = pool.reserve(4, "x")
    pool.commit()
    pool.release([ids[1]])  # a packet may still count against its slots
    assert (pool.in_use(), pool.free) == (3, 1)
    now[0] += 0.002
    with pytest.raises(Exhausted):
        pool.reserve(2, "x")  # waiting would not help: refused at once
    assert slept == []
    assert pool.reserve(1, "x") == [ids[1]] and slept == [pytest.approx(0.003)]
    pool.commit()
    pool.release(ids[2:])
    now[0] += 0.005  # their grace has passed: free without a wait
    assert sorted(pool.reserve(2, "x")) == ids[2:] and len(slept) == 1
