"""SCTP services through the loaded TC programs (BPF_PROG_TEST_RUN): an INIT opens a flow
and is DNATed, the endpoint's answers are translated back, and every rewritten packet's
CRC32c is checked by recomputing it in full (tests/datapath/packets.py crc32c), never by
the datapath's own incremental formula. A wrong CRC stays exactly as wrong."""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from dpd import abi
from tests.datapath.packets import (
    CLIENT,
    EP1,
    FORWARDED,
    MAC_C,
    MAC_L,
    SCTP_ABORT,
    SCTP_COOKIE_ECHO,
    SCTP_DATA,
    SCTP_INIT,
    SCTP_INIT_ACK,
    SCTP_SHUTDOWN_COMPLETE,
    TC_ACT_OK,
    TC_ACT_SHOT,
    VIP,
    crc32c,
    run,
    sctp,
    sctp_chunk,
    sctp_crc_ok,
    sctp_fields,
    sctp_init,
    sum16,
)
from xlbcore.service import EndpointSpec, Mode, Proto, ServiceSpec

pytestmark = pytest.mark.root

ABI = abi.load()
NEW, EST, CLOSED = ABI.const("XLB_CT_NEW"), ABI.const("XLB_CT_EST"), ABI.const("XLB_CT_CLOSED")
ORIG = ABI.const("XLB_DIR_ORIG")
SNAT = "198.18.9.1"
PORT = 38412  # the VIP's port (NGAP's)
C_TAG, S_TAG = 0x1234ABCD, 0x5A5A0001  # client's and endpoint's verification tags


def svc(ep_port: int = 9000, mode: Mode = Mode.DNAT) -> ServiceSpec:
    return ServiceSpec(VIP, PORT, Proto.SCTP, mode=mode,
                       endpoints=(EndpointSpec(EP1, ep_port),),
                       snat_addr=SNAT if mode == Mode.FULLNAT else "")


def data(tsn: int, size: int) -> bytes:
    """A DATA chunk of `size` payload bytes (padding follows when size % 4)."""
    return sctp_chunk(SCTP_DATA, struct.pack("!IHHI", tsn, 0, 0, 46) + bytes(range(size % 251))
                      + b"x" * max(0, size - size % 251), flags=3)


def ip_ok(out: bytes) -> bool:
    return sum16(out[14:34]) == 0xFFFF


def open_flow(node, sport: int, ep_port: int = 9000) -> None:
    """INIT from the client and the endpoint's INIT ACK: the flow is established."""
    verdict, out = run(node, sctp(CLIENT, VIP, sport, PORT, sctp_init(C_TAG)))
    assert verdict in FORWARDED and out[IP].dst == EP1
    verdict, _ = run(node, sctp(EP1, CLIENT, ep_port, sport,
                                sctp_chunk(SCTP_INIT_ACK, struct.pack("!IIHHI", S_TAG, 65536,
                                                                      10, 10, 1)), vtag=C_TAG))
    assert verdict in FORWARDED


def test_init_is_dnated_to_the_endpoint_port_with_a_right_crc(node):
    node.put_services([svc(9000)])
    pkt = sctp(CLIENT, VIP, 5000, PORT, sctp_init(C_TAG))
    verdict, out = run(node, pkt)
    assert verdict in FORWARDED
    raw = bytes(out)
    assert (out[IP].src, out[IP].dst) == (CLIENT, EP1)
    sport, dport, vtag, _, chunks = sctp_fields(raw)
    assert (sport, dport, vtag) == (5000, 9000, 0)
    assert chunks == sctp_fields(pkt)[4]  # the chunks are not touched
    assert sctp_crc_ok(raw) and ip_ok(raw)
    flows = {e.direction: e for e in node.list_conntrack()}
    assert flows[ORIG].proto == Proto.SCTP and flows[ORIG].state == NEW
    assert (flows[ORIG].nat_address, flows[ORIG].nat_port) == (EP1, 9000)


def test_reply_is_translated_back_and_establishes(node):
    node.put_services([svc(9000)])
    run(node, sctp(CLIENT, VIP, 5001, PORT, sctp_init(C_TAG)))
    ack = sctp(EP1, CLIENT, 9000, 5001,
               sctp_chunk(SCTP_INIT_ACK, struct.pack("!IIHHI", S_TAG, 65536, 10, 10, 1)
                          + b"\0\7\0\x0ccookie!!"), vtag=C_TAG)
    verdict, out = run(node, ack)
    assert verdict in FORWARDED
    raw = bytes(out)
    assert (out[IP].src, out[IP].dst) == (VIP, CLIENT)
    assert sctp_fields(raw)[:3] == (PORT, 5001, C_TAG)
    assert sctp_crc_ok(raw) and ip_ok(raw)
    assert {e.state for e in node.list_conntrack()} == {EST}


