"""Real packets through the loaded TC programs (BPF_PROG_TEST_RUN): DNAT of new flows,
reverse NAT of replies, conntrack state, pass-through of traffic that is not ours."""

from __future__ import annotations

from collections import Counter

import pytest
from scapy.layers.inet import IP, TCP, UDP

from dpd import abi
from tests.datapath.packets import (
    CLIENT,
    EP1,
    EP2,
    FORWARDED,
    TC_ACT_OK,
    TC_ACT_SHOT,
    VIP,
    checksums_valid,
    run,
    tcp,
    udp,
)
from xlbcore.service import Algorithm, EndpointSpec, Proto, ServiceSpec

pytestmark = pytest.mark.root

ABI = abi.load()



def web(*eps: EndpointSpec, algo: Algorithm = Algorithm.ROUND_ROBIN, proto: Proto = Proto.TCP,
        port: int = 80) -> ServiceSpec:
    return ServiceSpec(VIP, port, proto, algo, endpoints=tuple(sorted(eps)))


def global_stat(node, name: str) -> int:
    return node.global_stats()[name].packets


def test_syn_to_vip_is_dnated_with_valid_checksums(node):
    node.put_services([web(EndpointSpec(EP1, 8080))])
    verdict, out = run(node, tcp(CLIENT, VIP, 40000, 80, "S"))
    assert verdict in FORWARDED
    assert out[IP].dst == EP1 and out[TCP].dport == 8080
    assert out[IP].src == CLIENT and out[TCP].sport == 40000
    assert checksums_valid(out)


def test_reply_is_reverse_nated_to_vip(node):
    node.put_services([web(EndpointSpec(EP1, 8080))])
    run(node, tcp(CLIENT, VIP, 40001, 80, "S"))
    verdict, out = run(node, tcp(EP1, CLIENT, 8080, 40001, "SA"))
    assert verdict in FORWARDED
    assert out[IP].src == VIP and out[TCP].sport == 80
    assert out[IP].dst == CLIENT and out[TCP].dport == 40001
    assert checksums_valid(out)


def test_packet_to_non_vip_passes_untouched(node):
    node.put_services([web(EndpointSpec(EP1, 8080))])
    for pkt in (tcp(CLIENT, "198.19.0.99", 40002, 80), tcp(CLIENT, VIP, 40002, 81),
                udp(CLIENT, VIP, 40002, 80)):
        verdict, out = run(node, pkt)
        assert verdict == TC_ACT_OK
        assert bytes(out) == pkt
    assert node.list_conntrack() == []


def test_conntrack_tracks_handshake_and_fast_path_takes_established(node):
    node.put_services([web(EndpointSpec(EP1, 8080))])
    run(node, tcp(CLIENT, VIP, 40003, 80, "S"))
    entries = {e.direction: e for e in node.list_conntrack()}
    assert set(entries) == {ABI.const("XLB_DIR_ORIG"), ABI.const("XLB_DIR_REPLY")}
    orig, reply = entries[ABI.const("XLB_DIR_ORIG")], entries[ABI.const("XLB_DIR_REPLY")]
    assert (orig.src, orig.dst, orig.nat_address, orig.nat_port) == (CLIENT, VIP, EP1, 8080)
    assert (reply.src, reply.dst, reply.nat_address, reply.nat_port) == (EP1, CLIENT, VIP, 80)
    assert orig.state == ABI.const("XLB_CT_NEW")
    run(node, tcp(EP1, CLIENT, 8080, 40003, "SA"))
    assert {e.state for e in node.list_conntrack()} == {ABI.const("XLB_CT_REPLIED")}
    run(node, tcp(CLIENT, VIP, 40003, 80, "A"))
    assert {e.state for e in node.list_conntrack()} == {ABI.const("XLB_CT_EST")}

    slow_before = global_stat(node, "slow_path")
    verdict, out = run(node, tcp(CLIENT, VIP, 40003, 80, "PA", b"GET / HTTP/1.0\r\n\r\n"))
    assert verdict in FORWARDED and out[IP].dst == EP1 and checksums_valid(out)
    verdict, out = run(node, tcp(EP1, CLIENT, 8080, 40003, "PA", b"HTTP/1.0 200 OK\r\n"))
    assert out[IP].src == VIP and out[TCP].sport == 80 and checksums_valid(out)
    assert global_stat(node, "slow_path") == slow_before  # both took the fast path

    run(node, tcp(CLIENT, VIP, 40003, 80, "FA"))
    assert {e.state for e in node.list_conntrack()} == {ABI.const("XLB_CT_CLOSING")}
    run(node, tcp(EP1, CLIENT, 8080, 40003, "FA"))
    assert {e.state for e in node.list_conntrack()} == {ABI.const("XLB_CT_CLOSED")}


