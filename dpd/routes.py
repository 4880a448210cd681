"""Routes and neighbours of one node: what PutRoutes/DeleteRoutes/ListRoutes/ListNeighbors do.

Design (docs/routing.md has the measurements behind it): routes live in the node's kernel
FIB, installed through netlink (pyroute2) in the main table under xlb's own route
protocol id (`RTPROT_XLB`, `xlb-dpd --route-proto`). The datapath forwards with
``bpf_fib_lookup`` on that FIB and packets it hands to the stack are routed by the same
FIB, so both forward alike. Several next hops are one kernel multipath route with
weights (rtnh_hops = weight - 1); with ``fib_multipath_hash_policy=1`` (set in dpd's
network namespace on the first put) the kernel and ``bpf_fib_lookup`` (which passes the
ports) hash the 5-tuple, so one flow keeps one path. Neighbour MACs are the kernel's.

Only routes carrying xlb's protocol id are ever changed or deleted: a prefix the FIB
already routes by another protocol (a connected network, a static route) is refused,
and deletes pass the protocol to the kernel, which then leaves any other route alone.

`RouteTable` holds what both implementations share: the batch checks, a lock, the
generation (bumped by one per Put/Delete call that changes something) and the summary
(count and a digest of what List returns (`specs`), so an edit made with ``ip route`` shows).
`KernelRoutes` writes the FIB; `MemoryRoutes` keeps a dict (``--datapath memory``) with
the same contract, reachability checked against a configured set of networks or not at all.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import socket
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from dpd import rtnl
from xlbcore.errors import PreconditionError, ValidationError, quote
from xlbcore.route import NextHopSpec, RouteSpec, parse_route_prefix

log = structlog.get_logger("dpd.routes")

RTPROT_XLB = 200  # xlb's route protocol id ("proto 200" in `ip route`); --route-proto
MAIN_TABLE = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete: any scope
HASH_POLICY_SYSCTLS = ("/proc/sys/net/ipv4/fib_multipath_hash_policy",
                       "/proc/sys/net/ipv6/fib_multipath_hash_policy")
HASH_POLICY_L4 = "1"  # hash the 5-tuple (source, destination, protocol, ports)

# NUD_* bit -> xlb.dpd.v1.NeighborState (the enum's numbers are the bit positions + 1)
_NUD_STATE = {0x01: 1, 0x02: 2, 0x04: 3, 0x08: 4, 0x10: 5, 0x20: 6, 0x40: 7, 0x80: 8}


@dataclass(frozen=True)
class Neighbor:
    address: str
    mac: str  # "" while unresolved
    interface: str
    state: int  # xlb.dpd.v1.NeighborState


def check_proto(proto: int) -> int:
    """A route protocol id dpd may own: 5..255 (1..4 are the kernel's: redirect, kernel,
    boot, static)."""
    if not 5 <= proto <= 255:
        raise ValueError(f"route protocol {proto}: use one of 5..255 that nothing else on "
                         "the node uses")
    return proto


def _family(spec: RouteSpec) -> int:
    return socket.AF_INET6 if spec.family == 6 else socket.AF_INET


def _hop_order(hop: NextHopSpec) -> tuple[str, int]:
    return hop.gateway, hop.weight


def same_route(given: RouteSpec, fib: RouteSpec) -> bool:
    """Whether the FIB's `fib` is what `given` asked for: the same gateways and weights,
    the same interfaces where `given` named one (an empty interface is the kernel's
    choice), and any weight for a single next hop (the kernel keeps none)."""
    if given.prefix != fib.prefix or len(given.next_hops) != len(fib.next_hops):
        return False
    single = len(given.next_hops) == 1
    for g, f in zip(sorted(given.next_hops, key=_hop_order),
                    sorted(fib.next_hops, key=_hop_order), strict=True):
        if g.gateway != f.gateway or (g.interface and g.interface != f.interface):
            return False
        if not single and g.weight != f.weight:
            return False
    return True


def route_line(spec: RouteSpec) -> str:
    hops = ",".join(f"{h.gateway}%{h.interface}*{h.weight}" for h in spec.next_hops)
    return f"{spec.prefix} {hops}"


class RouteTable:
    """The part both implementations share. Subclasses provide `_links`, `_write`,
    `_delete` and `_read`."""

    kind = "abstract"

    def __init__(self) -> None:
        self.generation = 0
        self._lock = threading.Lock()
        # what was put through this dpd, by prefix: List shows a route as it was given
        # while the FIB still holds exactly that (an empty interface stays empty)
        self._given: dict[str, RouteSpec] = {}

    # the contract
    def put(self, routes: list[RouteSpec]) -> int:
        """Install `routes` (upsert by prefix), all or nothing: if one fails, the ones
        this call already wrote are restored to what they were."""
        if not routes:
            return 0
        seen: dict[str, int] = {}
        for i, r in enumerate(routes):
            first = seen.setdefault(r.prefix, i)
            if first != i:
                raise ValidationError(
                    f"routes[{i}].prefix: {r.prefix} appears more than once in the batch "
                    f"(also routes[{first}])")
        with self._lock:
            links = self._links()
            for i, r in enumerate(routes):
                self._check(i, r, links)
            self._write(routes)
            for r in routes:
                self._given[r.prefix] = r
            self.generation += 1
        log.debug("routes_put", count=len(routes), generation=self.generation)
        return len(routes)

    def delete(self, prefixes: list[str]) -> int:
        """Remove xlb's routes for `prefixes`; returns how many existed."""
        keys = [parse_route_prefix(p, f"prefixes[{i}]") for i, p in enumerate(prefixes)]
        if not keys:
            return 0
        with self._lock:
            deleted = self._delete(list(dict.fromkeys(keys)))
            for k in keys:
                self._given.pop(k, None)
            self.generation += 1
        log.debug("routes_deleted", requested=len(keys), deleted=deleted,
                  generation=self.generation)
        return deleted

    def specs(self) -> list[RouteSpec]:
        """xlb's routes as the FIB holds them, sorted by prefix."""
        with self._lock:
            fib = self._read()
            given = dict(self._given)
        out = []
        for r in fib:
            g = given.get(r.prefix)
            out.append(g if g is not None and same_route(g, r) else r)
        return sorted(out, key=lambda r: (r.family, ipaddress.ip_network(r.prefix)))

    def summary(self) -> tuple[int, int, str]:
        """(generation, count, digest of List's answer)."""
        generation = self.generation
        routes = self.specs()
        digest = hashlib.sha256("\n".join(map(route_line, routes)).encode()).hexdigest()[:16]
        return generation, len(routes), digest

    def neighbors(self) -> list[Neighbor]:
        return []

    def close(self) -> None:
        pass

    # shared checks
    def _check(self, i: int, r: RouteSpec, links: Collection[str] | None) -> None:
        for j, h in enumerate(r.next_hops):
            where = f"routes[{i}].next_hops[{j}]"
            if links is not None and h.interface and h.interface not in links:
                raise ValidationError(f"{where}.interface: interface {quote(h.interface)} "
                                      "does not exist on this node")
            if h.gateway and not h.interface and ipaddress.ip_address(h.gateway).is_link_local:
                raise ValidationError(f"{where}.interface: the gateway {h.gateway} is "
                                      "link-local: name the interface it is on")

    # the implementation's part
    def _links(self) -> Collection[str] | None:
        raise NotImplementedError

    def _write(self, routes: list[RouteSpec]) -> None:
        raise NotImplementedError

    def _delete(self, prefixes: list[str]) -> int:
        raise NotImplementedError

    def _read(self) -> list[RouteSpec]:
        raise NotImplementedError


