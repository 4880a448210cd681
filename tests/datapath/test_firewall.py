"""The firewall in the loaded datapath (BPF_PROG_TEST_RUN): priorities between
overlapping rules, port ranges, default policy per interface, IPv4 and IPv6, stage and
swap, counters, pass flows in conntrack, and the kernel's verdict against dpd's model
(dpd/firewall.py) on random rule sets and packets."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.layers.l2 import Ether

from dpd import bpfsys
from dpd.firewall import Packet, Policy, StaticLinks
from tests.datapath.packets import (
    CLIENT,
    EP1,
    MAC_C,
    MAC_L,
    SCTP_COOKIE_ECHO,
    SCTP_DATA,
    SCTP_INIT_ACK,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    VIP,
    crc32c,
    sctp,
    sctp_chunk,
    sctp_init,
    tcp,
    udp,
)
from xlbcore.errors import Exhausted
from xlbcore.firewall import Action, PortRange, RuleMatch, RuleProto, RuleSpec
from xlbcore.service import EndpointSpec, Proto, ServiceSpec

IF_A, IF_B = 7001, 7002  # ingress ifindexes the tests give packets (no such links needed)
LINKS = {"fw-a": IF_A, "fw-b": IF_B, "lo": 1}
SERVER = "198.18.5.5"


@pytest.fixture
def fw(node: object) -> Iterator[object]:
    """The node with an empty rule set, every interface policy back to allow, and
    interface names resolved to the test's ifindexes."""
    table = node.firewall  # type: ignore[attr-defined]
    saved = table.links
    table.links = StaticLinks(LINKS)
    table.delete([r.name for r in table.rules()])
    for name in ("fw-a", "fw-b"):
        table.set_interface(name, "", Policy.ALLOW)
    try:
        yield node
    finally:
        table.delete([r.name for r in table.rules()])
        for name in ("fw-a", "fw-b"):
            table.set_interface(name, "", Policy.ALLOW)
        table.links = saved


def send(node: object, frame: bytes, ifindex: int = IF_A) -> int:
    return bpfsys.prog_test_run(node.dp.fast_fd, frame,  # type: ignore[attr-defined]
                                ingress_ifindex=ifindex).retval


def rule(name: str, priority: int = 100, action: Action = Action.DROP, redirect: str = "",
         **match: object) -> tuple[str, RuleSpec]:
    return name, RuleSpec(priority, RuleMatch(**match), action, redirect)  # type: ignore[arg-type]


def stat(node: object, name: str) -> int:
    return node.global_stats()[name].packets  # type: ignore[attr-defined]


def rule_packets(node: object) -> dict[str, int]:
    return {n: c.packets for n, c in node.firewall.stats()}  # type: ignore[attr-defined]


def tcp6(src: str, dst: str, sport: int, dport: int, flags: str = "S") -> bytes:
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, flags=flags))


def ping(src: str, dst: str) -> bytes:
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=src, dst=dst) / ICMP())


def test_off_costs_nothing_and_tracks_nothing(fw):
    assert send(fw, udp(CLIENT, SERVER, 5000, 53)) == TC_ACT_OK
    assert send(fw, tcp(CLIENT, SERVER, 5000, 22)) == TC_ACT_OK
    assert stat(fw, "fw_eval") == 0 and fw.conntrack.count() == 0
    assert stat(fw, "pass") == 2


def drops(node: object, ifindex: int) -> dict[str, int]:
    return node.firewall.interface_drops(ifindex)  # type: ignore[attr-defined]


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_priority_decides_between_overlapping_rules(fw):
    before = drops(fw, IF_A)
    fw.firewall.put([rule("allow-one", 200, Action.ALLOW, src="198.18.0.2/32"),
                     rule("drop-net", 100, src="198.18.0.0/24"),
                     rule("allow-net-tie", 100, Action.ALLOW, src="198.18.0.3/32")])
    assert send(fw, udp(CLIENT, SERVER, 5000, 53)) == TC_ACT_OK
    assert send(fw, udp("198.18.0.9", SERVER, 5000, 53)) == TC_ACT_SHOT
    # equal priority: the name that sorts first ("allow-net-tie" < "drop-net")
    assert send(fw, udp("198.18.0.3", SERVER, 5000, 53)) == TC_ACT_OK
    assert send(fw, udp("198.18.9.9", SERVER, 5000, 53)) == TC_ACT_OK  # no rule: allow
    assert rule_packets(fw) == {"allow-one": 1, "allow-net-tie": 1, "drop-net": 1}
    assert stat(fw, "drop_firewall") == 1 and stat(fw, "fw_eval") == 4
    assert delta(drops(fw, IF_A), before) == {"drop_firewall": 1}


