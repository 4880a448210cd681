"""A small client of xlb.policy.v1.Policy, for xlbctl, demos and tests.

    with PolicyClient("unix:/run/xlb/policyd.sock") as pc:
        pc.wait_ready()
        pc.register_node("node-a", "127.0.0.1:50051")
        pc.apply_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:8080", "198.18.1.3:8080@2"])
        pc.wait_synced(timeout=30)      # every node SYNCED at the current generation

        # many services at once: one call, one transaction, one generation
        reply = pc.apply_services([make_service(f"s{i}", ...) for i in range(10_000)])
        pc.wait_synced(generation=reply.generation)

Errors are the server's: grpc.RpcError with code() and details().
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from xlb.policy.v1 import policy_pb2, policy_pb2_grpc
from xlb.types.v1 import types_pb2
from xlbcore.errors import quote
from xlbcore.server import MESSAGE_OPTIONS

# Replies of ApplyServices / ListServices for many services exceed grpc's default 4 MiB.
CHANNEL_OPTIONS = MESSAGE_OPTIONS

PROTOCOLS = {"tcp": types_pb2.PROTOCOL_TCP, "udp": types_pb2.PROTOCOL_UDP,
             "sctp": types_pb2.PROTOCOL_SCTP}
ALGORITHMS = {
    "round-robin": types_pb2.ALGORITHM_ROUND_ROBIN,
    "rr": types_pb2.ALGORITHM_ROUND_ROBIN,
    "hash": types_pb2.ALGORITHM_HASH,
    "maglev": types_pb2.ALGORITHM_MAGLEV,
    "source-hash": types_pb2.ALGORITHM_SOURCE_HASH,
    "least-connections": types_pb2.ALGORITHM_LEAST_CONNECTIONS,
    "lc": types_pb2.ALGORITHM_LEAST_CONNECTIONS,
}


def parse_endpoint(text: str) -> types_pb2.Endpoint:
    """``ADDRESS:PORT[@WEIGHT][,priority=N]`` -> Endpoint (the server validates the
    values); an IPv6 address in brackets: ``[2001:db8::2]:8080``."""
    text, *options = text.split(",")
    priority = None
    for opt in options:
        key, _, value = opt.partition("=")
        if key != "priority" or not value.isdigit():
            raise ValueError(f"endpoint option {quote(opt)}: use priority=N (0: preferred)")
        priority = int(value)
    where, _, weight = text.partition("@")
    address, sep, port = where.rpartition(":")
    if not sep or not address or not port.isdigit():
        raise ValueError(f"endpoint {quote(text)}: use ADDRESS:PORT or ADDRESS:PORT@WEIGHT")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    elif ":" in address:
        raise ValueError(f"endpoint {quote(text)}: an IPv6 address goes in brackets, "
                         "[ADDRESS]:PORT")
    ep = types_pb2.Endpoint(address=address, port=int(port))
    if weight:
        if not weight.isdigit():
            raise ValueError(f"endpoint {quote(text)}: weight {quote(weight)} is not a number")
        ep.weight = int(weight)
    if priority is not None:
        ep.priority = priority
    return ep


HEALTH_KINDS = {
    "tcp": types_pb2.HEALTH_CHECK_KIND_TCP,
    "udp": types_pb2.HEALTH_CHECK_KIND_UDP,
    "http": types_pb2.HEALTH_CHECK_KIND_HTTP,
    "icmp": types_pb2.HEALTH_CHECK_KIND_ICMP,
}


def _millis(text: str, what: str) -> int:
    """``200``, ``200ms`` or ``1.5s`` -> milliseconds."""
    t = text.strip().lower()
    try:
        if t.endswith("ms"):
            return int(t[:-2])
        if t.endswith("s"):
            return round(float(t[:-1]) * 1000)
        return int(t)
    except ValueError:
        raise ValueError(f"health {what} {quote(text)}: not a duration (200, 200ms, 1.5s)") \
            from None


def parse_health(text: str) -> types_pb2.HealthCheck:
    """``KIND[,interval=200ms][,timeout=100ms][,rise=N][,fall=N][,port=P][,path=/x]
    [,status=N][,request=TEXT][,expect=TEXT]`` -> HealthCheck (the server validates)."""
    kind, *opts = text.split(",")
    if kind.strip().lower() not in HEALTH_KINDS:
        raise ValueError(f"health {quote(kind)}: use one of {', '.join(HEALTH_KINDS)}")
    hc = types_pb2.HealthCheck(kind=HEALTH_KINDS[kind.strip().lower()])
    for opt in opts:
        key, eq, value = opt.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"health option {quote(opt)}: KEY=VALUE")
        if key in ("interval", "timeout"):
            setattr(hc, f"{key}_ms", _millis(value, key))
        elif key in ("rise", "fall", "port", "status"):
            if not value.isdigit():
                raise ValueError(f"health {key} {quote(value)}: not a number")
            setattr(hc, "http_status" if key == "status" else key, int(value))
        elif key == "path":
            hc.http_path = value
        elif key in ("request", "expect"):
            setattr(hc, f"udp_{key}", value.encode())
        else:
            raise ValueError(f"health option {quote(key)}: use interval, timeout, rise, "
                             "fall, port, path, status, request or expect")
    return hc


def parse_ct_timeouts(items: Iterable[str]) -> types_pb2.ConntrackTimeouts | None:
    """``STATE=SECONDS`` items (tcp_handshake, tcp_established, tcp_closing, tcp_closed,
    udp_new, udp_established) -> ConntrackTimeouts; None without items."""
    out = types_pb2.ConntrackTimeouts()
    items = list(items)
    for item in items:
        state, _, value = item.partition("=")
        if state not in out.DESCRIPTOR.fields_by_name or not value.isdigit():
            names = ", ".join(out.DESCRIPTOR.fields_by_name)
            raise ValueError(f"conntrack timeout {quote(item)}: STATE=SECONDS, STATE one of "
                             f"{names}")
        setattr(out, state, int(value))
    return out if items else None


def parse_service_ports(text: str, field: str = "port") -> tuple[int, int]:
    """A service's ports as people write them -> (port, port_last): ``80`` (one port),
    ``8000-8099`` (a range) or ``*`` (any-port: every port of the VIP). The server
    validates the values."""
    text = text.strip()
    if text in ("*", "any"):
        return 0, 0
    first, sep, last = text.partition("-")
    if not first.isdigit() or (sep and not last.isdigit()):
        raise ValueError(f"{field} {quote(text)}: use PORT, FIRST-LAST or * (every port)")
    return int(first), int(last) if sep else 0


def make_service(
    name: str,
    vip: str,
    port: int,
    protocol: str = "tcp",
    endpoints: Iterable[str | types_pb2.Endpoint] = (),
    algorithm: str = "round-robin",
    health: str | None = None,
    ct_timeouts: Iterable[str] = (),
    persistence_s: int = 0,
    port_last: int = 0,
) -> policy_pb2.Service:
    """`port` with `port_last` 0: one port; port_last > port: the range port..port_last;
    port 0: every port (docs/services.md). An endpoint ``ADDRESS:0`` of a range or
    any-port service keeps the client's destination port."""
    if protocol.lower() not in PROTOCOLS:
        raise ValueError(f"protocol {quote(protocol)}: use {' or '.join(PROTOCOLS)}")
    if algorithm.lower() not in ALGORITHMS:
        raise ValueError(f"algorithm {quote(algorithm)}: use one of {', '.join(ALGORITHMS)}")
    return policy_pb2.Service(
        name=name,
        vip=vip,
        port=port,
        port_last=port_last,
        protocol=PROTOCOLS[protocol.lower()],
        algorithm=ALGORITHMS[algorithm.lower()],
        endpoints=[parse_endpoint(e) if isinstance(e, str) else e for e in endpoints],
        health=parse_health(health) if health else None,
        conntrack_timeouts=parse_ct_timeouts(ct_timeouts),
        persistence_timeout_s=persistence_s,
    )


