"""IPv6 services through the loaded TC programs (BPF_PROG_TEST_RUN): NAT66 of new flows
and replies with valid checksums, conntrack (both directions, the TCP handshake, the
established fast path, no flow over another's), full-NAT66, DSR on L2 and through
ip6ip6, and packets that are not part of a flow passing untouched (docs/ipv6.md).
Services are written to nat_v6_map with the ABI's codecs."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether

from dpd import abi, bpfsys
from tests.datapath.packets import (
    C_ISN,
    FORWARDED,
    MAC_C,
    MAC_L,
    S_ISN,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    run,
)
from tests.datapath.test_modes import inside

pytestmark = pytest.mark.root

ABI = abi.load()
CLIENT6 = "2001:db8::2"
CLIENT6B = "2001:db8::3"
VIP6 = "2001:db8:ff::10"
EP6A = "2001:db8:1::2"
EP6B = "2001:db8:2::2"
FAR6 = "2001:db8:60::2"
SNAT6 = "2001:db8:9::1"
NODE6 = "2001:db8:1::1"
EP_MAC = "02:00:00:00:0e:01"
GW_MAC = "02:00:00:00:0e:fe"
C = ABI.const
NEW, REPLIED, EST = C("XLB_CT_NEW"), C("XLB_CT_REPLIED"), C("XLB_CT_EST")
ORIG, REPLY = C("XLB_DIR_ORIG"), C("XLB_DIR_REPLY")
SVC_ID = 60  # of the test node's 64: beside any IPv4 service the other tests put
STAT_IDS = (250, 251)
EP_BASE = SLOT_BASE = 240  # runs past those of the other tests' few IPv4 services


def a16(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, addr)


def fold(addr: str) -> bytes:
    b = a16(addr)
    return bytes(x ^ y ^ z ^ w for x, y, z, w in zip(b[0:4], b[4:8], b[8:12], b[12:16],
                                                     strict=True))


def put6(node, eps: list[tuple[str, int]], proto: int = 6, port: int = 80,
         mode: int = C("XLB_MODE_DNAT"), snat: str = "") -> None:
    """An IPv6 service VIP6:port with `eps` (equal weights, round-robin): its endpoints
    at EP_BASE of ep_map (the fold of each address) and ep6_map (the address), its slot
    table at SLOT_BASE of slot_map, its value in nat_v6_map."""
    n = len(eps)
    maps = node.dp.maps
    ep, ep6 = ABI.structs["xlb_ep"].codec, ABI.structs["xlb_ep6"].codec
    for i, (a, p) in enumerate(eps):
        at = (EP_BASE + i).to_bytes(4, "little")
        maps["ep_map"].put(at, ep.pack(addr=fold(a), port=p, weight=1, stat_id=STAT_IDS[i],
                                       flags=C("XLB_EP_LIVE")))
        maps["ep6_map"].put(at, ep6.pack(addr=a16(a)))
    chunk = C("XLB_SLOT_CHUNK")
    slots = list(range(n)) + [0] * (-n % chunk)
    for j in range(0, len(slots), chunk):
        maps["slot_map"].put((SLOT_BASE + j // chunk).to_bytes(4, "little"),
                             ABI.structs["xlb_slots"].codec.pack(ep=tuple(slots[j:j + chunk])))
    sel = {"svc_id": SVC_ID, "algo": C("XLB_ALGO_RR"), "mode": mode, "n_eps": n,
           "n_slots": n, "ep_base": EP_BASE, "slot_base": SLOT_BASE}
    val = ABI.structs["xlb_nat6_val"].codec.pack(
        sel=sel, snat_addr=a16(snat) if snat else bytes(16))
    key = ABI.structs["xlb_nat6_key"].codec.pack(vip=a16(VIP6), port=port, proto=proto)
    maps["nat_v6_map"].put(key, val)


def ct6(node) -> list[dict]:
    """ct_v6_map decoded: (key, value) dicts."""
    kc, vc = ABI.structs["xlb_ct6_key"].codec, ABI.structs["xlb_ct6_val"].codec
    return [(kc.unpack(k), vc.unpack(v)) for k, v in node.dp.maps["ct_v6_map"].items()]


def ntop(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, bytes(b))


@pytest.fixture
def node6(node):
    for m in ("nat_v6_map", "ct_v6_map"):
        node.dp.maps[m].delete_batch([k for k, _ in node.dp.maps[m].items()])
    yield node
    for m in ("nat_v6_map", "ct_v6_map"):
        node.dp.maps[m].delete_batch([k for k, _ in node.dp.maps[m].items()])


def tcp6(src: str, dst: str, sport: int, dport: int, flags: str = "S",
         payload: bytes = b"", seq: int | None = None, ack: int | None = None) -> bytes:
    from_ep = src in (EP6A, EP6B, FAR6)
    if seq is None:
        seq = {"S": C_ISN, "SA": S_ISN}.get(flags, (S_ISN if from_ep else C_ISN) + 1)
    if ack is None:
        ack = 0 if flags == "S" else (C_ISN if from_ep or flags == "SA" else S_ISN) + 1
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=src, dst=dst, hlim=64)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / payload)


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes = b"hello") -> bytes:
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=src, dst=dst)
                 / UDP(sport=sport, dport=dport) / payload)


def l4_ok(pkt: Ether) -> bool:
    """The L4 checksum the datapath left equals scapy's over the pseudo header."""
    fresh = Ether(bytes(pkt))
    l4 = fresh[TCP] if TCP in fresh else fresh[UDP]
    got = l4.chksum
    del l4.chksum
    rebuilt = Ether(bytes(fresh))
    return got == (rebuilt[TCP] if TCP in rebuilt else rebuilt[UDP]).chksum


