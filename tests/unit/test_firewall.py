"""The firewall without root: binding and validation, ranking, port-range expansion, the
compiled tuple space against the rules' definition, stage and swap on in-memory maps,
all-or-nothing writes, restart, interfaces, flush of established flows, and the API."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpd.firewall import (
    BoundRule,
    FirewallTable,
    Packet,
    Policy,
    StaticLinks,
    compile_rules,
    first_match,
    port_prefixes,
)
from dpd.loader import Settings
from dpd.maps import MemoryMap
from dpd.memory import MemoryDatapath
from dpd.node import Node
from dpd.servicer import DatapathServicer
from tests.unit.conftest import serve_datapath
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.dpd.v1 import datapath_pb2_grpc
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import Exhausted, ValidationError
from xlbcore.firewall import Action, PortRange, RuleMatch, RuleProto, RuleSpec

TCP, UDP, ICMP, SCTP = 6, 17, 1, 132


def rule(name: str, priority: int = 100, action: Action = Action.DROP, **match: object
         ) -> tuple[str, RuleSpec]:
    redirect = str(match.pop("redirect", "")) if action is Action.REDIRECT else ""
    return name, RuleSpec(priority, RuleMatch(**match), action, redirect)  # type: ignore[arg-type]


def bound(name: str, priority: int = 100, action: Action = Action.DROP, ifindex: int = 0,
          **match: object) -> BoundRule:
    n, spec = rule(name, priority, action, **match)
    return BoundRule(n, spec, 0, ifindex)


def table(dp: MemoryDatapath | None = None) -> FirewallTable:
    return FirewallTable(dp or MemoryDatapath(Settings(name="fw")), StaticLinks())


# -- port ranges --------------------------------------------------------------------------


@pytest.mark.parametrize("first,last,count", [
    (80, 80, 1), (1024, 65535, 6), (1, 65535, 16), (0x8000, 0xFFFF, 1), (22, 23, 1), (23, 24, 2)])
def test_port_range_becomes_the_fewest_prefixes(first, last, count):
    prefixes = port_prefixes(PortRange(first, last))
    assert len(prefixes) == count
    covered = set()
    for value, length in prefixes:
        size = 1 << (16 - length)
        assert value % size == 0  # aligned
        covered.update(range(value, value + size))
    assert covered == set(range(first, last + 1))


@given(st.integers(1, 65535), st.integers(0, 65535))
def test_port_prefixes_cover_exactly_the_range(first, span):
    last = min(65535, first + span)
    prefixes = port_prefixes(PortRange(first, last))
    assert len(prefixes) <= 30
    total = sum(1 << (16 - n) for _, n in prefixes)
    assert total == last - first + 1
    assert min(v for v, _ in prefixes) == first


# -- ranking and compiling ----------------------------------------------------------------


def test_higher_priority_wins_then_name_order():
    rules = [bound("b-allow", 10, Action.ALLOW, src="198.18.0.0/16"),
             bound("a-drop", 10, Action.DROP, src="198.18.1.0/24"),
             bound("z-top", 20, Action.ALLOW, src="198.18.1.7/32")]
    cls = compile_rules(rules, 64)
    judge = cls.lookup
    assert judge(Packet.of("198.18.1.7", "198.19.0.1", TCP, 1, 80)).rule == "z-top"
    assert judge(Packet.of("198.18.1.8", "198.19.0.1", TCP, 1, 80)).rule == "a-drop"
    assert judge(Packet.of("198.18.2.8", "198.19.0.1", TCP, 1, 80)).rule == "b-allow"
    assert judge(Packet.of("198.20.0.1", "198.19.0.1", TCP, 1, 80)) is None


def test_equal_masked_keys_keep_the_better_rank():
    rules = [bound("x", 5, Action.ALLOW, src="198.18.0.0/24"),
             bound("y", 9, Action.DROP, src="198.18.0.0/24")]
    cls = compile_rules(rules, 64)
    assert len(cls.tuples) == 1 and cls.entries == 1
    assert cls.lookup(Packet.of("198.18.0.1", "198.19.0.1", UDP)).rule == "y"


def test_tuples_sorted_by_min_rank_and_shapes_counted():
    rules = [bound(f"r{i}", 100 - i, src=f"198.0.0.0/{16 + i}") for i in range(8)]
    cls = compile_rules(rules, 64)
    assert [t.min_rank for t in cls.tuples] == sorted(t.min_rank for t in cls.tuples)
    with pytest.raises(Exhausted, match="needs 8 lookup shapes"):
        compile_rules(rules, 7)


def test_family_and_protocol_are_matched():
    rules = [bound("v6", 10, src="2001:db8::/32"), bound("icmp", 5, protocol=RuleProto.ICMP),
             bound("any-udp", 1, Action.ALLOW, protocol=RuleProto.UDP)]
    cls = compile_rules(rules, 64)
    assert cls.lookup(Packet.of("2001:db8::1", "2001:db8::2", TCP, 1, 2)).rule == "v6"
    # an IPv4 address whose bits look like 2001:db8:: is not in it
    assert cls.lookup(Packet.of("32.1.13.184", "198.19.0.1", TCP, 1, 2)) is None
    assert cls.lookup(Packet.of("198.18.0.1", "198.19.0.1", ICMP)).rule == "icmp"
    assert cls.lookup(Packet.of("2001:db8:1::1", "2001:db8::2", UDP, 1, 2)).rule == "v6"
    assert cls.lookup(Packet.of("2001:db9::1", "2001:db8::2", UDP, 1, 2)).rule == "any-udp"


PREFIXES_V4 = ["198.18.0.0/15", "198.18.0.0/16", "198.18.1.0/24", "198.18.1.0/25",
               "198.18.1.128/25", "198.18.1.7/32", "198.19.0.0/16", "0.0.0.0/0", ""]
PREFIXES_V6 = ["2001:db8::/32", "2001:db8:1::/48", "2001:db8::1/128", "::/0", ""]
RANGES = [None, PortRange(80, 80), PortRange(1000, 2000), PortRange(1024, 65535),
          PortRange(22, 23), PortRange(7, 7)]


@st.composite
def rule_sets(draw: st.DrawFn) -> list[BoundRule]:
    n = draw(st.integers(1, 25))
    out = []
    for i in range(n):
        v6 = draw(st.booleans())
        pool = PREFIXES_V6 if v6 else PREFIXES_V4
        proto = draw(st.sampled_from([RuleProto.ANY, RuleProto.TCP, RuleProto.UDP,
                                      RuleProto.SCTP,
                                      RuleProto.ICMPV6 if v6 else RuleProto.ICMP]))
        ports = proto in (RuleProto.TCP, RuleProto.UDP, RuleProto.SCTP)
        m = RuleMatch(draw(st.sampled_from(pool)), draw(st.sampled_from(pool)), proto,
                      draw(st.sampled_from(RANGES)) if ports else None,
                      draw(st.sampled_from(RANGES)) if ports else None)
        action = draw(st.sampled_from([Action.ALLOW, Action.DROP]))
        out.append(BoundRule(f"r{i:02d}", RuleSpec(draw(st.integers(0, 5)), m, action), i,
                             draw(st.sampled_from([0, 0, 2, 3]))))
    return out


def packets_for(rules: list[BoundRule], rng: random.Random, n: int) -> list[Packet]:
    addrs4 = ["198.18.1.7", "198.18.1.200", "198.18.0.9", "198.19.3.3", "10.0.0.1"]
    addrs6 = ["2001:db8::1", "2001:db8:1::5", "2001:db9::1"]
    out = []
    for _ in range(n):
        pool = addrs6 if rng.random() < 0.4 else addrs4
        proto = rng.choice([TCP, UDP, SCTP, ICMP if pool is addrs4 else 58])
        ports = proto in (TCP, UDP, SCTP)
        out.append(Packet.of(rng.choice(pool), rng.choice(pool), proto,
                             rng.choice([7, 22, 80, 1500, 40000]) if ports else 0,
                             rng.choice([7, 23, 80, 1000, 2000, 2001, 65535]) if ports else 0,
                             rng.choice([1, 2, 3])))
    return out


@settings(max_examples=150, deadline=None)
@given(rule_sets(), st.integers(0, 2**32))
def test_compiled_classifier_agrees_with_the_rules(rules, seed):
    cls = compile_rules(rules, 1024)
    for pkt in packets_for(rules, random.Random(seed), 40):
        want = first_match(rules, pkt)
        got = cls.lookup(pkt)
        assert (got.rule if got else None) == (want.name if want else None), pkt


# -- the table on in-memory maps ---------------------------------------------------------


def live_gen(fw: FirewallTable) -> tuple[int, list[int]]:
    c = fw._cfg.unpack(fw.cfg_map.get(bytes(4)) or b"")
    return c["gen"], list(c["n_tuples"])


def acl_gens(fw: FirewallTable) -> set[int]:
    return {int.from_bytes(k[:2], "little") // fw.max_tuples for k, _ in fw.acl.items()}


def test_stage_and_swap_flips_the_generation_and_clears_the_old():
    fw = table()
    assert live_gen(fw) == (0, [0, 0]) and not fw.judge(Packet.of(
        "198.18.0.1", "198.19.0.1", TCP, 1, 2)).judged  # off
    fw.put([rule("a", src="198.18.0.0/24")])
    assert live_gen(fw) == (1, [0, 1]) and acl_gens(fw) == {1}
    fw.put([rule("b", dst="198.19.0.0/16", protocol=RuleProto.TCP,
                 dst_ports=PortRange(1024, 65535))])
    gen, n = live_gen(fw)
    assert gen == 0 and n[0] == 7 and acl_gens(fw) == {0}
    assert fw.acl.count() == 1 + 6
    assert fw.judge(Packet.of("198.18.0.1", "203.0.113.1", UDP, 1, 2)).rule == "a"
    assert fw.judge(Packet.of("198.20.0.1", "198.19.0.1", TCP, 1, 2000)).rule == "b"
    assert fw.judge(Packet.of("198.20.0.1", "198.19.0.1", TCP, 1, 80)).action is Action.ALLOW
    assert fw.delete(["a", "b", "nope"]) == 2
    assert fw.acl.count() == 0 and live_gen(fw)[1][live_gen(fw)[0]] == 0


def test_generation_moves_on_every_write_call():
    fw = table()
    fw.put([rule("a")])
    fw.put([rule("a")])  # unchanged: no swap, but a write call
    fw.delete(["zzz"])
    assert fw.summary() == (3, 1)


def test_a_full_acl_map_refuses_the_set_with_nothing_half_written():
    dp = MemoryDatapath(Settings(name="fw"))
    spec = dp.maps["acl_map"].spec
    dp.maps["acl_map"] = MemoryMap(dataclasses.replace(spec, max_entries=20))
    fw = table(dp)
    fw.put([rule("small", src="198.18.0.0/24", protocol=RuleProto.TCP,
                 dst_ports=PortRange(1024, 65535))])  # 6 entries
    before = sorted(fw.acl.items()), live_gen(fw), sorted(fw.rules_map.items())
    with pytest.raises(Exhausted, match="acl_map has no room"):
        # 16 entries: does not fit beside the live 6
        fw.put([rule("big", protocol=RuleProto.UDP, dst_ports=PortRange(1, 65535))])
    assert (sorted(fw.acl.items()), live_gen(fw), sorted(fw.rules_map.items())) == before
    assert [r.name for r in fw.rules()] == ["small"]
    fw.put([rule("fits", protocol=RuleProto.UDP, dst_ports=PortRange(53, 53))])
    assert [r.name for r in fw.rules()] == ["fits", "small"]


def test_too_many_shapes_names_how_many_the_set_needs():
    fw = table()
    rules = [rule(f"r{i}", src=f"0.0.0.0/{i + 1}") for i in range(15)]
    rules += [rule(f"s{i}", dst=f"2001:db8::/{33 + i}", protocol=RuleProto.TCP,
                   src_ports=PortRange(1, 65535)) for i in range(4)]
    with pytest.raises(Exhausted, match=r"needs 79 lookup shapes.*holds 64"):
        fw.put(rules)
    assert fw.count() == 0 and fw.acl.count() == 0 and fw.rules_map.count() == 0


def test_unknown_interface_and_duplicates_are_refused():
    fw = table()
    with pytest.raises(ValidationError, match=r"rules\[1\]\.spec\.match\.in_interface: no "
                                              r"interface 'nope0'"):
        fw.put([rule("a"), rule("b", in_interface="nope0")])
    with pytest.raises(ValidationError, match=r"rules\[0\]\.spec\.redirect_interface"):
        fw.put([rule("c", action=Action.REDIRECT, redirect="gone9")])
    with pytest.raises(ValidationError, match="more than once"):
        fw.put([rule("a"), rule("a", 3)])
    assert fw.count() == 0


def test_a_restarted_table_reads_its_rules_back_and_keeps_the_classifier():
    dp = MemoryDatapath(Settings(name="fw"))
    fw = table(dp)
    put = [rule("web", 10, Action.ALLOW, src="0.0.0.0/0", dst="198.19.0.10/32",
                protocol=RuleProto.TCP, dst_ports=PortRange(80, 80), in_interface="eth0"),
           rule("v6", 5, Action.DROP, src="2001:db8::/32"),
           rule("fwd", 1, Action.REDIRECT, redirect="eth1", protocol=RuleProto.ICMP)]
    fw.put(put)
    acl = sorted(fw.acl.items())
    again = table(dp)
    assert {r.name: r.spec for r in again.rules()} == dict(put)
    assert [r.rule_id for r in again.rules()] == [r.rule_id for r in fw.rules()]
    assert sorted(again.acl.items()) == acl  # nothing rewritten
    assert again.rules()[0].in_ifindex == 2 and again.rules()[2].target == 3
    # a classifier that does not match the records (a dpd stopped mid-way) is rebuilt
    gen = live_gen(again)[0]
    stray = fw._key_bytes((gen ^ 1) * fw.max_tuples, (4, 6, 0, 0, 0, 0, 0))
    dp.maps["acl_map"].put(stray, bytes(16))
    dp.maps["acl_map"].delete(acl[0][0])
    third = table(dp)
    assert live_gen(third)[0] != gen
    assert third.acl.count() == len(acl)


def test_changing_a_rule_keeps_its_counter_slot():
    fw = table()
    fw.put([rule("a", 1), rule("b", 2)])
    ids = {r.name: r.rule_id for r in fw.rules()}
    fw.put([rule("a", 7, Action.ALLOW)])
    assert {r.name: r.rule_id for r in fw.rules()} == ids
    fw.delete(["a"])
    fw.put([rule("c")])
    assert len({r.rule_id for r in fw.rules()}) == 2


def test_interface_policy_sets_the_flag_and_decides_unmatched_packets():
    fw = table()
    c = fw.set_interface("eth0", "dmz", Policy.DROP)
    assert (c.ifindex, c.zone, c.policy) == (2, "dmz", Policy.DROP) and c.slot != 0
    assert fw.policy_drop
    assert fw.judge(Packet.of("198.18.0.1", "198.19.0.1", TCP, 1, 2, ifindex=2)).drops
    assert not fw.judge(Packet.of("198.18.0.1", "198.19.0.1", TCP, 1, 2, ifindex=3)).drops
    fw.put([rule("ok", 1, Action.ALLOW, src="198.18.0.1/32")])
    assert fw.judge(Packet.of("198.18.0.1", "198.19.0.1", TCP, 1, 2, ifindex=2)).rule == "ok"
    fw.set_interface("eth0", "", Policy.ALLOW)
    assert not fw.policy_drop and fw.interface(2).slot == c.slot
    with pytest.raises(ValidationError, match="zone"):
        fw.set_interface("eth0", "bad zone!", Policy.ALLOW)


def ct_put(node: Node, src: str, dst: str, sport: int, dport: int, nat: str, nat_port: int,
           ifindex: int) -> None:
    """A flow's two conntrack entries as the datapath writes them."""
    ct = node.conntrack
    a = socket.inet_aton
    orig = ct.key.pack(saddr=a(src), daddr=a(dst), sport=sport, dport=dport, proto=TCP)
    reply = ct.key.pack(saddr=a(nat), daddr=a(src), sport=nat_port, dport=sport, proto=TCP)
    v = {"state": 3, "nat_addr": a(nat), "nat_port": nat_port, "in_ifindex": ifindex}
    ct.map.put(orig, ct.val.pack(dir=ct.states.orig, **v))
    ct.map.put(reply, ct.val.pack(**{**v, "dir": ct.states.reply, "nat_addr": a(dst),
                                     "nat_port": dport}))