@pytest.mark.parametrize("dport,verdict", [
    (999, TC_ACT_OK), (1000, TC_ACT_SHOT), (1500, TC_ACT_SHOT), (2000, TC_ACT_SHOT),
    (2001, TC_ACT_OK)])
def test_port_ranges(fw, dport, verdict):
    fw.firewall.put([rule("r", protocol=RuleProto.TCP, dst_ports=PortRange(1000, 2000),
                          src_ports=PortRange(1024, 65535))])
    assert send(fw, tcp(CLIENT, SERVER, 40000, dport)) == verdict
    assert send(fw, tcp(CLIENT, SERVER, 1023, dport)) == TC_ACT_OK  # source port outside
    assert send(fw, udp(CLIENT, SERVER, 40000, dport)) == TC_ACT_OK  # not TCP


def test_default_policy_per_interface(fw):
    before_a, before_b = drops(fw, IF_A), drops(fw, IF_B)
    fw.firewall.set_interface("fw-a", "outside", Policy.DROP)
    assert send(fw, udp(CLIENT, SERVER, 5000, 53), IF_A) == TC_ACT_SHOT
    assert send(fw, udp(CLIENT, SERVER, 5000, 53), IF_B) == TC_ACT_OK
    fw.firewall.put([rule("dns", 10, Action.ALLOW, protocol=RuleProto.UDP,
                          dst_ports=PortRange(53, 53), in_interface="fw-a")])
    assert send(fw, udp(CLIENT, SERVER, 5001, 53), IF_A) == TC_ACT_OK
    assert send(fw, udp(CLIENT, SERVER, 5001, 54), IF_A) == TC_ACT_SHOT
    assert stat(fw, "drop_default_policy") == 2
    assert delta(drops(fw, IF_A), before_a) == {"drop_default_policy": 2}
    assert delta(drops(fw, IF_B), before_b) == {}


def test_ipv6_rules_and_neighbour_discovery(fw):
    fw.firewall.put([rule("v6-drop", 10, src="2001:db8:1::/48"),
                     rule("v6-web", 20, Action.ALLOW, src="2001:db8:1::7/128",
                          protocol=RuleProto.TCP, dst_ports=PortRange(80, 80))])
    assert send(fw, tcp6("2001:db8:1::5", "2001:db8:2::1", 4000, 80)) == TC_ACT_SHOT
    assert send(fw, tcp6("2001:db8:1::7", "2001:db8:2::1", 4000, 80)) == TC_ACT_OK
    assert send(fw, tcp6("2001:db8:1::7", "2001:db8:2::1", 4000, 81)) == TC_ACT_SHOT
    assert send(fw, tcp6("2001:db8:3::7", "2001:db8:2::1", 4000, 81)) == TC_ACT_OK
    # an IPv4 source whose bits begin like 2001:db8:1:: is not in the v6 prefix
    assert send(fw, udp("32.1.13.184", SERVER, 1, 2)) == TC_ACT_OK
    fw.flush_conntrack()
    # neighbour discovery passes even where the policy drops everything
    fw.firewall.set_interface("fw-a", "", Policy.DROP)
    ns = bytes(Ether(src=MAC_C, dst=MAC_L) / IPv6(src="2001:db8:3::1", dst="ff02::1:ff00:1")
               / ICMPv6ND_NS(tgt="2001:db8:3::2"))
    assert send(fw, ns) == TC_ACT_OK
    assert send(fw, tcp6("2001:db8:3::7", "2001:db8:2::1", 4000, 81)) == TC_ACT_SHOT
    assert fw.conntrack.count() == 0  # no IPv6 conntrack: judged per packet


