"""``xlbctl --dpd ADDR services|conntrack|stats|interfaces|rules|routes|policers``: one node's
tables as dpd reads them back from its maps, decoded (addresses and ports as text, enums
by name), without grpcurl. Read-only: it calls only dpd's List/Get methods."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import grpc

from policyd.cli_objects import enum_name, next_hops, rule_match, table
from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlb.types.v1 import types_pb2
from xlbcore.service import host_text, ports_text

VIEWS = ("services", "conntrack", "stats", "interfaces", "rules", "routes", "policers")


def _key(key: Any) -> str:
    proto = enum_name(key.protocol, types_pb2.Protocol, "PROTOCOL_")
    return f"{host_text(key.vip)}:{ports_text(key.port, key.port_last)}/{proto}"


def services(stub: Any, args: argparse.Namespace) -> str:
    rows = []
    for s in stub.ListServices(datapath_pb2.ListServicesRequest(), timeout=args.rpc_timeout):
        eps = ",".join(f"{host_text(e.address)}:{e.port}@{e.weight or 1}"
                       for e in s.endpoints)
        rows.append([f"{host_text(s.vip)}:{ports_text(s.port, s.port_last)}",
                     enum_name(s.protocol, types_pb2.Protocol, "PROTOCOL_"),
                     enum_name(s.algorithm, types_pb2.Algorithm, "ALGORITHM_"),
                     enum_name(s.mode, types_pb2.Mode, "MODE_"), eps or "-"])
    return table(["VIP", "PROTO", "ALGORITHM", "MODE", "ENDPOINTS"], rows)


def conntrack(stub: Any, args: argparse.Namespace) -> str:
    rows = []
    for e in stub.ListConntrack(datapath_pb2.ListConntrackRequest(), timeout=args.rpc_timeout):
        rows.append([enum_name(e.protocol, types_pb2.Protocol, "PROTOCOL_"),
                     f"{host_text(e.src)}:{e.src_port}", f"{host_text(e.dst)}:{e.dst_port}",
                     enum_name(e.direction, datapath_pb2.Direction, "DIRECTION_"),
                     enum_name(e.state, datapath_pb2.ConntrackState, "CONNTRACK_STATE_"),
                     f"{host_text(e.nat_address)}:{e.nat_port}" if e.nat_address else "-",
                     _key(e.service) if e.service.vip else "-",
                     f"{e.idle_ns / 1e9:.1f}s"])
    return table(["PROTO", "SOURCE", "DESTINATION", "DIRECTION", "STATE", "NAT", "SERVICE",
                  "IDLE"], rows)


def stats(stub: Any, args: argparse.Namespace) -> str:
    reply = stub.GetStats(datapath_pb2.GetStatsRequest(), timeout=args.rpc_timeout)
    rows: list[list[Any]] = []
    for s in reply.services:
        c = s.counters
        rows.append([_key(s.service), "", c.packets, c.bytes])
        for e in s.endpoints:
            rows.append(["", f"{host_text(e.endpoint.address)}:{e.endpoint.port}",
                         e.counters.packets,
                         e.counters.bytes])
    out = table(["SERVICE", "ENDPOINT", "PACKETS", "BYTES"], rows) if rows else "no services"
    counters = [[name, value] for name, value in sorted(reply.global_counters.items())
                if value or args.output == "wide"]
    return out + "\n\n" + table(["COUNTER", "PACKETS"], counters)


def interfaces(stub: Any, args: argparse.Namespace) -> str:
    rows = []
    for i in stub.ListInterfaces(datapath_pb2.ListInterfacesRequest(), timeout=args.rpc_timeout):
        rows.append([i.name, i.ifindex, "yes" if i.attached else "no", i.program_tag or "-",
                     enum_name(i.xdp_mode, datapath_pb2.XdpMode, "XDP_MODE_"), i.zone or "-",
                     enum_name(i.default_policy, types_pb2.DefaultPolicy, "DEFAULT_POLICY_")])
    return table(["NAME", "IFINDEX", "ATTACHED", "TC-TAG", "XDP", "ZONE", "DEFAULT"], rows)


def rules(stub: Any, args: argparse.Namespace) -> str:
    rows = []
    for r in stub.ListFirewallRules(datapath_pb2.ListFirewallRulesRequest(),
                                    timeout=args.rpc_timeout):
        action = enum_name(r.spec.action, types_pb2.FirewallAction, "FIREWALL_ACTION_")
        if r.spec.redirect_interface:
            action += f"->{r.spec.redirect_interface}"
        rows.append([r.name, r.spec.priority, action, rule_match(r.spec)])
    return table(["NAME", "PRIORITY", "ACTION", "MATCH"], rows)


def routes(stub: Any, args: argparse.Namespace) -> str:
    rows = [[r.prefix, next_hops(r)]
            for r in stub.ListRoutes(datapath_pb2.ListRoutesRequest(), timeout=args.rpc_timeout)]
    return table(["PREFIX", "NEXT-HOPS"], rows)


def policers(stub: Any, args: argparse.Namespace) -> str:
    rows = [[p.name, p.rate_bps, p.burst_bytes, ",".join(p.interfaces) or "-",
             p.passed.packets, p.passed.bytes, p.dropped.packets, p.dropped.bytes]
            for p in stub.ListPolicers(datapath_pb2.ListPolicersRequest(),
                                       timeout=args.rpc_timeout)]
    return table(["NAME", "RATE-BPS", "BURST-BYTES", "INTERFACES", "PASSED", "PASSED-BYTES",
                  "DROPPED", "DROPPED-BYTES"], rows)


_VIEWS: dict[str, Callable[[Any, argparse.Namespace], str]] = {
    "services": services, "conntrack": conntrack, "stats": stats,
    "interfaces": interfaces, "rules": rules, "routes": routes, "policers": policers,
}


def show(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """The table of view ``args.group`` read from the dpd behind `channel`."""
    return _VIEWS[args.group](datapath_pb2_grpc.DatapathStub(channel), args)