RULE_PROTOCOLS = {
    "any": types_pb2.PROTOCOL_UNSPECIFIED,
    "tcp": types_pb2.PROTOCOL_TCP,
    "udp": types_pb2.PROTOCOL_UDP,
    "icmp": types_pb2.PROTOCOL_ICMP,
    "icmpv6": types_pb2.PROTOCOL_ICMPV6,
    "sctp": types_pb2.PROTOCOL_SCTP,
}
ACTIONS = {
    "allow": types_pb2.FIREWALL_ACTION_ALLOW,
    "drop": types_pb2.FIREWALL_ACTION_DROP,
    "redirect": types_pb2.FIREWALL_ACTION_REDIRECT,
    "trap": types_pb2.FIREWALL_ACTION_TRAP,
}


def parse_ports(text: str, field: str = "ports") -> types_pb2.PortRange:
    """``PORT`` or ``FIRST-LAST`` -> PortRange (the server validates the values)."""
    first, sep, last = text.partition("-")
    if not first.isdigit() or (sep and not last.isdigit()):
        raise ValueError(f"{field} {quote(text)}: use PORT or FIRST-LAST")
    return types_pb2.PortRange(first=int(first), last=int(last if sep else first))


def make_rule(
    name: str,
    action: str,
    priority: int = 0,
    *,
    src: str = "",
    dst: str = "",
    protocol: str = "any",
    src_ports: str = "",
    dst_ports: str = "",
    in_interface: str = "",
    redirect_interface: str = "",
    flush_existing: bool = False,
) -> policy_pb2.FirewallRule:
    if action.lower() not in ACTIONS:
        raise ValueError(f"action {quote(action)}: use one of {', '.join(ACTIONS)}")
    if protocol.lower() not in RULE_PROTOCOLS:
        raise ValueError(f"protocol {quote(protocol)}: use one of {', '.join(RULE_PROTOCOLS)}")
    match = types_pb2.FirewallMatch(src=src, dst=dst, protocol=RULE_PROTOCOLS[protocol.lower()],
                                    in_interface=in_interface)
    if src_ports:
        match.src_ports.CopyFrom(parse_ports(src_ports, "src-ports"))
    if dst_ports:
        match.dst_ports.CopyFrom(parse_ports(dst_ports, "dst-ports"))
    spec = types_pb2.FirewallRuleSpec(priority=priority, match=match,
                                      action=ACTIONS[action.lower()],
                                      redirect_interface=redirect_interface)
    return policy_pb2.FirewallRule(name=name, spec=spec, flush_existing=flush_existing)


