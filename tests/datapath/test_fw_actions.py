"""Firewall rules whose action is POLICE or MIRROR, in the loaded datapath
(BPF_PROG_TEST_RUN): a POLICE rule's flow is charged to its policer packet by packet, the
established packets on the fast path included, over-rate ones dropped and counted on the
policer and the rule; a MIRROR rule's flow is copied, byte for byte as it arrived (before
NAT), out of the mirror interface (a veth pair in a namespace of the test's own)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP

from dpd import bpfsys
from dpd.firewall import StaticLinks
from dpd.policers import PolicerSpec
from tests.datapath.packets import CLIENT, EP1, TC_ACT_OK, TC_ACT_SHOT, VIP, udp
from tests.datapath.test_modes import inside
from xlbcore.errors import PreconditionError, ValidationError
from xlbcore.firewall import Action, RuleMatch, RuleProto, RuleSpec
from xlbcore.service import EndpointSpec, Proto, ServiceSpec

pytestmark = pytest.mark.root

IF_A = 7101  # the ingress ifindex the packets are given (no such link needed)
SERVER = "198.18.5.5"


@pytest.fixture
def fwp(node: object) -> Iterator[object]:
    """The node with no rules and no policers, "fw-a" resolving to IF_A."""
    fw, pol = node.firewall, node.policers  # type: ignore[attr-defined]
    saved = fw.links
    fw.links = StaticLinks({"fw-a": IF_A, "lo": 1})
    fw.delete([r.name for r in fw.rules()])
    pol.delete([p.spec.name for p in pol.entries()])
    try:
        yield node
    finally:
        fw.delete([r.name for r in fw.rules()])
        pol.delete([p.spec.name for p in pol.entries()])
        fw.links = saved


def send(node: object, frame: bytes) -> bpfsys.TestRunResult:
    return bpfsys.prog_test_run(node.dp.fast_fd, frame,  # type: ignore[attr-defined]
                                ingress_ifindex=IF_A)


def sized(src: str, dst: str, sport: int, dport: int, length: int) -> bytes:
    base = udp(src, dst, sport, dport, b"")
    return udp(src, dst, sport, dport, b"x" * (length - len(base)))


def police_rule(policer: str, **match: object) -> tuple[str, RuleSpec]:
    return "police-udp", RuleSpec(100, RuleMatch(protocol=RuleProto.UDP, **match),  # type: ignore[arg-type]
                                  Action.POLICE, policer=policer)


def ct_orig(node: object, src: str, dst: str, sport: int, dport: int) -> dict:
    ct = node.conntrack  # type: ignore[attr-defined]
    raw = ct.map.get(ct.key.pack(saddr=socket.inet_aton(src), daddr=socket.inet_aton(dst),
                                 sport=sport, dport=dport, proto=17))
    assert raw is not None
    return ct.val.unpack(raw)


def test_a_police_rule_polices_every_packet_of_its_flow(fwp):
    """8 kbit/s, a 3000-byte burst, 1000-byte datagrams: the flow's first datagram
    (judged) and the next two (established, fast path) conform, the rest are dropped,
    counted on the policer, the rule and drop_policer; the replies are not charged."""
    abi = fwp.dp.abi
    fwp.policers.put([PolicerSpec("slow", 8_000, 3_000)])
    pid = fwp.policers.id_of("slow")
    fwp.firewall.put([police_rule("slow", src=f"{CLIENT}/32")])
    out = sized(CLIENT, SERVER, 4000, 9000, 1000)
    back = sized(SERVER, CLIENT, 9000, 4000, 1000)
    verdicts = [send(fwp, out).retval]
    verdicts += [send(fwp, back).retval for _ in range(3)]  # replies: never charged
    verdicts += [send(fwp, out).retval for _ in range(4)]
    assert verdicts == [TC_ACT_OK] * 6 + [TC_ACT_SHOT] * 2
    v = ct_orig(fwp, CLIENT, SERVER, 4000, 9000)
    assert v["flags"] & abi.const("XLB_CTF_POLICE") and v["fw_arg"] == pid
    [p] = fwp.policers.entries()
    assert (p.passed.packets, p.passed.bytes) == (3, 3000)
    assert (p.dropped.packets, p.dropped.bytes) == (2, 2000)
    assert dict((n, c.packets) for n, c in fwp.firewall.stats()) == {"police-udp": 3}
    assert fwp.global_stats()["drop_policer"].packets == 2


def test_a_police_rule_polices_a_service_flow_and_drops_before_nat(fwp):
    fwp.put_services([ServiceSpec(VIP, 53, Proto.UDP, endpoints=(EndpointSpec(EP1, 5353),))])
    fwp.policers.put([PolicerSpec("svc", 8_000, 2_000)])
    fwp.firewall.put([police_rule("svc", dst=f"{VIP}/32")])
    pkt = sized(CLIENT, VIP, 4001, 53, 1000)
    first, second, third = (send(fwp, pkt) for _ in range(3))
    for r in (first, second):  # NATed to the endpoint
        assert r.retval == TC_ACT_OK
        assert IP(r.data[14:]).dst == EP1 and IP(r.data[14:])[UDP].dport == 5353
    assert third.retval == TC_ACT_SHOT
    assert ct_orig(fwp, CLIENT, VIP, 4001, 53)["flags"] & fwp.dp.abi.const("XLB_CTF_POLICE")
    [p] = fwp.policers.entries()
    assert (p.passed.packets, p.dropped.packets) == (2, 1)


def test_unknown_policer_and_mirror_interface_are_refused_and_nothing_changes(fwp):
    fwp.firewall.put([("keep", RuleSpec(1, RuleMatch(), Action.ALLOW))])
    before = fwp.firewall.rules()
    with pytest.raises(ValidationError, match=r"rules\[0\]\.spec\.policer: no policer 'nope'"):
        fwp.firewall.put([police_rule("nope")])
    with pytest.raises(ValidationError, match=r"rules\[1\]\.spec\.mirror_interface: no "
                                              r"interface 'veth-nope'"):
        fwp.firewall.put([("a", RuleSpec(5, RuleMatch(), Action.ALLOW)),
                          ("m", RuleSpec(5, RuleMatch(), Action.MIRROR,
                                         mirror_interface="veth-nope"))])
    assert fwp.firewall.rules() == before


def test_a_policer_a_rule_charges_is_not_deleted(fwp):
    fwp.policers.put([PolicerSpec("used", 8_000, 3_000)])
    fwp.firewall.put([police_rule("used")])
    with pytest.raises(PreconditionError, match="'used' is charged by firewall rule "
                                                "'police-udp'"):
        fwp.policers.delete(["used"])
    assert [p.spec.name for p in fwp.policers.entries()] == ["used"]
    fwp.firewall.delete(["police-udp"])
    assert fwp.policers.delete(["used"]) == 1


@contextlib.contextmanager
def mirror_ns() -> Iterator[tuple[str, int, str]]:
    """A namespace of the test's own with a veth pair (fam0 <-> fam1, both up): yields its
    name, fam0's ifindex (where the copies go) and fam1's name (where they arrive)."""
    name = f"fa-dp-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # no IPv6 on the pair: nothing but the copies crosses it (no MLD, no DAD)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        for cmd in (["link", "add", "fam0", "type", "veth", "peer", "name", "fam1"],
                    ["link", "set", "fam0", "up"], ["link", "set", "fam1", "up"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        link = json.loads(subprocess.run(["ip", "-n", name, "-j", "link", "show", "fam0"],
                                         check=True, capture_output=True, text=True).stdout)
        yield name, link[0]["ifindex"], "fam1"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_mirror_rule_copies_every_packet_of_its_flow_as_it_arrived(fwp):
    """Each datagram of a flow to a service (judged, then established) leaves fam0 as a
    copy identical to the frame that came in (before NAT), while the packet itself is
    NATed on; replies are not copied."""
    fwp.put_services([ServiceSpec(VIP, 53, Proto.UDP, endpoints=(EndpointSpec(EP1, 5353),))])
    with mirror_ns() as (ns, ifindex, peer), inside(ns):
        fwp.firewall.links = StaticLinks({"fw-a": IF_A, "fam0": ifindex})
        fwp.firewall.put([("tap", RuleSpec(100, RuleMatch(dst=f"{VIP}/32"), Action.MIRROR,
                                           mirror_interface="fam0"))])
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        cap.bind((peer, 0))
        cap.settimeout(1.0)
        frames = [udp(CLIENT, VIP, 4002, 53, f"datagram {i}".encode()) for i in range(3)]
        results = [send(fwp, f) for f in frames]
        reply = send(fwp, udp(EP1, CLIENT, 5353, 4002, b"answer"))
        seen = []
        with contextlib.suppress(TimeoutError):
            while len(seen) < 10:
                frame = cap.recv(65535)
                if frame[12:14] == b"\x08\x00":  # IPv4 only
                    seen.append(frame)
        cap.close()
    assert [r.retval for r in results] == [TC_ACT_OK] * 3 and reply.retval == TC_ACT_OK
    assert all(IP(r.data[14:]).dst == EP1 for r in results)  # the packets went on NATed
    assert seen == frames  # the copies: byte for byte as they came, no reply among them
    stats = fwp.global_stats()
    assert (stats["mirrored"].packets, stats["mirror_fail"].packets) == (3, 0)
    assert dict((n, c.packets) for n, c in fwp.firewall.stats()) == {"tap": 3}
    v = ct_orig(fwp, CLIENT, VIP, 4002, 53)
    assert v["flags"] & fwp.dp.abi.const("XLB_CTF_MIRROR") and v["fw_arg"] == ifindex