def stat(node, name: str) -> int:
    return node.global_stats()[name].packets


def handshake(node, sport: int, client: str = CLIENT6, ep: str = EP6A) -> None:
    for pkt in (tcp6(client, VIP6, sport, 80, "S"), tcp6(ep, client, 8080, sport, "SA"),
                tcp6(client, VIP6, sport, 80, "A")):
        verdict, _ = run(node, pkt)
        assert verdict in FORWARDED


# -- DNAT66 ------------------------------------------------------------------------------

def test_syn_is_dnated_and_the_reply_reverse_nated_with_valid_checksums(node6):
    put6(node6, [(EP6A, 8080)])
    verdict, out = run(node6, tcp6(CLIENT6, VIP6, 40000, 80, "S"))
    assert verdict in FORWARDED
    assert (out[IPv6].src, out[IPv6].dst, out[TCP].sport, out[TCP].dport) == \
        (CLIENT6, EP6A, 40000, 8080)
    assert l4_ok(out)
    verdict, out = run(node6, tcp6(EP6A, CLIENT6, 8080, 40000, "SA"))
    assert verdict in FORWARDED
    assert (out[IPv6].src, out[IPv6].dst, out[TCP].sport, out[TCP].dport) == \
        (VIP6, CLIENT6, 80, 40000)
    assert l4_ok(out)


def test_handshake_establishes_both_entries_and_the_fast_path_rewrites(node6):
    put6(node6, [(EP6A, 8080)])
    run(node6, tcp6(CLIENT6, VIP6, 40001, 80, "S"))
    entries = {v["c"]["dir"]: (k, v) for k, v in ct6(node6)}
    assert set(entries) == {ORIG, REPLY}
    k, v = entries[ORIG]
    assert (ntop(k["saddr"]), ntop(k["daddr"]), ntop(v["nat_addr"]), v["c"]["nat_port"]) == \
        (CLIENT6, VIP6, EP6A, 8080)
    k, v = entries[REPLY]
    assert (ntop(k["saddr"]), ntop(k["daddr"]), ntop(v["nat_addr"]), v["c"]["nat_port"]) == \
        (EP6A, CLIENT6, VIP6, 80)
    assert {v["c"]["state"] for _, v in ct6(node6)} == {NEW}
    run(node6, tcp6(EP6A, CLIENT6, 8080, 40001, "SA"))
    assert {v["c"]["state"] for _, v in ct6(node6)} == {REPLIED}
    run(node6, tcp6(CLIENT6, VIP6, 40001, 80, "A"))
    assert {v["c"]["state"] for _, v in ct6(node6)} == {EST}
    slow = stat(node6, "slow_path")
    for pkt, want in ((tcp6(CLIENT6, VIP6, 40001, 80, "PA", b"GET /"), (CLIENT6, EP6A)),
                      (tcp6(EP6A, CLIENT6, 8080, 40001, "PA", b"200 OK"), (VIP6, CLIENT6))):
        verdict, out = run(node6, pkt)
        assert verdict in FORWARDED and (out[IPv6].src, out[IPv6].dst) == want
        assert l4_ok(out) and bytes(out[TCP].payload) == bytes(Ether(pkt)[TCP].payload)
    assert stat(node6, "slow_path") == slow  # both took the fast path