def test_flush_ends_the_flows_the_new_set_drops():
    node = Node(MemoryDatapath(Settings(name="fw")), ct_aging_interval=0)
    ct_put(node, "198.18.1.2", "198.19.0.10", 40000, 80, "198.18.2.2", 8080, 2)  # via a VIP
    ct_put(node, "198.18.1.3", "198.18.2.2", 40001, 22, "198.18.2.2", 22, 2)  # passed flow
    ct_put(node, "198.18.1.4", "198.18.2.2", 40002, 22, "198.18.2.2", 22, 3)  # other intf
    fw = node.firewall
    fw.put([rule("no-ssh", dst="198.18.2.2/32", protocol=RuleProto.TCP,
                 dst_ports=PortRange(22, 22), in_interface="eth0")])
    assert fw.flush_flows(node.conntrack) == 1
    assert node.conntrack.count() == 4
    fw.put([rule("no-vip", dst="198.19.0.10/32")])
    assert fw.flush_flows(node.conntrack) == 1
    left = {(e.src, e.dst) for e in node.list_conntrack()}
    assert left == {("198.18.1.4", "198.18.2.2"), ("198.18.2.2", "198.18.1.4")}
    node.close()


# -- the API ---------------------------------------------------------------------------


@pytest.fixture
def stub(sockdir: Path) -> Iterator[tuple[Node, datapath_pb2_grpc.DatapathStub]]:
    node = Node(MemoryDatapath(Settings(name="fwapi")), ct_aging_interval=0)
    with contextlib.closing(node), serve_datapath(sockdir, DatapathServicer(node)) as stub:
        yield node, stub


