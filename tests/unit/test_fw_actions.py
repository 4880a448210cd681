"""Firewall rules whose action is POLICE or MIRROR, without root: the shared model's
validation (xlbcore.firewall, what dpd and policyd both check), dpd's table binding the
policer and mirror interface (INVALID_ARGUMENT naming the field, nothing written), the
rules read back after a restart, a policer a rule charges kept from deletion, policyd
and xlbctl apply -f carrying the new fields to a node; and PolicerTable.put rolling
back everything when attaching its TC filter fails part-way."""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
import pytest

from dpd.firewall import FirewallTable, StaticLinks
from dpd.policers import NoFilters, PolicerSpec, PolicerTable
from tests.unit.conftest import RecordsAttach, memory_node, serve_datapath
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import PreconditionError, ValidationError
from xlbcore.firewall import Action, RuleMatch, RuleProto, RuleSpec, fill_rule, parse_rule


def spec_msg(**kw: Any) -> tpb.FirewallRuleSpec:
    return tpb.FirewallRuleSpec(priority=10, match=tpb.FirewallMatch(
        protocol=tpb.PROTOCOL_UDP), **kw)


def test_the_model_takes_police_and_mirror_and_names_what_is_wrong():
    police = parse_rule(spec_msg(action=tpb.FIREWALL_ACTION_POLICE, policer="udp-10m"))
    assert (police.action, police.policer) == (Action.POLICE, "udp-10m")
    mirror = parse_rule(spec_msg(action=tpb.FIREWALL_ACTION_MIRROR, mirror_interface="tap0"))
    assert (mirror.action, mirror.mirror_interface) == (Action.MIRROR, "tap0")
    for s in (police, mirror):  # written back, read again: equal
        assert parse_rule(fill_rule(tpb.FirewallRuleSpec(), s)) == s
    bad = [
        (dict(action=tpb.FIREWALL_ACTION_POLICE), r"spec\.policer: FIREWALL_ACTION_POLICE "
                                                  "needs a policer name"),
        (dict(action=tpb.FIREWALL_ACTION_POLICE, policer="a b"), r"spec\.policer: 'a b' is "
                                                                 "not a policer name"),
        (dict(action=tpb.FIREWALL_ACTION_ALLOW, policer="p"), r"spec\.policer: only "
                                                              "FIREWALL_ACTION_POLICE"),
        (dict(action=tpb.FIREWALL_ACTION_MIRROR), r"spec\.mirror_interface: "
                                                  "FIREWALL_ACTION_MIRROR needs an interface"),
        (dict(action=tpb.FIREWALL_ACTION_MIRROR, mirror_interface="x" * 40),
         r"spec\.mirror_interface: 'x{20}"),
        (dict(action=tpb.FIREWALL_ACTION_DROP, mirror_interface="tap0"),
         r"spec\.mirror_interface: only FIREWALL_ACTION_MIRROR"),
        (dict(action=tpb.FIREWALL_ACTION_POLICE, policer="p", mirror_interface="tap0"),
         r"spec\.mirror_interface: only FIREWALL_ACTION_MIRROR"),
    ]
    for kw, message in bad:
        with pytest.raises(ValidationError, match=message):
            parse_rule(spec_msg(**kw))


def test_dpd_binds_the_policer_and_mirror_interface_and_reads_them_back():
    node = memory_node()
    with contextlib.closing(node):
        node.policers.put([PolicerSpec("udp-10m", 10_000_000, 15_000)])
        pid = node.policers.id_of("udp-10m")
        police = RuleSpec(10, RuleMatch(protocol=RuleProto.UDP), Action.POLICE,
                          policer="udp-10m")
        mirror = RuleSpec(20, RuleMatch(dst="198.19.0.10/32"), Action.MIRROR,
                          mirror_interface="eth1")
        node.firewall.put([("police", police), ("tap", mirror)])
        got = {r.name: r for r in node.firewall.rules()}
        assert (got["police"].spec, got["police"].target) == (police, pid)
        assert (got["tap"].spec, got["tap"].target) == (mirror, 3)  # eth1's ifindex
        # the classifier's entries carry the action's target
        entries = {e.rule: e for t in node.firewall.classifier.tuples
                   for e in t.entries.values()}
        assert (entries["police"].action, entries["police"].target) == (Action.POLICE, pid)
        assert (entries["tap"].action, entries["tap"].target) == (Action.MIRROR, 3)
        # a restarted dpd reads the same rules back from the maps
        again = FirewallTable(node.dp, StaticLinks())
        assert {r.name: (r.spec, r.target) for r in again.rules()} == {
            "police": (police, pid), "tap": (mirror, 3)}


