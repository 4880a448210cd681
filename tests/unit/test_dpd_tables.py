"""dpd's tables on in-memory maps (no root): the same code that runs on the kernel's
maps, through the map seam. Service batches are all or nothing; a full table is
Exhausted with nothing half-written; conntrack ages flows by state and idle time."""

from __future__ import annotations

import socket

import pytest

from dpd.conntrack import SECOND, Conntrack
from dpd.loader import Settings
from dpd.maps import MapFull, MemoryMap
from dpd.memory import MemoryDatapath
from dpd.node import Node
from xlbcore.errors import Exhausted
from xlbcore.service import Algorithm, EndpointSpec, Proto, ServiceSpec


def svc(i: int, n_eps: int = 2, port: int = 80) -> ServiceSpec:
    eps = tuple(EndpointSpec(f"198.18.{1 + j}.{1 + i % 250}", 8080) for j in range(n_eps))
    return ServiceSpec(f"198.19.{i // 250}.{1 + i % 250}", port, Proto.TCP,
                       Algorithm.ROUND_ROBIN, endpoints=eps)


@pytest.fixture
def node():
    n = Node(MemoryDatapath(Settings(name="mem", max_services=8, max_backends=16,
                                     ct_size=64)), ct_aging_interval=0)
    yield n
    n.close()


def test_put_list_delete(node):
    specs = [svc(i) for i in range(3)]
    assert node.put_services(specs) == 3
    assert sorted(node.list_services(), key=str) == sorted(specs, key=str)
    assert node.delete_services([specs[0].key, specs[0].key]) == 1
    assert {s.key for s in node.list_services()} == {specs[1].key, specs[2].key}


def test_a_batch_that_does_not_fit_writes_nothing(node):
    node.put_services([svc(i) for i in range(6)])
    before = node.list_services()
    with pytest.raises(Exhausted, match="services: 3 more needed, 2 of 8 free"):
        node.put_services([svc(i) for i in range(6, 9)])
    assert node.list_services() == before
    node.put_services([svc(i) for i in range(6, 8)])  # what fits still goes in
    assert len(node.list_services()) == 8


def test_endpoint_counter_slots_run_out_before_anything_is_written(node):
    with pytest.raises(Exhausted, match="endpoints: 20 more needed, 16 of 16 free"):
        node.put_services([svc(i, n_eps=4) for i in range(5)])
    assert node.list_services() == []


class _FailingMap(MemoryMap):
    """Refuses the batch after `ok` entries, as a kernel map can part-way."""

    ok = 1

    def put_batch(self, keys, values):
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            if i == self.ok:
                err = MapFull(28, "nat_v4_map batch update: No space left on device")
                err.done = i  # type: ignore[attr-defined]
                raise err
            self.put(k, v)


def test_a_map_that_refuses_part_way_is_rolled_back(node):
    node.put_services([svc(0)])
    changed = ServiceSpec(svc(0).vip, 80, Proto.TCP, Algorithm.HASH, endpoints=svc(0).endpoints)
    old_nat = node.dp.maps["nat_v4_map"]
    failing = _FailingMap(old_nat.spec)
    failing._data = old_nat._data  # type: ignore[attr-defined]
    node.services.nat = failing
    with pytest.raises(Exhausted, match="nat_v4_map has no room"):
        node.put_services([changed, svc(1), svc(2)])
    node.services.nat = old_nat
    assert node.list_services() == [svc(0)]  # the replaced one restored, new ones gone
    node.put_services([svc(1)])  # ids were given back
    assert len(node.list_services()) == 2


def test_global_counters_are_named_and_summed_over_cpus(node):
    m = node.dp.maps["stats_map"]
    codec = node.dp.abi.structs["xlb_counter"].codec
    stride = 16
    idx = node.dp.abi.const("XLB_STAT_NEW_FLOW")
    per_cpu = bytearray(stride * m.ncpus)
    for cpu in range(m.ncpus):
        codec.pack_into(per_cpu, cpu * stride, packets=5 + cpu, bytes=0)
    m.put(idx.to_bytes(4, "little"), bytes(per_cpu))
    stats = node.global_stats()
    assert stats["new_flow"].packets == 5 * m.ncpus + sum(range(m.ncpus))
    assert stats["drop_no_endpoint"].packets == 0
    node.reset_global_stats()
    assert node.global_stats()["new_flow"].packets == 0