def api_rule(name: str, **kw: object) -> pb.FirewallRule:
    match = kw.pop("match", {})
    return pb.FirewallRule(name=name, spec=tpb.FirewallRuleSpec(
        match=tpb.FirewallMatch(**match), **kw))  # type: ignore[arg-type]


def test_api_put_list_delete_and_stats(stub):
    node, api = stub
    rules = [api_rule("allow-one", priority=200, action=tpb.FIREWALL_ACTION_ALLOW,
                      match={"src": "198.18.1.2", "protocol": tpb.PROTOCOL_TCP,
                             "dst_ports": tpb.PortRange(first=80, last=80)}),
             api_rule("drop-net", priority=100, action=tpb.FIREWALL_ACTION_DROP,
                      match={"src": "198.18.1.0/24", "in_interface": "eth0"})]
    resp = api.PutFirewallRules(pb.PutFirewallRulesRequest(rules=rules), timeout=5)
    assert (resp.written, resp.generation, resp.flushed) == (2, 1, 0)
    listed = list(api.ListFirewallRules(pb.ListFirewallRulesRequest(), timeout=5))
    assert [r.name for r in listed] == ["allow-one", "drop-net"]
    assert listed[0].spec.match.src == "198.18.1.2/32"
    assert listed[1].spec.match.in_interface == "eth0"
    stats = api.GetStats(pb.GetStatsRequest(), timeout=5)
    assert [r.name for r in stats.rules] == ["allow-one", "drop-net"]
    assert "drop_firewall" in stats.global_counters
    resp = api.DeleteFirewallRules(pb.DeleteFirewallRulesRequest(names=["drop-net", "x"]),
                                   timeout=5)
    assert (resp.deleted, resp.generation) == (1, 2)