def test_established_packets_of_many_sizes_keep_a_right_crc_both_ways(node):
    """The fast path's rewrite: the CRC update depends on the packet's length (every bit
    of it), so lengths from the smallest chunk to a full frame, padding included."""
    node.put_services([svc(9000)])
    open_flow(node, 5002)
    rng = random.Random(11)
    sizes = [0, 1, 2, 3, 4, 5, 100, 255, 256, 1000, 1024, 1400, 1432] + \
        [rng.randrange(1, 1433) for _ in range(20)]
    for tsn, size in enumerate(sizes, 2):
        verdict, out = run(node, sctp(CLIENT, VIP, 5002, PORT, data(tsn, size), vtag=S_TAG))
        raw = bytes(out)
        assert verdict in FORWARDED and out[IP].dst == EP1, size
        assert sctp_fields(raw)[:3] == (5002, 9000, S_TAG) and sctp_crc_ok(raw), size
        verdict, out = run(node, sctp(EP1, CLIENT, 9000, 5002, data(tsn, size), vtag=C_TAG))
        raw = bytes(out)
        assert verdict in FORWARDED and out[IP].src == VIP, size
        assert sctp_fields(raw)[:3] == (PORT, 5002, C_TAG) and sctp_crc_ok(raw), size


def test_same_port_endpoint_rewrites_addresses_only_crc_unchanged(node):
    node.put_services([svc(PORT)])
    pkt = sctp(CLIENT, VIP, 5003, PORT, sctp_init(C_TAG))
    verdict, out = run(node, pkt)
    raw = bytes(out)
    assert verdict in FORWARDED and out[IP].dst == EP1
    assert raw[34:] == pkt[34:]  # the whole SCTP packet, CRC included, byte for byte
    assert ip_ok(raw)


def test_wrong_crc_is_carried_not_fixed(node):
    """An incremental update keeps a wrong CRC exactly as wrong: the endpoint drops the
    packet as it would have without the node."""
    node.put_services([svc(9000)])
    good = sctp(CLIENT, VIP, 5004, PORT, sctp_init(C_TAG))
    bad_crc = sctp_fields(good)[3] ^ 0x00010000
    verdict, out = run(node, sctp(CLIENT, VIP, 5004, PORT, sctp_init(C_TAG), crc=bad_crc))
    raw = bytes(out)
    assert verdict in FORWARDED and sctp_fields(raw)[1] == 9000
    assert not sctp_crc_ok(raw)
    l4 = raw[34:]
    want = crc32c(l4[:8] + b"\0\0\0\0" + l4[12:])
    assert sctp_fields(raw)[3] ^ want == 0x00010000  # as wrong as it came


def test_offloaded_crc_zero_is_left_for_the_device(node):
    """A sender with CRC offload (a veth) leaves the field 0: it stays 0, to be computed
    over the rewritten packet."""
    node.put_services([svc(9000)])
    verdict, out = run(node, sctp(CLIENT, VIP, 5005, PORT, sctp_init(C_TAG), crc=0))
    assert verdict in FORWARDED and sctp_fields(bytes(out))[1:4] == (9000, 0, 0)


@pytest.mark.parametrize("chunks,vtag", [
    (data(1, 10), S_TAG),                        # DATA of no flow
    (sctp_chunk(SCTP_COOKIE_ECHO, b"cookie!!"), S_TAG),
    (sctp_chunk(SCTP_ABORT), S_TAG),
    (sctp_init(C_TAG), 7),                       # INIT with a verification tag: invalid
])
def test_packet_of_no_flow_passes_untouched(node, chunks, vtag):
    node.put_services([svc(9000)])
    pkt = sctp(CLIENT, VIP, 5006, PORT, chunks, vtag=vtag)
    verdict, out = run(node, pkt)
    assert verdict == TC_ACT_OK and bytes(out) == pkt
    assert node.list_conntrack() == []
    assert node.global_stats()["pass_bad_flags"].packets == 1


def test_sctp_to_other_port_or_tcp_service_is_untouched(node):
    node.put_services([svc(9000), ServiceSpec(VIP, PORT + 1, Proto.TCP,
                                              endpoints=(EndpointSpec(EP1, 80),))])
    for pkt in (sctp(CLIENT, VIP, 5007, PORT + 2, sctp_init(C_TAG)),  # no service
                sctp(CLIENT, VIP, 5007, PORT + 1, sctp_init(C_TAG))):  # a TCP service's port
        verdict, out = run(node, pkt)
        assert verdict == TC_ACT_OK and bytes(out) == pkt
    assert node.list_conntrack() == []


