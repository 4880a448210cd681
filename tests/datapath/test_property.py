"""Property: valid packets mutated at random (hypothesis) through the loaded programs.

Whatever the mutation, an output that differs from its input is the NAT of a conntrack
flow (or of a service, for a flow the packet may open), carries a correct IP header
checksum and an L4 checksum that is correct exactly when the input's was (the datapath
updates checksums incrementally: it never repairs nor breaks one); and a packet that
cannot open a flow (malformed, bad flags, martian source, not a service) leaves no
conntrack entry behind. Derandomized: the same examples on every run."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import Ether

from tests.datapath.packets import (
    CLIENT,
    EP1,
    EP2,
    MAC_C,
    MAC_L,
    TC_ACT_SHOT,
    VIP,
    run,
    sum16,
    tcp,
    udp,
)
from xlbcore.service import EndpointSpec, Proto, ServiceSpec

pytestmark = pytest.mark.root

SERVICES = [
    ServiceSpec(VIP, 80, Proto.TCP, endpoints=(EndpointSpec(EP1, 8080), EndpointSpec(EP2, 8080))),
    ServiceSpec(VIP, 53, Proto.UDP, endpoints=(EndpointSpec(EP2, 5353),)),
]
SERVICE_KEYS = {(VIP, 80, 6), (VIP, 53, 17)}
EST_PORT = 41000  # the established flow every example starts with

FRAG_PORT, FRAG_ID = 41005, 777
# a UDP datagram to the VIP in three fragments: every example sends the first, so that
# the later ones (seeds) belong to a flow
FRAGS = [bytes(Ether(src=MAC_C, dst=MAC_L) / f) for f in fragment(
    IP(src=CLIENT, dst=VIP, id=FRAG_ID) / UDP(sport=FRAG_PORT, dport=53) / (b"q" * 900),
    fragsize=400)]

OPENERS = [tcp(CLIENT, VIP, 41001, 80, "S"), tcp(CLIENT, VIP, 41002, 80, "A", b"mid-stream")]
SEEDS = [
    *FRAGS[1:],
    tcp(CLIENT, VIP, 41001, 80, "S"),
    tcp(CLIENT, VIP, EST_PORT, 80, "PA", b"GET /"),
    tcp(CLIENT, VIP, 41002, 80, "A", b"mid-stream"),
    udp(CLIENT, VIP, 41003, 53, b"query"),
    tcp(CLIENT, "198.19.0.99", 41004, 80, "S"),  # no service
    # ICMP errors quoting the established flow (on whichever endpoint it landed)
    *(bytes(Ether(src=MAC_C, dst=MAC_L)
            / IP(src=ep, dst=CLIENT) / ICMP(type=3, code=4, nexthopmtu=1400)
            / bytes(IP(src=CLIENT, dst=ep) / TCP(sport=EST_PORT, dport=8080, flags="PA")
                    / b"GET /")) for ep in (EP1, EP2)),
]


def ip_ok(frame: bytes) -> bool:
    return len(frame) >= 34 and sum16(frame[14:14 + 4 * (frame[14] & 15)]) == 0xffff


def l4_ok(frame: bytes) -> bool:
    """The TCP/UDP checksum over the pseudo header and the datagram (unfragmented)."""
    ihl = 4 * (frame[14] & 15)
    tot = struct.unpack("!H", frame[16:18])[0]
    seg = frame[14 + ihl:14 + tot]
    proto = frame[23]
    if proto == 17 and seg[6:8] == b"\0\0":
        return True  # UDP without a checksum
    pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, len(seg))
    return sum16(pseudo + seg) == 0xffff


def may_open(frame: bytes) -> bool:
    """Whether this frame may create conntrack state: what the datapath must hold."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] != 0x45:
        return False
    tot = struct.unpack("!H", frame[16:18])[0]
    if tot < 20 or tot > len(frame) - 14 or not ip_ok(frame):
        return False
    if struct.unpack("!H", frame[20:22])[0] & 0x1fff:
        return False  # a later fragment never opens a flow
    more = struct.unpack("!H", frame[20:22])[0] & 0x2000
    proto = frame[23]
    src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    if frame[26] in (0, 127) or frame[26] >= 224:
        return False
    l4 = frame[34:14 + tot]
    if proto == 6:
        if len(l4) < 20 or l4[12] >> 4 < 5 or 4 * (l4[12] >> 4) > len(l4):
            return False
        if l4[13] & 0x17 not in (0x02, 0x10):  # SYN alone, or a bare ACK (mid-stream)
            return False
    elif proto == 17:
        if len(l4) < 8:
            return False
        ulen = struct.unpack("!H", l4[4:6])[0]
        if ulen < 8 or (not more and ulen > len(l4)):
            return False
    else:
        return False
    dport = struct.unpack("!H", l4[2:4])[0]
    return src != dst and (dst, dport, proto) in SERVICE_KEYS


