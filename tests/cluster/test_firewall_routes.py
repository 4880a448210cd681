"""Firewall rules and routes applied once to policyd reach both nodes and are enforced on
both: a drop rule stops a real client's TCP to the VIP through either node (and its
counter moves), routes are in each node's kernel FIB; a rule deleted on one node by hand
through dpd is restored at the next resync; a route a node cannot reach is ERROR there."""

from __future__ import annotations

import time

import pytest

from lab import netns
from lab.client import run_tcp_who
from tests.cluster.conftest import VIP, wait_until
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

SYNCED = ppb.SYNC_STATE_SYNCED
ROUTE_PREFIX = "198.20.0.0/16"


def apply_web(cluster):
    return cluster.policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
        name="web", vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP,
        endpoints=[tpb.Endpoint(address=f"198.18.{i}.2", port=8080) for i in (1, 2)],
    )), timeout=5)


def block_web() -> ppb.FirewallRule:
    return ppb.FirewallRule(name="block-web", spec=tpb.FirewallRuleSpec(
        priority=100, action=tpb.FIREWALL_ACTION_DROP,
        match=tpb.FirewallMatch(dst=f"{VIP}/32", protocol=tpb.PROTOCOL_TCP,
                                dst_ports=tpb.PortRange(first=80, last=80))))


def lab_route(name: str = "lab", prefix: str = ROUTE_PREFIX,
              gateway: str = "198.18.1.2") -> ppb.Route:
    return ppb.Route(name=name, spec=tpb.RouteSpec(
        prefix=prefix, next_hops=[tpb.NextHop(gateway=gateway)]))


def node_rules(cluster, name: str) -> list[str]:
    stub = cluster.datapath(name)
    return [r.name for r in stub.ListFirewallRules(dpb.ListFirewallRulesRequest(), timeout=5)]


def rule_packets(cluster, name: str, rule: str) -> int:
    stats = cluster.datapath(name).GetStats(dpb.GetStatsRequest(), timeout=5)
    return next((r.counters.packets for r in stats.rules if r.name == rule), 0)


def fib_routes(topo) -> str:
    """xlb's routes in the node's kernel FIB (route protocol 200)."""
    return netns.run(None, ["ip", "-n", topo.lb_ns, "route", "show", "proto", "200"]).stdout


def test_rules_and_routes_reach_both_nodes_and_are_enforced(cluster):
    svc = apply_web(cluster)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=svc.revision)
    for topo in cluster.topos:  # the service carries traffic before the rule
        assert run_tcp_who(topo, VIP, 80, count=4).get("errors") == 0

    cluster.policy.ApplyFirewallRule(ppb.ApplyFirewallRuleRequest(rule=block_web()), timeout=5)
    routes = cluster.policy.ApplyRoute(ppb.ApplyRouteRequest(route=lab_route()), timeout=5)
    for name, topo in zip(cluster.nodes, cluster.topos, strict=True):
        st = cluster.wait_state(name, SYNCED, generation=routes.revision)
        assert (st.firewall_rules, st.routes, list(st.errors)) == (1, 1, [])
        assert node_rules(cluster, name) == ["block-web"]
        assert f"{ROUTE_PREFIX} via 198.18.1.2" in fib_routes(topo)

    for name, topo in zip(cluster.nodes, cluster.topos, strict=True):
        before = rule_packets(cluster, name, "block-web")
        seen = run_tcp_who(topo, VIP, 80, count=3, timeout=1.0)
        assert seen.get("errors") == 3 and not seen.get("be1") and not seen.get("be2"), seen
        assert rule_packets(cluster, name, "block-web") > before

    # deleted in policyd: gone from both nodes, traffic flows again
    gen = cluster.policy.DeleteFirewallRules(
        ppb.DeleteFirewallRulesRequest(names=["block-web"]), timeout=5).generation
    cluster.policy.DeleteRoute(ppb.DeleteRouteRequest(name="lab"), timeout=5)
    for name, topo in zip(cluster.nodes, cluster.topos, strict=True):
        cluster.wait_state(name, SYNCED, generation=gen + 1)
        assert node_rules(cluster, name) == []
        assert ROUTE_PREFIX not in fib_routes(topo)
        assert run_tcp_who(topo, VIP, 80, count=4).get("errors") == 0