def test_syn_ack_that_acknowledges_nothing_does_not_advance(node6):
    put6(node6, [(EP6A, 8080)])
    run(node6, tcp6(CLIENT6, VIP6, 40002, 80, "S"))
    run(node6, tcp6(EP6A, CLIENT6, 8080, 40002, "SA", ack=77))
    assert {v["c"]["state"] for _, v in ct6(node6)} == {NEW}


def test_udp_both_ways_with_valid_checksums(node6):
    put6(node6, [(EP6A, 5353)], proto=17, port=53)
    verdict, out = run(node6, udp6(CLIENT6, VIP6, 40100, 53, b"query"))
    assert verdict in FORWARDED and (out[IPv6].dst, out[UDP].dport) == (EP6A, 5353)
    assert l4_ok(out) and out[UDP].chksum != 0
    verdict, out = run(node6, udp6(EP6A, CLIENT6, 5353, 40100, b"answer"))
    assert verdict in FORWARDED and (out[IPv6].src, out[UDP].sport) == (VIP6, 53)
    assert l4_ok(out)
    assert {v["c"]["state"] for _, v in ct6(node6)} == {EST}


def test_round_robin_over_two_endpoints(node6):
    put6(node6, [(EP6A, 8080), (EP6B, 8080)])
    got = set()
    for sport in (41000, 41001):
        _, out = run(node6, tcp6(CLIENT6, VIP6, sport, 80, "S"))
        got.add(out[IPv6].dst)
    assert got == {EP6A, EP6B}


def test_packets_of_no_flow_pass_untouched(node6):
    put6(node6, [(EP6A, 8080)])
    ext = bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=CLIENT6, dst=VIP6)
                / IPv6ExtHdrDestOpt() / TCP(sport=40200, dport=80, flags="S"))
    for pkt in (tcp6(CLIENT6, "2001:db8:ff::99", 40200, 80),  # no service
                tcp6(CLIENT6, VIP6, 40200, 81),                 # no service on the port
                tcp6(CLIENT6, VIP6, 40200, 80, "F"),            # FIN opens nothing
                tcp6(EP6A, CLIENT6, 8080, 40200, "SA"),          # a reply of no flow
                ext):                                           # an extension header
        verdict, out = run(node6, pkt)
        assert verdict == TC_ACT_OK and bytes(out) == pkt
    assert ct6(node6) == []
    assert stat(node6, "pass_v6_ext") == 1


def test_malformed_packets_pass_untouched(node6):
    put6(node6, [(EP6A, 8080)], proto=17, port=53)
    good = udp6(CLIENT6, VIP6, 40300, 53)
    zero_csum = good[:54 + 6] + b"\0\0" + good[54 + 8:]   # IPv6 forbids UDP checksum 0
    long_len = good[:18] + (len(good) - 54 + 40).to_bytes(2, "big") + good[20:]
    for pkt in (zero_csum, long_len, good[:60]):
        verdict, out = run(node6, pkt)
        assert verdict == TC_ACT_OK and bytes(out) == pkt
    assert ct6(node6) == []


def test_rst_outside_the_window_is_dropped(node6):
    put6(node6, [(EP6A, 8080)])
    handshake(node6, 40400)
    verdict, _ = run(node6, tcp6(CLIENT6, VIP6, 40400, 80, "R", seq=C_ISN + 5_000_000))
    assert verdict == TC_ACT_SHOT
    assert {v["c"]["state"] for _, v in ct6(node6)} == {EST}
    verdict, _ = run(node6, tcp6(CLIENT6, VIP6, 40400, 80, "R"))
    assert verdict in FORWARDED
    assert {v["c"]["state"] for _, v in ct6(node6)} == {C("XLB_CT_CLOSED")}