def test_truncated_sctp_is_not_translated(node):
    node.put_services([svc(9000)])
    full = sctp(CLIENT, VIP, 5008, PORT, sctp_init(C_TAG))
    ip = IP(full[14:])
    ip.len = 20 + 12  # a common header and no chunk
    del ip.chksum
    pkt = full[:14] + bytes(ip)[:32]
    verdict, out = run(node, pkt)
    assert verdict == TC_ACT_OK and bytes(out) == pkt
    assert node.list_conntrack() == []
    assert node.global_stats()["pass_bad_header"].packets == 1


def test_abort_closes_the_flow_and_an_init_reopens_it(node):
    node.put_services([svc(9000)])
    open_flow(node, 5009)
    verdict, out = run(node, sctp(CLIENT, VIP, 5009, PORT, sctp_chunk(SCTP_ABORT), vtag=S_TAG))
    assert verdict in FORWARDED and sctp_fields(bytes(out))[1] == 9000
    assert sctp_crc_ok(bytes(out))
    assert {e.state for e in node.list_conntrack()} == {CLOSED}
    run(node, sctp(CLIENT, VIP, 5009, PORT, sctp_init(C_TAG)))  # a new association
    assert {e.state for e in node.list_conntrack()} == {NEW}
    open_flow(node, 5009)
    verdict, _ = run(node, sctp(EP1, CLIENT, 9000, 5009,
                                sctp_chunk(SCTP_SHUTDOWN_COMPLETE), vtag=C_TAG))
    assert verdict in FORWARDED
    assert {e.state for e in node.list_conntrack()} == {CLOSED}


def test_first_fragment_whose_port_changes_is_not_translated(node):
    """The CRC update needs the SCTP packet's length, which a first fragment lacks."""
    node.put_services([svc(9000)])
    full = sctp(CLIENT, VIP, 5010, PORT, sctp_init(C_TAG) + data(1, 64))
    ip = IP(full[14:])
    l4 = bytes(ip.payload)
    frag = IP(src=CLIENT, dst=VIP, proto=132, flags="MF", frag=0, id=77) / l4[:40]
    pkt = bytes(full[:14]) + bytes(frag)
    verdict, out = run(node, pkt)
    assert verdict == TC_ACT_OK and bytes(out) == pkt


def test_fullnat_rewrites_both_ports_with_a_right_crc(node):
    node.put_services([svc(9000, Mode.FULLNAT)])
    verdict, out = run(node, sctp(CLIENT, VIP, 5011, PORT, sctp_init(C_TAG)))
    raw = bytes(out)
    assert verdict in FORWARDED
    assert (out[IP].src, out[IP].dst) == (SNAT, EP1)
    snat_port = sctp_fields(raw)[0]
    assert sctp_fields(raw)[1] == 9000 and sctp_crc_ok(raw) and ip_ok(raw)
    ack = sctp(EP1, SNAT, 9000, snat_port,
               sctp_chunk(SCTP_INIT_ACK, struct.pack("!IIHHI", S_TAG, 65536, 10, 10, 1)),
               vtag=C_TAG)
    verdict, out = run(node, ack)
    raw = bytes(out)
    assert verdict in FORWARDED
    assert (out[IP].src, out[IP].dst) == (VIP, CLIENT)
    assert sctp_fields(raw)[:2] == (PORT, 5011) and sctp_crc_ok(raw) and ip_ok(raw)
    for size in (1, 333, 1400):  # established, both ways, on the fast path
        _, out = run(node, sctp(CLIENT, VIP, 5011, PORT, data(9, size), vtag=S_TAG))
        assert sctp_fields(bytes(out))[:2] == (snat_port, 9000) and sctp_crc_ok(bytes(out))
        _, out = run(node, sctp(EP1, SNAT, 9000, snat_port, data(9, size), vtag=C_TAG))
        assert sctp_fields(bytes(out))[:2] == (PORT, 5011) and sctp_crc_ok(bytes(out))


def test_ethernet_padding_is_not_counted_in_the_crc(node):
    """A short frame padded by its sender: the SCTP packet ends where IP says."""
    node.put_services([svc(9000)])
    pkt = sctp(CLIENT, VIP, 5012, PORT, sctp_chunk(SCTP_INIT))
    assert len(pkt) < 60
    verdict, out = run(node, pkt + b"\xee" * (60 - len(pkt)))
    assert verdict in FORWARDED and sctp_fields(bytes(out))[1] == 9000
    assert sctp_crc_ok(bytes(out))



