"""The XDP stage (xdp_packet_func) under BPF_PROG_TEST_RUN: blocked v4 and v6 prefixes
are dropped (longest prefix match, counted globally and per prefix), everything else
passes untouched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from dpd import bpfsys
from tests.datapath.packets import MAC_C, MAC_L, VIP, tcp, udp

pytestmark = pytest.mark.root

XDP_DROP = 1
XDP_PASS = 2


@pytest.fixture
def xnode(node: object) -> Iterator[object]:
    bl = node.blocklist  # type: ignore[attr-defined]
    bl.delete([b.prefix for b in bl.entries()])
    yield node
    bl.delete([b.prefix for b in bl.entries()])


def xdp(node: object, packet: bytes) -> tuple[int, bytes]:
    res = bpfsys.prog_test_run(node.dp.xdp_fd, packet)  # type: ignore[attr-defined]
    return res.retval, res.data


def udp6(src: str, dst: str = "2001:db8:1::10") -> bytes:
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=src, dst=dst)
                 / UDP(sport=1000, dport=53) / b"hello")


def test_empty_blocklist_passes_everything_untouched(xnode):
    for pkt in (udp("198.18.66.7", VIP, 1234, 53), tcp("198.18.0.2", VIP, 1234, 80),
                udp6("2001:db8:66::7"),
                bytes(Ether(src=MAC_C, dst=MAC_L) / ARP(psrc="198.18.0.2")),
                bytes(Ether(src=MAC_C, dst=MAC_L, type=0x0800) / b"\x45\x00"),  # truncated
                bytes(Ether(src=MAC_C, dst=MAC_L, type=0x88B5))):  # a bare header
        rc, out = xdp(xnode, pkt)
        assert rc == XDP_PASS
        assert out == pkt
    stats = xnode.global_stats()  # type: ignore[attr-defined]
    assert stats["xdp_pass"].packets == 6
    assert stats["drop_blocklist"].packets == 0


def test_v4_prefixes_drop_with_longest_prefix_semantics(xnode):
    bl = xnode.blocklist  # type: ignore[attr-defined]
    assert bl.put(["198.18.66.0/24", "198.18.66.7/32", "198.18.128.0/17"]) == 3
    cases = {"198.18.66.7": XDP_DROP, "198.18.66.200": XDP_DROP, "198.18.67.1": XDP_PASS,
             "198.18.200.1": XDP_DROP, "198.18.127.255": XDP_PASS, "198.19.66.7": XDP_PASS}
    for src, want in cases.items():
        pkt = udp(src, VIP, 1234, 53)
        rc, out = xdp(xnode, pkt)
        assert rc == want, src
        if want == XDP_PASS:
            assert out == pkt
    # each drop was counted for the longest prefix holding the source
    got = {b.prefix: b.counters.packets for b in bl.entries()}
    assert got == {"198.18.66.0/24": 1, "198.18.66.7/32": 1, "198.18.128.0/17": 1}
    stats = xnode.global_stats()  # type: ignore[attr-defined]
    assert stats["drop_blocklist"].packets == 3
    assert stats["xdp_pass"].packets == 3
    # deleting the /32 leaves its address to the /24
    assert bl.delete(["198.18.66.7/32"]) == 1
    assert xdp(xnode, udp("198.18.66.7", VIP, 1234, 53))[0] == XDP_DROP
    assert {b.prefix: b.counters.packets for b in bl.entries()}["198.18.66.0/24"] == 2
    # the destination is not what is matched
    assert xdp(xnode, udp("198.18.0.2", "198.18.66.7", 1234, 53))[0] == XDP_PASS


def test_v6_prefixes_and_vlan_tagged_frames(xnode):
    bl = xnode.blocklist  # type: ignore[attr-defined]
    bl.put(["2001:db8:66::/48", "2001:db8:66:1::5/128", "198.18.66.0/24"])
    assert xdp(xnode, udp6("2001:db8:66:ffff::1"))[0] == XDP_DROP
    assert xdp(xnode, udp6("2001:db8:66:1::5"))[0] == XDP_DROP
    pkt = udp6("2001:db8:67::1")
    assert xdp(xnode, pkt) == (XDP_PASS, pkt)
    # a v4-mapped source is not the v4 prefix
    assert xdp(xnode, udp6("::ffff:198.18.66.7"))[0] == XDP_PASS
    got = {b.prefix: b.counters.packets for b in bl.entries()}
    assert got == {"198.18.66.0/24": 0, "2001:db8:66::/48": 1, "2001:db8:66:1::5/128": 1}
    tagged = bytes(Ether(src=MAC_C, dst=MAC_L) / Dot1Q(vlan=7)
                   / IP(src="198.18.66.9", dst=VIP) / UDP(sport=1, dport=2))
    assert xdp(xnode, tagged)[0] == XDP_DROP


def test_the_whole_range_and_the_default_route(xnode):
    bl = xnode.blocklist  # type: ignore[attr-defined]
    bl.put(["0.0.0.0/0"])
    assert xdp(xnode, udp("203.0.113.1", VIP, 1, 2))[0] == XDP_DROP
    assert xdp(xnode, udp6("2001:db8::1"))[0] == XDP_PASS  # v4 only
    bl.put(["::/0"])
    assert xdp(xnode, udp6("2001:db8::1"))[0] == XDP_DROP


def test_a_restarted_dpd_reads_the_blocklist_back(xnode):
    from dpd.blocklist import Blocklist

    xnode.blocklist.put(["198.18.66.0/24", "2001:db8:66::/48"])  # type: ignore[attr-defined]
    xdp(xnode, udp("198.18.66.1", VIP, 1, 2))
    again = Blocklist(xnode.dp)  # type: ignore[attr-defined]
    got = {b.prefix: b.counters.packets for b in again.entries()}
    assert got == {"198.18.66.0/24": 1, "2001:db8:66::/48": 0}
    assert again.count() == 2
    assert again.put(["198.18.66.0/24"]) == 0  # already there: kept


def test_mirror_filter_passes_every_packet_on_unchanged(xnode):
    """tc_mirror_func without a mirror for the interface, and with one whose mirror
    interface is gone: the packet goes on untouched to the next filter (TC_ACT_UNSPEC),
    a failed copy is counted."""
    import ctypes

    fd = xnode.dp.mirror_fd  # type: ignore[attr-defined]
    unspec = ctypes.c_uint32(-1).value
    pkt = udp("198.18.0.2", VIP, 1234, 53)
    res = bpfsys.prog_test_run(fd, pkt, ingress_ifindex=7)
    assert (res.retval, res.data) == (unspec, pkt)
    m = xnode.dp.maps["mirr_map"]  # type: ignore[attr-defined]
    codec = xnode.dp.abi.structs["xlb_mirr"].codec  # type: ignore[attr-defined]
    key = (7).to_bytes(4, "little")
    m.put(key, codec.pack(ifindex=999_999, name=b"x0", mirror_name=b"gone0"))
    try:
        res = bpfsys.prog_test_run(fd, pkt, ingress_ifindex=7)
        assert (res.retval, res.data) == (unspec, pkt)
        stats = xnode.global_stats()  # type: ignore[attr-defined]
        assert (stats["mirror_fail"].packets, stats["mirrored"].packets) == (1, 0)
    finally:
        m.delete(key)