def test_stage_and_swap_replaces_the_whole_set(fw):
    fw.firewall.put([rule("a", src="198.18.0.0/24")])
    assert send(fw, udp(CLIENT, SERVER, 5000, 53)) == TC_ACT_SHOT
    gen = fw.firewall._gen
    fw.firewall.put([rule("a", 100, Action.ALLOW, src="198.18.0.0/24"),
                     rule("b", 200, dst=SERVER + "/32")])
    assert fw.firewall._gen == gen ^ 1
    keys = [k for k, _ in fw.firewall.acl.items()]
    assert {int.from_bytes(k[:2], "little") // 64 for k in keys} == {gen ^ 1}
    assert send(fw, udp(CLIENT, SERVER, 5001, 53)) == TC_ACT_SHOT  # "b" has priority
    fw.firewall.delete(["b"])
    assert send(fw, udp(CLIENT, SERVER, 5002, 53)) == TC_ACT_OK
    fw.firewall.delete(["a"])
    assert fw.firewall.acl.count() == 0
    before = stat(fw, "fw_eval")
    assert send(fw, udp(CLIENT, SERVER, 5003, 53)) == TC_ACT_OK
    assert stat(fw, "fw_eval") == before  # off again


def test_allowed_flows_are_tracked_and_not_judged_again(fw):
    fw.firewall.put([rule("other", src="203.0.113.0/24")])  # the firewall is on
    assert send(fw, tcp(CLIENT, SERVER, 40000, 22, "S")) == TC_ACT_OK
    assert stat(fw, "fw_pass_flow") == 1 and fw.conntrack.count() == 2
    assert send(fw, tcp(SERVER, CLIENT, 22, 40000, "SA", seq=5000, ack=1001), IF_B) == TC_ACT_OK
    assert send(fw, tcp(CLIENT, SERVER, 40000, 22, "A", seq=1001, ack=5001)) == TC_ACT_OK
    states = {(e.src, e.state) for e in fw.list_conntrack()}
    assert states == {(CLIENT, 3), (SERVER, 3)} and all(
        e.service is None for e in fw.list_conntrack())
    # a new rule that drops the flow: without flush it goes on (fast path, unjudged)
    fw.firewall.put([rule("no-ssh", dst=SERVER, protocol=RuleProto.TCP,
                          dst_ports=PortRange(22, 22))])
    evals = stat(fw, "fw_eval")
    for _ in range(3):
        assert send(fw, tcp(CLIENT, SERVER, 40000, 22, "PA", b"x", seq=1001, ack=5001)) == \
            TC_ACT_OK
        assert send(fw, tcp(SERVER, CLIENT, 22, 40000, "PA", b"y", seq=5001, ack=1002),
                    IF_B) == TC_ACT_OK
    assert stat(fw, "fw_eval") == evals
    assert send(fw, tcp(CLIENT, SERVER, 40001, 22, "S")) == TC_ACT_SHOT  # a new flow is
    # flush_existing ends it: its next packet is judged, and dropped
    assert fw.firewall.flush_flows(fw.conntrack) == 1 and fw.conntrack.count() == 0
    assert send(fw, tcp(CLIENT, SERVER, 40000, 22, "PA", b"x", seq=1002, ack=5002)) == \
        TC_ACT_SHOT


def test_vip_flows_are_judged_then_balanced_with_their_interface_recorded(fw):
    fw.put_services([ServiceSpec(VIP, 80, Proto.TCP, endpoints=(EndpointSpec(EP1, 8080),))])
    fw.firewall.put([rule("allow-one", 200, Action.ALLOW, src=CLIENT + "/32"),
                     rule("no-web", 100, dst=VIP, protocol=RuleProto.TCP)])
    assert send(fw, tcp("198.18.0.9", VIP, 40000, 80, "S")) == TC_ACT_SHOT
    assert send(fw, tcp(CLIENT, VIP, 40000, 80, "S"), IF_B) == TC_ACT_OK  # NATed, to stack
    orig = fw.conntrack.val.unpack(next(v for k, v in fw.conntrack.map.items()
                                        if fw.conntrack.val.unpack(v)["dir"] == 1))
    assert orig["in_ifindex"] == IF_B and not orig["flags"] & 8
    assert stat(fw, "new_flow") == 1 and stat(fw, "fw_pass_flow") == 0


def test_a_flow_sharing_a_vip_flows_reply_key_is_refused_not_passed_to_be_mistranslated(fw):
    """The client's port in a UDP flow through the VIP to EP1:8080, then the same port
    straight to EP1:8080: EP1 could not tell the two apart (DNAT keeps the client's
    port), so the direct flow is refused as a clashing service flow is; passed untracked,
    EP1's answer to it would be rewritten to come from the VIP."""
    fw.put_services([ServiceSpec(VIP, 53, Proto.UDP, endpoints=(EndpointSpec(EP1, 8080),))])
    fw.firewall.put([rule("other", src="203.0.113.0/24")])  # the firewall is on
    assert send(fw, udp(CLIENT, VIP, 40000, 53)) == TC_ACT_OK
    assert send(fw, udp(EP1, CLIENT, 8080, 40000), IF_B) == TC_ACT_OK  # established
    clashes, flows = stat(fw, "drop_ct_clash"), fw.conntrack.count()
    assert send(fw, udp(CLIENT, EP1, 40000, 8080)) == TC_ACT_SHOT
    assert stat(fw, "drop_ct_clash") == clashes + 1 and stat(fw, "fw_pass_flow") == 0
    assert fw.conntrack.count() == flows
    # the VIP flow goes on: EP1's answers still come back from the VIP
    out = bpfsys.prog_test_run(fw.dp.fast_fd, udp(EP1, CLIENT, 8080, 40000),
                               ingress_ifindex=IF_B)
    reply = Ether(out.data)
    assert (reply[IP].src, reply[UDP].sport) == (VIP, 53)
    # another client port straight to EP1 is a flow of its own, tracked
    assert send(fw, udp(CLIENT, EP1, 40001, 8080)) == TC_ACT_OK
    assert stat(fw, "fw_pass_flow") == 1


def test_icmp_is_judged_by_protocol_and_errors_of_a_flow_pass(fw):
    fw.firewall.put([rule("no-icmp", protocol=RuleProto.ICMP)])
    assert send(fw, ping(CLIENT, SERVER)) == TC_ACT_SHOT
    assert send(fw, udp(CLIENT, SERVER, 5000, 53)) == TC_ACT_OK  # tracked pass flow
    quote = IP(src=CLIENT, dst=SERVER) / UDP(sport=5000, dport=53)
    err = bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=SERVER, dst=CLIENT)
                / ICMP(type=3, code=3) / bytes(quote)[:28])
    assert send(fw, err, IF_B) == TC_ACT_OK
    unrelated = bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=SERVER, dst=CLIENT)
                      / ICMP(type=3, code=3) / bytes(IP(src=CLIENT, dst=SERVER)
                                                     / UDP(sport=6000, dport=53))[:28])
    assert send(fw, unrelated, IF_B) == TC_ACT_SHOT


