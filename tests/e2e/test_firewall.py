"""The firewall on a real node: client, lb and two backend namespaces (named fw*), dpd
attached to the lb's interfaces, real TCP and UDP sockets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.e2e.conftest import (
    CLIENT,
    CLIENT2,
    VIP,
    Lab,
    add_client_address,
    open_lab,
    put_vip_services,
    reach,
)
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

ALLOWED, BLOCKED = CLIENT, CLIENT2  # the client's address, and its second one
TCP, UDP = tpb.PROTOCOL_TCP, tpb.PROTOCOL_UDP


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(prefix="fw", before_dpd=lambda topo: add_client_address(topo, BLOCKED)) as lab:
        yield lab


def fw_rule(name: str, priority: int, action: int, **match: object) -> pb.FirewallRule:
    return pb.FirewallRule(name=name, spec=tpb.FirewallRuleSpec(
        priority=priority, action=action, match=tpb.FirewallMatch(**match)))  # type: ignore[arg-type]


def put_rules(lab: Any, *rules: pb.FirewallRule, flush: bool = False
              ) -> pb.PutFirewallRulesResponse:
    return lab.stub.PutFirewallRules(pb.PutFirewallRulesRequest(
        rules=list(rules), flush_existing=flush), timeout=10)


def test_drop_rule_stops_tcp_and_udp_while_a_higher_allow_lets_one_client_through(lab):
    put_vip_services(lab)
    assert reach(lab, BLOCKED) == {"tcp-vip": 0, "udp-vip": 0, "tcp-be": 0, "udp-be": 0}
    resp = put_rules(lab,
                     fw_rule("allow-one", 200, tpb.FIREWALL_ACTION_ALLOW, src=f"{ALLOWED}/32"),
                     fw_rule("drop-clients", 100, tpb.FIREWALL_ACTION_DROP,
                             src="198.18.0.0/24", in_interface="c0"))
    assert resp.written == 2
    assert reach(lab, ALLOWED) == {"tcp-vip": 0, "udp-vip": 0, "tcp-be": 0, "udp-be": 0}
    assert reach(lab, BLOCKED) == {"tcp-vip": 3, "udp-vip": 3, "tcp-be": 3, "udp-be": 3}

    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10)
    rules = {r.name: r.counters.packets for r in stats.rules}
    assert rules["drop-clients"] >= 12 and rules["allow-one"] >= 4
    assert stats.global_counters["drop_firewall"] == rules["drop-clients"]
    assert stats.global_counters["fw_pass_flow"] >= 6  # the allowed flows to the backend
    c0 = next(i for i in lab.stub.ListInterfaces(pb.ListInterfacesRequest(), timeout=10)
              if i.name == "c0")
    assert c0.counters.drops["drop_firewall"] == rules["drop-clients"]
    assert c0.counters.rx_packets > 0 and c0.counters.tx_packets > 0

    # the rule gone, the blocked address gets through again
    lab.stub.DeleteFirewallRules(pb.DeleteFirewallRulesRequest(names=["drop-clients"]),
                                 timeout=10)
    assert reach(lab, BLOCKED) == {"tcp-vip": 0, "udp-vip": 0, "tcp-be": 0, "udp-be": 0}


def test_default_policy_drop_on_an_interface(lab):
    put_vip_services(lab)
    intf = lab.stub.SetInterfaceConfig(pb.SetInterfaceConfigRequest(
        name="c0", zone="clients", default_policy=tpb.DEFAULT_POLICY_DROP), timeout=10)
    assert (intf.zone, intf.default_policy, intf.attached) == (
        "clients", tpb.DEFAULT_POLICY_DROP, True)
    assert reach(lab, ALLOWED)["tcp-vip"] == 3
    put_rules(lab, fw_rule("web", 10, tpb.FIREWALL_ACTION_ALLOW, dst=f"{VIP}/32",
                           protocol=TCP, dst_ports=tpb.PortRange(first=80, last=80)))
    got = reach(lab, ALLOWED)
    assert got["tcp-vip"] == 0 and got["udp-vip"] == 3 and got["tcp-be"] == 3
    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert stats.global_counters["drop_default_policy"] >= 9


def test_flush_existing_cuts_established_flows_the_new_set_drops(lab):
    from lab.client import start_tcp_long

    put_vip_services(lab)
    be = lab.topo.backend_ips[0]
    # the firewall on before the connections open, so that their verdict is tracked
    put_rules(lab, fw_rule("unrelated", 1, tpb.FIREWALL_ACTION_DROP, src="198.18.200.0/24"))
    lives = start_tcp_long(lab.topo, VIP, 80, duration=3.0, interval_ms=50)
    cut_vip = start_tcp_long(lab.topo, VIP, 80, duration=7.0, interval_ms=50)
    cut_be = start_tcp_long(lab.topo, be, 8080, duration=7.0, interval_ms=50)
    time.sleep(1.0)
    # a set that drops the client: established connections go on without flush ...
    cut = fw_rule("cut-client", 100, tpb.FIREWALL_ACTION_DROP, src=f"{ALLOWED}/32")
    assert put_rules(lab, cut).flushed == 0
    res = lives.result()
    assert res["errors"] == 0 and res["received"] == res["sent"] > 20, res
    # ... and with flush_existing they end
    assert put_rules(lab, cut, flush=True).flushed >= 2
    for conn in (cut_vip, cut_be):
        res = conn.result()
        assert res["errors"] > 0 and res["received"] < res["sent"], res
    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert {r.name: r.counters.packets for r in stats.rules}["cut-client"] > 0


def test_bad_rules_are_refused_naming_the_field(lab):
    with pytest.raises(grpc.RpcError) as err:
        put_rules(lab, fw_rule("x", 1, tpb.FIREWALL_ACTION_DROP, in_interface="nosuch0"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rules[0].spec.match.in_interface" in err.value.details()


C6, LB6_C, LB6_B, B6 = "2001:db8:10::2", "2001:db8:10::1", "2001:db8:11::1", "2001:db8:11::2"


def _ipv6_links(topo: Any) -> None:
    from lab import netns

    for ns, dev, cidr in ((topo.client_ns, topo.client_iface, f"{C6}/64"),
                          (topo.lb_ns, "c0", f"{LB6_C}/64"), (topo.lb_ns, "b1", f"{LB6_B}/64"),
                          (topo.backend_ns[0], topo.backend_iface, f"{B6}/64")):
        netns.run(ns, ["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"])
    netns.run(topo.client_ns, ["ip", "-6", "route", "add", "default", "via", LB6_C])
    netns.run(topo.backend_ns[0], ["ip", "-6", "route", "add", "default", "via", LB6_B])
    netns.sysctl(topo.lb_ns, {"net.ipv6.conf.all.forwarding": 1})


@pytest.fixture
def lab6() -> Iterator[Lab]:
    """One backend, IPv6 addresses on every link (2001:db8:10::/64 client side,
    2001:db8:11::/64 backend side), the lb forwarding IPv6."""
    with open_lab(prefix="fw", backends=1, before_dpd=_ipv6_links, servers=False,
                  disable_ipv6=False) as lab:
        yield lab


def ping6(lab: Any, count: int = 2) -> int:
    """Echo replies the client gets from the backend over IPv6."""
    from lab import netns

    res = netns.run(lab.topo.client_ns, ["ping", "-6", "-n", "-c", str(count), "-i", "0.2",
                                         "-W", "1", B6], check=False, timeout=30)
    for line in res.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def test_ipv6_traffic_is_judged_by_ipv6_rules(lab6):
    assert ping6(lab6) == 2
    put_rules(lab6, fw_rule("no-v6-ping", 100, tpb.FIREWALL_ACTION_DROP,
                            src="2001:db8:10::/64", protocol=tpb.PROTOCOL_ICMPV6))
    assert ping6(lab6) == 0
    stats = lab6.stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert {r.name: r.counters.packets for r in stats.rules}["no-v6-ping"] >= 2
    put_rules(lab6, fw_rule("this-host", 200, tpb.FIREWALL_ACTION_ALLOW, src=f"{C6}/128"))
    assert ping6(lab6) == 2
    # a drop policy on the client side: the allow rule still lets it through, neighbour
    # discovery is never judged, and the replies come in on b1 (policy allow)
    lab6.stub.DeleteFirewallRules(pb.DeleteFirewallRulesRequest(names=["no-v6-ping"]),
                                  timeout=10)
    lab6.stub.SetInterfaceConfig(pb.SetInterfaceConfigRequest(
        name="c0", default_policy=tpb.DEFAULT_POLICY_DROP), timeout=10)
    assert ping6(lab6) == 2
    lab6.stub.DeleteFirewallRules(pb.DeleteFirewallRulesRequest(names=["this-host"]),
                                  timeout=10)
    assert ping6(lab6) == 0
