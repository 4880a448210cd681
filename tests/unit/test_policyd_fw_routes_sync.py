"""policyd reconciles firewall rules and routes onto dpd nodes (dpd's real servicer and
tables over in-memory maps): they reach every node, only what changed is sent, a hand
edit is repaired within the resync interval, and an object a node refuses makes that
node ERROR with the reason while its other objects still apply."""

from __future__ import annotations

import ipaddress
from typing import Any

from policyd.client import PolicyClient, make_route, make_rule
from tests.unit.conftest import FakeNode
from xlb.policy.v1 import policy_pb2
from xlbcore.route import NextHopSpec, RouteSpec


def status(client: PolicyClient, node: str) -> policy_pb2.NodeSyncStatus:
    (s,) = client.sync_status(node).nodes
    return s


def synced(client: PolicyClient, node: str, generation: int | None = None) -> bool:
    s = status(client, node)
    target = client.sync_status().generation if generation is None else generation
    return s.state == policy_pb2.SYNC_STATE_SYNCED and s.observed_generation >= target


def rules_on(node: FakeNode) -> dict[str, Any]:
    return {r.name: r.spec for r in node.datapath.node.firewall.rules()}


def routes_on(node: FakeNode) -> dict[str, RouteSpec]:
    return {r.prefix: r for r in node.datapath.node.routes.specs()}


def writes(node: FakeNode, method: str) -> list[list[str]]:
    with node.datapath.lock:
        return [items for m, items in node.datapath.writes if m == method]


RULES = [
    make_rule("allow-admin", "allow", 200, src="198.18.9.0/24", protocol="tcp", dst_ports="22"),
    make_rule("no-ssh", "drop", 100, protocol="tcp", dst_ports="22"),
    make_rule("no-telnet", "drop", 100, protocol="tcp", dst_ports="23"),
]
ROUTES = [
    make_route("lab", "198.20.0.0/16", ["198.18.1.1", "198.18.2.1,weight=3"]),
    make_route("lab6", "2001:db8:20::/48", ["2001:db8:1::1"]),
]