def test_later_fragments_follow_the_flow_or_are_judged_by_addresses(fw):
    fw.firewall.put([rule("no-server", dst=SERVER + "/32", protocol=RuleProto.UDP,
                          dst_ports=PortRange(9, 9)),
                     rule("no-other", dst="198.18.6.6/32")])
    big = IP(src=CLIENT, dst="198.18.7.7", id=77) / UDP(sport=5000, dport=53) / (b"x" * 3000)
    frags = [bytes(Ether(src=MAC_C, dst=MAC_L) / f) for f in fragment(big, 1000)]
    assert [send(fw, f) for f in frags] == [TC_ACT_OK] * len(frags)
    lone = IP(src=CLIENT, dst="198.18.6.6", id=78, frag=100, proto=17) / (b"y" * 100)
    assert send(fw, bytes(Ether(src=MAC_C, dst=MAC_L) / lone)) == TC_ACT_SHOT


def test_sctp_rules_match_port_ranges_and_only_an_init_opens_a_pass_flow(fw):
    """A DROP rule on SCTP to ports 38400-38499 (and nothing else: TCP and UDP to the
    same port, SCTP to the next port are not its); an allowed INIT opens a pass flow whose
    INIT ACK and DATA take the fast path unjudged; a DATA or COOKIE ECHO of no flow is
    judged alone and opens nothing."""
    fw.firewall.put([rule("no-ngap", protocol=RuleProto.SCTP, dst_ports=PortRange(38400, 38499)),
                     rule("other", src="203.0.113.0/24")])
    init = sctp_init(0x11112222)
    for port in (38400, 38412, 38499):
        assert send(fw, sctp(CLIENT, SERVER, 5000, port, init)) == TC_ACT_SHOT, port
    assert rule_packets(fw)["no-ngap"] == 3 and fw.conntrack.count() == 0
    assert send(fw, tcp(CLIENT, SERVER, 5000, 38412)) == TC_ACT_OK
    assert send(fw, udp(CLIENT, SERVER, 5000, 38412)) == TC_ACT_OK
    fw.flush_conntrack()
    passed = stat(fw, "fw_pass_flow")
    lone = sctp_chunk(SCTP_DATA, struct.pack("!IHHI", 1, 0, 0, 46) + b"data", flags=3)
    assert send(fw, sctp(CLIENT, SERVER, 5000, 38500, lone, vtag=7)) == TC_ACT_OK
    echo = sctp_chunk(SCTP_COOKIE_ECHO, b"cookie!!")
    assert send(fw, sctp(CLIENT, SERVER, 5000, 38500, echo, vtag=7)) == TC_ACT_OK
    assert fw.conntrack.count() == 0 and stat(fw, "fw_pass_flow") == passed
    assert stat(fw, "fw_eval") == 3 + 2 + 2
    assert send(fw, sctp(CLIENT, SERVER, 5000, 38500, init)) == TC_ACT_OK
    assert stat(fw, "fw_pass_flow") == passed + 1 and fw.conntrack.count() == 2
    ack = sctp_chunk(SCTP_INIT_ACK, struct.pack("!IIHHI", 0x33334444, 65536, 10, 10, 1))
    assert send(fw, sctp(SERVER, CLIENT, 38500, 5000, ack, vtag=0x11112222), IF_B) == TC_ACT_OK
    assert {e.state for e in fw.list_conntrack()} == {3}
    evals = stat(fw, "fw_eval")
    assert send(fw, sctp(CLIENT, SERVER, 5000, 38500, lone, vtag=0x33334444)) == TC_ACT_OK
    assert send(fw, sctp(SERVER, CLIENT, 38500, 5000, lone, vtag=0x11112222), IF_B) == TC_ACT_OK
    assert stat(fw, "fw_eval") == evals and fw.conntrack.count() == 2
    # IPv6: judged per packet by its ports too
    v6 = IPv6(src="2001:db8::1", dst="2001:db8::2", nh=132)
    assert send(fw, bytes(Ether(src=MAC_C, dst=MAC_L) / v6 / sctp_l4(5000, 38412, init))) == \
        TC_ACT_SHOT
    assert send(fw, bytes(Ether(src=MAC_C, dst=MAC_L) / v6 / sctp_l4(5000, 38500, init))) == \
        TC_ACT_OK


