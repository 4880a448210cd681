"""IPv6 services programmed through dpd's gRPC API (PutServices on a unix socket, the
session's loaded node), then packets through the TC programs (BPF_PROG_TEST_RUN): NAT66
and full-NAT66 of new flows and replies, Maglev and persistence, a full ep_map refused
with nothing written, ListServices/GetStats, ListConntrack and FlushConntrack filters
over ct_v6_map, conntrack ageing of IPv6 flows, and a dpd that reopens the pins reading
its IPv6 services back."""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether

from dpd.conntrack import SECOND, Conntrack
from dpd.servicer import DatapathServicer
from tests.datapath.packets import (
    FORWARDED,
    MAC_C,
    MAC_L,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    run,
    sum16,
)
from tests.datapath.test_nat6 import ABI, l4_ok, tcp6, udp6
from tests.unit.conftest import serve_datapath
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

CLIENT = "2001:db8::2"
CLIENT2 = "2001:db8::3"
VIP = "2001:db8:ff::10"
EPA = "2001:db8:1::2"
EPB = "2001:db8:2::2"
SNAT = "2001:db8:9::1"
C = ABI.const
EST, NEW = C("XLB_CT_EST"), C("XLB_CT_NEW")
ORIG, REPLY = C("XLB_DIR_ORIG"), C("XLB_DIR_REPLY")


@pytest.fixture
def api(node) -> Iterator[Any]:
    with tempfile.TemporaryDirectory(prefix="xlb-s6-") as d, \
            serve_datapath(Path(d), DatapathServicer(node)) as stub:
        yield stub
    node.delete_services([s.key for s in node.list_services()])
    node.flush_conntrack()


def service(*eps: tuple[str, int], port: int = 80, proto: int = tpb.PROTOCOL_TCP,
            vip: str = VIP, **fields: object) -> pb.Service:
    return pb.Service(vip=vip, port=port, protocol=proto,  # type: ignore[arg-type]
                      endpoints=[tpb.Endpoint(address=a, port=p) for a, p in eps],
                      **fields)  # type: ignore[arg-type]


def syn(node, sport: int, client: str = CLIENT, dport: int = 80) -> tuple[int, Any]:
    return run(node, tcp6(client, VIP, sport, dport, "S"))


def test_put_services_v6_then_nat66_both_ways_and_listed(api, node):
    api.PutServices(pb.PutServicesRequest(services=[
        service((EPA, 8080), (EPB.upper(), 8080))]))
    (listed,) = list(api.ListServices(pb.ListServicesRequest()))
    assert (listed.vip, [e.address for e in listed.endpoints]) == (VIP, [EPA, EPB])
    dsts = set()
    for sport in (40000, 40001):
        verdict, out = syn(node, sport)
        assert verdict in FORWARDED and l4_ok(out)
        assert (out[IPv6].src, out[TCP].sport, out[TCP].dport) == (CLIENT, sport, 8080)
        dsts.add(out[IPv6].dst)
        verdict, back = run(node, tcp6(out[IPv6].dst, CLIENT, 8080, sport, "SA"))
        assert verdict in FORWARDED and l4_ok(back)
        assert (back[IPv6].src, back[IPv6].dst, back[TCP].sport) == (VIP, CLIENT, 80)
    assert dsts == {EPA, EPB}  # round-robin over both
    stats = api.GetStats(pb.GetStatsRequest(services=[
        tpb.ServiceKey(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP)]))
    (s,) = stats.services
    assert s.counters.packets == 4
    assert sorted((e.endpoint.address, e.counters.packets) for e in s.endpoints) == \
        [(EPA, 2), (EPB, 2)]
    api.DeleteServices(pb.DeleteServicesRequest(keys=[
        tpb.ServiceKey(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP)]))
    packet = tcp6(CLIENT, VIP, 40002, 80, "S")
    verdict, out = run(node, packet)
    assert verdict == TC_ACT_OK and bytes(out) == packet
    assert node.dp.maps["nat_v6_map"].count() == 0


