"""Firewall rules whose action is POLICE or MIRROR on a real node: client, lb and one
backend namespace (named fa*), dpd attached to the lb's interfaces. A UDP stream at twice
a POLICE rule's rate delivers the rate within 10 % (the stream's packets after the first
are charged on the fast path); a MIRROR rule's copies, captured on a veth in another
namespace, are the client's frames byte for byte; the docs' grpcurl examples work."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import CLIENT, Lab, doc_grpcurl_commands, open_lab
from tests.e2e.test_policers import UDP_SEND, _sink
from tests.e2e.test_xdp import CAPTURE, SEND
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

RATE = 8_000_000  # bits/s


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(prefix="fa", backends=1, servers=False) as lab:
        yield lab


def _rule(name: str, **spec: object) -> pb.FirewallRule:
    return pb.FirewallRule(name=name, spec=tpb.FirewallRuleSpec(priority=100, **spec))  # type: ignore[arg-type]


def test_a_udp_stream_through_a_police_rule_delivers_the_rate(lab):
    from lab import netns

    topo = lab.topo
    lab.stub.PutPolicers(pb.PutPolicersRequest(policers=[pb.Policer(
        name="udp-8m", rate_bps=RATE, burst_bytes=15_000)]), timeout=10)
    lab.stub.PutFirewallRules(pb.PutFirewallRulesRequest(rules=[_rule(
        "police-udp", action=tpb.FIREWALL_ACTION_POLICE, policer="udp-8m",
        match=tpb.FirewallMatch(protocol=tpb.PROTOCOL_UDP, dst=topo.backend_ips[0],
                                dst_ports=tpb.PortRange(first=9000, last=9000)))]), timeout=10)
    seconds, size = 3.0, 1000
    sink = _sink(lab, "udp", 9000, seconds + 2)
    sent = int(topo.run(topo.client_ns, [sys.executable, "-c", UDP_SEND, topo.backend_ips[0],
                                         "9000", str(2 * RATE), str(seconds), str(size)],
                        env=netns.python_env()).stdout.split()[-1])
    out, _ = sink.communicate(timeout=30)
    marks = json.loads(out.strip().splitlines()[-1])
    got = marks[-1][2]  # datagrams delivered
    delivered = got * (size + 42 + 14) * 8 / seconds  # as the policer counts: the frame
    assert abs(delivered - RATE) <= 0.10 * RATE, (delivered, got, sent)
    [p] = list(lab.stub.ListPolicers(pb.ListPolicersRequest(), timeout=10))
    assert p.passed.packets >= got and p.passed.packets + p.dropped.packets == sent
    assert p.dropped.packets > 0.35 * sent
    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert stats.global_counters["drop_policer"] == p.dropped.packets
    [r] = [r for r in stats.rules if r.name == "police-udp"]
    assert r.counters.packets == 1 + p.dropped.packets  # the flow's opening, the drops
    # one flow, tracked once: the packets after the first were charged on the fast path
    assert stats.global_counters["fw_pass_flow"] == 1


def test_a_mirror_rule_copies_its_flow_byte_for_byte(lab):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from lab import netns

    topo = lab.topo
    cap_ns = f"{topo.prefix}-mi"
    subprocess.run(["ip", "netns", "add", cap_ns], check=True)
    proc = None
    try:
        subprocess.run(["ip", "netns", "exec", cap_ns, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        subprocess.run(["ip", "-n", topo.lb_ns, "link", "add", "fam0", "type", "veth",
                        "peer", "name", "eth0", "netns", cap_ns], check=True)
        subprocess.run(["ip", "-n", topo.lb_ns, "link", "set", "fam0", "up"], check=True)
        subprocess.run(["ip", "-n", cap_ns, "link", "set", "eth0", "up"], check=True)
        lab.stub.PutFirewallRules(pb.PutFirewallRulesRequest(rules=[_rule(
            "tap-udp", action=tpb.FIREWALL_ACTION_MIRROR, mirror_interface="fam0",
            match=tpb.FirewallMatch(protocol=tpb.PROTOCOL_UDP,
                                    dst_ports=tpb.PortRange(first=7777, last=7777)))]),
            timeout=10)
        proc = subprocess.Popen(["ip", "netns", "exec", cap_ns, sys.executable, "-c", CAPTURE,
                                 "eth0", "6"], stdout=subprocess.PIPE, text=True,
                                env=netns.python_env())
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        mac_c, mac_l = topo.mac(topo.client_ns, topo.client_iface), topo.mac(topo.lb_ns, "c0")
        frames = [bytes(Ether(src=mac_c, dst=mac_l)
                        / IP(src=CLIENT, dst=topo.backend_ips[0], ttl=61, id=4300 + i)
                        / UDP(sport=40001, dport=7777) / f"mirror me {i}".encode())
                  for i in range(4)]
        other = bytes(Ether(src=mac_c, dst=mac_l) / IP(src=CLIENT, dst=topo.backend_ips[0])
                      / UDP(sport=40001, dport=7778) / b"not mine")
        topo.run(topo.client_ns, [sys.executable, "-c", SEND, topo.client_iface,
                                  *(f.hex() for f in [*frames, other])])
        out, _ = proc.communicate(timeout=30)
        seen = [bytes.fromhex(line) for line in out.split()]
        seen = [f for f in seen if f[12:14] == b"\x08\x00"]  # IPv4
        assert seen == frames  # every datagram of the flow, as sent; nothing else
        stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10)
        assert stats.global_counters["mirrored"] == len(frames)
        assert stats.global_counters["mirror_fail"] == 0
        [r] = [r for r in stats.rules if r.name == "tap-udp"]
        assert r.counters.packets == len(frames)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", cap_ns], check=False)


def test_the_grpcurl_examples_of_the_docs_work_as_written(lab):
    from tests.unit.test_policyd_grpcurl import GRPCURL

    if GRPCURL is None:
        pytest.skip("grpcurl is missing")
    commands = [c for c in doc_grpcurl_commands("firewall.md")
                if any("POLICE" in a or "MIRROR" in a or "udp-10m" in a or "tap-web" in a
                       for a in c) or c[-1].endswith("/ListPolicers")]
    assert len(commands) == 5
    for argv in commands:
        argv = [GRPCURL if a == "grpcurl" else lab.dpd.socket if a == "/run/xlb/dpd.sock"
                else a.replace('"eth1"', '"b1"') for a in argv]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{argv}: {res.stderr}"
        if argv[-1].endswith("/ListPolicers"):
            assert '"udp-10m"' in res.stdout
            rules = list(lab.stub.ListFirewallRules(pb.ListFirewallRulesRequest(), timeout=10))
            assert {(r.name, r.spec.policer, r.spec.mirror_interface) for r in rules} == {
                ("police-udp", "udp-10m", ""), ("tap-web", "", "b1")}
    assert '"deleted": 2' in res.stdout
