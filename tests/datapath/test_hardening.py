"""Crafted traffic through the loaded programs (BPF_PROG_TEST_RUN): what the datapath
refuses to create state for, flows that must not disturb each other, the TCP handshake
and RST window, IPv4 fragments. Each rule has a test that fails when it breaks."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from dpd import abi
from tests.datapath.packets import (
    C_ISN,
    CLIENT,
    EP1,
    EP2,
    FORWARDED,
    MAC_C,
    MAC_L,
    S_ISN,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    VIP,
    VIP2,
    checksums_valid,
    run,
    sum16,
    tcp,
    udp,
)
from xlbcore.service import Algorithm, EndpointSpec, Proto, ServiceSpec

pytestmark = pytest.mark.root

ABI = abi.load()
NEW, REPLIED, EST = (ABI.const(f"XLB_CT_{s}") for s in ("NEW", "REPLIED", "EST"))
CLOSING, CLOSED = ABI.const("XLB_CT_CLOSING"), ABI.const("XLB_CT_CLOSED")


def svc(*eps: EndpointSpec, vip: str = VIP, port: int = 80, proto: Proto = Proto.TCP,
        algo: Algorithm = Algorithm.ROUND_ROBIN) -> ServiceSpec:
    return ServiceSpec(vip, port, proto, algo, endpoints=tuple(sorted(eps)))


def stat(node, name: str) -> int:
    return node.global_stats()[name].packets


def states(node) -> set[int]:
    return {e.state for e in node.list_conntrack()}


def handshake(node, sport: int, ep: str = EP1, eport: int = 8080, vip: str = VIP) -> None:
    run(node, tcp(CLIENT, vip, sport, 80, "S"))
    run(node, tcp(ep, CLIENT, eport, sport, "SA"))
    run(node, tcp(CLIENT, vip, sport, 80, "A"))


def assert_untouched(node, pkt: bytes, counter: str) -> None:
    before = stat(node, counter)
    verdict, out = run(node, pkt)
    assert verdict == TC_ACT_OK
    assert bytes(out) == pkt
    assert stat(node, counter) == before + 1


# -- conntrack: flows never disturb each other ---------------------------------------------


def test_reopened_tuple_removes_the_old_flow_so_its_late_rst_cannot_close_the_new(node):
    node.put_services([svc(EndpointSpec(EP1, 8080), EndpointSpec(EP2, 8080))])
    handshake(node, 40100, EP1)  # round robin: the first flow goes to EP1
    run(node, tcp(CLIENT, VIP, 40100, 80, "FA"))
    assert states(node) == {CLOSING}
    verdict, out = run(node, tcp(CLIENT, VIP, 40100, 80, "S", seq=90000))
    assert verdict in FORWARDED and out[IP].dst == EP2  # the new flow, on the next endpoint
    entries = node.list_conntrack()
    assert {(e.src, e.state) for e in entries} == {(CLIENT, NEW), (EP2, NEW)}
    # the old endpoint's late RST (in its old window) finds no entry: it is not NATed
    late = tcp(EP1, CLIENT, 8080, 40100, "R", seq=S_ISN + 1)
    verdict, out = run(node, late)
    assert bytes(out) == late and out[IP].src == EP1
    assert {(e.src, e.state) for e in node.list_conntrack()} == {(CLIENT, NEW), (EP2, NEW)}
    # the new flow continues
    _, out = run(node, tcp(EP2, CLIENT, 8080, 40100, "SA", seq=7000, ack=90001))
    assert out[IP].src == VIP and states(node) == {REPLIED}


def test_two_vips_sharing_an_endpoint_never_share_a_reply_entry(node):
    node.put_services([svc(EndpointSpec(EP1, 8080)), svc(EndpointSpec(EP1, 8080), vip=VIP2)])
    handshake(node, 40200)
    # same client ip:port to the other VIP, same endpoint ip:port: refused, counted
    verdict, _ = run(node, tcp(CLIENT, VIP2, 40200, 80, "S"))
    assert verdict == TC_ACT_SHOT
    assert stat(node, "drop_ct_clash") == 1
    assert len(node.list_conntrack()) == 2
    # replies of the first flow still leave with the first VIP as their source
    verdict, out = run(node, tcp(EP1, CLIENT, 8080, 40200, "PA", b"data"))
    assert out[IP].src == VIP and checksums_valid(out)
    assert states(node) == {EST}


def test_a_closed_flows_reply_entry_is_reclaimed_by_a_new_flow(node):
    node.put_services([svc(EndpointSpec(EP1, 8080)), svc(EndpointSpec(EP1, 8080), vip=VIP2)])
    handshake(node, 40300)
    run(node, tcp(CLIENT, VIP, 40300, 80, "R"))
    assert states(node) == {CLOSED}
    verdict, out = run(node, tcp(CLIENT, VIP2, 40300, 80, "S"))
    assert verdict in FORWARDED and out[IP].dst == EP1
    assert {(e.dst, e.nat_address) for e in node.list_conntrack()} == {
        (VIP2, EP1), (CLIENT, VIP2)}
    _, out = run(node, tcp(EP1, CLIENT, 8080, 40300, "SA"))
    assert out[IP].src == VIP2


def test_orphan_reply_entry_is_reclaimed(node):
    node.put_services([svc(EndpointSpec(EP1, 8080)), svc(EndpointSpec(EP1, 8080), vip=VIP2)])
    handshake(node, 40400)
    ct = node.conntrack
    orig = [k for k, v in ct.map.items() if ct.val.unpack(v)["dir"] == ct.states.orig]
    ct.map.delete_batch(orig)  # as an LRU eviction of the ORIG entry would
    verdict, out = run(node, tcp(CLIENT, VIP2, 40400, 80, "S"))
    assert verdict in FORWARDED and out[IP].dst == EP1
    assert stat(node, "drop_ct_clash") == 0


# -- validation before state -----------------------------------------------------------------


def _raw(pkt) -> bytes:
    return bytes(Ether(src=MAC_C, dst=MAC_L) / pkt)


def _bad_ip_checksum() -> bytes:
    b = bytearray(tcp(CLIENT, VIP, 40500, 80, "S"))
    b[24] ^= 0x01
    return bytes(b)


def _with_ip_header(mutate) -> bytes:
    """A SYN to the VIP whose IP header is changed by `mutate` (checksum fixed after)."""
    ip = IP(src=CLIENT, dst=VIP)
    mutate(ip)
    pkt = Ether(src=MAC_C, dst=MAC_L) / ip / TCP(sport=40501, dport=80, flags="S", seq=C_ISN)
    return bytes(pkt)


BAD_HEADERS = {
    "version 6 in an IPv4 frame": _with_ip_header(lambda ip: setattr(ip, "version", 6)),
    "header length 4": _with_ip_header(lambda ip: setattr(ip, "ihl", 4)),
    "total length beyond the frame": _with_ip_header(lambda ip: setattr(ip, "len", 200)),
    "total length below the header": _with_ip_header(lambda ip: setattr(ip, "len", 19)),
    "total length 0 in a small frame": _with_ip_header(lambda ip: setattr(ip, "len", 0)),
    "IP header checksum": _bad_ip_checksum(),
    "TCP data offset 4": _raw(IP(src=CLIENT, dst=VIP) / TCP(sport=40502, dport=80, flags="S",
                                                           dataofs=4)),
    "TCP data offset beyond the datagram": _raw(
        IP(src=CLIENT, dst=VIP) / TCP(sport=40503, dport=80, flags="S", dataofs=15)),
    "UDP length beyond the datagram": _raw(IP(src=CLIENT, dst=VIP) / UDP(sport=40504, dport=53,
                                                                          len=100) / b"x"),
    "UDP length below its header": _raw(IP(src=CLIENT, dst=VIP) / UDP(sport=40505, dport=53,
                                                                       len=7) / b"x"),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_malformed_headers_pass_untouched_and_create_nothing(node, name):
    node.put_services([svc(EndpointSpec(EP1, 8080)),
                       svc(EndpointSpec(EP2, 5353), port=53, proto=Proto.UDP)])
    assert_untouched(node, BAD_HEADERS[name], "pass_bad_header")
    assert node.list_conntrack() == []


def test_truncation_at_every_length_never_rewrites_or_creates_state(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    full = tcp(CLIENT, VIP, 40510, 80, "S", b"payload")
    # BPF_PROG_TEST_RUN refuses an IPv4 frame shorter than Ethernet + IP header (34)
    for n in range(34, len(full)):
        verdict, out = run(node, full[:n])
        assert verdict == TC_ACT_OK and bytes(out) == full[:n], n
    assert node.list_conntrack() == []


def test_frames_for_another_host_pass_untouched_even_of_a_live_flow(node):
    """A frame addressed to another MAC (a bridge flooding unknown unicast: two nodes on
    one segment both see it) is not this node's: never NATed, never tracked."""
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    other = "02:00:00:00:00:99"
    syn = tcp(CLIENT, VIP, 40515, 80, "S")
    assert_untouched(node, bytes(Ether(src=MAC_C, dst=other) / Ether(syn).payload), "pass")
    assert node.list_conntrack() == []
    handshake(node, 40516)  # a live flow; its packets sent to another MAC stay untouched
    data = tcp(CLIENT, VIP, 40516, 80, "PA", b"x")
    assert_untouched(node, bytes(Ether(src=MAC_C, dst=other) / Ether(data).payload), "pass")
    verdict, out = run(node, data)  # the same packet addressed to the node is NATed
    assert verdict in FORWARDED and out[IP].dst == EP1