@pytest.mark.parametrize("bad,field", [
    (api_rule("a", action=tpb.FIREWALL_ACTION_DROP, match={"src": "198.18.0.1/33"}),
     "rules[0].spec.match.src"),
    (api_rule("a", action=tpb.FIREWALL_ACTION_DROP, match={
        "protocol": tpb.PROTOCOL_TCP, "dst_ports": tpb.PortRange(first=90, last=80)}),
     "rules[0].spec.match.dst_ports.last"),
    (api_rule("a", action=tpb.FIREWALL_ACTION_DROP, match={
        "dst_ports": tpb.PortRange(first=80, last=80)}), "rules[0].spec.match.dst_ports"),
    (api_rule("a", action=tpb.FIREWALL_ACTION_DROP, match={
        "protocol": tpb.PROTOCOL_ICMP, "src_ports": tpb.PortRange(first=80, last=80)}),
     "rules[0].spec.match.src_ports: ports can only be matched with PROTOCOL_TCP, "
     "PROTOCOL_UDP or PROTOCOL_SCTP"),
    (api_rule("a", action=tpb.FIREWALL_ACTION_DROP, match={"protocol": 99}),
     "rules[0].spec.match.protocol: unknown protocol 99"),
    (api_rule("a", action=tpb.FIREWALL_ACTION_DROP, match={
        "src": "198.18.0.0/16", "dst": "2001:db8::/32"}), "rules[0].spec.match.dst"),
    (api_rule("a", action=tpb.FIREWALL_ACTION_DROP, match={"in_interface": "nope0"}),
     "rules[0].spec.match.in_interface"),
    (api_rule("a", action=tpb.FIREWALL_ACTION_REDIRECT), "rules[0].spec.redirect_interface"),
    (api_rule("Bad Name", action=tpb.FIREWALL_ACTION_DROP), "rules[0].name"),
    (api_rule("a", action=tpb.FIREWALL_ACTION_DROP, match={"src": "x" * 10_000}),
     "rules[0].spec.match.src"),
])
def test_api_refuses_bad_rules_naming_the_field(stub, bad, field):
    node, api = stub
    with pytest.raises(grpc.RpcError) as err:
        api.PutFirewallRules(pb.PutFirewallRulesRequest(
            rules=[bad]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()
    assert len(err.value.details()) < 300
    assert node.firewall.count() == 0


def test_api_takes_sctp_rules_with_port_ranges(stub):
    """PROTOCOL_SCTP with port ranges is put, listed back as put and decides SCTP packets
    by their ports (the model the datapath is compared with), not TCP's."""
    node, api = stub
    rule = api_rule("no-ngap", priority=10, action=tpb.FIREWALL_ACTION_DROP,
                    match={"protocol": tpb.PROTOCOL_SCTP, "dst": "198.19.0.0/16",
                           "src_ports": tpb.PortRange(first=1024, last=65535),
                           "dst_ports": tpb.PortRange(first=38400, last=38499)})
    api.PutFirewallRules(pb.PutFirewallRulesRequest(rules=[rule]), timeout=5)
    listed = list(api.ListFirewallRules(pb.ListFirewallRulesRequest(), timeout=5))
    assert [r.spec for r in listed] == [rule.spec]
    judge = node.firewall.judge
    assert judge(Packet.of("198.18.0.1", "198.19.0.10", SCTP, 5000, 38412)).drops
    assert not judge(Packet.of("198.18.0.1", "198.19.0.10", SCTP, 5000, 38500)).drops
    assert not judge(Packet.of("198.18.0.1", "198.19.0.10", SCTP, 1023, 38412)).drops
    assert not judge(Packet.of("198.18.0.1", "198.19.0.10", TCP, 5000, 38412)).drops


def test_api_duplicate_names_and_exhaustion(stub):
    node, api = stub
    with pytest.raises(grpc.RpcError) as err:
        api.PutFirewallRules(pb.PutFirewallRulesRequest(rules=[
            api_rule("a", action=tpb.FIREWALL_ACTION_DROP),
            api_rule("a", action=tpb.FIREWALL_ACTION_ALLOW)]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    many = [api_rule(f"r{i}", action=tpb.FIREWALL_ACTION_DROP,
                     match={"src": f"0.0.0.0/{1 + i % 32}", "dst": f"198.19.0.0/{16 + i // 32}"})
            for i in range(96)]
    with pytest.raises(grpc.RpcError) as err:
        api.PutFirewallRules(pb.PutFirewallRulesRequest(rules=many), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "96 lookup shapes" in err.value.details()
    assert node.firewall.count() == 0


def test_api_set_interface_config(stub):
    node, api = stub
    intf = api.SetInterfaceConfig(pb.SetInterfaceConfigRequest(
        name="eth1", zone="outside", default_policy=tpb.DEFAULT_POLICY_DROP), timeout=5)
    assert (intf.name, intf.ifindex, intf.zone, intf.default_policy) == (
        "eth1", 3, "outside", tpb.DEFAULT_POLICY_DROP)
    with pytest.raises(grpc.RpcError) as err:
        api.SetInterfaceConfig(pb.SetInterfaceConfigRequest(name="nope0"), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        api.SetInterfaceConfig(pb.SetInterfaceConfigRequest(name="eth1", zone="a b"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
