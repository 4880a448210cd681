"""Conntrack over the memory datapath: aging by state with the node's defaults and a
service's own timeouts, the filters of List/FlushConntrack, the counters in GetStats."""

from __future__ import annotations

import socket

import pytest

from dpd.conntrack import SECOND, Conntrack, CtFilter, Timeouts
from dpd.loader import Settings
from dpd.memory import MemoryDatapath
from dpd.node import Node
from dpd.servicer import DatapathServicer
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import ValidationError
from xlbcore.service import CtTimeoutsSpec, EndpointSpec, Proto, ServiceKey, ServiceSpec

VIP, VIP2 = "198.19.0.10", "198.19.0.11"
EP1, EP2 = "198.18.1.2", "198.18.2.2"
NOW = 100_000 * SECOND


@pytest.fixture
def node():
    n = Node(MemoryDatapath(Settings(name="ct", max_services=8, max_backends=16, ct_size=256)),
             ct_aging_interval=0)
    yield n
    n.close()


def flow(ct: Conntrack, client: str, port: int, state: int, idle_s: float, *,
         vip: str = VIP, ep: str = EP1, proto: int = 6, svc_id: int = 7) -> None:
    """A flow's two entries, both last used `idle_s` before NOW."""
    c, v, e = (socket.inet_aton(a) for a in (client, vip, ep))
    s = ct.states
    last = NOW - int(idle_s * SECOND)
    svc = {"vip": v, "port": 80, "proto": proto}
    ct.map.put(ct.key.pack(saddr=c, daddr=v, sport=port, dport=80, proto=proto),
               ct.val.pack(nat_addr=e, nat_port=8080, dir=s.orig, state=state, last_ns=last,
                           svc=svc, svc_id=svc_id))
    ct.map.put(ct.key.pack(saddr=e, daddr=c, sport=8080, dport=port, proto=proto),
               ct.val.pack(nat_addr=v, nat_port=80, dir=s.reply, state=state, last_ns=last,
                           svc=svc, svc_id=svc_id))


def ports(ct: Conntrack, match: CtFilter | None = None) -> set[int]:
    """Client ports of the flows whose both entries are listed."""
    entries = ct.entries(match)
    orig = {e.src_port for e in entries if e.direction == ct.states.orig}
    reply = {e.dst_port for e in entries if e.direction == ct.states.reply}
    assert orig == reply, "a flow is listed with both of its entries"
    return orig


NEW, REPLIED = 1, 2


def test_aging_by_state_with_the_node_defaults(node):
    ct = Conntrack(node.dp, clock=lambda: NOW)
    s = ct.states
    cases = [  # (port, state, idle s, proto, expired?)
        (1, NEW, 29, 6, False), (2, NEW, 31, 6, True),
        (3, REPLIED, 31, 6, True),
        (4, s.est, 3599, 6, False), (5, s.est, 3601, 6, True),
        (6, s.closing, 59, 6, False), (7, s.closing, 61, 6, True),
        (8, s.closed, 9, 6, False), (9, s.closed, 11, 6, True),
        (10, NEW, 29, 17, False), (11, NEW, 31, 17, True),
        (12, s.est, 179, 17, False), (13, s.est, 181, 17, True),
    ]
    for port, state, idle, proto, _ in cases:
        flow(ct, "198.18.0.2", 40000 + port, state, idle, proto=proto)
    removed = ct.age_once()
    gone = {40000 + p for p, *_, exp in cases if exp}
    assert removed == 2 * len(gone)
    assert ports(ct) == {40000 + p for p, *_ in cases} - gone
    assert ct.counters.expired == len(gone)


def test_node_defaults_from_flags_and_a_services_own_timeouts(node):
    defaults = Timeouts.parse(["tcp_established=600", "tcp_closing=5"])
    assert (defaults.tcp_established, defaults.tcp_closing) == (600 * SECOND, 5 * SECOND)
    with pytest.raises(ValidationError, match="--ct-timeout"):
        Timeouts.parse(["tcp_bogus=5"])
    fast = ServiceSpec(VIP2, 80, Proto.TCP, endpoints=(EndpointSpec(EP1, 8080),),
                       ct_timeouts=CtTimeoutsSpec(tcp_established=30, tcp_closed=1))
    node.put_services([fast])
    (_, entry), = node.services.entries()
    ct = Conntrack(node.dp, defaults, clock=lambda: NOW,
                   per_service=node.services.ct_timeouts)
    s = ct.states
    flow(ct, "198.18.0.2", 1, s.est, 31, vip=VIP2, svc_id=entry.svc_id)   # the service's 30 s
    flow(ct, "198.18.0.2", 2, s.est, 31)                                  # defaults: 600 s
    flow(ct, "198.18.0.2", 3, s.est, 601)                                 # defaults: expired
    flow(ct, "198.18.0.2", 4, s.closing, 6, vip=VIP2, svc_id=entry.svc_id)  # default 5 s
    flow(ct, "198.18.0.2", 5, s.closed, 2, vip=VIP2, svc_id=entry.svc_id)   # the service's 1 s
    ct.age_once()
    assert ports(ct) == {2}


