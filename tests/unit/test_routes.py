"""dpd's routes without root: validation messages, all-or-nothing batches, the summary,
the API over a node of in-memory maps, `--attach auto`'s choice of interfaces."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dpd.autoattach import eligible
from dpd.routes import MemoryRoutes, same_route
from dpd.rtnl import Hop, route_body
from dpd.rtnl import parse_route as rtnl_parse
from tests.unit.conftest import MemoryDatapathServicer, serve_datapath
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import PreconditionError, ValidationError
from xlbcore.route import NextHopSpec, RouteSpec, parse_route


def msg(prefix: str, *hops: tuple[str, str, int]) -> tpb.RouteSpec:
    return tpb.RouteSpec(prefix=prefix, next_hops=[
        tpb.NextHop(gateway=g, interface=i, weight=w) for g, i, w in hops])


def route(prefix: str, *hops: tuple[str, str, int]) -> RouteSpec:
    return parse_route(msg(prefix, *hops), "routes[0]")


@pytest.mark.parametrize(("m", "expect"), [
    (msg("198.19.0.0/33", ("198.18.1.1", "", 1)), "routes[0].prefix:"),
    (msg("198.19.0.1/16", ("198.18.1.1", "", 1)), "host bits set; did you mean 198.19.0.0/16"),
    (msg("x" * 5000, ("198.18.1.1", "", 1)), "routes[0].prefix: 'xxxxxxxx"),
    (msg("", ("198.18.1.1", "", 1)), "routes[0].prefix: a prefix is required"),
    (msg("198.19.0.0/16"), "routes[0].next_hops: a route needs at least one next hop"),
    (msg("198.19.0.0/16", ("2001:db8::1", "", 1)), "routes[0].next_hops[0].gateway: 2001:db8::1"
     " is IPv6"),
    (msg("198.19.0.0/16", ("198.18.1.1", "", 257)), "routes[0].next_hops[0].weight: 257 is out"
     " of range 1..256"),
    (msg("198.19.0.0/16", ("", "", 1)), "routes[0].next_hops[0]: a next hop needs a gateway"),
    (msg("198.19.0.0/16", ("198.18.1.1", "", 1), ("198.18.1.1", "", 2)),
     "routes[0].next_hops[1]: the same next hop as next_hops[0]"),
    (msg("198.19.0.0/16", ("198.18.1.1", "eth/0", 1)), "routes[0].next_hops[0].interface"),
])
def test_validation_names_the_field(m: tpb.RouteSpec, expect: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_route(m, "routes[0]")
    assert expect in str(err.value)
    assert len(str(err.value)) < 200  # a bad value is quoted short


def test_canonical_form_sorted_hops_and_default_weight() -> None:
    r = route("2001:DB8:1::/48", ("2001:db8::3", "", 0), ("2001:db8::2", "", 3))
    assert r.prefix == "2001:db8:1::/48"
    assert r.next_hops == (NextHopSpec("2001:db8::2", "", 3), NextHopSpec("2001:db8::3", "", 1))


def test_batch_with_a_duplicate_prefix_is_refused_whole() -> None:
    t = MemoryRoutes()
    with pytest.raises(ValidationError, match=r"routes\[2\].prefix: 198.19.0.0/16 appears more"):
        t.put([route("198.19.0.0/16", ("198.18.1.1", "", 1)),
               route("198.20.0.0/16", ("198.18.1.1", "", 1)),
               route("198.19.0.0/16", ("198.18.2.1", "", 1))])
    assert t.specs() == [] and t.generation == 0


def test_unknown_interface_and_link_local_gateway_are_invalid() -> None:
    t = MemoryRoutes(interfaces={"eth0"})
    with pytest.raises(ValidationError, match=r"routes\[1\].next_hops\[0\].interface: interface"
                                              r" 'eth9' does not exist"):
        t.put([route("198.19.0.0/16", ("198.18.1.1", "eth0", 1)),
               route("198.20.0.0/16", ("198.18.1.1", "eth9", 1))])
    with pytest.raises(ValidationError, match="link-local"):
        t.put([route("2001:db8:1::/48", ("fe80::1", "", 1))])
    assert t.specs() == []


def test_unreachable_next_hop_is_a_precondition_and_nothing_is_written() -> None:
    t = MemoryRoutes(reachable=["198.18.1.0/24", "2001:db8::/64"])
    t.put([route("198.19.0.0/16", ("198.18.1.1", "", 1))])
    with pytest.raises(PreconditionError) as err:
        t.put([route("198.19.0.0/16", ("198.18.1.2", "", 1)),
               route("198.20.0.0/16", ("198.18.9.1", "", 1))])
    assert str(err.value) == ("routes[1]: next hop 198.18.9.1 is unreachable on this node "
                              "(no connected network holds it)")
    assert [r.next_hops[0].gateway for r in t.specs()] == ["198.18.1.1"]  # not half-written
    assert t.generation == 1


def test_generation_digest_and_delete() -> None:
    t = MemoryRoutes()
    g0, n0, d0 = t.summary()
    assert (g0, n0) == (0, 0)
    t.put([route("198.19.0.0/16", ("198.18.1.1", "", 1), ("198.18.2.1", "", 2)),
           route("2001:db8:1::/48", ("2001:db8::1", "", 1))])
    g1, n1, d1 = t.summary()
    assert (g1, n1) == (1, 2) and d1 != d0
    t.put([route("198.19.0.0/16", ("198.18.1.1", "", 1), ("198.18.2.1", "", 3))])
    g2, n2, d2 = t.summary()
    assert (g2, n2) == (2, 2) and d2 != d1
    assert t.delete(["198.19.0.0/16", "198.19.0.0/16", "198.30.0.0/16"]) == 1
    assert [r.prefix for r in t.specs()] == ["2001:db8:1::/48"]
    with pytest.raises(ValidationError, match=r"prefixes\[0\]: '198.19.0.1/16' has host bits"):
        t.delete(["198.19.0.1/16"])


def test_fib_readback_matches_what_was_given() -> None:
    given = route("198.19.0.0/16", ("198.18.1.1", "", 2), ("198.18.2.1", "eth1", 1))
    fib = RouteSpec("198.19.0.0/16", (NextHopSpec("198.18.1.1", "eth0", 2),
                                      NextHopSpec("198.18.2.1", "eth1", 1)))
    assert same_route(given, fib)  # the kernel chose eth0 where none was named
    assert not same_route(given, RouteSpec(fib.prefix, (fib.next_hops[0],)))
    moved = RouteSpec(fib.prefix, (fib.next_hops[0], NextHopSpec("198.18.2.1", "eth2", 1)))
    assert not same_route(given, moved)
    # one next hop: the kernel keeps no weight
    assert same_route(route("198.19.0.0/16", ("198.18.1.1", "", 7)),
                      RouteSpec("198.19.0.0/16", (NextHopSpec("198.18.1.1", "eth0", 1),)))


@pytest.mark.parametrize(("ifi_type", "flags", "kind", "master", "ok"), [
    (1, 0x1003, None, None, True),  # a physical NIC
    (1, 0x1003, "veth", None, True),
    (1, 0x1003, "bond", None, True),
    (1, 0x1003, None, "bond", False),  # a bond's slave: its packets are the bond's
    (1, 0x1003, "veth", "bridge", False),  # a bridge port
    (1, 0x1003, "veth", "vrf", True),  # a VRF member still routes
    (772, 0x49, None, None, False),  # loopback
    (1, 0x1003, "bridge", None, False),
    (1, 0x1003, "vxlan", None, False),
    (1, 0x1003, "vlan", None, False),
    (1, 0x1003, "dummy", None, False),
    (65534, 0x1091, "wireguard", None, False),
])
def test_attach_auto_picks(ifi_type: int, flags: int, kind: str | None, master: str | None,
                           ok: bool) -> None:
    assert eligible(ifi_type, flags, kind, master) is ok


@pytest.fixture
def dpd(sockdir: Path) -> Iterator[tuple[MemoryDatapathServicer, object]]:
    servicer = MemoryDatapathServicer()
    with contextlib.closing(servicer), serve_datapath(sockdir, servicer) as stub:
        yield servicer, stub


def test_api_put_list_delete(dpd) -> None:
    servicer, stub = dpd
    resp = stub.PutRoutes(pb.PutRoutesRequest(routes=[
        msg("198.19.0.0/16", ("198.18.2.1", "", 0), ("198.18.1.1", "", 3)),
        msg("2001:db8:1::/48", ("2001:db8::1", "", 0))]), timeout=5)
    assert (resp.written, resp.generation) == (2, 1)
    listed = list(stub.ListRoutes(pb.ListRoutesRequest(), timeout=5))
    assert [r.prefix for r in listed] == ["198.19.0.0/16", "2001:db8:1::/48"]
    assert [(h.gateway, h.weight) for h in listed[0].next_hops] == [
        ("198.18.1.1", 3), ("198.18.2.1", 1)]
    resp2 = stub.DeleteRoutes(pb.DeleteRoutesRequest(prefixes=["2001:db8:1::/48"]), timeout=5)
    assert (resp2.deleted, resp2.generation) == (1, 2)
    assert list(stub.ListNeighbors(pb.ListNeighborsRequest(), timeout=5)) == []


def test_api_bad_input_is_invalid_argument(dpd) -> None:
    servicer, stub = dpd
    with pytest.raises(grpc.RpcError) as err:
        stub.PutRoutes(pb.PutRoutesRequest(routes=[
            msg("198.19.0.0/16", ("198.18.1.1", "", 1)),
            msg("198.20.0.0/16", ("198.18.1.1", "", 1000))]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("routes[1].next_hops[0].weight: 1000")
    assert servicer.node.routes.specs() == []


def test_api_unreachable_is_failed_precondition(dpd) -> None:
    servicer, stub = dpd
    servicer.node.routes = MemoryRoutes(reachable=["198.18.1.0/24"])
    with pytest.raises(grpc.RpcError) as err:
        stub.PutRoutes(pb.PutRoutesRequest(routes=[
            msg("198.19.0.0/16", ("198.18.1.1", "", 1)),
            msg("198.20.0.0/16", ("198.18.9.1", "", 1))]), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "routes[1]: next hop 198.18.9.1 is unreachable" in err.value.details()
    assert servicer.node.routes.specs() == []


@pytest.mark.parametrize(("family", "prefix", "hops"), [
    (socket.AF_INET, "198.19.0.0/16", (Hop("198.18.1.1", 3, 1),)),
    (socket.AF_INET, "0.0.0.0/0", (Hop("", 7, 1),)),
    (socket.AF_INET, "198.19.5.0/24", (Hop("198.18.1.1", 2, 7), Hop("198.18.2.1", 0, 1))),
    (socket.AF_INET6, "2001:db8:5::/48", (Hop("2001:db8:1::2", 4, 256),
                                          Hop("2001:db8:2::2", 5, 2))),
])
def test_rtnl_route_messages_round_trip(family: int, prefix: str,
                                        hops: tuple[Hop, ...]) -> None:
    body = route_body(family, prefix, 254, 200, 0, hops, priority=1024)
    got = rtnl_parse(body, 0, len(body))
    assert (got.family, got.prefix, got.proto, got.table, got.priority) == (
        family, prefix, 200, 254, 1024)
    assert got.hops == hops