def test_ip_options_pass_untouched(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    pkt = bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=CLIENT, dst=VIP, options=b"\x01\x01\x01\x01")
                / TCP(sport=40520, dport=80, flags="S"))
    assert_untouched(node, pkt, "pass_ip_options")
    assert node.list_conntrack() == []


@pytest.mark.parametrize("flags", ["", "SF", "SR", "FPU", "R", "F", "RA", "FA", "SA", "SRAF"])
def test_tcp_flags_that_cannot_open_a_flow_pass_untouched(node, flags):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    assert_untouched(node, tcp(CLIENT, VIP, 40530, 80, flags, seq=1, ack=1), "pass_bad_flags")
    assert node.list_conntrack() == []


def test_bare_ack_is_still_picked_up_mid_stream(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    verdict, out = run(node, tcp(CLIENT, VIP, 40540, 80, "PA", b"x"))
    assert verdict in FORWARDED and out[IP].dst == EP1 and checksums_valid(out)
    assert states(node) == {EST}


# Martian sources are outside the test networks by definition: they never leave the test.
@pytest.mark.parametrize("src", ["0.1.2.3", "127.0.0.1", "224.0.0.5", "239.1.2.3",
                                 "240.0.0.1", "255.255.255.255"])
def test_martian_and_multicast_sources_create_nothing(node, src):
    node.put_services([svc(EndpointSpec(EP1, 8080)),
                       svc(EndpointSpec(EP2, 5353), port=53, proto=Proto.UDP)])
    assert_untouched(node, tcp(src, VIP, 40550, 80, "S"), "pass_martian")
    assert_untouched(node, udp(src, VIP, 40550, 53), "pass_martian")
    assert node.list_conntrack() == []


@pytest.mark.parametrize("flags", ["", "SF", "SR", "FPU"])
def test_invalid_flag_combinations_on_a_flow_are_dropped(node, flags):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    handshake(node, 40560)
    verdict, _ = run(node, tcp(CLIENT, VIP, 40560, 80, flags))
    assert verdict == TC_ACT_SHOT
    assert stat(node, "drop_bad_flags") == 1
    assert states(node) == {EST}


# -- the TCP handshake and the RST window -----------------------------------------------------


def test_syn_ack_that_does_not_answer_the_syn_does_not_advance(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    run(node, tcp(CLIENT, VIP, 40600, 80, "S"))
    run(node, tcp(EP1, CLIENT, 8080, 40600, "SA", ack=C_ISN + 77))
    assert states(node) == {NEW}
    assert stat(node, "ct_no_advance") == 1
    run(node, tcp(EP1, CLIENT, 8080, 40600, "A"))  # not a SYN-ACK at all
    assert states(node) == {NEW}
    run(node, tcp(EP1, CLIENT, 8080, 40600, "SA"))
    assert states(node) == {REPLIED}


def test_ack_that_does_not_answer_the_syn_ack_does_not_establish(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    run(node, tcp(CLIENT, VIP, 40610, 80, "S"))
    run(node, tcp(EP1, CLIENT, 8080, 40610, "SA"))
    run(node, tcp(CLIENT, VIP, 40610, 80, "A", ack=S_ISN + 999))
    assert states(node) == {REPLIED}
    slow = stat(node, "slow_path")
    run(node, tcp(CLIENT, VIP, 40610, 80, "A"))
    assert states(node) == {EST}
    run(node, tcp(CLIENT, VIP, 40610, 80, "PA", b"x"))
    assert stat(node, "slow_path") == slow + 1  # the data took the fast path


@pytest.mark.parametrize("src", ["client", "endpoint"])
def test_blind_rst_cannot_cut_an_established_flow(node, src):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    handshake(node, 40620)
    run(node, tcp(CLIENT, VIP, 40620, 80, "PA", b"x" * 100))
    base = C_ISN + 101 if src == "client" else S_ISN + 1  # the sender's next seq
    for off in (2**31, 1 << 21, -(1 << 21), 70000):
        seq = (base + off) % 2**32
        pkt = (tcp(CLIENT, VIP, 40620, 80, "R", seq=seq) if src == "client"
               else tcp(EP1, CLIENT, 8080, 40620, "R", seq=seq))
        verdict, _ = run(node, pkt)
        assert verdict == TC_ACT_SHOT, seq
    assert stat(node, "drop_rst_window") == 4
    assert states(node) == {EST}
    # an RST at the sender's next sequence number closes it
    if src == "client":
        verdict, out = run(node, tcp(CLIENT, VIP, 40620, 80, "R", seq=C_ISN + 101))
        assert out[IP].dst == EP1
    else:
        verdict, out = run(node, tcp(EP1, CLIENT, 8080, 40620, "RA", seq=S_ISN + 1))
        assert out[IP].src == VIP
    assert verdict in FORWARDED and checksums_valid(out)
    assert states(node) == {CLOSED}


def test_endpoint_refusing_the_syn_closes_only_when_its_rst_answers_it(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    run(node, tcp(CLIENT, VIP, 40630, 80, "S"))
    verdict, _ = run(node, tcp(EP1, CLIENT, 8080, 40630, "RA", seq=0, ack=C_ISN + 5))
    assert verdict == TC_ACT_SHOT and states(node) == {NEW}
    verdict, out = run(node, tcp(EP1, CLIENT, 8080, 40630, "RA", seq=0, ack=C_ISN + 1))
    assert verdict in FORWARDED and out[IP].src == VIP
    assert states(node) == {CLOSED}


def test_fast_path_tracks_sequence_numbers_for_the_rst_window(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    handshake(node, 40640)
    seq = C_ISN + 1
    for _ in range(400):  # 1.2 MB: past the window behind the sender's next seq
        run(node, tcp(CLIENT, VIP, 40640, 80, "A", b"x" * 3000, seq=seq))
        seq += 3000
    verdict, _ = run(node, tcp(CLIENT, VIP, 40640, 80, "R", seq=C_ISN + 1))
    assert verdict == TC_ACT_SHOT
    verdict, _ = run(node, tcp(CLIENT, VIP, 40640, 80, "R", seq=seq))
    assert verdict in FORWARDED and states(node) == {CLOSED}


# -- IPv4 fragments ---------------------------------------------------------------------------


def _frags(src: str, dst: str, sport: int, dport: int, size: int, ip_id: int) -> list[bytes]:
    pkt = IP(src=src, dst=dst, id=ip_id) / UDP(sport=sport, dport=dport) / (b"z" * size)
    return [bytes(Ether(src=MAC_C, dst=MAC_L) / f) for f in fragment(pkt, fragsize=400)]


def _reassembled_udp_ok(outs: list[Ether]) -> bool:
    """The UDP checksum over the reassembled datagram (the first fragment holds it)."""
    first = outs[0][IP]
    body = b"".join(bytes(o[IP].payload) for o in outs)
    pseudo = (socket.inet_aton(first.src) + socket.inet_aton(first.dst)
              + struct.pack("!BBH", 0, 17, len(body)))
    return sum16(pseudo + body) == 0xffff


def test_fragments_follow_their_first_fragment_both_ways(node):
    node.put_services([svc(EndpointSpec(EP1, 5353), EndpointSpec(EP2, 5353), port=53,
                           proto=Proto.UDP)])
    frags = _frags(CLIENT, VIP, 40700, 53, 1000, 4242)
    assert len(frags) == 3
    outs = []
    for f in frags:
        verdict, out = run(node, f)
        assert verdict in FORWARDED
        outs.append(out)
    ep = outs[0][IP].dst
    assert ep in (EP1, EP2)
    assert all(o[IP].dst == ep for o in outs)
    assert all(sum16(bytes(o)[14:34]) == 0xffff for o in outs)  # IP header checksums
    assert _reassembled_udp_ok(outs)
    assert stat(node, "frag_nat") == 2
    # the endpoint's fragmented reply leaves with the VIP as its source
    back = [run(node, f)[1] for f in _frags(ep, CLIENT, 5353, 40700, 1000, 999)]
    assert all(o[IP].src == VIP for o in back)
    assert back[0][UDP].sport == 53 and _reassembled_udp_ok(back)


def test_later_fragment_to_a_vip_before_its_first_is_dropped_and_counted(node):
    node.put_services([svc(EndpointSpec(EP1, 5353), port=53, proto=Proto.UDP)])
    frags = _frags(CLIENT, VIP, 40710, 53, 1000, 4343)
    verdict, _ = run(node, frags[1])
    assert verdict == TC_ACT_SHOT
    assert stat(node, "drop_frag_no_first") == 1
    assert node.list_conntrack() == []


def test_later_fragment_to_another_address_passes_untouched(node):
    node.put_services([svc(EndpointSpec(EP1, 5353), port=53, proto=Proto.UDP)])
    frags = _frags(CLIENT, "198.18.7.7", 40711, 53, 1000, 4344)
    assert_untouched(node, frags[1], "pass_frag")
    assert node.list_conntrack() == []


# -- ICMP errors ------------------------------------------------------------------------------


def _icmp_error(src: str, dst: str, quote: bytes, type_: int = 3, code: int = 3,
                nexthop_mtu: int = 0) -> bytes:
    icmp = ICMP(type=type_, code=code)
    if type_ == 3 and code == 4:
        icmp.nexthopmtu = nexthop_mtu
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=src, dst=dst) / icmp / Raw(quote))


def _icmp_checks(frame: bytes, full_quote: bool) -> None:
    """Outer IP, ICMP, quoted IP (and quoted L4 over the full quoted datagram) sum right."""
    assert sum16(frame[14:34]) == 0xffff, "outer IP checksum"
    assert sum16(frame[34:]) == 0xffff, "ICMP checksum"
    inner = frame[42:]
    assert sum16(inner[:20]) == 0xffff, "quoted IP checksum"
    if full_quote:
        seg = inner[20:struct.unpack("!H", inner[2:4])[0]]
        pseudo = inner[12:20] + struct.pack("!BBH", 0, inner[9], len(seg))
        assert sum16(pseudo + seg) == 0xffff, "quoted L4 checksum"


def test_port_unreachable_from_the_endpoint_is_translated_to_the_vip(node):
    node.put_services([svc(EndpointSpec(EP2, 5353), port=53, proto=Proto.UDP)])
    run(node, udp(CLIENT, VIP, 40800, 53, b"query"))
    quote = bytes(IP(src=CLIENT, dst=EP2) / UDP(sport=40800, dport=5353) / b"query")
    verdict, out = run(node, _icmp_error(EP2, CLIENT, quote))
    assert verdict in FORWARDED
    frame = bytes(out)
    _icmp_checks(frame, full_quote=True)
    ip = IP(frame[14:])
    assert (ip.src, ip.dst) == (VIP, CLIENT)
    q = IP(frame[42:])
    assert (q.src, q.dst, q[UDP].sport, q[UDP].dport) == (CLIENT, VIP, 40800, 53)
    assert EP2 not in (ip.src, ip.dst, q.src, q.dst)
    assert stat(node, "icmp_nat") == 1


def test_fragmentation_needed_from_a_router_reaches_the_client_about_the_vip(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    handshake(node, 40810)
    router = "198.18.3.1"
    full = bytes(IP(src=CLIENT, dst=EP1) / TCP(sport=40810, dport=8080, flags="PA",
                                                seq=C_ISN + 1, ack=S_ISN + 1) / (b"x" * 40))
    for quote, whole in ((full, True), (full[:28], False)):  # whole, or IP + 8 bytes
        verdict, out = run(node, _icmp_error(router, CLIENT, quote, 3, 4, 1400))
        assert verdict in FORWARDED
        frame = bytes(out)
        _icmp_checks(frame, full_quote=whole)
        ip = IP(frame[14:])
        assert (ip.src, ip.dst) == (router, CLIENT)  # a router's address stays
        assert ip[ICMP].nexthopmtu == 1400
        q = frame[42:]
        assert socket.inet_ntoa(q[16:20]) == VIP and struct.unpack("!H", q[22:24])[0] == 80


def test_error_about_a_reply_reaches_the_endpoint_about_its_own_address(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    handshake(node, 40820)
    router = "198.18.3.1"
    quote = bytes(IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40820, flags="PA",
                                                 seq=S_ISN + 1, ack=C_ISN + 1) / b"reply")
    verdict, out = run(node, _icmp_error(router, VIP, quote, 11, 0))
    assert verdict in FORWARDED
    frame = bytes(out)
    _icmp_checks(frame, full_quote=True)
    ip = IP(frame[14:])
    assert (ip.src, ip.dst) == (router, EP1)
    q = IP(frame[42:])
    assert (q.src, q[TCP].sport, q.dst) == (EP1, 8080, CLIENT)


def _echo(dst: str) -> bytes:
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=CLIENT, dst=dst, ttl=3)
                 / ICMP(type=8, id=77, seq=5) / b"ping-payload")


def test_echo_to_a_vip_is_answered_and_to_anything_else_passes(node):
    node.put_services([svc(EndpointSpec(EP1, 8080)), svc(EndpointSpec(EP2, 53), port=53,
                                                          proto=Proto.UDP)])
    verdict, out = run(node, _echo(VIP))
    assert verdict == TC_ACT_REDIRECT  # redirected back out of the interface it came in on
    assert (out[Ether].src, out[Ether].dst) == (MAC_L, MAC_C)
    assert (out[IP].src, out[IP].dst, out[IP].ttl) == (VIP, CLIENT,
                                                      ABI.const("XLB_ICMP_REPLY_TTL"))
    assert (out[ICMP].type, out[ICMP].id, out[ICMP].seq) == (0, 77, 5)
    assert bytes(out[ICMP].payload) == b"ping-payload"
    fresh = Ether(bytes(out))
    del fresh[IP].chksum, fresh[ICMP].chksum
    rebuilt = Ether(bytes(fresh))
    assert (out[IP].chksum, out[ICMP].chksum) == (rebuilt[IP].chksum, rebuilt[ICMP].chksum)
    assert stat(node, "icmp_echo_reply") == 1
    assert node.list_conntrack() == []  # no state, no endpoint involved
    # one VIP of two services: deleting one keeps it answered, deleting both stops it
    node.delete_services([svc(EndpointSpec(EP1, 8080)).key])
    assert run(node, _echo(VIP))[0] == TC_ACT_REDIRECT
    node.delete_services([svc(EndpointSpec(EP2, 53), port=53, proto=Proto.UDP).key])
    assert_untouched(node, _echo(VIP), "pass")
    assert_untouched(node, _echo(EP1), "pass")  # not a VIP


def test_icmp_that_quotes_no_flow_passes_untouched(node):
    node.put_services([svc(EndpointSpec(EP1, 8080))])
    quote = bytes(IP(src=CLIENT, dst=EP1) / TCP(sport=40830, dport=8080, flags="S"))
    assert_untouched(node, _icmp_error(EP1, CLIENT, quote), "pass")
    # an error not sent to the source of what it quotes is not translated
    handshake(node, 40831)
    quote = bytes(IP(src=CLIENT, dst=EP1) / TCP(sport=40831, dport=8080, flags="A"))
    assert_untouched(node, _icmp_error(EP1, "198.18.0.3", quote), "pass")