ROUTER = "198.18.3.1"


def frag_needed(src: str, dst: str, quote: bytes, mtu: int = 1280) -> bytes:
    """ICMP fragmentation needed (3/4) from `src` to `dst` quoting `quote` (IP onwards)."""
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=src, dst=dst)
                 / ICMP(type=3, code=4, nexthopmtu=mtu) / Raw(quote))


def icmp_sums_ok(frame: bytes) -> bool:
    """The outer IP, ICMP (over the whole message) and quoted IP checksums are right."""
    return (sum16(frame[14:34]) == 0xFFFF and sum16(frame[34:]) == 0xFFFF
            and sum16(frame[42:62]) == 0xFFFF)


@pytest.mark.parametrize("reporter", ["router", "endpoint"])
@pytest.mark.parametrize("quoted", [None, 8, 12, 100])  # SCTP bytes quoted (None: all)
def test_frag_needed_quoting_a_dnated_packet_reaches_the_client_as_its_own(node, reporter,
                                                                           quoted):
    """Path MTU discovery through DNAT with the endpoint on another port: a router (or
    the endpoint) reports a client packet as it left the node (client:5013 -> EP1:9000);
    the client gets it about the packet it sent (-> VIP:PORT): the quoted SCTP bytes as
    the client sent them, its CRC32c included (updated by the quoted length even when the
    quote is cut short), and every checksum around them right."""
    node.put_services([svc(9000)])
    open_flow(node, 5013)
    sent = sctp(CLIENT, VIP, 5013, PORT, data(2, 1300), vtag=S_TAG)
    verdict, out = run(node, sent)
    assert verdict in FORWARDED and sctp_fields(bytes(out))[:2] == (5013, 9000)
    inner = bytes(out)[14:]
    quote = inner if quoted is None else inner[:20 + quoted]
    src = ROUTER if reporter == "router" else EP1
    verdict, out = run(node, frag_needed(src, CLIENT, quote))
    assert verdict in FORWARDED
    frame = bytes(out)
    assert (out[IP].src, out[IP].dst) == (ROUTER if reporter == "router" else VIP, CLIENT)
    assert out[ICMP].type == 3 and out[ICMP].code == 4 and out[ICMP].nexthopmtu == 1280
    assert icmp_sums_ok(frame)
    q = IP(frame[42:62])
    assert (q.src, q.dst, q.proto) == (CLIENT, VIP, 132)
    want = sent[34:] if quoted is None else sent[34:34 + quoted]
    assert frame[62:] == want
    assert node.global_stats()["icmp_nat"].packets == 1


def test_fullnat_frag_needed_from_the_client_reaches_the_endpoint_about_its_packet(node):
    """The other way in full-NAT: the client reports the endpoint's packet as it reached
    it (VIP:PORT -> client:5014); the endpoint gets it from the SNAT address about the
    packet it sent (EP1:9000 -> SNAT:port), its CRC32c as it sent it."""
    node.put_services([svc(9000, Mode.FULLNAT)])
    _, out = run(node, sctp(CLIENT, VIP, 5014, PORT, sctp_init(C_TAG)))
    snat_port = sctp_fields(bytes(out))[0]
    ack = sctp_chunk(SCTP_INIT_ACK, struct.pack("!IIHHI", S_TAG, 65536, 10, 10, 1))
    run(node, sctp(EP1, SNAT, 9000, snat_port, ack, vtag=C_TAG))
    sent = sctp(EP1, SNAT, 9000, snat_port, data(5, 1300), vtag=C_TAG)
    verdict, out = run(node, sent)
    assert verdict in FORWARDED and sctp_fields(bytes(out))[:2] == (PORT, 5014)
    for quoted in (None, 40):
        inner = bytes(out)[14:]
        quote = inner if quoted is None else inner[:20 + quoted]
        verdict, err = run(node, frag_needed(CLIENT, VIP, quote))
        assert verdict in FORWARDED
        frame = bytes(err)
        assert (err[IP].src, err[IP].dst) == (SNAT, EP1) and icmp_sums_ok(frame)
        q = IP(frame[42:62])
        assert (q.src, q.dst) == (EP1, SNAT)
        assert frame[62:] == (sent[34:] if quoted is None else sent[34:34 + quoted])


def abort(src: str, dst: str, sport: int, dport: int, vtag: int, t_bit: bool = False,
          ctype: int = SCTP_ABORT) -> bytes:
    return sctp(src, dst, sport, dport, sctp_chunk(ctype, flags=1 if t_bit else 0), vtag=vtag)