def test_fullnat66_with_the_services_snat_address(api, node):
    api.PutServices(pb.PutServicesRequest(services=[
        service((EPA, 8080), proto=tpb.PROTOCOL_UDP, mode=tpb.MODE_FULLNAT,
                snat_address=SNAT)]))
    verdict, out = run(node, udp6(CLIENT, VIP, 40100, 80, b"q"))
    assert verdict in FORWARDED and l4_ok(out)
    assert (out[IPv6].src, out[IPv6].dst, out[UDP].dport) == (SNAT, EPA, 8080)
    snat_port = out[UDP].sport
    verdict, back = run(node, udp6(EPA, SNAT, 8080, snat_port, b"a"))
    assert verdict in FORWARDED and l4_ok(back)
    assert (back[IPv6].src, back[IPv6].dst, back[UDP].sport, back[UDP].dport) == \
        (VIP, CLIENT, 80, 40100)
    (got,) = list(api.ListServices(pb.ListServicesRequest()))
    assert (got.mode, got.snat_address) == (tpb.MODE_FULLNAT, SNAT)


def test_maglev_and_persistence_on_v6(api, node):
    api.PutServices(pb.PutServicesRequest(services=[
        service((EPA, 8080), (EPB, 8080), algorithm=tpb.ALGORITHM_MAGLEV),
        service((EPA, 8443), (EPB, 8443), port=443, persistence_timeout_s=60)]))
    dsts = {syn(node, 41000 + i)[1][IPv6].dst for i in range(32)}
    assert dsts == {EPA, EPB}
    # persistence: every new flow of one client goes where its first went
    first = run(node, tcp6(CLIENT2, VIP, 42000, 443, "S"))[1][IPv6].dst
    assert {run(node, tcp6(CLIENT2, VIP, 42001 + i, 443, "S"))[1][IPv6].dst
            for i in range(8)} == {first}