@pytest.mark.resync(1.0)
def test_rule_deleted_by_hand_on_one_node_is_restored_at_the_next_resync(cluster):
    apply_web(cluster)
    rule = cluster.policy.ApplyFirewallRule(ppb.ApplyFirewallRuleRequest(rule=block_web()),
                                            timeout=5)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=rule.revision)
    node1 = cluster.datapath("node1")
    reply = node1.DeleteFirewallRules(dpb.DeleteFirewallRulesRequest(names=["block-web"]),
                                      timeout=5)
    assert reply.deleted == 1
    deleted_at = time.monotonic()
    assert node_rules(cluster, "node1") == []
    wait_until(lambda: node_rules(cluster, "node1") == ["block-web"], timeout=5,
               what="the rule restored on node1")
    # within the resync interval (1 s, jittered by +-25 %) plus the repair itself
    assert time.monotonic() - deleted_at < 2.5
    assert node_rules(cluster, "node2") == ["block-web"]
    seen = run_tcp_who(cluster.topos[0], VIP, 80, count=2, timeout=1.0)
    assert seen.get("errors") == 2, seen


def test_route_a_node_cannot_reach_is_error_there_with_the_reason(cluster):
    good = cluster.policy.ApplyRoute(ppb.ApplyRouteRequest(route=lab_route()), timeout=5)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=good.revision)
    # no connected network of either node holds 198.18.77.1
    cluster.policy.ApplyRoute(ppb.ApplyRouteRequest(
        route=lab_route("far", "198.21.0.0/16", "198.18.77.1")), timeout=5)
    for name, topo in zip(cluster.nodes, cluster.topos, strict=True):
        st = cluster.wait_state(name, ppb.SYNC_STATE_ERROR)
        errors = [(e.kind, e.name) for e in st.errors]
        assert errors == [("route", "far")], st
        assert "198.18.77.1" in st.errors[0].message and "far" in st.message
        assert st.routes == 1 and f"{ROUTE_PREFIX} via 198.18.1.2" in fib_routes(topo)
    gen = cluster.policy.DeleteRoutes(ppb.DeleteRoutesRequest(names=["far"]),
                                      timeout=5).generation
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=gen)


def test_node_rebuilt_with_wiped_pins_gets_its_rules_back_without_any_call(cluster):
    apply_web(cluster)
    rule = cluster.policy.ApplyFirewallRule(ppb.ApplyFirewallRuleRequest(rule=block_web()),
                                            timeout=5)
    cluster.wait_state("node1", SYNCED, generation=rule.revision)
    dpd = cluster.nodes["node1"]
    dpd.kill()
    dpd.wipe_pins()
    dpd.start()
    assert node_rules(cluster, "node1") == []  # a new, empty firewall table
    # no call to policyd or dpd: the drift check sees a new dpd instance and refills it
    wait_until(lambda: node_rules(cluster, "node1") == ["block-web"], timeout=20,
               what="the rule back on node1")
    cluster.wait_state("node1", SYNCED, generation=rule.revision)
    seen = run_tcp_who(cluster.topos[0], VIP, 80, count=2, timeout=1.0)
    assert seen.get("errors") == 2, seen


def test_flush_existing_cuts_an_established_flow_a_plain_rule_leaves(cluster):
    from lab.client import start_tcp_long

    svc = apply_web(cluster)
    cluster.wait_state("node1", SYNCED, generation=svc.revision)
    topo = cluster.topos[0]
    conn = start_tcp_long(topo, VIP, 80, duration=8.0, interval_ms=100, timeout=1.0)
    time.sleep(1.0)
    # a plain drop rule: new flows only; the established connection goes on
    plain = cluster.policy.ApplyFirewallRule(ppb.ApplyFirewallRuleRequest(rule=block_web()),
                                             timeout=5)
    cluster.wait_state("node1", SYNCED, generation=plain.revision)
    assert run_tcp_who(topo, VIP, 80, count=1, timeout=1.0).get("errors") == 1
    time.sleep(2.0)
    cut = block_web()
    cut.name, cut.spec.priority, cut.flush_existing = "cut-web", 200, True
    applied = cluster.policy.ApplyFirewallRule(ppb.ApplyFirewallRuleRequest(rule=cut),
                                               timeout=5)
    assert applied.flush_existing
    cluster.wait_state("node1", SYNCED, generation=applied.revision)
    res = conn.result()
    assert res["broken"] or res["errors"], res
    assert res["received"] >= 25, res  # it outlived the plain rule by about 2 s
