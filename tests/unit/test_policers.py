"""Policers (dpd/policers.py) over in-memory maps (no root): the GCRA model's arithmetic,
validation naming the field, put/replace/delete, interfaces held by one policer, the API."""

from __future__ import annotations

import contextlib

import pytest

from dpd.policers import Bucket, NoFilters, PolicerSpec, PolicerTable, byte_ns_q16, parse_policer
from tests.unit.conftest import RecordsAttach, memory_node
from xlbcore.errors import ValidationError


class Recording(RecordsAttach, NoFilters):
    pass


def test_the_bucket_passes_the_burst_then_the_rate():
    b = Bucket(rate_bps=8_000_000, burst_bytes=10_000)  # 1 byte per microsecond
    now = 10**12
    assert [b.charge(1000, now) for _ in range(11)] == [True] * 10 + [False]
    assert not b.charge(1000, now + 999_000)  # 999 bytes refilled: not enough
    assert b.charge(1000, now + 1_000_000)
    # a long run at twice the rate delivers the rate (plus the burst)
    b = Bucket(rate_bps=8_000_000, burst_bytes=10_000)
    passed = sum(b.charge(1000, now + i * 500_000) for i in range(20_000))  # 2 MB/s, 10 s
    assert abs(passed * 1000 - (10_000_000 + 10_000)) <= 1000


def test_fixed_point_cost_is_exact_enough_at_the_limits():
    for rate in (8_000, 1_000_000, 10**9, 400 * 10**9):
        exact = 1500 * 8e9 / rate
        assert abs(((1500 * byte_ns_q16(rate)) >> 16) - exact) <= max(1, exact * 1e-4)


def test_validation_names_the_field():
    assert parse_policer("a", 8000, 1500, ["eth0"], "p") == PolicerSpec("a", 8000, 1500,
                                                                          ("eth0",))
    for args, field in ((("a b", 8000, 1500, []), "p.name"), (("a", 10, 1500, []), "p.rate_bps"),
                        (("a", 8000, 10, []), "p.burst_bytes"),
                        (("a", 8000, 1500, ["eth0", "eth0"]), r"p.interfaces\[1\]"),
                        (("a", 8000, 1500, [""]), r"p.interfaces\[0\]")):
        with pytest.raises(ValidationError, match=field):
            parse_policer(*args, "p")


def test_put_replace_delete_and_filters():
    node = memory_node()
    filters = Recording()
    table = PolicerTable(node.dp, node.firewall.links, filters)
    assert table.put([PolicerSpec("a", 8000, 1500, ("eth0",))]) == 1
    assert filters.on == {2}
    table.put([PolicerSpec("a", 16000, 3000, ("eth1",)), PolicerSpec("b", 8000, 1500)])
    assert filters.on == {3}
    got = {p.spec.name: p.spec for p in table.entries()}
    assert got == {"a": PolicerSpec("a", 16000, 3000, ("eth1",)),
                   "b": PolicerSpec("b", 8000, 1500, ())}
    with pytest.raises(ValidationError, match=r"policers\[0\].interfaces\[0\]: 'eth1' is "
                                              r"policed by 'a'"):
        table.put([PolicerSpec("b", 8000, 1500, ("eth1",))])
    with pytest.raises(ValidationError, match=r"no interface 'eth9'"):
        table.put([PolicerSpec("c", 8000, 1500, ("eth9",))])
    assert table.count() == 2
    # read back by a restarted dpd
    again = PolicerTable(node.dp, node.firewall.links, NoFilters())
    assert {p.spec.name for p in again.entries()} == {"a", "b"}
    assert table.delete(["a", "zz"]) == 1 and filters.on == set()
    assert [p.spec.name for p in table.entries()] == ["b"]


def test_api(sockdir):
    import grpc

    from dpd.servicer import DatapathServicer
    from tests.unit.conftest import serve_datapath
    from xlb.dpd.v1 import datapath_pb2 as pb

    node = memory_node()
    with contextlib.closing(node), serve_datapath(sockdir, DatapathServicer(node)) as stub:
        with pytest.raises(grpc.RpcError) as err:
            stub.PutPolicers(pb.PutPolicersRequest(policers=[
                pb.Policer(name="a", rate_bps=8000, burst_bytes=1500),
                pb.Policer(name="a", rate_bps=8000, burst_bytes=1500)]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "policers[1].name" in err.value.details()
        r = stub.PutPolicers(pb.PutPolicersRequest(policers=[pb.Policer(
            name="a", rate_bps=8000, burst_bytes=1500, interfaces=["eth0"])]), timeout=5)
        assert (r.written, r.generation) == (1, 1)
        [p] = list(stub.ListPolicers(pb.ListPolicersRequest(), timeout=5))
        assert (p.name, p.rate_bps, p.burst_bytes, list(p.interfaces)) == (
            "a", 8000, 1500, ["eth0"])
        assert stub.DeletePolicers(pb.DeletePolicersRequest(names=["a"]), timeout=5).deleted == 1