def test_redirect_sends_the_packet_out_of_the_interface(fw):
    fw.firewall.put([rule("mirror", 5, Action.REDIRECT, redirect="lo", dst=SERVER)])
    assert send(fw, udp(CLIENT, SERVER, 5000, 53)) == TC_ACT_REDIRECT
    assert stat(fw, "fw_redirect") == 1 and fw.conntrack.count() == 0


# -- the kernel against the model -------------------------------------------------------

PREFIXES = ["198.18.0.0/15", "198.18.0.0/16", "198.18.1.0/24", "198.18.1.128/25",
            "198.18.1.7/32", "198.19.0.0/16", "0.0.0.0/0", "", "", ""]
PREFIXES6 = ["2001:db8::/32", "2001:db8:1::/48", "2001:db8::1/128", ""]
RANGES = [None, PortRange(80, 80), PortRange(1000, 2000), PortRange(1024, 65535),
          PortRange(22, 23)]


@st.composite
def rule_set(draw: st.DrawFn) -> list[tuple[str, RuleSpec]]:
    out = []
    for i in range(draw(st.integers(0, 12))):
        v6 = draw(st.integers(0, 3)) == 0
        pool = PREFIXES6 if v6 else PREFIXES
        proto = draw(st.sampled_from([RuleProto.ANY, RuleProto.TCP, RuleProto.UDP,
                                      RuleProto.SCTP,
                                      RuleProto.ICMPV6 if v6 else RuleProto.ICMP]))
        ports = proto in (RuleProto.TCP, RuleProto.UDP, RuleProto.SCTP)
        action = draw(st.sampled_from([Action.ALLOW, Action.DROP, Action.DROP,
                                       Action.REDIRECT]))
        match = RuleMatch(draw(st.sampled_from(pool)), draw(st.sampled_from(pool)), proto,
                          draw(st.sampled_from(RANGES[:3])) if ports else None,
                          draw(st.sampled_from(RANGES)) if ports else None,
                          draw(st.sampled_from(["", "", "fw-a", "fw-b"])))
        out.append((f"r{i}", RuleSpec(draw(st.integers(0, 3)), match, action,
                                      "lo" if action is Action.REDIRECT else "")))
    return out


