"""Mirrors (dpd/mirror.py) and their API over in-memory maps (no root): validation,
all or nothing, replace, read-back."""

from __future__ import annotations

import contextlib

import pytest

from dpd.mirror import MirrorSpec, MirrorTable, NoFilters, parse_mirror
from tests.unit.conftest import RecordsAttach, memory_node
from xlbcore.errors import ValidationError


class Recording(RecordsAttach, NoFilters):
    pass


def test_parse():
    assert parse_mirror("eth0", "eth1", "m") == MirrorSpec("eth0", "eth1")
    with pytest.raises(ValidationError, match=r"m.mirror_interface: 'eth0' is the mirrored"):
        parse_mirror("eth0", "eth0", "m")
    with pytest.raises(ValidationError, match=r"m.interface"):
        parse_mirror("x" * 100, "eth1", "m")


def test_put_replace_delete_and_filters():
    node = memory_node()
    filters = Recording()
    table = MirrorTable(node.dp, node.firewall.links, filters)
    assert table.put([MirrorSpec("eth0", "eth1")]) == 1
    assert filters.on == {2}
    assert [(m.spec.interface, m.spec.mirror_interface) for m in table.entries()] == [
        ("eth0", "eth1")]
    table.put([MirrorSpec("eth0", "lo"), MirrorSpec("eth1", "lo")])  # replace and add
    assert [(m.spec.interface, m.spec.mirror_interface) for m in table.entries()] == [
        ("eth0", "lo"), ("eth1", "lo")]
    assert filters.on == {2, 3} and table.generation == 2
    assert table.delete(["eth0", "eth9"]) == 1
    assert filters.on == {3}
    assert MirrorTable(node.dp, node.firewall.links, NoFilters()).count() == 1  # read back


def test_unknown_interface_writes_nothing():
    node = memory_node()
    table = node.mirrors
    with pytest.raises(ValidationError, match=r"mirrors\[1\].mirror_interface: no interface "
                                              r"'eth9'"):
        table.put([MirrorSpec("eth0", "eth1"), MirrorSpec("eth1", "eth9")])
    assert table.entries() == []


def test_a_failure_midway_puts_back_what_was_there():
    node = memory_node()
    filters = Recording()
    table = MirrorTable(node.dp, node.firewall.links, filters)
    table.put([MirrorSpec("eth0", "eth1")])

    def refuse(ifindex: int) -> None:
        if ifindex == 3:
            raise OSError(1, "not permitted")
        filters.on.add(ifindex)

    filters.attach = refuse  # type: ignore[method-assign]
    with pytest.raises(OSError):
        table.put([MirrorSpec("eth0", "lo"), MirrorSpec("eth1", "lo")])
    assert [(m.spec.interface, m.spec.mirror_interface) for m in table.entries()] == [
        ("eth0", "eth1")]
    assert filters.on == {2}


def test_api(sockdir):
    import grpc

    from dpd.servicer import DatapathServicer
    from tests.unit.conftest import serve_datapath
    from xlb.dpd.v1 import datapath_pb2 as pb

    node = memory_node()
    with contextlib.closing(node), serve_datapath(sockdir, DatapathServicer(node)) as stub:
        with pytest.raises(grpc.RpcError) as err:
            stub.PutMirrors(pb.PutMirrorsRequest(mirrors=[
                pb.Mirror(interface="eth0", mirror_interface="eth1"),
                pb.Mirror(interface="eth0", mirror_interface="lo")]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "mirrored twice" in err.value.details()
        r = stub.PutMirrors(pb.PutMirrorsRequest(mirrors=[
            pb.Mirror(interface="eth0", mirror_interface="eth1")]), timeout=5)
        assert (r.written, r.generation) == (1, 1)
        got = list(stub.ListMirrors(pb.ListMirrorsRequest(), timeout=5))
        assert [(m.interface, m.mirror_interface, m.counters.packets) for m in got] == [
            ("eth0", "eth1", 0)]
        d = stub.DeleteMirrors(pb.DeleteMirrorsRequest(interfaces=["eth0"]), timeout=5)
        assert (d.deleted, d.generation) == (1, 2)
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=5).global_counters
        assert stats["mirrored"] == 0 and stats["mirror_fail"] == 0