def unreachable(i: int, gateway: str) -> PreconditionError:
    return PreconditionError(f"routes[{i}]: next hop {gateway} is unreachable on this node "
                             "(no connected network holds it)")


class MemoryRoutes(RouteTable):
    """Routes in a dict, for simulated nodes and unit tests. `reachable`: the networks a
    gateway must be in (None: every gateway is reachable); `interfaces`: the interfaces
    that exist (None: any name)."""

    kind = "memory"

    def __init__(self, reachable: Iterable[str] | None = None,
                 interfaces: Iterable[str] | None = None) -> None:
        super().__init__()
        self.reachable = (None if reachable is None
                          else [ipaddress.ip_network(n) for n in reachable])
        self.interfaces = None if interfaces is None else frozenset(interfaces)
        self._routes: dict[str, RouteSpec] = {}

    def _links(self) -> Collection[str] | None:
        return self.interfaces

    def _write(self, routes: list[RouteSpec]) -> None:
        for i, r in enumerate(routes):
            for h in r.next_hops:
                if h.gateway and self.reachable is not None and not any(
                        ipaddress.ip_address(h.gateway) in n for n in self.reachable):
                    raise unreachable(i, h.gateway)
        for r in routes:
            self._routes[r.prefix] = r

    def _delete(self, prefixes: list[str]) -> int:
        return sum(self._routes.pop(p, None) is not None for p in prefixes)

    def _read(self) -> list[RouteSpec]:
        return list(self._routes.values())