ADDRS = ["198.18.1.7", "198.18.1.200", "198.18.0.9", "198.19.3.3", "203.0.113.1"]
ADDRS6 = ["2001:db8::1", "2001:db8:1::5", "2001:db9::1"]


def sctp_l4(sport: int, dport: int, chunks: bytes) -> bytes:
    """An SCTP packet (verification tag 0, CRC32c right) as an IP payload."""
    common = struct.pack("!HHI", sport, dport, 0)
    return common + struct.pack("<I", crc32c(common + b"\0\0\0\0" + chunks)) + chunks


def frame_of(pkt: tuple[str, str, str, int, int]) -> bytes:
    kind, src, dst, sport, dport = pkt
    if kind == "sctp":  # an INIT: IPv4 opens a pass flow by it, IPv6 is judged per packet
        l3 = IPv6(src=src, dst=dst, nh=132) if ":" in src else IP(src=src, dst=dst, proto=132)
        return bytes(Ether(src=MAC_C, dst=MAC_L) / l3 / sctp_l4(sport, dport, sctp_init()))
    l3 = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    l4 = {"tcp": TCP(sport=sport, dport=dport, flags="S"), "udp": UDP(sport=sport, dport=dport),
          "icmp": ICMP()}[kind]
    return bytes(Ether(src=MAC_C, dst=MAC_L) / l3 / l4)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rule_set(), st.sampled_from([None, "fw-a", "fw-b"]), st.integers(0, 2**32))
def test_kernel_verdicts_match_the_model(fw, rules, drop_intf, seed):
    table = fw.firewall
    table.delete([r.name for r in table.rules()])
    for name in ("fw-a", "fw-b"):
        table.set_interface(name, "", Policy.DROP if name == drop_intf else Policy.ALLOW)
    try:
        table.put(rules)
    except Exhausted:  # more lookup shapes than the datapath holds: not this test's case
        assume(False)
    rng = random.Random(seed)
    want_of = {Action.DROP: TC_ACT_SHOT, Action.REDIRECT: TC_ACT_REDIRECT,
               Action.ALLOW: TC_ACT_OK}
    for _ in range(25):
        v6 = rng.random() < 0.3
        pool = ADDRS6 if v6 else ADDRS
        kind = rng.choice(["tcp", "udp", "sctp"] if v6 else ["tcp", "udp", "sctp", "icmp"])
        ports = (rng.choice([22, 80, 1023, 1500, 40000]), rng.choice([22, 23, 80, 999, 1000,
                                                                       2000, 65535]))
        if kind == "icmp":
            ports = (0, 0)
        pkt = (kind, rng.choice(pool), rng.choice(pool), *ports)
        ifindex = rng.choice([IF_A, IF_B])
        proto = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1}[kind]
        model = table.judge(Packet.of(pkt[1], pkt[2], proto, pkt[3], pkt[4], ifindex))
        got = send(fw, frame_of(pkt), ifindex)
        fw.flush_conntrack()  # every packet a new flow
        assert got == want_of[model.action], (pkt, ifindex, model)


