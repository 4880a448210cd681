"""The shared firewall rule and route models (xlbcore.firewall, xlbcore.route): canonical
forms, round trips, and errors that name the field and quote only a short prefix."""

from __future__ import annotations

import pytest

from xlb.types.v1 import types_pb2
from xlbcore.errors import ValidationError
from xlbcore.firewall import (
    Action,
    PortRange,
    RuleProto,
    fill_rule,
    parse_rule,
    parse_rule_name,
)
from xlbcore.route import NextHopSpec, fill_route, parse_route


def rule(**kw: object) -> types_pb2.FirewallRuleSpec:
    match = kw.pop("match", {})
    msg = types_pb2.FirewallRuleSpec(**kw)  # type: ignore[arg-type]
    for k, v in dict(match).items():  # type: ignore[call-overload]
        if k in ("src_ports", "dst_ports"):
            getattr(msg.match, k).first, getattr(msg.match, k).last = v
        else:
            setattr(msg.match, k, v)
    return msg


def route(prefix: str, *hops: tuple[str, str, int]) -> types_pb2.RouteSpec:
    msg = types_pb2.RouteSpec(prefix=prefix)
    for gw, dev, weight in hops:
        msg.next_hops.add(gateway=gw, interface=dev, weight=weight)
    return msg


def test_rule_canonical_and_round_trip():
    spec = parse_rule(rule(priority=100, action=types_pb2.FIREWALL_ACTION_DROP,
                           match={"src": "198.18.1.7", "protocol": types_pb2.PROTOCOL_TCP,
                                  "dst_ports": (80, 90), "src_ports": (0, 0)}))
    assert spec.match.src == "198.18.1.7/32"
    assert spec.match.dst_ports == PortRange(80, 90)
    assert spec.match.src_ports is None  # 0..0: any
    assert spec.match.protocol is RuleProto.TCP and spec.action is Action.DROP
    assert spec.match.family == 4
    again = parse_rule(fill_rule(types_pb2.FirewallRuleSpec(), spec))
    assert again == spec
    v6 = parse_rule(rule(action=types_pb2.FIREWALL_ACTION_ALLOW,
                         match={"dst": "2001:db8:0:0::/64"}))
    assert v6.match.dst == "2001:db8::/64" and v6.match.family == 6


@pytest.mark.parametrize(("msg", "field"), [
    (rule(action=0), "spec.action"),
    (rule(action=9), "spec.action"),
    (rule(priority=70000, action=1), "spec.priority"),
    (rule(action=1, match={"src": "198.18.0.1/24"}), "spec.match.src"),
    (rule(action=1, match={"dst": "nonsense"}), "spec.match.dst"),
    (rule(action=1, match={"src": "198.18.0.0/24", "dst": "2001:db8::/32"}), "spec.match.dst"),
    (rule(action=1, match={"protocol": 3, "dst": "2001:db8::/32"}), "spec.match.protocol"),
    (rule(action=1, match={"protocol": types_pb2.PROTOCOL_TCP, "dst_ports": (90, 80)}),
     "spec.match.dst_ports.last"),
    (rule(action=1, match={"protocol": types_pb2.PROTOCOL_TCP, "src_ports": (0, 80)}),
     "spec.match.src_ports.first"),
    (rule(action=1, match={"dst_ports": (80, 80)}), "spec.match.dst_ports"),
    (rule(action=1, match={"in_interface": "a/b"}), "spec.match.in_interface"),
    (rule(action=3), "spec.redirect_interface"),
    (rule(action=2, redirect_interface="eth1"), "spec.redirect_interface"),
])
def test_rule_errors_name_the_field(msg: types_pb2.FirewallRuleSpec, field: str):
    with pytest.raises(ValidationError) as err:
        parse_rule(msg)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_bad_values_are_quoted_short():
    with pytest.raises(ValidationError) as err:
        parse_rule(rule(action=1, match={"src": "x" * 5000}))
    assert len(str(err.value)) < 200 and "5000 characters" in str(err.value)
    with pytest.raises(ValidationError) as err:
        parse_rule_name("A" * 5000)
    assert len(str(err.value)) < 200


def test_route_canonical_and_round_trip():
    spec = parse_route(route("198.19.0.0/16", ("198.18.2.1", "", 0), ("198.18.1.1", "veth1", 3)))
    assert spec.next_hops == (NextHopSpec("198.18.1.1", "veth1", 3),
                              NextHopSpec("198.18.2.1", "", 1))
    assert parse_route(fill_route(types_pb2.RouteSpec(), spec)) == spec
    assert parse_route(route("2001:db8:1:0::/48", ("", "eth0", 1))).prefix == "2001:db8:1::/48"


@pytest.mark.parametrize(("msg", "field"), [
    (route(""), "spec.prefix"),
    (route("198.19.0.1/16", ("198.18.1.1", "", 1)), "spec.prefix"),
    (route("198.19.0.0/16"), "spec.next_hops"),
    (route("198.19.0.0/16", ("", "", 1)), "spec.next_hops[0]"),
    (route("198.19.0.0/16", ("2001:db8::1", "", 1)), "spec.next_hops[0].gateway"),
    (route("198.19.0.0/16", ("198.18.1.1", "", 300)), "spec.next_hops[0].weight"),
    (route("198.19.0.0/16", ("198.18.1.1", "", 1), ("198.18.1.1", "", 2)), "spec.next_hops[1]"),
    (route("198.19.0.0/16", ("224.0.0.1", "", 1)), "spec.next_hops[0].gateway"),
])
def test_route_errors_name_the_field(msg: types_pb2.RouteSpec, field: str):
    with pytest.raises(ValidationError) as err:
        parse_route(msg)
    assert str(err.value).startswith(field), str(err.value)