def test_a_flow_never_overwrites_another_flows_entry(node6):
    """Two VIPs sharing an endpoint: one client tuple to both would share the REPLY key;
    the second flow is refused, the first keeps its entries."""
    put6(node6, [(EP6A, 8080)])
    key2 = ABI.structs["xlb_nat6_key"].codec.pack(vip=a16("2001:db8:ff::11"), port=80, proto=6)
    node6.dp.maps["nat_v6_map"].put(key2, node6.dp.maps["nat_v6_map"].get(
        ABI.structs["xlb_nat6_key"].codec.pack(vip=a16(VIP6), port=80, proto=6)))
    run(node6, tcp6(CLIENT6, VIP6, 40500, 80, "S"))
    before = sorted(map(repr, ct6(node6)))
    verdict, _ = run(node6, tcp6(CLIENT6, "2001:db8:ff::11", 40500, 80, "S"))
    assert verdict == TC_ACT_SHOT
    assert sorted(map(repr, ct6(node6))) == before
    assert stat(node6, "drop_ct_clash") == 1


# -- full-NAT66 ----------------------------------------------------------------------------

def test_fullnat_rewrites_both_ends_and_back(node6):
    put6(node6, [(EP6A, 8080)], mode=C("XLB_MODE_FULLNAT"), snat=SNAT6)
    verdict, out = run(node6, tcp6(CLIENT6, VIP6, 40600, 80, "S"))
    assert verdict in FORWARDED and l4_ok(out)
    assert (out[IPv6].src, out[IPv6].dst, out[TCP].sport, out[TCP].dport) == \
        (SNAT6, EP6A, 40600, 8080)  # the client's port, in the range, kept
    verdict, out = run(node6, tcp6(EP6A, SNAT6, 8080, 40600, "SA"))
    assert verdict in FORWARDED and l4_ok(out)
    assert (out[IPv6].src, out[IPv6].dst, out[TCP].sport, out[TCP].dport) == \
        (VIP6, CLIENT6, 80, 40600)
    run(node6, tcp6(CLIENT6, VIP6, 40600, 80, "A"))
    verdict, out = run(node6, tcp6(CLIENT6, VIP6, 40600, 80, "PA", b"x"))  # fast path
    assert (out[IPv6].src, out[IPv6].dst) == (SNAT6, EP6A) and l4_ok(out)


def test_fullnat_two_clients_with_one_port_get_distinct_source_ports(node6):
    put6(node6, [(EP6A, 8080)], mode=C("XLB_MODE_FULLNAT"), snat=SNAT6)
    ports = set()
    for client in (CLIENT6, CLIENT6B):
        _, out = run(node6, tcp6(client, VIP6, 40700, 80, "S"))
        assert out[IPv6].src == SNAT6 and l4_ok(out)
        ports.add(out[TCP].sport)
    assert len(ports) == 2
    assert stat(node6, "snat_port_busy") == 1


def test_fullnat_udp(node6):
    put6(node6, [(EP6A, 5353)], proto=17, port=53, mode=C("XLB_MODE_FULLNAT"), snat=SNAT6)
    _, out = run(node6, udp6(CLIENT6, VIP6, 40800, 53))
    assert (out[IPv6].src, out[IPv6].dst) == (SNAT6, EP6A) and l4_ok(out)
    _, back = run(node6, udp6(EP6A, SNAT6, 5353, out[UDP].sport))
    assert (back[IPv6].src, back[IPv6].dst, back[UDP].dport) == (VIP6, CLIENT6, 40800)
    assert l4_ok(back)