def _flow(ct: Conntrack, client_port: int, state: int, orig_last: int, reply_last: int,
          proto: int = 6) -> None:
    client, vip, ep = (socket.inet_aton(a) for a in ("198.18.0.2", "198.19.0.10", "198.18.1.2"))
    s = ct.states
    svc_key = {"vip": vip, "port": 80, "proto": proto}
    ct.map.put(ct.key.pack(saddr=client, daddr=vip, sport=client_port, dport=80, proto=proto),
               ct.val.pack(nat_addr=ep, nat_port=8080, dir=s.orig, state=state,
                           last_ns=orig_last, svc=svc_key))
    ct.map.put(ct.key.pack(saddr=ep, daddr=client, sport=8080, dport=client_port, proto=proto),
               ct.val.pack(nat_addr=vip, nat_port=80, dir=s.reply, state=state,
                           last_ns=reply_last, svc=svc_key))


def test_conntrack_ages_both_entries_of_a_flow_by_its_last_used_direction(node):
    now = [1000 * SECOND]
    ct = Conntrack(node.dp, clock=lambda: now[0])
    s = ct.states
    _flow(ct, 40000, s.est, orig_last=0, reply_last=now[0] - 10 * SECOND)  # reply is fresh
    _flow(ct, 40001, s.closed, orig_last=now[0] - 11 * SECOND,
          reply_last=now[0] - 11 * SECOND)  # closed 11 s ago: expired
    _flow(ct, 40002, s.est, orig_last=now[0] - 10 * SECOND, reply_last=now[0] - 10 * SECOND,
          proto=17)
    assert ct.age_once() == 2
    left = {(e.src_port, e.dst_port) for e in ct.entries()}
    assert left == {(40000, 80), (8080, 40000), (40002, 80), (8080, 40002)}
    now[0] += 3600 * SECOND
    assert ct.age_once() == 4
    assert ct.entries() == []


def test_conntrack_lru_evicts_instead_of_refusing(node):
    ct = Conntrack(node.dp)
    for port in range(40000, 40040):  # 80 entries into a 64-entry table
        _flow(ct, port, ct.states.est, 1, 1)
    assert ct.count() == 64


def test_generation_moves_with_every_write_call_and_pages_follow_key_order(node):
    specs = [svc(i, n_eps=1) for i in range(5)]
    assert node.services.summary() == (0, 0)
    node.put_services(specs)
    node.put_services(specs[:1])  # nothing changes; the call still counts
    node.delete_services([specs[4].key])
    assert node.services.summary() == (3, 4)
    gen, first, more = node.services_page(None, 3)
    assert gen == 3 and more and len(first) == 3
    _, rest, more = node.services_page(first[-1].key, 3)
    assert not more and [s.key for s in first + rest] == [s.key for s in specs[:4]]
    # the index survives a restart: a new table reads the map once
    from dpd.services import ServiceTable

    again = ServiceTable(node.dp)
    assert sorted(again.specs(), key=str) == sorted(specs[:4], key=str)
    assert again.instance_id != node.services.instance_id


def test_vip_map_counts_the_services_of_each_vip(node):
    from dpd.services import ServiceTable

    vips = node.dp.maps["vip_v4_map"]
    a, b = svc(0), svc(0, port=443)  # one VIP, two services
    node.put_services([a, b, svc(1)])
    count = {socket.inet_ntoa(k): int.from_bytes(v, "little") for k, v in vips.items()}
    assert count == {a.vip: 2, svc(1).vip: 1}
    node.delete_services([a.key, svc(1).key])
    assert {socket.inet_ntoa(k) for k, _ in vips.items()} == {a.vip}
    vips.put(socket.inet_aton("198.19.9.9"), (1).to_bytes(4, "little"))  # stale entry
    ServiceTable(node.dp)  # a restarted dpd makes the map match its services
    assert {socket.inet_ntoa(k): int.from_bytes(v, "little") for k, v in vips.items()} == {
        b.vip: 1}
