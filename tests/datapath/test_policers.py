"""Policers under BPF_PROG_TEST_RUN: tc_police_func charges each packet of a policed
interface to its bucket (GCRA, dpd/bpf/police.h), drops and counts what is over, and
agrees with dpd.policers.Bucket. Time is controlled by writing the bucket's tat against
CLOCK_MONOTONIC (bpf_ktime_get_ns), and the rates are slow enough (8 kbit/s: a second
per 1000 bytes) that the bucket cannot refill between two runs."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator

import pytest

from dpd import bpfsys
from dpd.policers import Bucket, PolicerSpec, burst_ns, byte_ns_q16
from tests.datapath.packets import VIP, udp

pytestmark = pytest.mark.root

UNSPEC = ctypes.c_uint32(-1).value
SHOT = 2
IFINDEX = 7  # not an interface of this namespace: the map entry is written directly


@pytest.fixture
def pnode(node: object) -> Iterator[object]:
    table = node.policers  # type: ignore[attr-defined]
    table.delete([p.spec.name for p in table.entries()])
    yield node
    table.intf.delete(IFINDEX.to_bytes(4, "little"))
    table.delete([p.spec.name for p in table.entries()])


def police(n: object, pid: int, pkt: bytes) -> int:
    table = n.policers  # type: ignore[attr-defined]
    table.intf.put(IFINDEX.to_bytes(4, "little"), pid.to_bytes(4, "little"))
    return bpfsys.prog_test_run(n.dp.police_fd, pkt,  # type: ignore[attr-defined]
                                ingress_ifindex=IFINDEX).retval


def sized(length: int) -> bytes:
    base = udp("198.18.0.2", VIP, 1234, 53, b"")
    return udp("198.18.0.2", VIP, 1234, 53, b"x" * (length - len(base)))


def test_no_policer_on_the_interface_passes_untouched(pnode):
    pkt = sized(200)
    res = bpfsys.prog_test_run(pnode.dp.police_fd, pkt, ingress_ifindex=IFINDEX)
    assert (res.retval, res.data) == (UNSPEC, pkt)


def test_a_full_bucket_passes_the_burst_then_drops_and_counts(pnode):
    table = pnode.policers
    table.put([PolicerSpec("slow", 8_000, 3_000)])
    pid = table._ids["slow"]
    pkt = sized(1000)
    verdicts = [police(pnode, pid, pkt) for _ in range(5)]
    # the model, fed the same packets at (about) the same instant
    model = Bucket(8_000, 3_000)
    now = time.monotonic_ns()
    expect = [UNSPEC if model.charge(1000, now) else SHOT for _ in range(5)]
    assert verdicts == expect == [UNSPEC] * 3 + [SHOT] * 2
    [p] = table.entries()
    assert (p.passed.packets, p.passed.bytes) == (3, 3000)
    assert (p.dropped.packets, p.dropped.bytes) == (2, 2000)
    assert pnode.global_stats()["drop_policer"].packets == 2


def test_controlled_time_room_for_exactly_one_packet(pnode):
    """tat written so that the bucket holds 1000 bytes plus 10 ms of refill: one 1000-byte
    packet conforms, the next does not; a bucket idle long enough is full again."""
    table = pnode.policers
    table.put([PolicerSpec("one", 8_000, 5_000)])
    pid = table._ids["one"]
    codec = pnode.dp.abi.structs["xlb_polx"].codec
    key = pid.to_bytes(4, "little")
    rec = codec.unpack(table.map.get(key))
    cost = (1000 * byte_ns_q16(8_000)) >> 16
    assert rec["burst_ns"] == burst_ns(8_000, 5_000) == 5 * cost
    rec["tat"] = time.monotonic_ns() + rec["burst_ns"] - cost - 10_000_000
    table.map.put(key, codec.pack(**rec))
    pkt = sized(1000)
    assert [police(pnode, pid, pkt) for _ in range(2)] == [UNSPEC, SHOT]
    # tat in the past: a bucket idle long enough is full (burst: five packets)
    rec = codec.unpack(table.map.get(key))
    rec["tat"] = 0
    table.map.put(key, codec.pack(**rec))
    assert [police(pnode, pid, pkt) for _ in range(6)] == [UNSPEC] * 5 + [SHOT]


def test_a_packet_bigger_than_the_burst_never_conforms(pnode):
    table = pnode.policers
    table.put([PolicerSpec("small", 1_000_000_000, 1_500)])
    pid = table._ids["small"]
    assert police(pnode, pid, sized(1500)) == UNSPEC
    time.sleep(0.001)  # 1 Gbit/s: refilled within microseconds
    assert police(pnode, pid, sized(1600)) == SHOT


def test_a_replaced_policer_keeps_its_bucket_and_a_deleted_one_passes(pnode):
    table = pnode.policers
    table.put([PolicerSpec("p", 8_000, 2_000)])
    pid = table._ids["p"]
    pkt = sized(1000)
    assert [police(pnode, pid, pkt) for _ in range(3)] == [UNSPEC, UNSPEC, SHOT]
    table.put([PolicerSpec("p", 8_000, 3_000)])  # a deeper bucket, same state
    assert table._ids["p"] == pid
    assert [police(pnode, pid, pkt) for _ in range(2)] == [UNSPEC, SHOT]
    table.delete(["p"])
    assert police(pnode, pid, pkt) == UNSPEC  # no bucket: nothing to enforce