@st.composite
def mutated(draw):
    """A seed with 1-4 bytes replaced (mostly in the headers), often with TCP flags or a
    source address of interest, often with its IP checksum made right again."""
    frame = bytearray(draw(st.sampled_from(SEEDS + OPENERS * 3)))
    for _ in range(draw(st.integers(1, 4))):
        top = len(frame) - 1 if draw(st.booleans()) else min(len(frame) - 1, 61)
        at = draw(st.integers(14, top))
        frame[at] = draw(st.integers(0, 255))
    if frame[23] == 6 and len(frame) > 47 and draw(st.booleans()):
        frame[47] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x10, 0x11, 0x12,
                                          0x14, 0x18, 0x29, 0x3f, 0xc2, 0xff]))
    if draw(st.integers(0, 5)) == 0:
        frame[26] = draw(st.sampled_from([0, 127, 224, 239, 240, 255]))
    if draw(st.integers(0, 2)) > 0:  # a valid IP checksum: the mutation reaches further in
        frame[24:26] = b"\0\0"
        frame[24:26] = struct.pack("!H", 0xffff - sum16(bytes(frame[14:34])))
    if draw(st.integers(0, 9)) == 0:
        frame = frame[:draw(st.integers(34, len(frame)))]
    return bytes(frame)


@pytest.fixture(scope="module")
def svc_node(loaded):
    n = loaded.node
    n.delete_services([s.key for s in n.list_services()])
    n.put_services(SERVICES)
    yield n
    n.delete_services([s.key for s in SERVICES])
    n.flush_conntrack()


def _established(node) -> None:
    run(node, tcp(CLIENT, VIP, EST_PORT, 80, "S"))
    dst = {e.nat_address for e in node.list_conntrack() if e.src_port == EST_PORT}.pop()
    run(node, tcp(dst, CLIENT, 8080, EST_PORT, "SA"))
    run(node, tcp(CLIENT, VIP, EST_PORT, 80, "A"))
    run(node, FRAGS[0])


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frame=mutated())
def test_mutated_packets_are_rewritten_whole_or_not_at_all(svc_node, frame):
    node = svc_node
    node.flush_conntrack()
    _established(node)
    before = {(e.src, e.src_port, e.dst, e.dst_port, e.proto) for e in node.list_conntrack()}
    verdict, out = run(node, frame)
    after = {(e.src, e.src_port, e.dst, e.dst_port, e.proto): e for e in node.list_conntrack()}
    created = set(after) - before
    if created:
        assert may_open(frame), f"state created by {frame.hex()}"
    out_b = bytes(out)
    event("created state" if created else "no state")
    if verdict == TC_ACT_SHOT or out_b == frame:
        event("dropped" if verdict == TC_ACT_SHOT else "untouched")
        return
    event("rewritten")
    # rewritten: a whole, valid NAT of a flow that conntrack now holds
    assert len(out_b) == len(frame)
    assert ip_ok(out_b), f"IP checksum of the rewrite of {frame.hex()}"
    if struct.unpack("!H", frame[20:22])[0] & 0x1fff:  # a later fragment: its address only
        assert {n for n in range(len(frame)) if frame[n] != out_b[n]} <= {24, 25, 30, 31, 32, 33}
        flow = after[(CLIENT, FRAG_PORT, VIP, 53, Proto.UDP)]
        assert frame[26:34] == FRAGS[1][26:34] and frame[18:20] == FRAGS[1][18:20]
        assert socket.inet_ntoa(out_b[30:34]) == flow.nat_address
        return
    if frame[23] == 1:  # an ICMP error translated: checksums, and no endpoint address left
        tot = struct.unpack("!H", frame[16:18])[0]
        assert (sum16(out_b[34:14 + tot]) == 0xffff) == (sum16(frame[34:14 + tot]) == 0xffff)
        assert ip_ok(out_b[28:]) == ip_ok(frame[28:])  # the quoted IP header
        eps = {socket.inet_aton(EP1), socket.inet_aton(EP2)}
        assert out_b[26:30] in (socket.inet_aton(VIP), frame[26:30]) and out_b[26:30] not in eps
        assert out_b[58:62] == socket.inet_aton(VIP)  # the quoted destination
        return
    assert l4_ok(out_b) == l4_ok(frame), f"L4 checksum of the rewrite of {frame.hex()}"
    o = Ether(out_b)
    i = Ether(frame)
    l4o = o[TCP] if TCP in o else o[UDP]
    l4i = i[TCP] if TCP in i else i[UDP]
    key = (i[IP].src, l4i.sport, i[IP].dst, l4i.dport, Proto(i[IP].proto))
    assert key in after, f"rewritten without a flow: {frame.hex()}"
    e = after[key]
    if e.direction == 1:
        assert (o[IP].dst, l4o.dport) == (e.nat_address, e.nat_port)
        assert (o[IP].src, l4o.sport) == (i[IP].src, l4i.sport)
    else:
        assert (o[IP].src, l4o.sport) == (e.nat_address, e.nat_port)
        assert (o[IP].dst, l4o.dport) == (i[IP].dst, l4i.dport)
    # only addresses, ports and checksums changed
    diff = [n for n in range(len(frame)) if frame[n] != out_b[n]]
    allowed = set(range(24, 26)) | set(range(26, 34)) | set(range(34, 38))
    allowed |= {50, 51} if i[IP].proto == 6 else {40, 41}
    assert set(diff) <= allowed, f"bytes {sorted(set(diff) - allowed)} changed: {frame.hex()}"
