"""The route model and its validation, shared by dpd and policyd (pure Python).

``parse_route(msg, field)`` turns an ``xlb.types.v1.RouteSpec`` into a frozen
``RouteSpec`` in canonical form (the prefix as its network, next hops sorted, an absent
weight as 1), raising ``ValidationError`` that names the field at fault; ``fill_route``
writes it back. A route is identified by its prefix.

What is checked here is what can be checked anywhere: whether a next hop is reachable
and an interface exists is up to each node, and dpd answers that one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from xlbcore.errors import ValidationError, quote
from xlbcore.firewall import parse_ifname, parse_prefix, prefix_family

MAX_NEXT_HOPS = 16
WEIGHT_MAX = 256  # as the kernel's multipath weight (rtnh_hops + 1)
DEFAULT_WEIGHT = 1


@dataclass(frozen=True, order=True)
class NextHopSpec:
    gateway: str = ""  # canonical address of the route's family; "": on-link
    interface: str = ""  # "": the one the node's FIB finds for the gateway
    weight: int = DEFAULT_WEIGHT


@dataclass(frozen=True)
class RouteSpec:
    prefix: str  # canonical: "198.19.0.0/16", "2001:db8:1::/48"
    next_hops: tuple[NextHopSpec, ...]

    @property
    def family(self) -> int:
        return prefix_family(self.prefix)


def parse_gateway(value: str, family: int, field: str) -> str:
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValidationError(f"{field}: {quote(value)} is not an IP address") from None
    if addr.version != family:
        raise ValidationError(
            f"{field}: {addr} is IPv{addr.version}, the route's prefix is IPv{family}")
    if addr.is_unspecified or addr.is_multicast or (
            isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address(
                "255.255.255.255")):
        raise ValidationError(f"{field}: {addr} is not a usable unicast address")
    return str(addr)


def parse_next_hop(msg: Any, family: int, field: str) -> NextHopSpec:
    gateway = parse_gateway(msg.gateway, family, f"{field}.gateway") if msg.gateway else ""
    interface = parse_ifname(msg.interface, f"{field}.interface") if msg.interface else ""
    if not gateway and not interface:
        raise ValidationError(
            f"{field}: a next hop needs a gateway, an interface (on-link) or both")
    weight = msg.weight or DEFAULT_WEIGHT
    if not 1 <= weight <= WEIGHT_MAX:
        raise ValidationError(f"{field}.weight: {weight} is out of range 1..{WEIGHT_MAX}")
    return NextHopSpec(gateway, interface, int(weight))


def parse_route(msg: Any, field: str = "spec") -> RouteSpec:
    """An xlb.types.v1.RouteSpec -> RouteSpec, or ValidationError naming
    ``<field>.<what>``."""
    prefix_ = f"{field}." if field else ""
    if not msg.prefix:
        raise ValidationError(f"{prefix_}prefix: a prefix is required")
    prefix = parse_prefix(msg.prefix, f"{prefix_}prefix")
    family = prefix_family(prefix)
    if not msg.next_hops:
        raise ValidationError(f"{prefix_}next_hops: a route needs at least one next hop")
    if len(msg.next_hops) > MAX_NEXT_HOPS:
        raise ValidationError(
            f"{prefix_}next_hops: {len(msg.next_hops)} next hops, at most {MAX_NEXT_HOPS}")
    hops: list[NextHopSpec] = []
    seen: dict[tuple[str, str], int] = {}
    for i, nh in enumerate(msg.next_hops):
        where = f"{prefix_}next_hops[{i}]"
        hop = parse_next_hop(nh, family, where)
        first = seen.setdefault((hop.gateway, hop.interface), i)
        if first != i:
            raise ValidationError(f"{where}: the same next hop as next_hops[{first}]")
        hops.append(hop)
    return RouteSpec(prefix, tuple(sorted(hops)))


def parse_route_prefix(value: str, field: str) -> str:
    """A route's key (DeleteRoutes): a canonical prefix."""
    if not value:
        raise ValidationError(f"{field}: a prefix is required")
    return parse_prefix(value, field)


def fill_route(msg: Any, spec: RouteSpec) -> Any:
    """Write `spec` into an empty xlb.types.v1.RouteSpec."""
    msg.prefix = spec.prefix
    for hop in spec.next_hops:
        msg.next_hops.add(gateway=hop.gateway, interface=hop.interface, weight=hop.weight)
    return msg
