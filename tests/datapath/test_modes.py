"""Full-NAT and DSR through the loaded TC programs (BPF_PROG_TEST_RUN): the exact bytes
out (addresses, ports, MACs, the outer header), replies, source port allocation, ICMP
errors, fragments, and that no packet outside a flow is rewritten (docs/modes.md)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from dpd import abi, bpfsys
from tests.datapath.packets import (
    C_ISN,
    CLIENT,
    EP1,
    FORWARDED,
    MAC_C,
    MAC_L,
    S_ISN,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    VIP,
    checksums_valid,
    run,
    sum16,
    tcp,
    udp,
)
from tests.datapath.test_hardening import _frags, _icmp_checks, _icmp_error, _reassembled_udp_ok
from xlbcore.service import EndpointSpec, Mode, Proto, ServiceSpec

pytestmark = pytest.mark.root

ABI = abi.load()
SNAT = "198.18.9.1"
CLIENT2 = "198.18.0.3"
PORT_MIN = ABI.const("XLB_SNAT_PORT_MIN")
PORT_COUNT = ABI.const("XLB_SNAT_PORT_COUNT")
PORT_COUNT_OWN = ABI.const("XLB_SNAT_PORT_COUNT_OWN")
EST = ABI.const("XLB_CT_EST")


def fullnat(*eps: EndpointSpec, snat: str = SNAT, proto: Proto = Proto.TCP,
            port: int = 80) -> ServiceSpec:
    return ServiceSpec(VIP, port, proto, mode=Mode.FULLNAT, endpoints=tuple(sorted(eps)),
                       snat_addr=snat)


def stat(node, name: str) -> int:
    return node.global_stats()[name].packets


def untouched(node, pkt: bytes) -> None:
    verdict, out = run(node, pkt)
    assert verdict == TC_ACT_OK and bytes(out) == pkt


# -- the datapath's hash, to predict the first candidate port -----------------------------

def _mix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _raw32(addr: str) -> int:  # a __be32 as the program's u32 arithmetic sees it
    return int.from_bytes(socket.inet_aton(addr), "little")


def _raw16(port: int) -> int:
    return socket.htons(port)


def candidate(src: str, sport: int, ep: str, ep_port: int, i: int = 0, own: bool = True,
              proto: int = 6) -> int:
    """The datapath's i-th candidate SNAT port for a flow (own: the service has its own
    SNAT address, so the range is XLB_SNAT_PORT_COUNT_OWN long): the client's port when
    in the range for i = 0, else a hash of the flow."""
    count = PORT_COUNT_OWN if own else PORT_COUNT
    if i == 0 and PORT_MIN <= sport < PORT_MIN + count:
        return sport
    h = _mix(_raw32(src) ^ 0x9E3779B9)
    h = _mix(h ^ _raw32(VIP))
    h = _mix(h ^ ((_raw16(sport) << 16) | _raw16(80)))
    h = _mix(h ^ proto)
    h = _mix(h ^ _raw32(ep) ^ _raw16(ep_port))
    return PORT_MIN + ((h + i) & 0xFFFFFFFF) % count


# -- full-NAT ----------------------------------------------------------------------------

def open_flow(node, client: str = CLIENT, sport: int = 41000) -> int:
    """The handshake of a full-NAT flow to EP1:8080; returns its SNAT port."""
    verdict, out = run(node, tcp(client, VIP, sport, 80, "S"))
    assert verdict in FORWARDED
    aport = out[TCP].sport
    _, back = run(node, tcp(EP1, SNAT, 8080, aport, "SA"))
    assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == (
        VIP, 80, client, sport)
    run(node, tcp(client, VIP, sport, 80, "A"))
    return aport


def test_fullnat_syn_rewrites_both_ends_with_valid_checksums(node):
    node.put_services([fullnat(EndpointSpec(EP1, 8080))])
    pkt = tcp(CLIENT, VIP, 41000, 80, "S")
    verdict, out = run(node, pkt)
    assert verdict in FORWARDED
    aport = out[TCP].sport
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == (SNAT, EP1, 8080)
    assert aport == 41000  # the client's port is kept where it is free
    assert checksums_valid(out)
    # nothing else changed: the bytes are the packet's with those four fields
    want = Ether(pkt)
    want[IP].src, want[IP].dst, want[TCP].sport, want[TCP].dport = SNAT, EP1, aport, 8080
    del want[IP].chksum, want[TCP].chksum
    assert bytes(out) == bytes(Ether(bytes(want)))
    flows = {e.direction: e for e in node.list_conntrack()}
    orig = flows[ABI.const("XLB_DIR_ORIG")]
    reply = flows[ABI.const("XLB_DIR_REPLY")]
    assert (orig.src, orig.dst, orig.nat_address, orig.nat_port) == (CLIENT, VIP, EP1, 8080)
    assert (reply.src, reply.src_port, reply.dst, reply.dst_port) == (EP1, 8080, SNAT, aport)
    assert (orig.nat2_address, orig.nat2_port) == (SNAT, aport)  # ListConntrack shows both
    assert (reply.nat2_address, reply.nat2_port) == (CLIENT, 41000)


def test_fullnat_reply_and_established_packets_both_ways(node):
    node.put_services([fullnat(EndpointSpec(EP1, 8080))])
    aport = open_flow(node)
    assert {e.state for e in node.list_conntrack()} == {EST}
    # established: the fast path rewrites both ends, checksums over payload valid
    verdict, out = run(node, tcp(CLIENT, VIP, 41000, 80, "PA", b"GET / HTTP/1.0\r\n\r\n"))
    assert verdict in FORWARDED and checksums_valid(out)
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (SNAT, aport, EP1, 8080)
    verdict, out = run(node, tcp(EP1, SNAT, 8080, aport, "PA", b"HTTP/1.0 200 OK\r\n"))
    assert verdict in FORWARDED and checksums_valid(out)
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (VIP, 80, CLIENT, 41000)
    assert bytes(out[TCP].payload) == b"HTTP/1.0 200 OK\r\n"


def test_fullnat_udp(node):
    node.put_services([fullnat(EndpointSpec(EP1, 5353), proto=Proto.UDP, port=53)])
    verdict, out = run(node, udp(CLIENT, VIP, 41100, 53, b"query"))
    assert verdict in FORWARDED and checksums_valid(out)
    aport = out[UDP].sport
    assert (out[IP].src, out[IP].dst, out[UDP].dport) == (SNAT, EP1, 5353)
    verdict, out = run(node, udp(EP1, SNAT, 5353, aport, b"answer"))
    assert verdict in FORWARDED and checksums_valid(out)
    assert (out[IP].src, out[UDP].sport, out[IP].dst, out[UDP].dport) == (VIP, 53, CLIENT, 41100)


def test_two_clients_with_one_source_port_get_distinct_snat_ports(node):
    node.put_services([fullnat(EndpointSpec(EP1, 8080))])
    a = open_flow(node, CLIENT, 41200)
    b = open_flow(node, CLIENT2, 41200)
    assert a != b
    # each reply goes to its own client
    _, out = run(node, tcp(EP1, SNAT, 8080, a, "PA", b"to-a"))
    assert (out[IP].dst, out[TCP].dport) == (CLIENT, 41200)
    _, out = run(node, tcp(EP1, SNAT, 8080, b, "PA", b"to-b"))
    assert (out[IP].dst, out[TCP].dport) == (CLIENT2, 41200)
    assert len(node.list_conntrack()) == 4


def test_a_taken_snat_port_is_skipped_never_overwritten(node):
    node.put_services([fullnat(EndpointSpec(EP1, 8080))])
    a = open_flow(node, CLIENT, 41300)
    assert a == 41300
    b = open_flow(node, CLIENT2, 41300)  # its first candidate, its own port, is a's
    assert b == candidate(CLIENT2, 41300, EP1, 8080, 1) != a
    assert stat(node, "snat_port_busy") == 1
    _, out = run(node, tcp(EP1, SNAT, 8080, a, "PA", b"still-a"))
    assert (out[IP].dst, out[TCP].dport) == (CLIENT, 41300)  # flow a's replies unchanged


def test_no_free_snat_port_drops_and_counts(node):
    node.put_services([fullnat(EndpointSpec(EP1, 8080))])
    sport = 41400
    tries = ABI.const("XLB_SNAT_TRIES")
    want = [candidate(CLIENT, sport, EP1, 8080, i) for i in range(tries)]
    # every candidate of (CLIENT, sport) held by a live flow of another client (each
    # keeps its own port)
    taken = [open_flow(node, f"198.18.0.{10 + i}", port) for i, port in enumerate(want)]
    assert taken == want
    verdict, _ = run(node, tcp(CLIENT, VIP, sport, 80, "S"))
    assert verdict == TC_ACT_SHOT
    assert stat(node, "drop_snat_ports") == 1
    assert stat(node, "snat_port_busy") == tries
    assert len(node.list_conntrack()) == 2 * tries  # nothing of the refused flow


def test_packets_of_no_fullnat_flow_are_never_rewritten(node):
    node.put_services([fullnat(EndpointSpec(EP1, 8080))])
    aport = open_flow(node)
    untouched(node, tcp(EP1, SNAT, 8080, aport + 1, "PA", b"x"))  # no flow at that port
    untouched(node, tcp(EP1, SNAT, 8081, aport, "PA", b"x"))
    untouched(node, tcp("198.18.1.9", SNAT, 8080, aport, "PA", b"x"))  # not the endpoint
    untouched(node, tcp(CLIENT, VIP, 41001, 80, "F"))  # cannot open a flow
    untouched(node, tcp(CLIENT, VIP, 41001, 80, "SF"))


def test_fullnat_icmp_error_from_the_endpoint_reaches_the_client_about_the_vip(node):
    node.put_services([fullnat(EndpointSpec(EP1, 5353), proto=Proto.UDP, port=53)])
    _, out = run(node, udp(CLIENT, VIP, 41500, 53, b"query"))
    aport = out[UDP].sport
    quote = bytes(out[IP])  # what the endpoint got: SNAT:aport -> EP1:5353
    verdict, out = run(node, _icmp_error(EP1, SNAT, quote))
    assert verdict in FORWARDED
    frame = bytes(out)
    _icmp_checks(frame, full_quote=True)
    ip = IP(frame[14:])
    assert (ip.src, ip.dst) == (VIP, CLIENT)
    q = IP(frame[42:])
    assert (q.src, q.dst, q[UDP].sport, q[UDP].dport) == (CLIENT, VIP, 41500, 53)
    assert stat(node, "icmp_nat") == 1
    assert aport


def test_fullnat_icmp_error_from_the_client_reaches_the_endpoint_from_the_snat_address(node):
    node.put_services([fullnat(EndpointSpec(EP1, 8080))])
    aport = open_flow(node, CLIENT, 41510)
    quote = bytes(IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=41510, flags="PA",
                                                 seq=S_ISN + 1, ack=C_ISN + 1) / b"reply")
    verdict, out = run(node, _icmp_error(CLIENT, VIP, quote, 3, 4, 1300))
    assert verdict in FORWARDED
    frame = bytes(out)
    _icmp_checks(frame, full_quote=True)
    ip = IP(frame[14:])
    assert (ip.src, ip.dst) == (SNAT, EP1)
    q = IP(frame[42:])
    assert (q.src, q[TCP].sport, q.dst, q[TCP].dport) == (EP1, 8080, SNAT, aport)
    assert CLIENT not in (ip.src, ip.dst, q.src, q.dst)


def test_fullnat_fragments_follow_their_first_both_ways(node):
    node.put_services([fullnat(EndpointSpec(EP1, 5353), proto=Proto.UDP, port=53)])
    outs = [run(node, f)[1] for f in _frags(CLIENT, VIP, 41600, 53, 1000, 777)]
    assert all((o[IP].src, o[IP].dst) == (SNAT, EP1) for o in outs)
    assert all(sum16(bytes(o)[14:34]) == 0xffff for o in outs)
    assert _reassembled_udp_ok(outs)
    aport = outs[0][UDP].sport
    back = [run(node, f)[1] for f in _frags(EP1, SNAT, 5353, aport, 1000, 778)]
    assert all((o[IP].src, o[IP].dst) == (VIP, CLIENT) for o in back)
    assert back[0][UDP].dport == 41600 and _reassembled_udp_ok(back)


def test_dnat_and_fullnat_services_side_by_side(node):
    dnat = ServiceSpec(VIP, 81, Proto.TCP, endpoints=(EndpointSpec(EP1, 8080),))
    node.put_services([fullnat(EndpointSpec(EP1, 8080)), dnat])
    _, out = run(node, tcp(CLIENT, VIP, 41700, 81, "S"))
    assert (out[IP].src, out[TCP].sport) == (CLIENT, 41700)  # DNAT keeps the client
    _, out = run(node, tcp(CLIENT, VIP, 41700, 80, "S"))
    assert out[IP].src == SNAT
    got = {(s.port, s.mode, s.snat_addr) for s in node.list_services()}
    assert got == {(80, Mode.FULLNAT, SNAT), (81, Mode.DNAT, "")}


# -- a network namespace for the FIB: DSR and the node's own address ------------------------

EP_MAC = "02:00:00:00:aa:01"
GW_MAC = "02:00:00:00:aa:fe"
NODE_ADDR = "198.18.1.1"
FAR_EP = "198.18.60.2"  # an endpoint in another subnet, through a gateway


@pytest.fixture(scope="module")
def fibns() -> Iterator[tuple[str, int]]:
    """A namespace with a link (md-dsr0: 198.18.1.1/24, the endpoint's and a gateway's
    MAC known) and a route to 198.18.60.0/24 through the gateway; yields its name and
    the ifindex of the link the packets come in on."""
    name = f"md-dp-{uuid.uuid4().hex[:6]}"
    sh = ["ip", "-n", name]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "add", "md-dsr0", "type", "veth", "peer", "name", "md-dsr1"],
                    ["link", "set", "md-dsr0", "up"], ["link", "set", "md-dsr1", "up"],
                    ["link", "set", "lo", "up"],
                    ["addr", "add", f"{NODE_ADDR}/24", "dev", "md-dsr0"],
                    ["addr", "add", "198.18.0.1/24", "dev", "md-dsr1"],
                    ["neigh", "replace", EP1, "lladdr", EP_MAC, "dev", "md-dsr0",
                     "nud", "permanent"],
                    ["neigh", "replace", "198.18.1.254", "lladdr", GW_MAC, "dev", "md-dsr0",
                     "nud", "permanent"],
                    ["route", "add", "198.18.60.0/24", "via", "198.18.1.254"]):
            subprocess.run([*sh, *cmd], check=True)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv4.conf.all.forwarding=1"], check=True)
        link = json.loads(subprocess.run([*sh, "-j", "link", "show", "md-dsr1"], check=True,
                                         capture_output=True, text=True).stdout)
        yield name, link[0]["ifindex"]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread in namespace `ns` (BPF_PROG_TEST_RUN's FIB lookups are the caller's)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(there)
        yield
    finally:
        _setns(home)
        os.close(there)
        os.close(home)


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def run_in(node, fib: tuple[str, int], packet: bytes) -> tuple[int, Ether]:
    with inside(fib[0]):
        res = bpfsys.prog_test_run(node.dp.fast_fd, packet, ingress_ifindex=fib[1])
    return res.retval, Ether(res.data)


def dsr(*eps: EndpointSpec, mode: Mode = Mode.DSR, snat: str = "",
        proto: Proto = Proto.TCP, port: int = 80) -> ServiceSpec:
    return ServiceSpec(VIP, port, proto, mode=mode, endpoints=tuple(sorted(eps)),
                       snat_addr=snat)


def test_dsr_rewrites_only_the_macs_and_ttl(node, fibns):
    node.put_services([dsr(EndpointSpec(EP1, 80))])
    for flags, payload in (("S", b""), ("A", b""), ("PA", b"GET / HTTP/1.0\r\n\r\n")):
        pkt = tcp(CLIENT, VIP, 42000, 80, flags, payload)
        verdict, out = run_in(node, fibns, pkt)
        assert verdict == TC_ACT_REDIRECT
        assert out[Ether].dst == EP_MAC and out[Ether].src != MAC_C
        want = Ether(pkt)[IP]
        want.ttl -= 1
        del want.chksum
        assert bytes(out[IP]) == bytes(IP(bytes(want)))  # the IP packet as sent, TTL - 1
    (entry,) = node.list_conntrack()  # one entry: replies do not come back
    assert (entry.src, entry.dst, entry.nat_address, entry.state) == (CLIENT, VIP, EP1, EST)
    assert stat(node, "dsr") == 3


def test_dsr_udp_and_icmp_error_to_the_vip_goes_to_the_endpoint(node, fibns):
    node.put_services([dsr(EndpointSpec(EP1, 53), proto=Proto.UDP, port=53)])
    verdict, out = run_in(node, fibns, udp(CLIENT, VIP, 42100, 53, b"q"))
    assert verdict == TC_ACT_REDIRECT and out[IP].dst == VIP and out[Ether].dst == EP_MAC
    # fragmentation needed about the endpoint's reply (VIP -> client), sent to the VIP
    quote = bytes(IP(src=VIP, dst=CLIENT) / UDP(sport=53, dport=42100) / b"answer")
    err = _icmp_error("198.18.3.1", VIP, quote, 3, 4, 1300)
    verdict, out = run_in(node, fibns, err)
    assert verdict == TC_ACT_REDIRECT and out[Ether].dst == EP_MAC
    assert bytes(out[IP])[12:] == err[14 + 12:]  # unchanged but the TTL (and IP checksum)
    assert out[IP].ttl == IP(err[14:]).ttl - 1 and sum16(bytes(out)[14:34]) == 0xffff


def test_dsr_endpoint_not_on_link_is_dropped(node, fibns):
    node.put_services([dsr(EndpointSpec(FAR_EP, 80))])
    verdict, _ = run_in(node, fibns, tcp(CLIENT, VIP, 42200, 80, "S"))
    assert verdict == TC_ACT_SHOT
    assert stat(node, "drop_no_route") == 1


@pytest.mark.parametrize("snat", ["", "198.18.9.9"])
def test_dsr_ipip_adds_an_outer_header(node, fibns, snat):
    node.put_services([dsr(EndpointSpec(FAR_EP, 80), mode=Mode.DSR_IPIP, snat=snat)])
    for flags in ("S", "A"):
        pkt = tcp(CLIENT, VIP, 42300, 80, flags)
        verdict, out = run_in(node, fibns, pkt)
        assert verdict == TC_ACT_REDIRECT
        frame = bytes(out)
        assert frame[12:14] == b"\x08\x00" and out[Ether].dst == GW_MAC  # via the gateway
        outer = frame[14:34]
        assert sum16(outer) == 0xffff
        ver, tos, length, ident, frag, ttl, proto = struct.unpack("!BBHHHBB", outer[:10])
        assert (ver, proto, length, frag) == (0x45, 4, len(pkt) - 14 + 20, 0x4000)
        assert socket.inet_ntoa(outer[12:16]) == (snat or NODE_ADDR)
        assert socket.inet_ntoa(outer[16:20]) == FAR_EP
        assert frame[34:] == pkt[14:]  # the client's packet, untouched


def test_fullnat_without_snat_address_uses_the_nodes_address(node, fibns):
    node.put_services([fullnat(EndpointSpec(EP1, 8080), snat="")])
    verdict, out = run_in(node, fibns, tcp(CLIENT, VIP, 42400, 80, "S"))
    assert verdict in FORWARDED and checksums_valid(out)
    assert (out[IP].src, out[IP].dst) == (NODE_ADDR, EP1)
    aport = out[TCP].sport  # 42400 is beyond the node address's range: hashed into it
    assert aport == candidate(CLIENT, 42400, EP1, 8080, own=False) < PORT_MIN + PORT_COUNT
    verdict, out = run_in(node, fibns, tcp(EP1, NODE_ADDR, 8080, aport, "SA"))
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == (VIP, CLIENT, 42400)


def test_dsr_packets_of_no_flow_are_not_sent(node, fibns):
    node.put_services([dsr(EndpointSpec(EP1, 80))])
    for pkt in (tcp(CLIENT, VIP, 42500, 80, "F"), tcp(CLIENT, VIP, 42500, 80, "R")):
        verdict, out = run_in(node, fibns, pkt)
        assert verdict == TC_ACT_OK and bytes(out) == pkt
    assert node.list_conntrack() == []
    assert MAC_L


def test_fullnat_flow_is_flushed_and_aged_as_one_flow(node):
    from dpd.conntrack import CtFilter

    node.put_services([fullnat(EndpointSpec(EP1, 8080))])
    open_flow(node, CLIENT, 42600)
    open_flow(node, CLIENT2, 42600)
    assert node.flush_conntrack(CtFilter(client=CLIENT)) == 2  # both its entries, by client
    left = node.list_conntrack()
    assert len(left) == 2 and CLIENT not in {e.src for e in left}
    ct = node.conntrack
    items = ct._decoded()
    peers = {ct.peer_key(k, v) for _, k, v in items}
    assert peers == {raw for raw, _, _ in items}  # each entry's peer is the other entry


@pytest.mark.parametrize("snat,sport", [(SNAT, 42700), ("", 42701)])
def test_fullnat_flow_picked_up_mid_stream_keeps_its_port(node, fibns, snat, sport):
    """After a flush, the flow's next packet (a bare ACK) opens it again with the same
    source port (the client's, or the same hash), so the endpoint's connection goes on."""
    node.put_services([fullnat(EndpointSpec(EP1, 8080), snat=snat)])
    _, first = run_in(node, fibns, tcp(CLIENT, VIP, sport, 80, "S"))
    node.flush_conntrack()
    verdict, out = run_in(node, fibns, tcp(CLIENT, VIP, sport, 80, "PA", b"more"))
    assert verdict in FORWARDED and checksums_valid(out)
    assert (out[IP].src, out[TCP].sport, out[IP].dst) == (first[IP].src, first[TCP].sport, EP1)
    assert {e.state for e in node.list_conntrack()} == {EST}