def test_a_full_ep_map_is_refused_and_nothing_is_written(api, node):
    api.PutServices(pb.PutServicesRequest(services=[service((EPA, 8080))]))
    before = list(api.ListServices(pb.ListServicesRequest()))
    room = node.dp.maps["ep_map"].spec.max_entries
    many = [(f"2001:db8:5::{i:x}", 8080) for i in range(1, room + 1)]
    with pytest.raises(grpc.RpcError) as err:
        api.PutServices(pb.PutServicesRequest(services=[
            service(*many), service((EPB, 53), port=53, proto=tpb.PROTOCOL_UDP)]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list(api.ListServices(pb.ListServicesRequest())) == before
    assert node.dp.maps["nat_v6_map"].count() == 1
    verdict, out = syn(node, 43000)
    assert verdict in FORWARDED and out[IPv6].dst == EPA  # the held service still serves


def test_a_mixed_family_service_is_refused_naming_the_field(api, node):
    with pytest.raises(grpc.RpcError) as err:
        api.PutServices(pb.PutServicesRequest(services=[
            service((EPA, 8080), ("198.18.1.2", 8080))]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "services[0].endpoints[1].address" in err.value.details()
    assert node.dp.maps["nat_v6_map"].count() == 0


def open_flows(node) -> None:
    """Two established TCP flows (CLIENT -> EPA, CLIENT2 -> EPB) and one NEW one
    (CLIENT, a SYN only) to the round-robin service VIP:80 of EPA and EPB."""
    for client, sport in ((CLIENT, 44000), (CLIENT2, 44001)):
        verdict, out = run(node, tcp6(client, VIP, sport, 80, "S"))
        ep = out[IPv6].dst
        run(node, tcp6(ep, client, 8080, sport, "SA"))
        run(node, tcp6(client, VIP, sport, 80, "A"))
    run(node, tcp6(CLIENT, VIP, 44002, 80, "S"))


def flows(api, **filters: object) -> set[tuple[str, int, str]]:
    """(client, client port, endpoint) of the ORIG entries ListConntrack gives."""
    return {(e.src, e.src_port, e.nat_address)
            for e in api.ListConntrack(pb.ListConntrackRequest(**filters))  # type: ignore[arg-type]
            if e.direction == ORIG}


def test_list_and_flush_conntrack_filters_on_v6_flows(api, node):
    api.PutServices(pb.PutServicesRequest(services=[
        service((EPA, 8080), (EPB, 8080)),
        service((EPA, 5353), port=53, proto=tpb.PROTOCOL_UDP)]))
    open_flows(node)
    run(node, udp6(CLIENT2, VIP, 44100, 53, b"q"))
    run(node, udp6(EPA, CLIENT2, 5353, 44100, b"a"))
    key = tpb.ServiceKey(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP)
    every = list(api.ListConntrack(pb.ListConntrackRequest()))
    assert len(every) == 8  # four flows, two entries each
    entry = next(e for e in every if e.src == CLIENT and e.src_port == 44000)
    assert (entry.dst, entry.service.vip, entry.service.port) == (VIP, VIP, 80)
    eps = {f[:2]: f[2] for f in flows(api)}
    assert len(flows(api, service=key)) == 3
    assert flows(api, client_address=CLIENT2) == {(CLIENT2, 44001, eps[(CLIENT2, 44001)]),
                                                  (CLIENT2, 44100, EPA)}
    assert {f[2] for f in flows(api, endpoint_address=EPB)} == {EPB}
    assert flows(api, state=pb.CONNTRACK_STATE_NEW) == {(CLIENT, 44002, eps[(CLIENT, 44002)])}
    assert {f[:2] for f in flows(api, service=key, state=pb.CONNTRACK_STATE_ESTABLISHED)} == \
        {(CLIENT, 44000), (CLIENT2, 44001)}
    # flush one client's flows: both entries of each go, the others stay and still work
    gone = api.FlushConntrack(pb.FlushConntrackRequest(client_address=CLIENT2.upper()))
    assert gone.flushed == 4
    assert {f[:2] for f in flows(api)} == {(CLIENT, 44000), (CLIENT, 44002)}
    verdict, out = run(node, tcp6(CLIENT, VIP, 44000, 80, "PA", b"x"))
    assert verdict in FORWARDED and out[IPv6].dst == eps[(CLIENT, 44000)]
    assert api.FlushConntrack(pb.FlushConntrackRequest(service=key)).flushed == 4
    assert node.dp.maps["ct_v6_map"].count() == 0
    with pytest.raises(grpc.RpcError) as err:
        list(api.ListConntrack(pb.ListConntrackRequest(client_address="2001:db8::zz")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_ageing_sweeps_v6_flows_by_state_timeouts(api, node):
    api.PutServices(pb.PutServicesRequest(services=[service((EPA, 8080), (EPB, 8080))]))
    open_flows(node)
    base = node.conntrack.clock()

    def sweep(after_s: int) -> set[tuple[str, int]]:
        ct = Conntrack(node.dp, clock=lambda: base + after_s * SECOND)
        ct.age_once()
        return {f[:2] for f in flows(api)}

    assert sweep(10) == {(CLIENT, 44000), (CLIENT2, 44001), (CLIENT, 44002)}
    assert sweep(31) == {(CLIENT, 44000), (CLIENT2, 44001)}  # the SYN-only flow (30 s)
    assert node.dp.maps["ct_v6_map"].count() == 4  # its REPLY entry went with it
    assert sweep(3601) == set()  # established: 3600 s
    assert node.dp.maps["ct_v6_map"].count() == 0


def test_a_restarted_dpd_reads_its_v6_services_back_from_the_pins(loaded, api, node):
    from dpd.node import Node

    api.PutServices(pb.PutServicesRequest(services=[
        service((EPA, 8080), (EPB, 8080), algorithm=tpb.ALGORITHM_MAGLEV),
        service((EPA, 5353), port=53, proto=tpb.PROTOCOL_UDP, mode=tpb.MODE_FULLNAT,
                snat_address=SNAT),
        service(("198.18.1.2", 8080), vip="198.19.0.10")]))
    listed = node.list_services()
    verdict, before = syn(node, 45000)
    run(node, tcp6(before[IPv6].dst, CLIENT, 8080, 45000, "SA"))
    again = Node.load(loaded.settings, ct_aging_interval=0)  # the pins, as a new dpd
    try:
        assert sorted(again.list_services(), key=str) == sorted(listed, key=str)
        flow = [e for e in again.conntrack.entries() if e.direction == ORIG]
        assert [(f.src, f.nat_address, str(f.service)) for f in flow] == \
            [(CLIENT, before[IPv6].dst, f"tcp://[{VIP}]:80")]
        # the established flow and new ones keep working through the reopened maps
        verdict, out = run(again, tcp6(CLIENT, VIP, 45000, 80, "A"))
        assert verdict in FORWARDED and out[IPv6].dst == before[IPv6].dst
        verdict, out = run(again, udp6(CLIENT, VIP, 45001, 53))
        assert (out[IPv6].src, out[IPv6].dst) == (SNAT, EPA)
        # a change made by the new dpd: one endpoint less, written to fresh runs
        tcp_svc = next(s for s in again.list_services() if s.port == 80 and ":" in s.vip)
        again.put_services([replace(tcp_svc, endpoints=tcp_svc.endpoints[1:])])
        assert {run(again, tcp6(CLIENT2, VIP, 45100 + i, 80, "S"))[1][IPv6].dst
                for i in range(8)} == {EPB}
        # deleted by the new dpd: gone from the maps (the session's node, whose view is
        # now stale, deletes its own copies of them afterwards: no-ops on the maps)
        assert again.delete_services([s.key for s in again.list_services()]) == 3
        assert node.dp.maps["nat_v6_map"].count() == 0
    finally:
        again.close()


def test_least_connections_on_v6_counts_ct_v6_map_flows(api, node):
    api.PutServices(pb.PutServicesRequest(services=[
        service((EPA, 8080), (EPB, 8080), algorithm=tpb.ALGORITHM_LEAST_CONNECTIONS)]))
    firsts = [syn(node, 46000 + i)[1][IPv6].dst for i in range(4)]
    assert sorted(firsts) == [EPA, EPA, EPB, EPB]  # each new flow to the least loaded
    api.FlushConntrack(pb.FlushConntrackRequest(endpoint_address=EPA))
    # the sweep recounts each endpoint's live flows from ct_v6_map: EPA has none left
    Conntrack(node.dp, clock=node.conntrack.clock,
              least_conn=node.services.lc_stat_ids).age_once()
    assert [syn(node, 46100 + i)[1][IPv6].dst for i in range(2)] == [EPA, EPA]


def echo6(dst: str, src: str = CLIENT) -> bytes:
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=src, dst=dst, hlim=5)
                 / ICMPv6EchoRequest(id=77, seq=5, data=b"ping6-payload"))


def test_echo_to_a_v6_vip_is_answered_with_a_valid_checksum(api, node):
    """vip_v6_map follows the services written through the API: an echo request to a VIP
    comes back as its reply (out of the interface it came in on) while at least one
    service holds the VIP; to any other address, or once the VIP's last service is gone,
    it passes untouched."""
    tcp, udp = service((EPA, 8080)), service((EPA, 5353), port=53, proto=tpb.PROTOCOL_UDP)
    api.PutServices(pb.PutServicesRequest(services=[tcp, udp]))
    before = node.global_stats()["icmp_echo_reply"].packets
    verdict, out = run(node, echo6(VIP))
    assert verdict == TC_ACT_REDIRECT
    assert (out[Ether].src, out[Ether].dst) == (MAC_L, MAC_C)
    assert (out[IPv6].src, out[IPv6].dst, out[IPv6].hlim) == (
        VIP, CLIENT, C("XLB_ICMP_REPLY_TTL"))
    reply = out[ICMPv6EchoReply]
    assert (reply.type, reply.code, reply.id, reply.seq, reply.data) == (
        129, 0, 77, 5, b"ping6-payload")
    # the ICMPv6 checksum over the message and its pseudo header (RFC 8200 8.1) ...
    frame = bytes(out)
    plen = struct.unpack("!H", frame[18:20])[0]
    pseudo = frame[22:54] + struct.pack("!I", plen) + b"\0\0\0\x3a"
    assert sum16(pseudo + frame[54:54 + plen]) == 0xffff
    # ... as scapy computes it afresh
    fresh = Ether(frame)
    del fresh[ICMPv6EchoReply].cksum
    assert Ether(bytes(fresh))[ICMPv6EchoReply].cksum == reply.cksum
    assert node.global_stats()["icmp_echo_reply"].packets == before + 1
    assert node.list_conntrack() == []  # no state, no endpoint involved
    for other in (echo6(EPA), echo6("2001:db8:ff::11"), echo6(VIP, src="ff02::1")):
        verdict, out = run(node, other)  # no VIP, a multicast source
        assert verdict == TC_ACT_OK and bytes(out) == other
    # one VIP of two services: deleting one keeps it answered, deleting both stops it
    api.DeleteServices(pb.DeleteServicesRequest(keys=[
        tpb.ServiceKey(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP)]))
    assert run(node, echo6(VIP))[0] == TC_ACT_REDIRECT
    api.DeleteServices(pb.DeleteServicesRequest(keys=[
        tpb.ServiceKey(vip=VIP, port=53, protocol=tpb.PROTOCOL_UDP)]))
    verdict, out = run(node, echo6(VIP))
    assert verdict == TC_ACT_OK and bytes(out) == echo6(VIP)
    assert node.global_stats()["icmp_echo_reply"].packets == before + 2