@pytest.mark.parametrize("ctype", [SCTP_ABORT, SCTP_SHUTDOWN_COMPLETE])
def test_an_abort_with_a_wrong_verification_tag_is_dropped_and_the_flow_kept(node, ctype):
    """RFC 9260 8.5.1: an ABORT (or SHUTDOWN COMPLETE) carries the receiver's tag, or with
    the T bit the sender's own. Forged ones with any other tag, from either side, are
    dropped and leave the flow established; its data goes on on the fast path."""
    node.put_services([svc(9000)])
    open_flow(node, 5020)
    drops = node.global_stats()["drop_rst_window"].packets
    forged = [abort(CLIENT, VIP, 5020, PORT, 0xDEAD0001, ctype=ctype),
              abort(CLIENT, VIP, 5020, PORT, C_TAG, ctype=ctype),  # the T bit's tag, no T bit
              abort(CLIENT, VIP, 5020, PORT, S_TAG, t_bit=True, ctype=ctype),
              abort(EP1, CLIENT, 9000, 5020, S_TAG, ctype=ctype),
              abort(EP1, CLIENT, 9000, 5020, 0, t_bit=True, ctype=ctype)]
    for pkt in forged:
        verdict, _ = run(node, pkt)
        assert verdict == TC_ACT_SHOT
        assert {e.state for e in node.list_conntrack()} == {EST}
    assert node.global_stats()["drop_rst_window"].packets == drops + len(forged)
    verdict, out = run(node, sctp(CLIENT, VIP, 5020, PORT, data(3, 10), vtag=S_TAG))
    assert verdict in FORWARDED and out[IP].dst == EP1
    # the right tags close it: the receiver's, or the sender's own with the T bit
    verdict, _ = run(node, abort(EP1, CLIENT, 9000, 5020, S_TAG, t_bit=True, ctype=ctype))
    assert verdict in FORWARDED
    assert {e.state for e in node.list_conntrack()} == {CLOSED}


def test_an_abort_with_the_receivers_tag_closes_from_either_side(node):
    node.put_services([svc(9000)])
    open_flow(node, 5021)
    verdict, _ = run(node, abort(EP1, CLIENT, 9000, 5021, C_TAG))
    assert verdict in FORWARDED and {e.state for e in node.list_conntrack()} == {CLOSED}
    run(node, sctp(CLIENT, VIP, 5021, PORT, sctp_init(C_TAG + 1)))  # a new association
    # the old association's tag (the endpoint's tag is not known until its INIT ACK, so
    # only a T-bit ABORT, carrying the client's new tag, is checked)
    verdict, _ = run(node, abort(CLIENT, VIP, 5021, PORT, C_TAG, t_bit=True))
    assert verdict == TC_ACT_SHOT and {e.state for e in node.list_conntrack()} == {NEW}
    # before the INIT ACK the client's ABORT can only carry its own tag (T bit)
    verdict, _ = run(node, abort(CLIENT, VIP, 5021, PORT, C_TAG + 1, t_bit=True))
    assert verdict in FORWARDED and {e.state for e in node.list_conntrack()} == {CLOSED}


def test_an_init_ack_with_a_wrong_tag_teaches_nothing(node):
    """A forged INIT ACK (not carrying the client's tag) cannot set the tag a forged ABORT
    would then carry."""
    node.put_services([svc(9000)])
    run(node, sctp(CLIENT, VIP, 5022, PORT, sctp_init(C_TAG)))
    forged = sctp_chunk(SCTP_INIT_ACK, struct.pack("!IIHHI", 0xBAD, 65536, 10, 10, 1))
    run(node, sctp(EP1, CLIENT, 9000, 5022, forged, vtag=0x1))
    ack = sctp_chunk(SCTP_INIT_ACK, struct.pack("!IIHHI", S_TAG, 65536, 10, 10, 1))
    verdict, _ = run(node, sctp(EP1, CLIENT, 9000, 5022, ack, vtag=C_TAG))
    assert verdict in FORWARDED and {e.state for e in node.list_conntrack()} == {EST}
    verdict, _ = run(node, abort(CLIENT, VIP, 5022, PORT, 0xBAD))
    assert verdict == TC_ACT_SHOT and {e.state for e in node.list_conntrack()} == {EST}
    verdict, _ = run(node, abort(CLIENT, VIP, 5022, PORT, S_TAG))
    assert verdict in FORWARDED and {e.state for e in node.list_conntrack()} == {CLOSED}
