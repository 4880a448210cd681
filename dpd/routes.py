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
from typing import Any

import structlog

from xlbcore.errors import PreconditionError, ValidationError, quote
from xlbcore.route import NextHopSpec, RouteSpec, parse_route_prefix

log = structlog.get_logger("dpd.routes")

RTPROT_XLB = 200  # xlb's route protocol id ("proto 200" in `ip route`); --route-proto
MAIN_TABLE = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete: any scope
RTM_F_FIB_MATCH = 0x2000  # RTM_GETROUTE: return the FIB entry that matched
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
    """Routes in the kernel FIB of this network namespace (main table, `proto`)."""

    kind = "kernel"

    def __init__(self, proto: int = RTPROT_XLB) -> None:
        super().__init__()
        self.proto = check_proto(proto)
        self._ipr: Any = None
        self._hash_policy_set = False

    def _netlink(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

    def _link_names(self) -> dict[int, str]:
        return {int(link["index"]): str(link.get_attr("IFLA_IFNAME"))
                for link in self._netlink().get_links()}

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
    def _request(self, r: RouteSpec) -> dict[str, Any]:
        index = {name: i for i, name in self._names.items()}
        req: dict[str, Any] = {"dst": r.prefix, "proto": self.proto, "table": MAIN_TABLE,
                               "family": _family(r)}
        if len(r.next_hops) == 1:
            h = r.next_hops[0]
            if h.gateway:
                req["gateway"] = h.gateway
            if h.interface:
                req["oif"] = index[h.interface]
        else:
            hops = []
            for h in r.next_hops:
                nh: dict[str, Any] = {"hops": h.weight - 1}
                if h.gateway:
                    nh["gateway"] = h.gateway
                if h.interface:
                    nh["oif"] = index[h.interface]
                hops.append(nh)
            req["multipath"] = hops
        on_link = all(not h.gateway for h in r.next_hops)
        if r.family == 4:
            req["scope"] = RT_SCOPE_LINK if on_link else RT_SCOPE_UNIVERSE
        return req

    def _current(self, r: RouteSpec) -> tuple[RouteSpec | None, int | None]:
        """(xlb's route for r.prefix, or None; the protocol of another route that holds
        r.prefix exactly, or None). A FIB-match lookup of the prefix's first address finds
        the route for the exact prefix unless a more specific one covers that address;
        then `_exact` answers from a dump."""
        from pyroute2.netlink.exceptions import NetlinkError

        net = ipaddress.ip_network(r.prefix)
        try:
            found = self._netlink().route("get", dst=str(net.network_address),
                                          family=_family(r), flags=RTM_F_FIB_MATCH)
        except NetlinkError as e:
            if e.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT, errno.ESRCH):
                return None, None
            raise
        for msg in found:
            if self._prefix_of(msg) == r.prefix:
                if int(msg["proto"]) == self.proto and msg.get_attr("RTA_TABLE") == MAIN_TABLE:
                    return self._from_fib(msg), None
                return None, int(msg["proto"])
        return self._exact(r)

    def _exact(self, r: RouteSpec) -> tuple[RouteSpec | None, int | None]:
        """As _current, from a dump of the family's main table (the rare case)."""
        mine: RouteSpec | None = None
        other: int | None = None
        for msg in self._netlink().get_routes(family=_family(r), table=MAIN_TABLE):
            if self._prefix_of(msg) != r.prefix:
                continue
            if int(msg["proto"]) == self.proto:
                mine = self._from_fib(msg)
            else:
                other = int(msg["proto"])
        return mine, other

    def _write(self, routes: list[RouteSpec]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        self._ensure_hash_policy()
        done: list[tuple[RouteSpec, RouteSpec | None]] = []
        try:
            for i, r in enumerate(routes):
                previous, other = self._current(r)
                if other is not None:
                    raise PreconditionError(
                        f"routes[{i}].prefix: {r.prefix} is routed on this node by protocol "
                        f"{_proto_name(other)}, not by xlb; xlb leaves that route alone")
                try:
                    self._netlink().route("replace" if previous else "add", **self._request(r))
                except NetlinkError as e:
                    if e.code == errno.EEXIST:  # a route _current did not see: look closer
                        previous, other = self._exact(r)
                        if other is not None or previous is None:
                            raise PreconditionError(
                                f"routes[{i}].prefix: {r.prefix} is routed on this node by "
                                f"protocol {_proto_name(other or 0)}, not by xlb; xlb leaves "
                                "that route alone") from None
                        self._netlink().route("replace", **self._request(r))
                    else:
                        raise self._refused(i, r, e) from None
                done.append((r, previous))
        except BaseException:
            self._roll_back(done)
            raise

    def _roll_back(self, done: list[tuple[RouteSpec, RouteSpec | None]]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        for r, previous in reversed(done):
            try:
                if previous is None:
                    self._netlink().route("del", dst=r.prefix, proto=self.proto,
                                          table=MAIN_TABLE, family=_family(r),
                                          scope=RT_SCOPE_NOWHERE)
                else:
                    self._netlink().route("replace", **self._request(previous))
            except (NetlinkError, KeyError) as e:
                log.warning("route_rollback_failed", prefix=r.prefix, error=str(e))
        if done:
            log.info("routes_rolled_back", routes=[r.prefix for r, _ in done])

    def _refused(self, i: int, r: RouteSpec, e: Any) -> Exception:
        """The error to report for the kernel's refusal `e` of routes[i]."""
        code = e.code
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return unreachable(i, self._unreachable_gateway(r))
        if code == errno.ENODEV:
            return PreconditionError(f"routes[{i}]: an interface of the route is gone")
        if code == errno.EINVAL:
            return ValidationError(f"routes[{i}]: the kernel refused the route for "
                                   f"{r.prefix} (invalid argument: a gateway that is one of "
                                   "the node's own addresses, or on the wrong interface?)")
        return PreconditionError(f"routes[{i}]: the kernel refused the route for {r.prefix}: "
                                 f"{errno.errorcode.get(code, code)}")

    def _unreachable_gateway(self, r: RouteSpec) -> str:
        """The first gateway of `r` that no connected route (of the given interface) holds."""
        from pyroute2.netlink.exceptions import NetlinkError

        index = {name: i for i, name in self._names.items()}
        gateways = [h for h in r.next_hops if h.gateway]
        for h in gateways:
            kw: dict[str, Any] = {"dst": h.gateway, "family": _family(r)}
            if h.interface:
                kw["oif"] = index[h.interface]
            try:
                found = self._netlink().route("get", **kw)
            except NetlinkError:
                return h.gateway
            if any(m.get_attr("RTA_GATEWAY") for m in found):  # not on a connected network
                return h.gateway
        return gateways[0].gateway if gateways else "?"

    def _delete(self, prefixes: list[str]) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        deleted = 0
        for p in prefixes:
            family = socket.AF_INET6 if ":" in p else socket.AF_INET
            try:  # the kernel deletes only a route of this protocol
                self._netlink().route("del", dst=p, proto=self.proto, table=MAIN_TABLE,
                                      family=family, scope=RT_SCOPE_NOWHERE)
                deleted += 1
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    raise PreconditionError(
                        f"deleting {p}: {errno.errorcode.get(e.code, e.code)}") from None
        return deleted

    # reading
    def _read(self) -> list[RouteSpec]:
        self._names = self._link_names()
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._netlink().get_routes(family=family, table=MAIN_TABLE,
                                                  proto=self.proto):
                if int(msg["proto"]) == self.proto:
                    out.append(self._from_fib(msg))
        return out

    @staticmethod
    def _prefix_of(msg: Any) -> str:
        dst = msg.get_attr("RTA_DST")
        if dst is None:
            dst = "::" if msg["family"] == socket.AF_INET6 else "0.0.0.0"
        return str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}"))

    def _from_fib(self, msg: Any) -> RouteSpec:
        names = getattr(self, "_names", None) or self._link_names()

        def name(oif: Any) -> str:
            return names.get(int(oif), str(oif)) if oif else ""

        hops = []
        multipath = msg.get_attr("RTA_MULTIPATH")
        if multipath:
            for nh in multipath:
                hops.append(NextHopSpec(str(nh.get_attr("RTA_GATEWAY") or ""),
                                        name(nh["oif"]), int(nh["hops"]) + 1))
        else:
            hops.append(NextHopSpec(str(msg.get_attr("RTA_GATEWAY") or ""),
                                    name(msg.get_attr("RTA_OIF")), 1))
        return RouteSpec(self._prefix_of(msg), tuple(sorted(hops)))

    def neighbors(self) -> list[Neighbor]:
        with self._lock:
            ipr = self._netlink()
            names = self._link_names()
            out = []
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
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    removed = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in list(ipr.get_routes(family=family, proto=proto)):  # every table
                if int(msg["proto"]) != proto:
                    continue
                prefix = KernelRoutes._prefix_of(msg)
                table = msg.get_attr("RTA_TABLE") or msg["table"]
                try:
                    ipr.route("del", dst=prefix, proto=proto, table=table, family=family,
                              scope=RT_SCOPE_NOWHERE, priority=msg.get_attr("RTA_PRIORITY") or 0)
                    removed.append(prefix)
                except NetlinkError as e:
                    if e.code not in (errno.ESRCH, errno.ENOENT):
                        raise
    if removed:
        log.info("routes_removed", count=len(removed), proto=proto)
    return removed