def test_the_api_refuses_an_unknown_policer_or_mirror_interface_and_writes_nothing(sockdir):
    from dpd.servicer import DatapathServicer

    node = memory_node()
    with contextlib.closing(node), serve_datapath(sockdir, DatapathServicer(node)) as stub:
        stub.PutFirewallRules(pb.PutFirewallRulesRequest(rules=[pb.FirewallRule(
            name="keep", spec=spec_msg(action=tpb.FIREWALL_ACTION_ALLOW))]), timeout=5)
        generation = node.firewall.generation
        for rules, field in (
            ([pb.FirewallRule(name="p", spec=spec_msg(action=tpb.FIREWALL_ACTION_POLICE,
                                                      policer="nope"))],
             "rules[0].spec.policer: no policer 'nope' on this node"),
            ([pb.FirewallRule(name="ok", spec=spec_msg(action=tpb.FIREWALL_ACTION_DROP)),
              pb.FirewallRule(name="m", spec=spec_msg(action=tpb.FIREWALL_ACTION_MIRROR,
                                                      mirror_interface="eth9"))],
             "rules[1].spec.mirror_interface: no interface 'eth9' on this node"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.PutFirewallRules(pb.PutFirewallRulesRequest(rules=rules), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in err.value.details()
        listed = list(stub.ListFirewallRules(pb.ListFirewallRulesRequest(), timeout=5))
        assert [r.name for r in listed] == ["keep"]
        assert node.firewall.generation == generation + 2  # moved, as for any refused put
        # a policer a rule charges stays until the rule goes
        stub.PutPolicers(pb.PutPolicersRequest(policers=[pb.Policer(
            name="p10", rate_bps=10_000_000, burst_bytes=15_000)]), timeout=5)
        stub.PutFirewallRules(pb.PutFirewallRulesRequest(rules=[pb.FirewallRule(
            name="pol", spec=spec_msg(action=tpb.FIREWALL_ACTION_POLICE, policer="p10"))]),
            timeout=5)
        [r] = [r for r in stub.ListFirewallRules(pb.ListFirewallRulesRequest(), timeout=5)
               if r.name == "pol"]
        assert (r.spec.action, r.spec.policer) == (tpb.FIREWALL_ACTION_POLICE, "p10")
        with pytest.raises(grpc.RpcError) as err:
            stub.DeletePolicers(pb.DeletePolicersRequest(names=["p10"]), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "charged by firewall rule 'pol'" in err.value.details()


class FailingFilters(RecordsAttach, NoFilters):
    """Attaching fails on `bad` (as netlink would: the interface went, tc refused)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def attach(self, ifindex: int) -> None:
        if ifindex == self.bad:
            raise OSError(19, "No such device")
        super().attach(ifindex)


def _state(table: PolicerTable) -> tuple[object, ...]:
    return (dict(table.map.items()), dict(table.intf.items()), dict(table._ids),
            sorted(table.filters.on))  # type: ignore[attr-defined]


def test_put_rolls_back_when_attaching_a_filter_fails_part_way():
    node = memory_node()
    with contextlib.closing(node):
        filters = FailingFilters(bad=3)  # eth1
        table = PolicerTable(node.dp, node.firewall.links, filters)
        table.put([PolicerSpec("a", 8_000, 1_500, ("eth0",)), PolicerSpec("b", 16_000, 3_000)])
        before = _state(table)
        assert before[3] == [2]
        # a new policer on lo then eth1 (fails); "a" replaced, moved from eth0 to eth1
        for specs in ([PolicerSpec("c", 8_000, 1_500, ("lo", "eth1"))],
                      [PolicerSpec("a", 64_000, 9_000, ("lo", "eth1")),
                       PolicerSpec("b", 32_000, 3_000)]):
            with pytest.raises(PreconditionError, match="could not be attached to 'eth1'.*"
                                                        "nothing was written"):
                table.put(specs)
            assert _state(table) == before  # buckets, policed interfaces, filters, names
        assert {p.spec.name: p.spec.interfaces for p in table.entries()} == {
            "a": ("eth0",), "b": ()}
        assert table.generation == 1  # only the first put counted
        # and the table still works
        filters.bad = 0
        table.put([PolicerSpec("c", 8_000, 1_500, ("lo", "eth1"))])
        assert sorted(filters.on) == [1, 2, 3]


def test_policyd_and_xlbctl_apply_f_carry_police_and_mirror_rules(capsys, policyd, fake_node,
                                                                   tmp_path, wait_for):
    from policyd import cli

    node = fake_node("a").start()
    server = policyd()
    site = tmp_path / "site.yaml"
    site.write_text(f"""\
kind: Node
metadata: {{name: node-a}}
spec: {{address: {node.address}}}
---
kind: Policer
metadata: {{name: udp-10m}}
spec: {{rate_bps: 10000000, burst_bytes: 15000}}
---
kind: FirewallRule
metadata: {{name: police-udp}}
spec:
  priority: 100
  action: FIREWALL_ACTION_POLICE
  policer: udp-10m
  match: {{protocol: PROTOCOL_UDP}}
---
kind: FirewallRule
metadata: {{name: tap-web}}
spec:
  priority: 90
  action: FIREWALL_ACTION_MIRROR
  mirror_interface: eth1
  match: {{dst: 198.19.0.10}}
""")
    rc = cli.main(["--server", server.address, "apply", "-f", str(site)])
    out, _ = capsys.readouterr()
    assert rc == 0, out
    assert "firewall-rule/police-udp configured" in out
    fw = node.datapath.node.firewall

    def synced() -> bool:
        return {r.name for r in fw.rules()} == {"police-udp", "tap-web"}

    wait_for(synced, what="both rules on the node")
    got = {r.name: r for r in fw.rules()}
    assert got["police-udp"].spec.policer == "udp-10m"
    assert got["police-udp"].target == node.datapath.node.policers.id_of("udp-10m")
    assert (got["tap-web"].spec.mirror_interface, got["tap-web"].target) == ("eth1", 3)
    rc = cli.main(["--server", server.address, "get", "firewall-rule", "police-udp",
                   "-o", "yaml"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "policer: udp-10m" in out and "FIREWALL_ACTION_POLICE" in out
    # a bad one is refused by policyd itself, naming the field
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: FirewallRule\nmetadata: {name: x}\nspec: {priority: 1, "
                   "action: FIREWALL_ACTION_POLICE, match: {}}\n")
    rc = cli.main(["--server", server.address, "apply", "-f", str(bad)])
    _, err = capsys.readouterr()
    assert rc != 0 and "spec.policer" in err
