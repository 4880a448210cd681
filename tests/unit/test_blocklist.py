"""The blocklist (dpd/blocklist.py) and its API over in-memory maps (no root):
validation, all or nothing, RESOURCE_EXHAUSTED with nothing written, read-back,
generations and the summary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dpd.blocklist import Blocklist, parse_prefixes
from dpd.node import Node
from dpd.servicer import DatapathServicer
from tests.unit.conftest import memory_node, serve_datapath
from xlb.dpd.v1 import datapath_pb2 as pb
from xlbcore.errors import Exhausted, ValidationError


def _node(size: int = 8) -> Node:
    return memory_node(blocklist_size=size)


@pytest.fixture
def dpd(sockdir: Path) -> Iterator[tuple[Node, object]]:
    node = _node()
    with contextlib.closing(node), serve_datapath(sockdir, DatapathServicer(node)) as stub:
        yield node, stub


def test_prefixes_are_canonical_and_bad_ones_named():
    assert parse_prefixes(["198.18.66.7", "2001:DB8:66::/48", " 198.18.0.0/16 ",
                           "198.18.66.7/32"]) == ["198.18.66.7/32", "2001:db8:66::/48",
                                                  "198.18.0.0/16"]
    with pytest.raises(ValidationError, match=r"prefixes\[1\]: .* host bits set; did you "
                                              r"mean 198.18.66.0/24"):
        parse_prefixes(["198.18.0.0/16", "198.18.66.7/24"])
    with pytest.raises(ValidationError, match=r"prefixes\[0\]: 'x{39}... \(100000 characters\)"):
        parse_prefixes(["x" * 100_000])
    with pytest.raises(ValidationError, match=r"prefixes\[0\]"):
        parse_prefixes(["198.18.0.0/33"])


def test_put_delete_list_and_generations():
    bl = _node().blocklist
    assert bl.put(["198.18.66.0/24", "2001:db8:66::/48", "198.18.0.0/16"]) == 3
    assert bl.put(["198.18.66.0/24"]) == 0  # idempotent, no generation move
    assert bl.summary() == (1, 3)
    assert [b.prefix for b in bl.entries()] == ["198.18.0.0/16", "198.18.66.0/24",
                                                "2001:db8:66::/48"]
    assert bl.delete(["198.18.66.0/24", "198.18.99.0/24"]) == 1
    assert bl.delete(["198.18.99.0/24"]) == 0
    assert bl.summary() == (2, 2)


def test_full_table_writes_nothing_and_freed_ids_are_reused():
    bl = _node(size=4).blocklist
    bl.put(["198.18.1.0/24", "198.18.2.0/24", "2001:db8:1::/48"])
    with pytest.raises(Exhausted, match="1 of 4 free"):
        bl.put(["198.18.3.0/24", "2001:db8:3::/48"])
    assert bl.count() == 3 and len(bl.entries()) == 3
    bl.delete(["198.18.1.0/24"])
    assert bl.put(["198.18.3.0/24", "2001:db8:3::/48"]) == 2
    assert bl.count() == 4


def test_a_map_failure_midway_undoes_what_the_call_wrote():
    node = _node()
    bl = node.blocklist
    bl.put(["198.18.1.0/24"])
    v6 = bl.maps[6]

    def refuse(key: bytes, value: bytes, flags: int = 0) -> None:
        from dpd.maps import MapFull

        raise MapFull(28, "blk_v6_map update: No space left on device")

    v6.put = refuse  # type: ignore[method-assign]
    with pytest.raises(Exhausted, match="nothing was written"):
        bl.put(["198.18.2.0/24", "2001:db8:2::/48"])
    assert [b.prefix for b in bl.entries()] == ["198.18.1.0/24"]
    assert bl.pool.in_use() == 1


def test_a_restarted_dpd_reads_its_blocklist_back():
    node = _node()
    node.blocklist.put(["198.18.66.0/24", "2001:db8:66::/48"])
    again = Blocklist(node.dp)
    assert [b.prefix for b in again.entries()] == ["198.18.66.0/24", "2001:db8:66::/48"]
    assert again.pool.in_use() == 2


def test_api_status_codes_and_read_back(dpd):
    node, stub = dpd
    with pytest.raises(grpc.RpcError) as err:
        stub.PutBlocklist(pb.PutBlocklistRequest(prefixes=["198.18.66.0/24", "9" * 100_000]),
                          timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefixes[1]" in err.value.details() and len(err.value.details()) < 200
    assert node.blocklist.count() == 0  # the valid one was not written either
    r = stub.PutBlocklist(pb.PutBlocklistRequest(prefixes=["198.18.66.0/24", "2001:db8::1"]),
                          timeout=5)
    assert (r.written, r.generation) == (2, 1)
    with pytest.raises(grpc.RpcError) as err:
        stub.PutBlocklist(pb.PutBlocklistRequest(
            prefixes=[f"198.18.{i}.0/24" for i in range(100, 107)]), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "6 of 8 free" in err.value.details()
    listed = {b.prefix: b.counters.packets for b in stub.ListBlocklist(
        pb.ListBlocklistRequest(), timeout=5)}
    assert listed == {"198.18.66.0/24": 0, "2001:db8::1/128": 0}
    d = stub.DeleteBlocklist(pb.DeleteBlocklistRequest(prefixes=["2001:db8::1"]), timeout=5)
    assert (d.deleted, d.generation) == (1, 2)
    tables = {t.table: t for t in stub.GetSummary(pb.GetSummaryRequest(), timeout=5).tables}
    assert (tables["blocklist"].generation, tables["blocklist"].count) == (2, 1)
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5).global_counters
    assert stats["drop_blocklist"] == 0 and "xdp_pass" in stats


def test_xdp_on_a_memory_node_is_failed_precondition(dpd):
    _, stub = dpd
    with pytest.raises(grpc.RpcError) as err:
        stub.AttachInterface(pb.AttachInterfaceRequest(name="eth0",
                                                       xdp_mode=pb.XDP_MODE_AUTO), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_metrics_carry_the_blocklist_and_mirrors():
    from prometheus_client import CollectorRegistry, generate_latest

    from dpd.metrics import register_node
    from dpd.mirror import MirrorSpec

    node = _node()
    node.blocklist.put(["198.18.66.0/24", "2001:db8:66::/48"])
    node.mirrors.put([MirrorSpec("eth0", "eth1")])
    registry = CollectorRegistry()
    register_node(registry, node)
    text = generate_latest(registry).decode()
    assert 'xlb_dpd_blocklist_drops_total{node="unit",prefix="198.18.66.0/24"} 0.0' in text
    assert 'xlb_dpd_blocklist_drop_bytes_total{node="unit",prefix="2001:db8:66::/48"} 0.0' in text
    assert 'xlb_dpd_blocklist_prefixes{node="unit"} 2.0' in text
    assert ('xlb_dpd_mirror_packets_total{interface="eth0",mirror="eth1",node="unit"} 0.0'
            in text)
    assert 'xlb_dpd_drops_total{node="unit",reason="blocklist"} 0.0' in text


def test_get_node_counts_the_blocklist_and_mirror_entries():
    from dpd.mirror import MirrorSpec

    node = _node()
    node.blocklist.put(["198.18.66.0/24", "2001:db8:66::/48", "198.18.0.0/16"])
    node.mirrors.put([MirrorSpec("eth0", "eth1")])
    used = {m.name: m.used for m in node.maps()}
    assert (used["blk_v4_map"], used["blk_v6_map"], used["mirr_map"],
            used["mirr_stats_map"]) == (2, 1, 1, 1)
