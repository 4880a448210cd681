"""ICMPv6 errors about IPv6 service flows through the loaded TC programs
(BPF_PROG_TEST_RUN, docs/ipv6.md): packet too big, destination unreachable and time
exceeded quoting a DNAT66 or full-NAT66 flow are translated (the quote and the outer
addresses become what the other side knows; the ICMPv6 checksum over its pseudo header
and the quoted L4 checksum stay right), an error to the VIP about a DSR flow goes on to
its endpoint, and errors quoting no flow, bogus quotes, echo requests to no VIP and
neighbour discovery pass untouched (echo to a VIP: test_services6)."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.datapath import test_nat6
from tests.datapath.packets import (
    C_ISN,
    FORWARDED,
    MAC_C,
    MAC_L,
    S_ISN,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    run,
    sum16,
)
from tests.datapath.test_nat6 import (
    CLIENT6,
    EP6A,
    EP_MAC,
    SNAT6,
    VIP6,
    C,
    a16,
    ct6,
    handshake,
    put6,
    run_in,
    stat,
    tcp6,
    udp6,
)

pytestmark = pytest.mark.root

ROUTER6 = "2001:db8:7::1"
node6 = test_nat6.node6  # the fixtures: the IPv6 maps emptied; the FIB namespace
fib6 = test_nat6.fib6


def error6(src: str, dst: str, quote: bytes, kind: str = "ptb", mtu: int = 1280) -> bytes:
    icmp = {"ptb": ICMPv6PacketTooBig(mtu=mtu), "unreach": ICMPv6DestUnreach(code=4),
            "time": ICMPv6TimeExceeded(code=0)}[kind]
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=src, dst=dst) / icmp / Raw(quote))


def quote6(pkt: bytes) -> bytes:
    """The IPv6 packet of a frame built by tcp6/udp6, as an error quotes it."""
    return pkt[14:]


def sums_ok(frame: bytes, full_quote: bool) -> None:
    """The ICMPv6 checksum over its pseudo header, and the quoted L4 checksum over the
    quoted pseudo header when the quote holds the whole datagram."""
    plen = struct.unpack("!H", frame[18:20])[0]
    msg = frame[54:54 + plen]
    pseudo = frame[22:54] + struct.pack("!I", plen) + b"\0\0\0\x3a"
    assert sum16(pseudo + msg) == 0xffff, "ICMPv6 checksum"
    if full_quote:
        inner = msg[8:]
        seg = inner[40:40 + struct.unpack("!H", inner[4:6])[0]]
        pseudo = inner[8:40] + struct.pack("!I", len(seg)) + b"\0\0\0" + inner[6:7]
        assert sum16(pseudo + seg) == 0xffff, "quoted L4 checksum"


def quoted(frame: bytes) -> tuple[str, str, int, int]:
    """The quoted source, destination and ports of an ICMPv6 error frame."""
    inner = frame[62:]
    sport, dport = struct.unpack("!HH", inner[40:44])
    return (socket.inet_ntop(socket.AF_INET6, inner[8:24]),
            socket.inet_ntop(socket.AF_INET6, inner[24:40]), sport, dport)


def outer(frame: bytes) -> tuple[str, str]:
    return (socket.inet_ntop(socket.AF_INET6, frame[22:38]),
            socket.inet_ntop(socket.AF_INET6, frame[38:54]))


def untouched(node, pkt: bytes) -> None:
    verdict, out = run(node, pkt)
    assert verdict == TC_ACT_OK and bytes(out) == pkt


# -- DNAT66 -------------------------------------------------------------------------------

def test_packet_too_big_from_a_router_reaches_the_client_about_the_vip(node6):
    put6(node6, [(EP6A, 8080)])
    handshake(node6, 43000)
    full = quote6(tcp6(CLIENT6, EP6A, 43000, 8080, "PA", b"x" * 1200))
    for quote, whole in ((full, True), (full[:48], False)):  # the datagram, or 8 bytes
        verdict, out = run(node6, error6(ROUTER6, CLIENT6, quote, "ptb", 1280))
        assert verdict in FORWARDED
        frame = bytes(out)
        sums_ok(frame, full_quote=whole)
        assert outer(frame) == (ROUTER6, CLIENT6)  # a router's address stays
        assert out[ICMPv6PacketTooBig].mtu == 1280
        assert quoted(frame) == (CLIENT6, VIP6, 43000, 80)
        assert a16(EP6A) not in frame
    assert stat(node6, "icmp_nat") == 2


def test_port_unreachable_from_the_endpoint_comes_from_the_vip(node6):
    put6(node6, [(EP6A, 5353)], proto=17, port=53)
    run(node6, udp6(CLIENT6, VIP6, 43100, 53, b"query"))
    quote = quote6(udp6(CLIENT6, EP6A, 43100, 5353, b"query"))
    verdict, out = run(node6, error6(EP6A, CLIENT6, quote, "unreach"))
    assert verdict in FORWARDED
    frame = bytes(out)
    sums_ok(frame, full_quote=True)
    assert outer(frame) == (VIP6, CLIENT6)
    assert quoted(frame) == (CLIENT6, VIP6, 43100, 53)
    assert a16(EP6A) not in frame


def test_time_exceeded_about_a_reply_reaches_the_endpoint_about_its_own_address(node6):
    put6(node6, [(EP6A, 8080)])
    handshake(node6, 43200)
    quote = quote6(tcp6(VIP6, CLIENT6, 80, 43200, "PA", b"reply", seq=S_ISN + 1,
                        ack=C_ISN + 1))
    verdict, out = run(node6, error6(ROUTER6, VIP6, quote, "time"))
    assert verdict in FORWARDED
    frame = bytes(out)
    sums_ok(frame, full_quote=True)
    assert outer(frame) == (ROUTER6, EP6A)
    assert quoted(frame) == (EP6A, CLIENT6, 8080, 43200)


# -- full-NAT66 ---------------------------------------------------------------------------

def test_fullnat_error_from_the_endpoint_reaches_the_client(node6):
    put6(node6, [(EP6A, 8080)], mode=C("XLB_MODE_FULLNAT"), snat=SNAT6)
    _, syn = run(node6, tcp6(CLIENT6, VIP6, 43300, 80, "S"))
    sport = syn[TCP].sport
    quote = quote6(tcp6(SNAT6, EP6A, sport, 8080, "PA", b"y" * 100))
    verdict, out = run(node6, error6(EP6A, SNAT6, quote, "ptb", 1300))
    assert verdict in FORWARDED
    frame = bytes(out)
    sums_ok(frame, full_quote=True)
    assert outer(frame) == (VIP6, CLIENT6)
    assert quoted(frame) == (CLIENT6, VIP6, 43300, 80)
    assert a16(EP6A) not in frame and a16(SNAT6) not in frame


def test_fullnat_error_from_the_client_reaches_the_endpoint_from_the_snat_address(node6):
    put6(node6, [(EP6A, 5353)], proto=17, port=53, mode=C("XLB_MODE_FULLNAT"), snat=SNAT6)
    _, fwd = run(node6, udp6(CLIENT6, VIP6, 43400, 53))
    sport = fwd[UDP].sport
    quote = quote6(udp6(VIP6, CLIENT6, 53, 43400, b"answer"))
    verdict, out = run(node6, error6(CLIENT6, VIP6, quote, "unreach"))
    assert verdict in FORWARDED
    frame = bytes(out)
    sums_ok(frame, full_quote=True)
    assert outer(frame) == (SNAT6, EP6A)
    assert quoted(frame) == (EP6A, SNAT6, 5353, sport)
    assert a16(CLIENT6) not in frame and a16(VIP6) not in frame


# -- DSR ----------------------------------------------------------------------------------

def test_dsr_packet_too_big_to_the_vip_goes_to_the_endpoint_as_it_is(node6, fib6):
    put6(node6, [(EP6A, 80)], mode=C("XLB_MODE_DSR"))
    run_in(node6, fib6, tcp6(CLIENT6, VIP6, 43500, 80, "S"))
    quote = quote6(tcp6(VIP6, CLIENT6, 80, 43500, "PA", b"z" * 1300, seq=S_ISN + 1,
                        ack=C_ISN + 1))
    pkt = error6(ROUTER6, VIP6, quote, "ptb", 1280)
    verdict, out = run_in(node6, fib6, pkt)
    assert verdict == TC_ACT_REDIRECT and out[Ether].dst == EP_MAC
    want = bytearray(pkt[14:])
    want[7] -= 1  # the hop limit
    assert bytes(out)[14:] == bytes(want)


# -- what passes untouched ---------------------------------------------------------------

def test_errors_quoting_no_flow_or_bogus_quotes_pass_untouched(node6):
    put6(node6, [(EP6A, 8080)])
    handshake(node6, 43600)
    good = quote6(tcp6(CLIENT6, EP6A, 43600, 8080, "PA", b"x" * 64))
    v4_quote = bytes.fromhex("45") + good[1:]
    hbh = bytes(IPv6(src=CLIENT6, dst=EP6A) / IPv6ExtHdrHopByHop()
                / TCP(sport=43600, dport=8080, flags="PA"))
    cases = [
        error6(ROUTER6, CLIENT6, quote6(tcp6(CLIENT6, EP6A, 43601, 8080, "PA"))),  # no flow
        error6(ROUTER6, "2001:db8::99", good),    # not sent to the quoted source
        error6(ROUTER6, CLIENT6, good[:42]),      # the quote ends before the ports
        error6(ROUTER6, CLIENT6, v4_quote),       # the quote is not IPv6
        error6(ROUTER6, CLIENT6, hbh),            # an extension header in the quote
    ]
    # the ports inside the frame but beyond the outer payload length
    short = bytearray(error6(ROUTER6, CLIENT6, good))
    short[18:20] = struct.pack("!H", 8 + 40 + 2)
    cases.append(bytes(short))
    cases.append(bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=CLIENT6, dst=EP6A)
                       / ICMPv6EchoRequest(id=7, seq=1, data=b"ping")))  # echo to no VIP
    cases.append(bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=CLIENT6, dst="ff02::1:ff00:10")
                       / ICMPv6ND_NS(tgt=VIP6)))
    before = sorted(map(repr, ct6(node6)))
    for pkt in cases:
        untouched(node6, pkt)
    assert sorted(map(repr, ct6(node6))) == before
    assert stat(node6, "icmp_nat") == 0