# -- DSR ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fib6() -> Iterator[tuple[str, int]]:
    """A namespace with a link (NODE6/64, the endpoint's and a gateway's MACs known) and a
    route to 2001:db8:60::/64 through the gateway; its name and the ingress ifindex."""
    name = f"md-dp6-{uuid.uuid4().hex[:6]}"
    sh = ["ip", "-n", name]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "add", "d6a", "type", "veth", "peer", "name", "d6b"],
                    ["link", "set", "d6a", "up"], ["link", "set", "d6b", "up"],
                    ["link", "set", "lo", "up"],
                    ["-6", "addr", "add", f"{NODE6}/64", "dev", "d6a", "nodad"],
                    ["-6", "addr", "add", "2001:db8::1/64", "dev", "d6b", "nodad"],
                    ["-6", "neigh", "replace", EP6A, "lladdr", EP_MAC, "dev", "d6a",
                     "nud", "permanent"],
                    ["-6", "neigh", "replace", "2001:db8:1::fe", "lladdr", GW_MAC, "dev",
                     "d6a", "nud", "permanent"],
                    ["-6", "route", "add", "2001:db8:60::/64", "via", "2001:db8:1::fe"]):
            subprocess.run([*sh, *cmd], check=True)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.forwarding=1"], check=True)
        link = json.loads(subprocess.run([*sh, "-j", "link", "show", "d6b"], check=True,
                                         capture_output=True, text=True).stdout)
        yield name, link[0]["ifindex"]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_in(node, fib: tuple[str, int], packet: bytes) -> tuple[int, Ether]:
    with inside(fib[0]):
        res = bpfsys.prog_test_run(node.dp.fast_fd, packet, ingress_ifindex=fib[1])
    return res.retval, Ether(res.data)


def test_dsr_l2_rewrites_only_the_macs_and_hop_limit(node6, fib6):
    put6(node6, [(EP6A, 80)], mode=C("XLB_MODE_DSR"))
    for flags, payload in (("S", b""), ("A", b""), ("PA", b"GET /")):
        pkt = tcp6(CLIENT6, VIP6, 42000, 80, flags, payload)
        verdict, out = run_in(node6, fib6, pkt)
        assert verdict == TC_ACT_REDIRECT
        assert out[Ether].dst == EP_MAC
        sent = bytes(out)[14:]
        want = bytearray(pkt[14:])
        want[7] -= 1  # the hop limit
        assert sent == bytes(want)
    ((k, v),) = ct6(node6)  # one entry: replies do not come back
    assert (ntop(k["saddr"]), ntop(v["nat_addr"]), v["c"]["state"]) == (CLIENT6, EP6A, EST)


def test_dsr_endpoint_not_on_link_is_dropped(node6, fib6):
    put6(node6, [(FAR6, 80)], mode=C("XLB_MODE_DSR"))
    verdict, _ = run_in(node6, fib6, tcp6(CLIENT6, VIP6, 42100, 80, "S"))
    assert verdict == TC_ACT_SHOT
    assert stat(node6, "drop_no_route") == 1


@pytest.mark.parametrize("snat", ["", SNAT6])
def test_dsr_ip6ip6_adds_an_outer_header(node6, fib6, snat):
    put6(node6, [(FAR6, 80)], mode=C("XLB_MODE_DSR_IPIP"), snat=snat)
    for flags in ("S", "A"):
        pkt = tcp6(CLIENT6, VIP6, 42200, 80, flags)
        verdict, out = run_in(node6, fib6, pkt)
        assert verdict == TC_ACT_REDIRECT
        frame = bytes(out)
        assert frame[12:14] == b"\x86\xdd" and out[Ether].dst == GW_MAC  # via the gateway
        outer = IPv6(frame[14:54])
        assert (outer.version, outer.nh, outer.plen, outer.hlim) == (6, 41, len(pkt) - 14, 64)
        assert (outer.src, outer.dst) == (snat or NODE6, FAR6)
        assert frame[54:] == pkt[14:]  # the client's packet, untouched


def test_fullnat_without_snat_address_uses_the_nodes_address(node6, fib6):
    put6(node6, [(EP6A, 8080)], mode=C("XLB_MODE_FULLNAT"))
    verdict, out = run_in(node6, fib6, tcp6(CLIENT6, VIP6, 42300, 80, "S"))
    assert verdict in FORWARDED and l4_ok(out)
    assert (out[IPv6].src, out[IPv6].dst) == (NODE6, EP6A)