def test_rules_and_routes_reach_every_node(wait_for, policyd, fake_node, client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    client = client_for(policyd())
    client.register_node("node-a", a.address)
    client.register_node("node-b", b.address)
    client.apply_rules(RULES)
    reply = client.apply_routes(ROUTES)
    for name, node in (("node-a", a), ("node-b", b)):
        wait_for(lambda n=name: synced(client, n, reply.generation), what=f"{name} synced")
        assert set(rules_on(node)) == {"allow-admin", "no-ssh", "no-telnet"}
        assert routes_on(node)["198.20.0.0/16"].next_hops == (
            NextHopSpec("198.18.1.1"), NextHopSpec("198.18.2.1", weight=3))
        s = status(client, name)
        assert (s.firewall_rules, s.routes, list(s.errors)) == (3, 2, [])
    # deleted in policyd: deleted on the nodes
    generation = client.delete_rules(["no-telnet"])
    client.delete_route("lab6")
    for name, node in (("node-a", a), ("node-b", b)):
        wait_for(lambda n=name: synced(client, n, generation + 1), what=f"{name} synced")
        assert set(rules_on(node)) == {"allow-admin", "no-ssh"}
        assert set(routes_on(node)) == {"198.20.0.0/16"}


def test_only_the_changed_objects_are_sent(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    client.apply_rules(RULES)
    first = client.apply_routes(ROUTES)
    wait_for(lambda: synced(client, "node-a", first.generation), what="synced")
    before_rules = len(writes(node, "PutFirewallRules"))
    before_routes = len(writes(node, "PutRoutes"))
    lists = (node.datapath.calls["ListFirewallRules"], node.datapath.calls["ListRoutes"])

    changed = client.apply_rule(make_rule("no-ssh", "drop", 150, protocol="tcp", dst_ports="22"))
    wait_for(lambda: synced(client, "node-a", changed.generation), what="rule change synced")
    assert writes(node, "PutFirewallRules")[before_rules:] == [["no-ssh"]]
    assert rules_on(node)["no-ssh"].priority == 150
    route = client.apply_route(make_route("lab", "198.20.0.0/16", ["198.18.1.1"]))
    wait_for(lambda: synced(client, "node-a", route.generation), what="route change synced")
    assert writes(node, "PutRoutes")[before_routes:] == [["198.20.0.0/16"]]
    # a route that moves to another prefix: the old prefix deleted, the new one put
    moved = client.apply_route(make_route("lab", "198.21.0.0/16", ["198.18.1.1"]))
    wait_for(lambda: synced(client, "node-a", moved.generation), what="moved route synced")
    assert writes(node, "DeleteRoutes")[-1] == ["198.20.0.0/16"]
    assert set(routes_on(node)) == {"198.21.0.0/16", "2001:db8:20::/48"}
    # changes cost no read-back
    assert (node.datapath.calls["ListFirewallRules"], node.datapath.calls["ListRoutes"]) == lists


def test_nothing_changing_reads_nothing_back(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())  # resync every 0.2 s
    client.register_node("node-a", node.address)
    reply = client.apply_rules(RULES)
    wait_for(lambda: synced(client, "node-a", reply.generation), what="synced")
    lists = (node.datapath.calls["ListFirewallRules"], node.datapath.calls["ListRoutes"])
    summaries = node.datapath.calls["GetSummary"]
    wait_for(lambda: node.datapath.calls["GetSummary"] >= summaries + 5, what="drift checks")
    assert (node.datapath.calls["ListFirewallRules"], node.datapath.calls["ListRoutes"]) == lists
    assert writes(node, "PutFirewallRules")[-1] == ["allow-admin", "no-ssh", "no-telnet"]


def test_a_rule_deleted_by_hand_through_dpd_is_restored(wait_for, policyd, fake_node,
                                                       client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    reply = client.apply_rules(RULES)
    wait_for(lambda: synced(client, "node-a", reply.generation), what="synced")
    reads = node.datapath.calls["ListFirewallRules"]
    node.datapath.node.firewall.delete(["no-ssh"])  # what DeleteFirewallRules does
    assert "no-ssh" not in rules_on(node)
    wait_for(lambda: "no-ssh" in rules_on(node), what="the rule restored")
    assert node.datapath.calls["ListFirewallRules"] > reads
    # a rule added by hand is removed: policyd owns the node's rule set
    from xlbcore.firewall import Action, RuleMatch, RuleSpec

    node.datapath.node.firewall.put([("stray", RuleSpec(5, RuleMatch(), Action.DROP))])
    wait_for(lambda: "stray" not in rules_on(node), what="the stray rule removed")
    assert set(rules_on(node)) == {"allow-admin", "no-ssh", "no-telnet"}


def test_a_route_changed_outside_dpd_is_repaired(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    reply = client.apply_routes(ROUTES)
    wait_for(lambda: synced(client, "node-a", reply.generation), what="synced")
    table = node.datapath.node.routes
    reads = node.datapath.calls["ListRoutes"]
    generation = table.generation
    # as `ip route del` would: the FIB changes, dpd's generation does not
    with table._lock:  # noqa: SLF001 - the in-memory FIB
        del table._routes["198.20.0.0/16"]  # noqa: SLF001
    assert table.generation == generation
    wait_for(lambda: "198.20.0.0/16" in routes_on(node), what="the route restored")
    assert node.datapath.calls["ListRoutes"] > reads


def test_a_refused_route_is_an_error_on_that_node_only(wait_for, policyd, fake_node,
                                                       client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    # node a reaches only these networks; node b reaches every next hop
    a.datapath.node.routes.reachable = [ipaddress.ip_network(n) for n in (
        "198.18.1.0/24", "198.18.2.0/24", "2001:db8:1::/64")]
    client = client_for(policyd())
    client.register_node("node-a", a.address)
    client.register_node("node-b", b.address)
    client.apply_rules(RULES)
    reply = client.apply_routes([*ROUTES, make_route("far", "198.22.0.0/16", ["198.18.7.1"])])
    wait_for(lambda: synced(client, "node-b", reply.generation), what="node-b synced")
    assert len(routes_on(b)) == 3

    def errored() -> policy_pb2.NodeSyncStatus | None:
        s = status(client, "node-a")
        return s if s.state == policy_pb2.SYNC_STATE_ERROR and s.errors else None

    s = wait_for(errored, what="node-a ERROR")
    (error,) = s.errors
    assert (error.kind, error.name) == ("route", "far")
    assert error.message.startswith("FAILED_PRECONDITION: next hop 198.18.7.1 is unreachable")
    assert "far" in s.message
    # everything else is applied on node a
    wait_for(lambda: set(routes_on(a)) == {"198.20.0.0/16", "2001:db8:20::/48"},
             what="node-a's other routes")
    assert set(rules_on(a)) == {"allow-admin", "no-ssh", "no-telnet"}
    assert (status(client, "node-a").firewall_rules, status(client, "node-a").routes) == (3, 2)
    # while the route stays refused, each drift check offers it again (one PutRoutes)
    # and reads nothing back
    reads, summaries = a.datapath.calls["ListRoutes"], a.datapath.calls["GetSummary"]
    offered = len(writes(a, "PutRoutes"))
    wait_for(lambda: a.datapath.calls["GetSummary"] >= summaries + 4, what="drift checks")
    assert a.datapath.calls["ListRoutes"] == reads
    assert all(w == ["198.22.0.0/16"] for w in writes(a, "PutRoutes")[offered:])
    assert status(client, "node-a").state == policy_pb2.SYNC_STATE_ERROR

    # the next hop becomes reachable: the route is retried at a drift check
    a.datapath.node.routes.reachable = None
    wait_for(lambda: synced(client, "node-a"), what="node-a synced")
    assert "198.22.0.0/16" in routes_on(a) and not status(client, "node-a").errors
    # deleting a refused route clears its error too
    a.datapath.node.routes.reachable = [ipaddress.ip_network("198.18.1.0/24")]
    bad = client.apply_route(make_route("worse", "198.23.0.0/16", ["198.18.8.1"]))
    wait_for(errored, what="node-a ERROR again")
    client.delete_route("worse")
    wait_for(lambda: synced(client, "node-a", bad.generation + 1), what="synced after delete")


def test_a_rule_naming_a_missing_interface_is_an_error(wait_for, policyd, fake_node,
                                                       client_for):
    node = fake_node("a").start()  # in-memory interfaces: lo, eth0, eth1
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    client.apply_rules([*RULES, make_rule("from-eth9", "drop", 300, in_interface="eth9")])
    s = wait_for(lambda: (x := status(client, "node-a")).errors and x, what="ERROR")
    assert s.state == policy_pb2.SYNC_STATE_ERROR
    assert [(e.kind, e.name) for e in s.errors] == [("firewall_rule", "from-eth9")]
    assert s.errors[0].message.startswith(
        "INVALID_ARGUMENT: spec.match.in_interface: no interface 'eth9'")
    assert set(rules_on(node)) == {"allow-admin", "no-ssh", "no-telnet"}
    fixed = client.apply_rule(make_rule("from-eth9", "drop", 300, in_interface="eth1"))
    wait_for(lambda: synced(client, "node-a", fixed.generation), what="synced")
    assert rules_on(node)["from-eth9"].match.in_interface == "eth1"


def test_a_rule_with_flush_existing_is_put_with_flush(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    first = client.apply_rules(RULES)
    wait_for(lambda: synced(client, "node-a", first.generation), what="synced")
    assert node.datapath.flushing == []
    cut = client.apply_rule(make_rule("cut-ssh", "drop", 300, protocol="tcp", dst_ports="22",
                                      flush_existing=True))
    assert cut.flush_existing
    wait_for(lambda: synced(client, "node-a", cut.generation), what="synced")
    assert node.datapath.flushing == [["cut-ssh"]]
    # only the flag changes: stored, no node change
    quiet = client.apply_rule(make_rule("cut-ssh", "drop", 300, protocol="tcp",
                                        dst_ports="22"))
    assert quiet.generation > cut.generation and not quiet.flush_existing
    wait_for(lambda: synced(client, "node-a", quiet.generation), what="synced")
    assert writes(node, "PutFirewallRules")[-1] == ["cut-ssh"]
    assert len(node.datapath.flushing) == 1


def test_a_node_whose_dpd_has_no_firewall_still_gets_its_services(wait_for, policyd,
                                                                  fake_node, client_for):
    import grpc

    from tests.unit.conftest import MemoryDatapathServicer

    class OlderDpd(MemoryDatapathServicer):
        """A dpd from before the firewall and GetSummary (the generated base answers
        UNIMPLEMENTED)."""

        def _older(self, context: Any) -> None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

        def GetSummary(self, request: Any, context: Any) -> Any:  # noqa: N802
            self._older(context)

        def PutFirewallRules(self, request: Any, context: Any) -> Any:  # noqa: N802
            self._older(context)

        def DeleteFirewallRules(self, request: Any, context: Any) -> Any:  # noqa: N802
            self._older(context)

        def ListFirewallRules(self, request: Any, context: Any) -> Any:  # noqa: N802
            self._older(context)

    node = fake_node("old")
    node.datapath.close()
    node.datapath = OlderDpd()
    node.start()
    client = client_for(policyd())
    client.register_node("node-old", node.address)
    client.apply_rules(RULES[:2])
    svc = client.apply_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:80"])
    def both_refused() -> policy_pb2.NodeSyncStatus | None:
        x = status(client, "node-old")
        return x if len(x.errors) == 2 and x.observed_generation >= svc.generation else None

    s = wait_for(both_refused, what="ERROR with both rules")
    assert sorted(e.name for e in s.errors) == ["allow-admin", "no-ssh"]
    assert s.errors[0].message.startswith("UNIMPLEMENTED")
    assert len(node.datapath.snapshot()) == 1  # the service is there
    client.delete_rules(["allow-admin", "no-ssh"])
    wait_for(lambda: synced(client, "node-old"), what="SYNCED once no rule is wanted")