def parse_next_hop(text: str) -> types_pb2.NextHop:
    """``GATEWAY[,dev=IFACE][,weight=N]`` or ``dev=IFACE[,weight=N]`` (on-link) -> NextHop."""
    hop = types_pb2.NextHop()
    for i, part in enumerate(p.strip() for p in text.split(",")):
        key, eq, value = part.partition("=")
        if not eq and i == 0 and part:
            hop.gateway = part
        elif key == "dev" and value:
            hop.interface = value
        elif key == "weight" and value.isdigit():
            hop.weight = int(value)
        else:
            raise ValueError(
                f"next hop {quote(text)}: use GATEWAY[,dev=IFACE][,weight=N] or dev=IFACE")
    return hop


def make_blocklist(name: str, prefixes: Iterable[str],
                   node_selector: dict[str, str] | None = None) -> policy_pb2.Blocklist:
    return policy_pb2.Blocklist(name=name, spec=policy_pb2.BlocklistSpec(prefixes=prefixes),
                                node_selector=node_selector or {})


def make_mirror(name: str, interface: str, mirror_interface: str,
                node_selector: dict[str, str] | None = None) -> policy_pb2.Mirror:
    return policy_pb2.Mirror(name=name, spec=policy_pb2.MirrorSpec(
        interface=interface, mirror_interface=mirror_interface),
        node_selector=node_selector or {})


def make_policer(name: str, rate_bps: int, burst_bytes: int, interfaces: Iterable[str] = (),
                 node_selector: dict[str, str] | None = None) -> policy_pb2.Policer:
    return policy_pb2.Policer(name=name, spec=policy_pb2.PolicerSpec(
        rate_bps=rate_bps, burst_bytes=burst_bytes, interfaces=interfaces),
        node_selector=node_selector or {})


def make_route(name: str, prefix: str, next_hops: Iterable[str | types_pb2.NextHop]
               ) -> policy_pb2.Route:
    hops = [parse_next_hop(h) if isinstance(h, str) else h for h in next_hops]
    return policy_pb2.Route(name=name, spec=types_pb2.RouteSpec(prefix=prefix, next_hops=hops))


