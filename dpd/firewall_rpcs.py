"""xlb.dpd.v1 firewall and interface methods (PutFirewallRules, SetInterfaceConfig, ...).

A mixin of dpd.servicer.DatapathServicer: messages <-> dpd.firewall calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import structlog

from dpd.firewall import parse_policy
from dpd.node import Node
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2
from xlbcore.errors import ValidationError
from xlbcore.firewall import fill_rule, parse_rule, parse_rule_name
from xlbcore.rpc import rpc

log = structlog.get_logger("dpd.api")


class FirewallRpcs:
    node: Node

    def _interface_config(self, msg: pb.Interface) -> pb.Interface:
        """Fill an Interface message's zone, default policy and counters."""
        fw = self.node.firewall
        c = fw.interface(msg.ifindex)
        if c is not None:
            msg.zone = c.zone
            msg.default_policy = types_pb2.DefaultPolicy.ValueType(int(c.policy))
        else:
            msg.default_policy = types_pb2.DEFAULT_POLICY_ALLOW
        counters = msg.counters
        for k, v in fw.links.counters(msg.ifindex).items():
            setattr(counters, k, v)
        counters.drops.update(fw.interface_drops(msg.ifindex))
        return msg

    def _rule_stats(self, resp: pb.GetStatsResponse) -> None:
        for name, c in self.node.firewall.stats():
            r = resp.rules.add(name=name)
            r.counters.packets, r.counters.bytes = c.packets, c.bytes

    @rpc
    def PutFirewallRules(self, request: Any, context: Any) -> pb.PutFirewallRulesResponse:  # noqa: N802
        rules = [(parse_rule_name(r.name, f"rules[{i}].name"),
                  parse_rule(r.spec, f"rules[{i}].spec")) for i, r in enumerate(request.rules)]
        fw = self.node.firewall
        written = fw.put(rules)
        flushed = fw.flush_flows(self.node.conntrack) if request.flush_existing else 0
        return pb.PutFirewallRulesResponse(written=written, generation=fw.generation,
                                           flushed=flushed)

    @rpc
    def DeleteFirewallRules(self, request: Any, context: Any) -> pb.DeleteFirewallRulesResponse:  # noqa: N802
        names = [parse_rule_name(n, f"names[{i}]") for i, n in enumerate(request.names)]
        fw = self.node.firewall
        deleted = fw.delete(names)
        flushed = fw.flush_flows(self.node.conntrack) if request.flush_existing else 0
        return pb.DeleteFirewallRulesResponse(deleted=deleted, generation=fw.generation,
                                              flushed=flushed)

    @rpc
    def ListFirewallRules(self, request: Any, context: Any) -> Iterator[pb.FirewallRule]:  # noqa: N802
        for r in self.node.firewall.rules():
            msg = pb.FirewallRule(name=r.name)
            fill_rule(msg.spec, r.spec)
            yield msg

    @rpc
    def SetInterfaceConfig(self, request: Any, context: Any) -> pb.Interface:  # noqa: N802
        if not request.name:
            raise ValidationError("name: an interface name is required")
        policy = parse_policy(request.default_policy)
        c = self.node.firewall.set_interface(request.name, request.zone, policy)
        attached = {a.ifindex: a for a in self.node.interfaces()}
        msg = pb.Interface(name=request.name, ifindex=c.ifindex,
                           attached=c.ifindex in attached,
                           program_tag=self.node.program_tag if c.ifindex in attached else "")
        return self._interface_config(msg)
