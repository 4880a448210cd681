"""Port-range and any-port services through the loaded TC programs (BPF_PROG_TEST_RUN):
which service a new flow's port reaches (exact port over range over any-port), the
destination port the endpoint sees (kept, or a fixed one), the reply's source port, and
what the API refuses (docs/services.md)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP

from dpd.services import port_prefixes
from tests.datapath.packets import (
    CLIENT,
    EP1,
    EP2,
    FORWARDED,
    TC_ACT_OK,
    VIP,
    VIP2,
    checksums_valid,
    run,
    tcp,
    udp,
)
from xlbcore.errors import ValidationError
from xlbcore.service import EndpointSpec, Mode, Proto, ServiceSpec

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
