"""The firewall rule model and its validation, shared by dpd and policyd (pure Python).

``parse_rule(msg, field)`` turns an ``xlb.types.v1.FirewallRuleSpec`` into a frozen
``RuleSpec`` in canonical form (prefixes as networks, an address as its /32 or /128,
absent port ranges as None), raising ``ValidationError`` that names the field at fault;
``fill_rule`` writes a ``RuleSpec`` back. So policyd accepts exactly what dpd accepts,
and a rule read back from a node compares equal to the rule that was put.

What is checked here is what can be checked anywhere: whether an interface named in a
rule exists is up to each node (nodes differ), and dpd answers that one.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from xlb.types.v1 import types_pb2
from xlbcore.errors import ValidationError, quote

PRIORITY_MAX = 65535
NAME_MAX = 63  # a rule name: 1..63 of [a-z0-9-], starting with a letter or digit
IFNAME_MAX = 15  # Linux IFNAMSIZ - 1
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
# a policer's name as dpd's PutPolicers takes it (whether the node has it is the node's
# business)
_POLICER_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")


class Action(enum.IntEnum):
    """Values match xlb.types.v1.FirewallAction (and the datapath's XLB_ACT_*)."""

    ALLOW = 1
    DROP = 2
    REDIRECT = 3
    TRAP = 4  # the packet's first bytes to dpd's event stream, then as ALLOW
    POLICE = 5  # charged to a policer: over its rate dropped, else as ALLOW
    MIRROR = 6  # a copy out of a mirror interface, then as ALLOW


class RuleProto(enum.IntEnum):
    """IP protocol a rule matches (0: any)."""

    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58
    SCTP = 132


_API_PROTO: dict[int, RuleProto] = {
    types_pb2.PROTOCOL_UNSPECIFIED: RuleProto.ANY,
    types_pb2.PROTOCOL_TCP: RuleProto.TCP,
    types_pb2.PROTOCOL_UDP: RuleProto.UDP,
    types_pb2.PROTOCOL_ICMP: RuleProto.ICMP,
    types_pb2.PROTOCOL_ICMPV6: RuleProto.ICMPV6,
    types_pb2.PROTOCOL_SCTP: RuleProto.SCTP,
}
# protocols whose rules may match ports (the datapath keys their packets by ports)
PORT_PROTOS = (RuleProto.TCP, RuleProto.UDP, RuleProto.SCTP)
_PROTO_API: dict[RuleProto, int] = {v: k for k, v in _API_PROTO.items()}


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class RuleMatch:
    src: str = ""  # canonical prefix ("198.18.0.0/24", "2001:db8::/32"); "": any
    dst: str = ""
    protocol: RuleProto = RuleProto.ANY
    src_ports: PortRange | None = None  # None: any
    dst_ports: PortRange | None = None
    in_interface: str = ""  # "": any

    @property
    def family(self) -> int:
        """4 or 6 when a prefix (or an ICMP protocol) fixes it, else 0 (both)."""
        for prefix in (self.src, self.dst):
            if prefix:
                return 6 if ":" in prefix else 4
        if self.protocol is RuleProto.ICMP:
            return 4
        if self.protocol is RuleProto.ICMPV6:
            return 6
        return 0


@dataclass(frozen=True)
class RuleSpec:
    priority: int
    match: RuleMatch
    action: Action
    redirect_interface: str = ""
    policer: str = ""  # POLICE: the policer's name
    mirror_interface: str = ""  # MIRROR: where the copies go


def parse_rule_name(value: str, field: str = "name") -> str:
    """A rule name: 1..63 of [a-z0-9-], starting with a letter or digit (the same rules as
    a service or node name)."""
    if not value:
        raise ValidationError(f"{field}: a name is required")
    if len(value) > NAME_MAX:
        raise ValidationError(
            f"{field}: {quote(value)} is {len(value)} characters, at most {NAME_MAX}")
    if not _NAME_RE.fullmatch(value):
        raise ValidationError(
            f"{field}: {quote(value)} is not a valid name; use lower-case letters, digits and"
            " '-', starting with a letter or digit")
    return value


def parse_ifname(value: str, field: str) -> str:
    """The syntax of a Linux interface name (whether it exists is each node's business)."""
    if len(value) > IFNAME_MAX:
        raise ValidationError(
            f"{field}: {quote(value)} is {len(value)} characters; an interface name has at"
            f" most {IFNAME_MAX}")
    if value in (".", "..") or any(c in value for c in "/: \t\n\r\x00"):
        raise ValidationError(f"{field}: {quote(value)} is not an interface name")
    return value


@functools.lru_cache(maxsize=65536)
def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        return None


def parse_prefix(value: str, field: str) -> str:
    """A prefix ("198.18.0.0/24", "2001:db8::/32") or an address (its /32 or /128) as
    canonical text; host bits set are refused (say what was meant)."""
    text = value.strip() if isinstance(value, str) else ""
    net = _network(text) if text else None
    if net is None:
        try:
            loose = ipaddress.ip_network(text, strict=False) if text else None
        except ValueError:
            loose = None
        if loose is not None:
            raise ValidationError(
                f"{field}: {quote(value)} has host bits set; did you mean {loose}?")
        raise ValidationError(f"{field}: {quote(value)} is not an IPv4 or IPv6 prefix or address")
    return str(net)


def prefix_family(prefix: str) -> int:
    return 6 if ":" in prefix else 4


def parse_rule_proto(api_value: int, field: str) -> RuleProto:
    try:
        return _API_PROTO[api_value]
    except KeyError:
        raise ValidationError(
            f"{field}: unknown protocol {api_value}; use PROTOCOL_TCP, PROTOCOL_UDP,"
            " PROTOCOL_SCTP, PROTOCOL_ICMP, PROTOCOL_ICMPV6 or leave it unset for any"
        ) from None


def parse_port_range(msg: Any, present: bool, field: str) -> PortRange | None:
    """None (any port) when absent or 0..0; else first 1..65535, last first..65535."""
    if not present or (msg.first == 0 and msg.last == 0):
        return None
    if not 1 <= msg.first <= 65535:
        raise ValidationError(f"{field}.first: port {msg.first} is out of range 1..65535")
    if not msg.first <= msg.last <= 65535:
        raise ValidationError(
            f"{field}.last: {msg.last} is not in {msg.first}..65535 (for one port, set last"
            " equal to first)")
    return PortRange(int(msg.first), int(msg.last))


def parse_match(msg: Any, field: str = "match") -> RuleMatch:
    src = parse_prefix(msg.src, f"{field}.src") if msg.src else ""
    dst = parse_prefix(msg.dst, f"{field}.dst") if msg.dst else ""
    if src and dst and prefix_family(src) != prefix_family(dst):
        raise ValidationError(
            f"{field}.dst: {dst} is not of the family of src {src} (both IPv4 or both IPv6)")
    protocol = parse_rule_proto(msg.protocol, f"{field}.protocol")
    family = prefix_family(src or dst) if (src or dst) else 0
    if protocol is RuleProto.ICMP and family == 6:
        raise ValidationError(f"{field}.protocol: PROTOCOL_ICMP with IPv6 prefixes; use"
                              " PROTOCOL_ICMPV6")
    if protocol is RuleProto.ICMPV6 and family == 4:
        raise ValidationError(f"{field}.protocol: PROTOCOL_ICMPV6 with IPv4 prefixes; use"
                              " PROTOCOL_ICMP")
    src_ports = parse_port_range(msg.src_ports, msg.HasField("src_ports"), f"{field}.src_ports")
    dst_ports = parse_port_range(msg.dst_ports, msg.HasField("dst_ports"), f"{field}.dst_ports")
    if (src_ports or dst_ports) and protocol not in PORT_PROTOS:
        which = "src_ports" if src_ports else "dst_ports"
        raise ValidationError(
            f"{field}.{which}: ports can only be matched with PROTOCOL_TCP, PROTOCOL_UDP or"
            " PROTOCOL_SCTP")
    in_interface = parse_ifname(msg.in_interface, f"{field}.in_interface") \
        if msg.in_interface else ""
    return RuleMatch(src, dst, protocol, src_ports, dst_ports, in_interface)


def parse_rule(msg: Any, field: str = "spec") -> RuleSpec:
    """An xlb.types.v1.FirewallRuleSpec -> RuleSpec, or ValidationError naming
    ``<field>.<what>``."""
    prefix = f"{field}." if field else ""
    if not 0 <= msg.priority <= PRIORITY_MAX:
        raise ValidationError(f"{prefix}priority: {msg.priority} is out of range 0..{PRIORITY_MAX}")
    match = parse_match(msg.match, f"{prefix}match")
    try:
        action = Action(msg.action)
    except ValueError:
        what = "no action given" if msg.action == 0 else f"unknown action {msg.action}"
        raise ValidationError(
            f"{prefix}action: {what}; use FIREWALL_ACTION_ALLOW, FIREWALL_ACTION_DROP,"
            " FIREWALL_ACTION_REDIRECT, FIREWALL_ACTION_TRAP, FIREWALL_ACTION_POLICE or"
            " FIREWALL_ACTION_MIRROR"
        ) from None
    redirect = msg.redirect_interface
    if action is Action.REDIRECT:
        if not redirect:
            raise ValidationError(
                f"{prefix}redirect_interface: FIREWALL_ACTION_REDIRECT needs an interface")
        parse_ifname(redirect, f"{prefix}redirect_interface")
    elif redirect:
        raise ValidationError(
            f"{prefix}redirect_interface: only FIREWALL_ACTION_REDIRECT takes an interface")
    policer = msg.policer
    if action is Action.POLICE:
        if not policer:
            raise ValidationError(f"{prefix}policer: FIREWALL_ACTION_POLICE needs a policer name")
        if not _POLICER_RE.fullmatch(policer):
            raise ValidationError(f"{prefix}policer: {quote(policer)} is not a policer name "
                                  "(1..63 letters, digits, '.', '_' or '-')")
    elif policer:
        raise ValidationError(f"{prefix}policer: only FIREWALL_ACTION_POLICE takes a policer")
    mirror = msg.mirror_interface
    if action is Action.MIRROR:
        if not mirror:
            raise ValidationError(
                f"{prefix}mirror_interface: FIREWALL_ACTION_MIRROR needs an interface")
        parse_ifname(mirror, f"{prefix}mirror_interface")
        if mirror == match.in_interface:
            raise ValidationError(f"{prefix}mirror_interface: {quote(mirror)} is the rule's "
                                  "in_interface itself")
    elif mirror:
        raise ValidationError(
            f"{prefix}mirror_interface: only FIREWALL_ACTION_MIRROR takes a mirror interface")
    return RuleSpec(int(msg.priority), match, action, redirect, policer, mirror)


def fill_rule(msg: Any, spec: RuleSpec) -> Any:
    """Write `spec` into an empty xlb.types.v1.FirewallRuleSpec (canonical: absent port
    ranges stay absent)."""
    msg.priority = spec.priority
    m, out = spec.match, msg.match
    out.SetInParent()
    out.src, out.dst = m.src, m.dst
    out.protocol = _PROTO_API[m.protocol]
    if m.src_ports is not None:
        out.src_ports.first, out.src_ports.last = m.src_ports.first, m.src_ports.last
    if m.dst_ports is not None:
        out.dst_ports.first, out.dst_ports.last = m.dst_ports.first, m.dst_ports.last
    out.in_interface = m.in_interface
    msg.action = int(spec.action)
    msg.redirect_interface = spec.redirect_interface
    msg.policer = spec.policer
    msg.mirror_interface = spec.mirror_interface
    return msg


def rule_order(name: str, spec: RuleSpec) -> tuple[int, str]:
    """The order in which rules decide: higher priority first, then by name."""
    return (-spec.priority, name)
