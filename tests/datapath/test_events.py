"""Events through the loaded datapath's ring (pkt_ring) and dpd's reader: a packet a
TRAP rule matches arrives with its first 128 bytes (all of a shorter one), its length,
the rule's name and the headers decoded, and goes on as allowed; a policer's drops give
one event a second."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dpd import bpfsys
from dpd.firewall import StaticLinks
from dpd.policers import PolicerSpec
from policyd import cli_events
from tests.datapath.packets import TC_ACT_OK, VIP, sctp, sctp_init, tcp, udp
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.firewall import Action, PortRange, RuleMatch, RuleProto, RuleSpec

IF_A = 7101
SERVER = "198.18.5.5"


@pytest.fixture
def ev(node: object) -> Iterator[object]:
    table = node.firewall  # type: ignore[attr-defined]
    saved = table.links
    table.links = StaticLinks({"ev-a": IF_A})
    table.delete([r.name for r in table.rules()])
    try:
        yield node
    finally:
        table.delete([r.name for r in table.rules()])
        table.links = saved
        pol = node.policers  # type: ignore[attr-defined]
        pol.intf.delete(IF_A.to_bytes(4, "little"))
        pol.delete([p.spec.name for p in pol.entries()])


def trap_rule(port: int) -> RuleSpec:
    return RuleSpec(100, RuleMatch(protocol=RuleProto.UDP, dst_ports=PortRange(port, port)),
                    Action.TRAP)


def test_a_trapped_packet_reaches_the_hub_with_its_bytes_and_rule(ev):
    hub = ev.events.hub
    assert ev.events.reader is not None  # the kernel datapath's ring is read
    ev.firewall.put([("trap-dns", trap_rule(53))])
    sub = hub.subscribe([tpb.EVENT_KIND_TRAP])
    try:
        long_pkt = udp("198.18.0.2", SERVER, 40000, 53, b"q" * 300)
        short_pkt = udp("198.18.0.2", SERVER, 40001, 53, b"hi")
        other = udp("198.18.0.2", SERVER, 40002, 54, b"not trapped")
        for pkt in (long_pkt, short_pkt, other):
            res = bpfsys.prog_test_run(ev.dp.fast_fd, pkt, ingress_ifindex=IF_A)
            assert res.retval == TC_ACT_OK  # trapped, then allowed
        got = [hub.next(sub, 5.0) for _ in range(2)]
        assert hub.next(sub, 0.3) is None  # the port-54 packet was not trapped
    finally:
        hub.unsubscribe(sub)
    first, second = got
    assert first is not None and second is not None
    assert first.kind == tpb.EVENT_KIND_TRAP and first.reason == "trap-dns"
    assert first.raw == long_pkt[:128] and first.packet_length == len(long_pkt)
    assert second.raw == short_pkt and second.packet_length == len(short_pkt)
    assert first.interface == f"ifindex {IF_A}"  # no such link in this namespace
    h = first.packet
    assert (h.src, h.dst, h.ip_protocol, h.src_port, h.dst_port) == (
        "198.18.0.2", SERVER, 17, 40000, 53)
    assert ev.global_stats()["trap"].packets == 2


def test_tcp_flags_are_decoded(ev):
    hub = ev.events.hub
    ev.firewall.put([("trap-web", RuleSpec(
        100, RuleMatch(protocol=RuleProto.TCP, dst_ports=PortRange(8443, 8443)), Action.TRAP))])
    sub = hub.subscribe([tpb.EVENT_KIND_TRAP])
    try:
        pkt = tcp("198.18.0.2", SERVER, 40010, 8443, flags="S")
        bpfsys.prog_test_run(ev.dp.fast_fd, pkt, ingress_ifindex=IF_A)
        e = hub.next(sub, 5.0)
    finally:
        hub.unsubscribe(sub)
    assert e is not None and list(e.packet.tcp_flags) == ["SYN"]
    assert e.packet.dst_port == 8443 and e.packet.dst == SERVER


def test_policer_drops_give_one_event_a_second(ev):
    hub = ev.events.hub
    pol = ev.policers
    pol.put([PolicerSpec("ev-slow", 8_000, 1_500)])
    pid = pol._ids["ev-slow"]
    pol.intf.put(IF_A.to_bytes(4, "little"), pid.to_bytes(4, "little"))
    sub = hub.subscribe([tpb.EVENT_KIND_POLICER_DROP])
    try:
        pkt = udp("198.18.0.2", VIP, 1234, 53, b"x" * 1000)
        for _ in range(6):  # one passes, five are dropped
            bpfsys.prog_test_run(ev.dp.police_fd, pkt, ingress_ifindex=IF_A)
        e = hub.next(sub, 5.0)
        assert hub.next(sub, 0.3) is None  # one event for five drops within a second
    finally:
        hub.unsubscribe(sub)
    assert e is not None and e.policer == "ev-slow"
    assert e.interface == f"ifindex {IF_A}" and 1 <= e.count <= 5


def test_a_trapped_sctp_packet_shows_its_ports(ev):
    """A TRAP rule on SCTP to a port: the INIT is trapped (SCTP named, its ports decoded)
    and goes on as allowed; SCTP to another port is not trapped."""
    hub = ev.events.hub
    ev.firewall.put([("trap-ngap", RuleSpec(
        100, RuleMatch(protocol=RuleProto.SCTP, dst_ports=PortRange(38412, 38412)),
        Action.TRAP))])
    sub = hub.subscribe([tpb.EVENT_KIND_TRAP])
    try:
        pkt = sctp("198.18.0.2", SERVER, 40020, 38412, sctp_init())
        other = sctp("198.18.0.2", SERVER, 40021, 38413, sctp_init())
        for p in (pkt, other):
            res = bpfsys.prog_test_run(ev.dp.fast_fd, p, ingress_ifindex=IF_A)
            assert res.retval == TC_ACT_OK
        e = hub.next(sub, 5.0)
        assert hub.next(sub, 0.3) is None  # the other port's was not trapped
    finally:
        hub.unsubscribe(sub)
        ev.flush_conntrack()
    assert e is not None and e.reason == "trap-ngap" and e.raw == pkt
    h = e.packet
    assert (h.src, h.dst, h.ip_protocol, h.src_port, h.dst_port, list(h.tcp_flags)) == (
        "198.18.0.2", SERVER, 132, 40020, 38412, [])
    assert cli_events.line(e).endswith(
        f" TRAP ifindex {IF_A} trap-ngap SCTP 198.18.0.2:40020 -> {SERVER}:38412 len {len(pkt)}")
