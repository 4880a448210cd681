"""Port-range and any-port services through the loaded TC programs (BPF_PROG_TEST_RUN):
which service a new flow's port reaches (exact port over range over any-port), the
destination port the endpoint sees (kept, or a fixed one), the reply's source port, and
what the API refuses (docs/services.md)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from dpd.services import port_prefixes
from tests.datapath.packets import (
    CLIENT,
    EP1,
    EP2,
    FORWARDED,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    VIP,
    VIP2,
    checksums_valid,
    run,
    tcp,
    udp,
)
from tests.datapath.test_hardening import _icmp_checks, _icmp_error
from tests.datapath.test_modes import fibns as fibns  # the fixture, shared
from xlbcore.errors import ValidationError
from xlbcore.service import (
    EndpointSpec,
    HealthKind,
    HealthSpec,
    Mode,
    Proto,
    ServiceSpec,
    parse_services,
)

pytestmark = pytest.mark.root

EP3 = "198.18.3.2"


def svc(port: int, last: int, *eps: EndpointSpec, proto: Proto = Proto.TCP,
        vip: str = VIP, mode: Mode = Mode.DNAT) -> ServiceSpec:
    return ServiceSpec(vip, port, proto, mode=mode, endpoints=tuple(sorted(eps)),
                       port_last=last)


def syn_to(node, dport: int, sport: int = 40000, dst: str = VIP):
    rc, out = run(node, tcp(CLIENT, dst, sport, dport, "S"))
    return rc, out


def test_range_keeps_the_clients_port_and_reply_comes_back_from_it(node):
    node.put_services([svc(8000, 8099, EndpointSpec(EP1, 0))])
    for i, port in enumerate((8000, 8042, 8099)):
        rc, out = syn_to(node, port, sport=40000 + i)
        assert rc in FORWARDED
        assert (out[IP].dst, out[TCP].dport) == (EP1, port)
        assert checksums_valid(out)
        # the endpoint's SYN-ACK leaves from the VIP and the port the client used
        rc, back = run(node, tcp(EP1, CLIENT, port, 40000 + i, "SA"))
        assert rc in FORWARDED
        assert (back[IP].src, back[TCP].sport) == (VIP, port)
        assert checksums_valid(back)


def test_range_edges_and_outside_ports_are_not_rewritten(node):
    node.put_services([svc(8000, 8099, EndpointSpec(EP1, 0))])
    for port in (7999, 8100):
        packet = tcp(CLIENT, VIP, 40000, port, "S")
        rc, out = run(node, packet)
        assert rc == TC_ACT_OK
        assert bytes(out) == packet  # no service: untouched


def test_range_with_a_fixed_endpoint_port(node):
    node.put_services([svc(5000, 5009, EndpointSpec(EP1, 9000), proto=Proto.UDP)])
    for port in (5000, 5005, 5009):
        rc, out = run(node, udp(CLIENT, VIP, 41000 + port, port))
        assert rc in FORWARDED
        assert (out[IP].dst, out[UDP].dport) == (EP1, 9000)
        assert checksums_valid(out)
        rc, back = run(node, udp(EP1, CLIENT, 9000, 41000 + port))
        assert (back[IP].src, back[UDP].sport) == (VIP, port)
        assert checksums_valid(back)


def test_exact_port_wins_over_range_which_wins_over_any_port(node):
    node.put_services([
        svc(0, 0, EndpointSpec(EP3, 0)),         # any-port
        svc(8000, 8099, EndpointSpec(EP2, 0)),   # range
        svc(8080, 0, EndpointSpec(EP1, 80)),     # exact, inside the range
    ])
    want = {8080: (EP1, 80), 8000: (EP2, 8000), 8081: (EP2, 8081), 22: (EP3, 22),
            65535: (EP3, 65535), 8100: (EP3, 8100)}
    for i, (port, ep) in enumerate(want.items()):
        rc, out = syn_to(node, port, sport=42000 + i)
        assert rc in FORWARDED
        assert (out[IP].dst, out[TCP].dport) == ep, port
    # another protocol and another VIP are not the any-port service's
    packet = udp(CLIENT, VIP, 43000, 22)
    assert bytes(run(node, packet)[1]) == packet
    packet = tcp(CLIENT, VIP2, 43000, 22, "S")
    assert bytes(run(node, packet)[1]) == packet


def test_conntrack_and_listing_name_the_range_service(node):
    spec = svc(8000, 8099, EndpointSpec(EP1, 0))
    node.put_services([spec])
    syn_to(node, 8042)
    flows = [e for e in node.conntrack.entries() if e.direction == 1]
    assert [(f.service, f.nat_port) for f in flows] == [(spec.key, 8042)]
    assert node.list_services() == [spec]


def test_deleting_a_range_removes_its_ports(node):
    spec = svc(8000, 8099, EndpointSpec(EP1, 0))
    node.put_services([spec])
    assert node.delete_services([spec.key]) == 1
    assert len(list(node.services.ranges.items())) == 0
    packet = tcp(CLIENT, VIP, 40000, 8042, "S")
    assert bytes(run(node, packet)[1]) == packet


def test_overlapping_ranges_are_refused_and_nothing_is_written(node):
    node.put_services([svc(8000, 8099, EndpointSpec(EP1, 0))])
    before = sorted(node.services.ranges.items())
    with pytest.raises(ValidationError, match="overlaps"):
        node.put_services([svc(9000, 9001, EndpointSpec(EP2, 0)),
                           svc(8099, 8200, EndpointSpec(EP2, 0))])
    assert sorted(node.services.ranges.items()) == before
    assert [s.port for s in node.list_services()] == [8000]
    # the same range on another protocol or VIP is another service
    node.put_services([svc(8000, 8099, EndpointSpec(EP2, 0), proto=Proto.UDP),
                       svc(8000, 8099, EndpointSpec(EP2, 0), vip=VIP2)])
    assert len(node.list_services()) == 3


@pytest.mark.parametrize(("first", "last"), [(1, 65535), (8000, 8099), (1023, 1025), (5, 5)])
def test_port_prefixes_cover_the_range_exactly(first, last):
    covered = set()
    for port, bits in port_prefixes(first, last):
        size = 1 << (16 - bits)
        assert port % size == 0
        block = set(range(port, port + size))
        assert not covered & block
        covered |= block
    assert covered == set(range(first, last + 1))


# -- full-NAT, DSR, ICMP errors, health, a restarted dpd --------------------------------------

SNAT = "198.18.9.1"


def test_fullnat_range_keeps_the_port_and_the_reply_returns_from_it(node):
    spec = ServiceSpec(VIP, 8000, Proto.TCP, mode=Mode.FULLNAT, snat_addr=SNAT,
                       endpoints=(EndpointSpec(EP1, 0),), port_last=8099)
    node.put_services([spec])
    for i, port in enumerate((8000, 8042, 8099)):
        sport = 44000 + i
        rc, out = syn_to(node, port, sport=sport)
        assert rc in FORWARDED and checksums_valid(out)
        assert (out[IP].src, out[IP].dst, out[TCP].dport) == (SNAT, EP1, port)
        aport = out[TCP].sport
        rc, back = run(node, tcp(EP1, SNAT, port, aport, "SA"))
        assert rc in FORWARDED and checksums_valid(back)
        assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == \
            (VIP, port, CLIENT, sport)
    # a packet from the endpoint on a port of the range but of no flow: untouched
    packet = tcp(EP1, SNAT, 8043, aport, "PA", b"x")
    assert bytes(run(node, packet)[1]) == packet


def test_fullnat_any_port_with_a_fixed_endpoint_port(node):
    node.put_services([ServiceSpec(VIP, 0, Proto.UDP, mode=Mode.FULLNAT, snat_addr=SNAT,
                                   endpoints=(EndpointSpec(EP1, 5353),))])
    rc, out = run(node, udp(CLIENT, VIP, 45000, 53))
    assert rc in FORWARDED and checksums_valid(out)
    assert (out[IP].src, out[IP].dst, out[UDP].dport) == (SNAT, EP1, 5353)
    rc, back = run(node, udp(EP1, SNAT, 5353, out[UDP].sport))
    assert (back[IP].src, back[UDP].sport, back[UDP].dport) == (VIP, 53, 45000)
    assert checksums_valid(back)


def test_dsr_range_sends_the_packet_as_is_and_refuses_a_fixed_port(node, fibns):  # noqa: F811
    from tests.datapath.test_modes import EP_MAC, run_in

    spec = ServiceSpec(VIP, 8000, Proto.TCP, mode=Mode.DSR, port_last=8099,
                       endpoints=(EndpointSpec(EP1, 0),))
    node.put_services([spec])
    for port in (8000, 8077):
        packet = tcp(CLIENT, VIP, 46000, port, "S")
        rc, out = run_in(node, fibns, packet)
        assert rc == TC_ACT_REDIRECT and out[Ether].dst == EP_MAC
        assert (out[IP].dst, out[TCP].dport) == (VIP, port)  # the port is the client's
        assert bytes(out[TCP]) == bytes(Ether(packet)[TCP])
    # a DSR range cannot send its flows to one fixed port: DSR rewrites no port
    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.types.v1 import types_pb2 as tpb

    msg = pb.Service(vip=VIP, port=9000, port_last=9009, protocol=tpb.PROTOCOL_TCP,
                     mode=tpb.MODE_DSR, endpoints=[tpb.Endpoint(address=EP1, port=9000)])
    with pytest.raises(ValidationError, match=r"services\[0\]\.endpoints\[0\]\.port: 9000"):
        parse_services([msg])


def test_icmp_errors_of_a_range_flow_are_translated_both_ways(node):
    node.put_services([svc(8000, 8099, EndpointSpec(EP1, 0), proto=Proto.UDP)])
    rc, out = run(node, udp(CLIENT, VIP, 47000, 8042, b"query"))
    assert (out[IP].dst, out[UDP].dport) == (EP1, 8042)
    # the endpoint's port unreachable about what it got -> the client, about the VIP
    err = _icmp_error(EP1, CLIENT, bytes(out[IP]))
    rc, got = run(node, err)
    assert rc in FORWARDED
    frame = bytes(got)
    _icmp_checks(frame, full_quote=True)
    assert (IP(frame[14:]).src, IP(frame[14:]).dst) == (VIP, CLIENT)
    q = IP(frame[42:])
    assert (q.src, q.dst, q[UDP].sport, q[UDP].dport) == (CLIENT, VIP, 47000, 8042)
    # the client's error about the VIP's answer -> the endpoint, about its own port
    quote = bytes(IP(src=VIP, dst=CLIENT) / UDP(sport=8042, dport=47000) / b"answer")
    rc, got = run(node, _icmp_error(CLIENT, VIP, quote, 3, 4, 1300))
    assert rc in FORWARDED
    frame = bytes(got)
    _icmp_checks(frame, full_quote=True)
    assert IP(frame[14:]).dst == EP1
    q = IP(frame[42:])
    assert (q.src, q[UDP].sport, q.dst, q[UDP].dport) == (EP1, 8042, CLIENT, 47000)
    # an error quoting a port of the range that carries no flow is left alone
    stray = _icmp_error(CLIENT, VIP, bytes(IP(src=VIP, dst=CLIENT)
                                           / UDP(sport=8043, dport=47000) / b"x"))
    assert bytes(run(node, stray)[1]) == stray


def test_health_takes_a_kept_port_endpoint_out_and_needs_a_check_port(node):
    spec = replace(svc(8000, 8099, EndpointSpec(EP1, 0), EndpointSpec(EP2, 0)),
                   health=HealthSpec(HealthKind.TCP, port=22))
    node.services.put([spec])  # the table alone: the verdicts below stand for the probes'
    node.services.set_down({spec.key: frozenset({(EP1, 0)})})
    for i in range(4):  # EP1 out of selection: every new flow to EP2, on its own port
        rc, out = syn_to(node, 8010 + i, sport=48000 + i)
        assert (out[IP].dst, out[TCP].dport) == (EP2, 8010 + i)
    node.services.set_down({spec.key: frozenset()})
    dsts = {syn_to(node, 8020 + i, sport=48100 + i)[1][IP].dst for i in range(4)}
    assert dsts == {EP1, EP2}
    # a TCP check of endpoints that keep the client's port must name the port it probes
    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.types.v1 import types_pb2 as tpb

    msg = pb.Service(vip=VIP, port=9000, port_last=9009, protocol=tpb.PROTOCOL_TCP,
                     endpoints=[tpb.Endpoint(address=EP1, port=0)],
                     health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP))
    with pytest.raises(ValidationError, match=r"health\.port: 0, but an endpoint has port 0"):
        parse_services([msg])
    msg.health.port = 22
    (ok,) = parse_services([msg])
    assert ok.health is not None and ok.health.port == 22
    msg.health.CopyFrom(tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_ICMP))  # no port needed
    assert parse_services([msg])[0].endpoints[0].port == 0


def test_a_restarted_dpd_reads_its_ranges_back_from_the_pins(loaded, node):
    from dpd.node import Node

    ranged = svc(8000, 8099, EndpointSpec(EP1, 0))
    fixed = svc(5000, 5009, EndpointSpec(EP2, 9000), proto=Proto.UDP)
    anyport = svc(0, 0, EndpointSpec(EP2, 0), vip=VIP2)
    node.put_services([ranged, fixed, anyport])
    rc, before = syn_to(node, 8042, sport=49000)
    again = Node.load(loaded.settings, ct_aging_interval=0)  # the pins, as a new dpd
    try:
        assert sorted(again.list_services(), key=lambda s: (s.vip, s.port)) == \
            sorted([ranged, fixed, anyport], key=lambda s: (s.vip, s.port))
        # its range record is whole: an overlap is still refused, the flow still named
        with pytest.raises(ValidationError, match="overlaps"):
            again.put_services([svc(8090, 8100, EndpointSpec(EP1, 0))])
        flows = [e for e in again.conntrack.entries() if e.direction == 1]
        assert [f.service for f in flows] == [ranged.key]
        # new flows keep working through the reopened maps; deleting frees the ports
        rc, out = run(again, tcp(CLIENT, VIP2, 49001, 2222, "S"))
        assert (out[IP].dst, out[TCP].dport) == (EP2, 2222)
        assert again.delete_services([ranged.key]) == 1
    finally:
        again.close()
    packet = tcp(CLIENT, VIP, 49002, 8042, "S")
    assert bytes(run(node, packet)[1]) == packet