class PolicyClient:
    """`credentials`: TLS (xlbcore.tls.ClientTLS(...).credentials()); `token`: a bearer
    token sent with every call (docs/security.md)."""

    def __init__(self, target: str, timeout: float = 10.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        if credentials is not None:
            self._raw = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        else:
            self._raw = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.channel = self._raw
        if token:
            from xlbcore.auth import BearerToken

            self.channel = grpc.intercept_channel(self._raw, BearerToken(token))
        self.stub = policy_pb2_grpc.PolicyStub(self.channel)

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects; grpc.FutureTimeoutError otherwise."""
        grpc.channel_ready_future(self._raw).result(timeout=timeout)

    # -- services ----------------------------------------------------------------------

    def apply(self, service: policy_pb2.Service) -> policy_pb2.Service:
        result: policy_pb2.Service = self.stub.ApplyService(
            policy_pb2.ApplyServiceRequest(service=service), timeout=self.timeout
        )
        return result

    def apply_service(
        self,
        name: str,
        vip: str,
        port: int,
        protocol: str = "tcp",
        endpoints: Iterable[str | types_pb2.Endpoint] = (),
        algorithm: str = "round-robin",
    ) -> policy_pb2.Service:
        return self.apply(make_service(name, vip, port, protocol, endpoints, algorithm))

    def apply_services(
        self, services: Iterable[policy_pb2.Service]
    ) -> policy_pb2.ApplyServicesResponse:
        """Create or replace all `services` atomically; the reply holds them as stored
        and the generation to wait for."""
        result: policy_pb2.ApplyServicesResponse = self.stub.ApplyServices(
            policy_pb2.ApplyServicesRequest(services=services), timeout=self.timeout
        )
        return result

    def delete_service(self, name: str) -> None:
        self.stub.DeleteService(policy_pb2.DeleteServiceRequest(name=name), timeout=self.timeout)

    def delete_services(self, names: Iterable[str]) -> int:
        """Delete all `names` atomically; returns the new generation."""
        result: policy_pb2.DeleteServicesResponse = self.stub.DeleteServices(
            policy_pb2.DeleteServicesRequest(names=names), timeout=self.timeout
        )
        return result.generation

    def get_service(self, name: str) -> policy_pb2.Service:
        result: policy_pb2.Service = self.stub.GetService(
            policy_pb2.GetServiceRequest(name=name), timeout=self.timeout
        )
        return result

    def list_services(self) -> list[policy_pb2.Service]:
        return list(self.stub.ListServices(policy_pb2.ListServicesRequest(), timeout=self.timeout))

    # -- firewall rules and routes ---------------------------------------------------

    def apply_rule(self, rule: policy_pb2.FirewallRule) -> policy_pb2.FirewallRule:
        result: policy_pb2.FirewallRule = self.stub.ApplyFirewallRule(
            policy_pb2.ApplyFirewallRuleRequest(rule=rule), timeout=self.timeout)
        return result

    def apply_rules(self, rules: Iterable[policy_pb2.FirewallRule]
                    ) -> policy_pb2.ApplyFirewallRulesResponse:
        """Create or replace all `rules` atomically."""
        result: policy_pb2.ApplyFirewallRulesResponse = self.stub.ApplyFirewallRules(
            policy_pb2.ApplyFirewallRulesRequest(rules=rules), timeout=self.timeout)
        return result

    def delete_rule(self, name: str) -> None:
        self.stub.DeleteFirewallRule(policy_pb2.DeleteFirewallRuleRequest(name=name),
                                     timeout=self.timeout)

    def delete_rules(self, names: Iterable[str]) -> int:
        """Delete all `names` atomically; returns the new generation."""
        result: policy_pb2.DeleteFirewallRulesResponse = self.stub.DeleteFirewallRules(
            policy_pb2.DeleteFirewallRulesRequest(names=names), timeout=self.timeout)
        return result.generation

    def get_rule(self, name: str) -> policy_pb2.FirewallRule:
        result: policy_pb2.FirewallRule = self.stub.GetFirewallRule(
            policy_pb2.GetFirewallRuleRequest(name=name), timeout=self.timeout)
        return result

    def list_rules(self) -> list[policy_pb2.FirewallRule]:
        return list(self.stub.ListFirewallRules(policy_pb2.ListFirewallRulesRequest(),
                                                timeout=self.timeout))

    def apply_route(self, route: policy_pb2.Route) -> policy_pb2.Route:
        result: policy_pb2.Route = self.stub.ApplyRoute(
            policy_pb2.ApplyRouteRequest(route=route), timeout=self.timeout)
        return result

    def apply_routes(self, routes: Iterable[policy_pb2.Route]) -> policy_pb2.ApplyRoutesResponse:
        """Create or replace all `routes` atomically."""
        result: policy_pb2.ApplyRoutesResponse = self.stub.ApplyRoutes(
            policy_pb2.ApplyRoutesRequest(routes=routes), timeout=self.timeout)
        return result

    def delete_route(self, name: str) -> None:
        self.stub.DeleteRoute(policy_pb2.DeleteRouteRequest(name=name), timeout=self.timeout)

    def delete_routes(self, names: Iterable[str]) -> int:
        result: policy_pb2.DeleteRoutesResponse = self.stub.DeleteRoutes(
            policy_pb2.DeleteRoutesRequest(names=names), timeout=self.timeout)
        return result.generation

    def get_route(self, name: str) -> policy_pb2.Route:
        result: policy_pb2.Route = self.stub.GetRoute(
            policy_pb2.GetRouteRequest(name=name), timeout=self.timeout)
        return result

    def list_routes(self) -> list[policy_pb2.Route]:
        return list(self.stub.ListRoutes(policy_pb2.ListRoutesRequest(), timeout=self.timeout))

    # -- blocklists and mirrors --------------------------------------------------------

    def apply_blocklist(self, blocklist: policy_pb2.Blocklist) -> policy_pb2.Blocklist:
        result: policy_pb2.Blocklist = self.stub.ApplyBlocklist(
            policy_pb2.ApplyBlocklistRequest(blocklist=blocklist), timeout=self.timeout)
        return result

    def apply_blocklists(self, blocklists: Iterable[policy_pb2.Blocklist]
                         ) -> policy_pb2.ApplyBlocklistsResponse:
        result: policy_pb2.ApplyBlocklistsResponse = self.stub.ApplyBlocklists(
            policy_pb2.ApplyBlocklistsRequest(blocklists=blocklists), timeout=self.timeout)
        return result

    def delete_blocklist(self, name: str) -> None:
        self.stub.DeleteBlocklist(policy_pb2.DeleteBlocklistRequest(name=name),
                                  timeout=self.timeout)

    def delete_blocklists(self, names: Iterable[str]) -> int:
        result: policy_pb2.DeleteBlocklistsResponse = self.stub.DeleteBlocklists(
            policy_pb2.DeleteBlocklistsRequest(names=names), timeout=self.timeout)
        return int(result.generation)

    def get_blocklist(self, name: str) -> policy_pb2.Blocklist:
        result: policy_pb2.Blocklist = self.stub.GetBlocklist(
            policy_pb2.GetBlocklistRequest(name=name), timeout=self.timeout)
        return result

    def list_blocklists(self) -> list[policy_pb2.Blocklist]:
        return list(self.stub.ListBlocklists(policy_pb2.ListBlocklistsRequest(),
                                             timeout=self.timeout))

    def apply_mirror(self, mirror: policy_pb2.Mirror) -> policy_pb2.Mirror:
        result: policy_pb2.Mirror = self.stub.ApplyMirror(
            policy_pb2.ApplyMirrorRequest(mirror=mirror), timeout=self.timeout)
        return result

    def apply_mirrors(self, mirrors: Iterable[policy_pb2.Mirror]
                      ) -> policy_pb2.ApplyMirrorsResponse:
        result: policy_pb2.ApplyMirrorsResponse = self.stub.ApplyMirrors(
            policy_pb2.ApplyMirrorsRequest(mirrors=mirrors), timeout=self.timeout)
        return result

    def delete_mirror(self, name: str) -> None:
        self.stub.DeleteMirror(policy_pb2.DeleteMirrorRequest(name=name), timeout=self.timeout)

    def delete_mirrors(self, names: Iterable[str]) -> int:
        result: policy_pb2.DeleteMirrorsResponse = self.stub.DeleteMirrors(
            policy_pb2.DeleteMirrorsRequest(names=names), timeout=self.timeout)
        return int(result.generation)

    def get_mirror(self, name: str) -> policy_pb2.Mirror:
        result: policy_pb2.Mirror = self.stub.GetMirror(
            policy_pb2.GetMirrorRequest(name=name), timeout=self.timeout)
        return result

    def list_mirrors(self) -> list[policy_pb2.Mirror]:
        return list(self.stub.ListMirrors(policy_pb2.ListMirrorsRequest(), timeout=self.timeout))

    # -- policers ------------------------------------------------------------------------

    def apply_policer(self, policer: policy_pb2.Policer,
                      expected_generation: int | None = None) -> policy_pb2.Policer:
        result: policy_pb2.Policer = self.stub.ApplyPolicer(
            policy_pb2.ApplyPolicerRequest(policer=policer,
                                           expected_generation=expected_generation),
            timeout=self.timeout)
        return result

    def apply_policers(self, policers: Iterable[policy_pb2.Policer],
                       check_generations: bool = False) -> policy_pb2.ApplyPolicersResponse:
        result: policy_pb2.ApplyPolicersResponse = self.stub.ApplyPolicers(
            policy_pb2.ApplyPolicersRequest(policers=policers,
                                            check_generations=check_generations),
            timeout=self.timeout)
        return result

    def delete_policer(self, name: str) -> None:
        self.stub.DeletePolicer(policy_pb2.DeletePolicerRequest(name=name),
                                timeout=self.timeout)

    def delete_policers(self, names: Iterable[str]) -> int:
        result: policy_pb2.DeletePolicersResponse = self.stub.DeletePolicers(
            policy_pb2.DeletePolicersRequest(names=names), timeout=self.timeout)
        return int(result.generation)

    def get_policer(self, name: str) -> policy_pb2.Policer:
        result: policy_pb2.Policer = self.stub.GetPolicer(
            policy_pb2.GetPolicerRequest(name=name), timeout=self.timeout)
        return result

    def list_policers(self) -> list[policy_pb2.Policer]:
        return list(self.stub.ListPolicers(policy_pb2.ListPolicersRequest(),
                                           timeout=self.timeout))

    # -- nodes -------------------------------------------------------------------------

    def register_node(self, name: str, address: str,
                      labels: dict[str, str] | None = None) -> policy_pb2.Node:
        result: policy_pb2.Node = self.stub.RegisterNode(
            policy_pb2.RegisterNodeRequest(node=policy_pb2.Node(name=name, address=address,
                                                                labels=labels or {})),
            timeout=self.timeout,
        )
        return result

    def deregister_node(self, name: str) -> None:
        self.stub.DeregisterNode(policy_pb2.DeregisterNodeRequest(name=name), timeout=self.timeout)

    def list_nodes(self) -> list[policy_pb2.Node]:
        return list(self.stub.ListNodes(policy_pb2.ListNodesRequest(), timeout=self.timeout))

    # -- watch ---------------------------------------------------------------------------

    def watch(self, from_revision: int = 0, kinds: Sequence[str] = (),
              timeout: float | None = None) -> Any:
        """The Watch stream (an iterator of WatchEvent; cancel() ends it)."""
        return self.stub.Watch(policy_pb2.WatchRequest(from_revision=from_revision,
                                                       kinds=kinds), timeout=timeout)

    def watch_sync_status(self, node: str = "", timeout: float | None = None) -> Any:
        """The WatchSyncStatus stream (an iterator of SyncStatusEvent)."""
        return self.stub.WatchSyncStatus(policy_pb2.WatchSyncStatusRequest(node=node),
                                         timeout=timeout)

    # -- status ------------------------------------------------------------------------

    def sync_status(self, node: str = "") -> policy_pb2.GetSyncStatusResponse:
        result: policy_pb2.GetSyncStatusResponse = self.stub.GetSyncStatus(
            policy_pb2.GetSyncStatusRequest(node=node), timeout=self.timeout
        )
        return result

    def wait_synced(
        self,
        nodes: Sequence[str] | None = None,
        timeout: float = 30.0,
        generation: int | None = None,
        poll: float = 0.05,
    ) -> policy_pb2.GetSyncStatusResponse:
        """Poll until the nodes (default: every registered node, at least one) are
        SYNCED with observed_generation >= `generation` (default: the generation the
        server reports). TimeoutError, with the last status, when `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.sync_status()
            if is_synced(status, nodes, generation):
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not synced after {timeout:g}s: {describe_status(status)}")
            time.sleep(poll)


def is_synced(
    status: policy_pb2.GetSyncStatusResponse,
    nodes: Sequence[str] | None = None,
    generation: int | None = None,
) -> bool:
    target = status.generation if generation is None else generation
    by_name = {n.node: n for n in status.nodes}
    names = list(nodes) if nodes is not None else list(by_name)
    if not names:
        return False
    for name in names:
        node = by_name.get(name)
        if node is None or node.state != policy_pb2.SYNC_STATE_SYNCED:
            return False
        if node.observed_generation < target:
            return False
    return True


def describe_status(status: Any) -> str:
    parts = [
        f"{n.node}={policy_pb2.SyncState.Name(n.state).removeprefix('SYNC_STATE_')}"
        f"@{n.observed_generation}/{n.desired_generation}"
        + (f" ({n.message})" if n.message else "")
        for n in status.nodes
    ]
    return f"generation {status.generation}: " + (", ".join(parts) or "no nodes")