def test_other_drops_are_counted_for_the_interface_too(fw):
    before = drops(fw, IF_B)
    fw.put_services([ServiceSpec(VIP, 80, Proto.TCP,
                                 endpoints=(EndpointSpec(EP1, 8080, weight=0),))])
    assert send(fw, tcp(CLIENT, VIP, 40000, 80, "S"), IF_B) == TC_ACT_SHOT
    assert delta(drops(fw, IF_B), before) == {"drop_no_endpoint": 1}


SENDER = """
import json, os, sys
from dpd import bpfsys
prog, frames_path, ifindex, stop, ready = sys.argv[1:]
fd = bpfsys.obj_get(prog)
data = open(frames_path, "rb").read()
size = int.from_bytes(data[:4], "little")
frames = [data[4 + i:4 + i + size] for i in range(0, len(data) - 4, size)]
counts = {}
while not os.path.exists(stop):
    for f in frames:
        rv = bpfsys.prog_test_run(fd, f, ingress_ifindex=int(ifindex)).retval
        counts[rv] = counts.get(rv, 0) + 1
    if not os.path.exists(ready):
        open(ready, "w").close()
print(json.dumps(counts))
"""


def test_no_packet_sees_a_mixture_of_two_sets_while_they_are_swapped(fw, tmp_path):
    """Both sets drop the packet, through different rules in different tuples; a mixture
    (x of one set, y of the other) would allow it. Swapped back and forth while another
    process sends the packet through the pinned program as fast as it can."""
    import subprocess
    import sys
    import time

    def pair(x_drops: bool) -> list[tuple[str, RuleSpec]]:
        x = rule("x", 100 if x_drops else 50, Action.DROP if x_drops else Action.ALLOW,
                 src="198.18.0.0/24")
        y = rule("y", 50 if x_drops else 100, Action.ALLOW if x_drops else Action.DROP,
                 dst=SERVER + "/32")
        return [x, y]

    fw.firewall.put(pair(True))
    frames = [udp(CLIENT, SERVER, 1024 + i, 53) for i in range(2000)]
    (tmp_path / "frames").write_bytes(len(frames[0]).to_bytes(4, "little") + b"".join(frames))
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", SENDER, fw.dp.pin("tc_packet_func"), str(tmp_path / "frames"),
         str(IF_A), str(stop), str(ready)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(100):
            fw.firewall.put(pair(i % 2 == 1))
    finally:
        stop.touch()
        out, _ = proc.communicate(timeout=30)
    counts = {int(k): v for k, v in json.loads(out).items()}
    assert sum(counts.values()) > 2000
    assert counts == {TC_ACT_SHOT: sum(counts.values())}


def test_a_restarted_dpd_reads_the_rules_back_from_the_kernel_maps(fw):
    from dpd.firewall import FirewallTable

    put = [rule("web", 10, Action.ALLOW, src="0.0.0.0/0", dst=VIP + "/32",
                protocol=RuleProto.TCP, dst_ports=PortRange(80, 80), in_interface="fw-a"),
           rule("v6", 5, src="2001:db8::/32"),
           rule("scrub", 1, Action.REDIRECT, redirect="lo", protocol=RuleProto.ICMP)]
    fw.firewall.put(put)
    fw.firewall.set_interface("fw-b", "dmz", Policy.DROP)
    assert send(fw, udp(CLIENT, SERVER, 5000, 53), IF_B) == TC_ACT_SHOT
    acl = sorted(fw.firewall.acl.items())
    again = FirewallTable(fw.dp, StaticLinks(LINKS))  # what a restarted dpd builds
    assert {r.name: r.spec for r in again.rules()} == dict(put)
    assert again._gen == fw.firewall._gen and sorted(again.acl.items()) == acl
    c = again.interface(IF_B)
    assert c is not None and (c.zone, c.policy) == ("dmz", Policy.DROP) and again.policy_drop
    assert again.judge(Packet.of(CLIENT, SERVER, 17, 5000, 53, IF_B)).drops