def test_filters_match_both_entries_of_a_flow(node):
    ct = node.conntrack
    s = ct.states
    flow(ct, "198.18.0.2", 1, s.est, 0)
    flow(ct, "198.18.0.2", 2, s.closing, 0, ep=EP2)
    flow(ct, "198.18.0.3", 3, s.est, 0, vip=VIP2)
    flow(ct, "198.18.0.3", 4, s.est, 0, proto=17)
    tcp80 = ServiceKey(VIP, 80, Proto.TCP)
    assert ports(ct, CtFilter(service=tcp80)) == {1, 2}
    assert ports(ct, CtFilter(endpoint=EP2)) == {2}
    assert ports(ct, CtFilter(endpoint=EP1, endpoint_port=8080)) == {1, 3, 4}
    assert ports(ct, CtFilter(endpoint=EP1, endpoint_port=9999)) == set()
    assert ports(ct, CtFilter(client="198.18.0.3")) == {3, 4}
    assert ports(ct, CtFilter(state=s.closing)) == {2}
    assert ports(ct, CtFilter(service=tcp80, client="198.18.0.2", state=s.est)) == {1}
    assert ct.flush(CtFilter(client="198.18.0.3")) == 4
    assert ports(ct) == {1, 2}
    assert ct.counters.flushed == 2


class Ctx:
    pass


def test_the_api_takes_filters_and_refuses_bad_ones_naming_the_field(node):
    api = DatapathServicer(node)
    ct = node.conntrack
    flow(ct, "198.18.0.2", 1, ct.states.est, 0)
    flow(ct, "198.18.0.3", 2, ct.states.est, 0)
    listed = list(api.ListConntrack(pb.ListConntrackRequest(client_address="198.18.0.3"),
                                    Ctx()))
    assert len(listed) == 2 and {e.src_port for e in listed} == {2, 8080}
    req = pb.FlushConntrackRequest(
        service=tpb.ServiceKey(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP),
        state=pb.CONNTRACK_STATE_ESTABLISHED, client_address="198.18.0.2")
    assert api.FlushConntrack(req, Ctx()).flushed == 2
    from dpd.servicer import _ct_filter
    for bad, field in [(pb.ListConntrackRequest(client_address="nope"), "client_address"),
                       (pb.ListConntrackRequest(endpoint_port=80), "endpoint_port"),
                       (pb.ListConntrackRequest(endpoint_address="198.18.1.2",
                                                endpoint_port=70000), "endpoint_port"),
                       (pb.ListConntrackRequest(state=42), "state")]:
        with pytest.raises(ValidationError, match=field):
            _ct_filter(bad)


def test_counters_created_refused_expired_flushed_evicted(node):
    api = DatapathServicer(node)
    stats = node.dp.maps["stats_map"]
    names = {v: k for k, v in node.dp.abi.stat_names().items()}
    codec = node.dp.abi.structs["xlb_counter"].codec

    def count(name, n):  # what the datapath would have counted, on one CPU
        stats.put(names[name].to_bytes(4, "little"),
                  codec.pack(packets=n, bytes=0) + codec.pack(packets=0, bytes=0))

    ct = node.conntrack
    s = ct.states
    count("new_flow", 10)
    count("drop_ct_clash", 2)
    count("drop_ct_insert", 1)
    for p in range(6):  # 10 created: 6 live, 2 expire, 1 flushed, so 1 was evicted
        flow(ct, "198.18.0.2", p, s.est, 0)
    flow(ct, "198.18.0.9", 7, s.closed, 3600)
    flow(ct, "198.18.0.9", 8, s.closed, 3600)
    flow(ct, "198.18.0.7", 9, s.est, 0)
    ct.clock = lambda: NOW
    ct.age_once()
    ct.flush(CtFilter(client="198.18.0.7"))
    c = api.GetStats(pb.GetStatsRequest(), Ctx()).conntrack
    assert (c.created, c.refused, c.expired, c.flushed, c.live, c.capacity) == (
        10, 3, 2, 1, 6, 128)
    assert c.evicted == 1