def test_udp_is_nated_both_ways(node):
    node.put_services([web(EndpointSpec(EP2, 5353), proto=Proto.UDP, port=53)])
    verdict, out = run(node, udp(CLIENT, VIP, 40004, 53, b"query"))
    assert out[IP].dst == EP2 and out[UDP].dport == 5353 and checksums_valid(out)
    verdict, out = run(node, udp(EP2, CLIENT, 5353, 40004, b"answer"))
    assert out[IP].src == VIP and out[UDP].sport == 53 and checksums_valid(out)
    assert {e.state for e in node.list_conntrack()} == {ABI.const("XLB_CT_EST")}


def _spread(node, n: int, base_port: int = 41000) -> Counter:
    seen: Counter = Counter()
    for i in range(n):
        _, out = run(node, tcp(CLIENT, VIP, base_port + i, 80, "S"))
        seen[out[IP].dst] += 1
    return seen


def test_weighted_round_robin_follows_weights(node):
    node.put_services([web(EndpointSpec(EP1, 8080, 2), EndpointSpec(EP2, 8080, 1))])
    assert _spread(node, 300) == {EP1: 200, EP2: 100}


def test_hash_spreads_and_is_stable_per_flow(node):
    node.put_services([web(EndpointSpec(EP1, 8080), EndpointSpec(EP2, 8080),
                           algo=Algorithm.HASH)])
    first = {p: run(node, tcp(CLIENT, VIP, p, 80, "S"))[1][IP].dst for p in range(42000, 42200)}
    counts = Counter(first.values())
    assert set(counts) == {EP1, EP2} and min(counts.values()) > 60
    node.flush_conntrack()
    again = {p: run(node, tcp(CLIENT, VIP, p, 80, "S"))[1][IP].dst for p in range(42000, 42200)}
    assert again == first


def test_drained_endpoint_gets_no_new_flows_but_keeps_old(node):
    node.put_services([web(EndpointSpec(EP1, 8080), EndpointSpec(EP2, 8080))])
    flows = {p: run(node, tcp(CLIENT, VIP, p, 80, "S"))[1][IP].dst for p in range(43000, 43010)}
    on_ep2 = [p for p, d in flows.items() if d == EP2]
    assert on_ep2
    node.put_services([web(EndpointSpec(EP1, 8080), EndpointSpec(EP2, 8080, 0))])
    assert _spread(node, 20, 43100) == {EP1: 20}
    # an existing flow to the drained endpoint still goes there
    _, out = run(node, tcp(CLIENT, VIP, on_ep2[0], 80, "A"))
    assert out[IP].dst == EP2


def test_all_endpoints_drained_drops_new_flows(node):
    node.put_services([web(EndpointSpec(EP1, 8080, 0))])
    verdict, _ = run(node, tcp(CLIENT, VIP, 44000, 80, "S"))
    assert verdict == TC_ACT_SHOT
    assert global_stat(node, "drop_no_endpoint") == 1


def test_midstream_packet_without_conntrack_sticks_to_one_endpoint(node):
    node.put_services([web(EndpointSpec(EP1, 8080), EndpointSpec(EP2, 8080))])
    dsts = set()
    for _ in range(3):
        node.flush_conntrack()
        _, out = run(node, tcp(CLIENT, VIP, 45000, 80, "A"))
        dsts.add(out[IP].dst)
    assert len(dsts) == 1


def test_counters_per_service_and_endpoint(node):
    node.put_services([web(EndpointSpec(EP1, 8080), EndpointSpec(EP2, 8080))])
    pkt = tcp(CLIENT, VIP, 46000, 80, "S")
    run(node, pkt)
    run(node, tcp(CLIENT, VIP, 46001, 80, "S"))
    [(spec, total, eps)] = node.services.stats()
    assert total.packets == 2 and total.bytes == 2 * len(pkt)
    assert sorted(c.packets for _, c in eps) == [1, 1]



def test_aging_removes_both_entries_of_an_expired_flow_only(node):
    from dpd.conntrack import SECOND, Conntrack, Timeouts

    node.put_services([web(EndpointSpec(EP1, 8080))])
    run(node, tcp(CLIENT, VIP, 47000, 80, "S"))  # handshake never finishes
    run(node, tcp(CLIENT, VIP, 47001, 80, "S"))
    run(node, tcp(EP1, CLIENT, 8080, 47001, "SA"))
    run(node, tcp(CLIENT, VIP, 47001, 80, "A"))  # established
    patient = Conntrack(node.dp, Timeouts(tcp_syn=3600 * SECOND))
    assert patient.age_once() == 0
    strict = Conntrack(node.dp, Timeouts(tcp_syn=0))
    assert strict.age_once() == 2
    left = node.list_conntrack()
    assert {(e.src_port, e.dst_port) for e in left} == {(47001, 80), (8080, 47001)}
    assert node.flush_conntrack() == 2
    assert node.list_conntrack() == []