class KernelRoutes(RouteTable):
    """Routes in the kernel FIB of this network namespace (main table, `proto`).

    Writes are pipelined (dpd/rtnl.py): a batch is one exchange of netlink messages, and
    a failure anywhere in it undoes every route of the batch that was written."""

    kind = "kernel"
    BULK = 32  # from this many routes in a put, one dump finds what exists (else lookups)

    def __init__(self, proto: int = RTPROT_XLB) -> None:
        super().__init__()
        self.proto = check_proto(proto)
        self._nl: rtnl.Rtnl | None = None
        self._names: dict[int, str] = {}
        self._hash_policy_set = False

    def _netlink(self) -> rtnl.Rtnl:
        if self._nl is None:
            self._nl = rtnl.Rtnl()
        return self._nl

    def close(self) -> None:
        with self._lock:
            if self._nl is not None:
                self._nl.close()
                self._nl = None

    @staticmethod
    def _link_names() -> dict[int, str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return {int(link["index"]): str(link.get_attr("IFLA_IFNAME"))
                    for link in ipr.get_links()}

    def _links(self) -> Collection[str] | None:
        self._names = self._link_names()
        return frozenset(self._names.values())

    def _ensure_hash_policy(self) -> None:
        """fib_multipath_hash_policy=1 (L4) in this network namespace, for v4 and v6."""
        if self._hash_policy_set:
            return
        for path in HASH_POLICY_SYSCTLS:
            p = Path(path)
            if p.exists() and p.read_text().strip() != HASH_POLICY_L4:
                p.write_text(HASH_POLICY_L4)
                log.info("multipath_hash_policy_set", sysctl=path, value=HASH_POLICY_L4)
        self._hash_policy_set = True

    # writing
    def _body(self, r: RouteSpec) -> bytes:
        index = {name: i for i, name in self._names.items()}
        hops = [rtnl.Hop(h.gateway, index[h.interface] if h.interface else 0, h.weight)
                for h in r.next_hops]
        on_link = all(not h.gateway for h in r.next_hops)
        scope = RT_SCOPE_LINK if on_link and r.family == 4 else RT_SCOPE_UNIVERSE
        return rtnl.route_body(_family(r), r.prefix, MAIN_TABLE, self.proto, scope, hops)

    def _restore_body(self, previous: rtnl.FibRoute) -> bytes:
        return rtnl.route_body(previous.family, previous.prefix, MAIN_TABLE, self.proto,
                               previous.scope, previous.hops, previous.type,
                               previous.priority)

    def _del_body(self, family: int, prefix: str, table: int = MAIN_TABLE,
                  priority: int | None = None) -> bytes:
        # type 0 and scope NOWHERE match any; the protocol makes the kernel delete only
        # a route of ours
        return rtnl.route_body(family, prefix, table, self.proto, RT_SCOPE_NOWHERE, (),
                               rtype=0, priority=priority)

    def _existing(self, routes: list[RouteSpec]) -> dict[str, list[rtnl.FibRoute]]:
        """The main table's routes for the prefixes of `routes`, by prefix. A FIB-match
        lookup of a prefix's first address finds the route for the exact prefix unless a
        more specific route covers that address; then (or for a large batch) a dump of
        the family's routes answers."""
        nl = self._netlink()
        out: dict[str, list[rtnl.FibRoute]] = {}
        dump_families: set[int] = set()
        if len(routes) >= self.BULK:
            dump_families = {_family(r) for r in routes}
        else:
            for r in routes:
                net = ipaddress.ip_network(r.prefix)
                found = nl.fib_match(_family(r), str(net.network_address))
                if found is None:
                    continue
                if found.prefix == r.prefix and found.table == MAIN_TABLE:
                    out[r.prefix] = [found]
                elif found.prefix == r.prefix or ipaddress.ip_network(found.prefix).prefixlen \
                        > net.prefixlen:
                    dump_families.add(_family(r))  # shadowed (or another table): look closer
        if dump_families:
            wanted = {r.prefix for r in routes if _family(r) in dump_families}
            for family in dump_families:
                for fr in nl.dump(family):
                    if fr.table == MAIN_TABLE and fr.prefix in wanted:
                        out.setdefault(fr.prefix, []).append(fr)
        return out

    def _write(self, routes: list[RouteSpec]) -> None:
        self._ensure_hash_policy()
        existing = self._existing(routes)
        previous: list[rtnl.FibRoute | None] = []
        for i, r in enumerate(routes):
            found = existing.get(r.prefix, [])
            other = [f.proto for f in found if f.proto != self.proto]
            if other:
                raise self._foreign(i, r, other[0])
            mine = [f for f in found if f.proto == self.proto]
            previous.append(mine[0] if mine else None)
        requests = [(rtnl.RTM_NEWROUTE,
                     rtnl.NLM_F_CREATE | (rtnl.NLM_F_REPLACE if prev else rtnl.NLM_F_EXCL),
                     self._body(r)) for r, prev in zip(routes, previous, strict=True)]
        codes = self._netlink().write(requests)
        done = [i for i, c in enumerate(codes) if c == 0]
        failed = [i for i, c in enumerate(codes) if c != 0]
        if not failed:
            return
        self._roll_back([(routes[i], previous[i]) for i in done])
        i = failed[0]
        if codes[i] == errno.EEXIST:  # a route the lookups did not see: whose is it?
            protos = [f.proto for f in self._netlink().dump(_family(routes[i]))
                      if f.table == MAIN_TABLE and f.prefix == routes[i].prefix]
            raise self._foreign(i, routes[i], next((p for p in protos if p != self.proto),
                                                   protos[0] if protos else 0))
        raise self._refused(i, routes[i], codes[i])

    def _foreign(self, i: int, r: RouteSpec, proto: int) -> PreconditionError:
        return PreconditionError(
            f"routes[{i}].prefix: {r.prefix} is routed on this node by protocol "
            f"{_proto_name(proto)}, not by xlb; xlb leaves that route alone")

    def _roll_back(self, done: list[tuple[RouteSpec, rtnl.FibRoute | None]]) -> None:
        if not done:
            return
        requests = []
        for r, prev in done:
            if prev is None:
                requests.append((rtnl.RTM_DELROUTE, 0, self._del_body(_family(r), r.prefix)))
            else:
                requests.append((rtnl.RTM_NEWROUTE, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                                 self._restore_body(prev)))
        codes = self._netlink().write(requests)
        bad = [(r.prefix, c) for (r, _), c in zip(done, codes, strict=True) if c]
        if bad:
            log.warning("route_rollback_failed", routes=bad)
        log.info("routes_rolled_back", routes=[r.prefix for r, _ in done])

    def _refused(self, i: int, r: RouteSpec, code: int) -> Exception:
        """The error to report for the kernel's refusal (errno `code`) of routes[i]."""
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return unreachable(i, self._unreachable_gateway(r))
        if code == errno.ENODEV:
            return PreconditionError(f"routes[{i}]: an interface of the route is gone")
        if code == errno.EINVAL:
            return ValidationError(f"routes[{i}]: the kernel refused the route for "
                                   f"{r.prefix} (invalid argument: a gateway on the wrong "
                                   "interface?)")
        return PreconditionError(f"routes[{i}]: the kernel refused the route for {r.prefix}: "
                                 f"{errno.errorcode.get(code, code)}")

    def _unreachable_gateway(self, r: RouteSpec) -> str:
        """The first gateway of `r` that no connected route (of its interface) holds."""
        index = {name: i for i, name in self._names.items()}
        gateways = [h for h in r.next_hops if h.gateway]
        for h in gateways:
            found = self._netlink().route_get(_family(r), h.gateway,
                                              index.get(h.interface, 0))
            if found is None or any(x.gateway for x in found.hops):
                return h.gateway  # no route, or only through another router
        return gateways[0].gateway if gateways else "?"

    def _delete(self, prefixes: list[str]) -> int:
        requests = [(rtnl.RTM_DELROUTE, 0,
                     self._del_body(socket.AF_INET6 if ":" in p else socket.AF_INET, p))
                    for p in prefixes]
        codes = self._netlink().write(requests)
        bad = [(p, c) for p, c in zip(prefixes, codes, strict=True)
               if c not in (0, errno.ESRCH, errno.ENOENT)]
        if bad:
            p, c = bad[0]
            raise PreconditionError(f"deleting {p}: {errno.errorcode.get(c, c)}")
        return codes.count(0)

    # reading
    def _read(self) -> list[RouteSpec]:
        self._names = self._link_names()
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for fr in self._netlink().dump(family):
                if fr.proto == self.proto and fr.table == MAIN_TABLE:
                    out.append(self._spec(fr))
        return out

    def _spec(self, fr: rtnl.FibRoute) -> RouteSpec:
        def name(ifindex: int) -> str:
            return self._names.get(ifindex, str(ifindex)) if ifindex else ""

        return RouteSpec(fr.prefix, tuple(sorted(
            NextHopSpec(h.gateway, name(h.ifindex), h.weight) for h in fr.hops)))

    def neighbors(self) -> list[Neighbor]:
        from pyroute2 import IPRoute

        names = self._link_names()
        out = []
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for n in ipr.get_neighbours(family=family):
                    address = n.get_attr("NDA_DST")
                    if address is None or ipaddress.ip_address(address).is_multicast:
                        continue
                    out.append(Neighbor(str(address), str(n.get_attr("NDA_LLADDR") or ""),
                                        names.get(int(n["ifindex"]), str(n["ifindex"])),
                                        _NUD_STATE.get(int(n["state"]), 0)))
        return out


_PROTO_NAMES = {2: "kernel (a connected network)", 3: "boot", 4: "static", 186: "bgp",
                188: "ospf", 189: "rip"}


def _proto_name(proto: int) -> str:
    return _PROTO_NAMES.get(proto, str(proto))


def cleanup(proto: int = RTPROT_XLB) -> list[str]:
    """Delete every route of protocol `proto` in this network namespace (every table, v4
    and v6); routes of any other protocol are never touched."""
    table = KernelRoutes(proto)
    nl = table._netlink()
    try:
        found = [fr for family in (socket.AF_INET, socket.AF_INET6) for fr in nl.dump(family)
                 if fr.proto == proto]
        codes = nl.write([(rtnl.RTM_DELROUTE, 0,
                           table._del_body(fr.family, fr.prefix, fr.table, fr.priority))
                          for fr in found])
    finally:
        table.close()
    removed = [fr.prefix for fr, c in zip(found, codes, strict=True) if c == 0]
    if removed:
        log.info("routes_removed", count=len(removed), proto=proto)
    return removed
