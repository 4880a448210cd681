"""xlb.dpd.v1.Datapath servicer: messages <-> domain calls, domain errors -> status codes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import structlog

from dpd.blocklist_rpcs import BlocklistRpcs, parse_xdp_mode
from dpd.bulkput import parse_bulk
from dpd.conntrack import CtFilter
from dpd.event_rpcs import EventRpcs
from dpd.firewall_rpcs import FirewallRpcs
from dpd.health import EndpointHealth
from dpd.node import Node
from dpd.policer_rpcs import PolicerRpcs
from dpd.route_rpcs import RouteRpcs
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.dpd.v1 import datapath_pb2_grpc as pb_grpc
from xlb.types.v1 import types_pb2
from xlbcore import gcpause
from xlbcore.errors import ValidationError
from xlbcore.rpc import rpc
from xlbcore.service import (
    ServiceKey,
    fill_service,
    fill_service_key,
    parse_ip,
    parse_port,
    parse_service_key,
    parse_services,
    proto_to_api,
)

log = structlog.get_logger("dpd.api")

VERSION = "0.1.0"
PAGE_DEFAULT = 1000  # services per ListServicesPage when the request sets no limit
PAGE_MAX = 5000
BULK = 1000  # a PutServices this large freezes the heap (see PutServices)

def _interface(a: Any, tag: str) -> pb.Interface:
    return pb.Interface(name=a.name, ifindex=a.ifindex, attached=a.attached,
                        program_tag=tag if a.attached else "")


def _fill_status(msgs: Any, statuses: list[EndpointHealth]) -> None:
    add = msgs.add
    for h in statuses:
        add(address=h.address, port=h.port, health=int(h.state), reason=h.reason,
            since_unix_ms=h.since_ms)


def _ct_filter(request: Any) -> CtFilter | None:
    """The filter fields of a List/FlushConntrackRequest; None when none is set."""
    service = (parse_service_key(request.service, "service")
               if request.HasField("service") else None)
    endpoint = parse_ip(request.endpoint_address, "endpoint_address", unicast=False) \
        if request.endpoint_address else ""
    if request.endpoint_port and not endpoint:
        raise ValidationError("endpoint_port: needs endpoint_address")
    port = parse_port(request.endpoint_port, "endpoint_port") if request.endpoint_port else 0
    client = parse_ip(request.client_address, "client_address", unicast=False) \
        if request.client_address else ""
    state = request.state
    if state not in pb.ConntrackState.values():
        raise ValidationError(f"state: unknown conntrack state {state}")
    if service is None and not endpoint and not client and not state:
        return None
    return CtFilter(service, endpoint, port, client, state)


def _require(name: str, field: str = "name") -> str:
    if not name:
        raise ValidationError(f"{field}: an interface name is required")
    return name


class DatapathServicer(FirewallRpcs, RouteRpcs, BlocklistRpcs, PolicerRpcs, EventRpcs,
                       pb_grpc.DatapathServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @rpc
    def GetNode(self, request: Any, context: Any) -> pb.Node:  # noqa: N802
        n = self.node
        msg = pb.Node(
            name=n.settings.name,
            bpf_root=n.settings.pin_dir,
            kernel=n.kernel(),
            services=n.services.count(),
            version=VERSION,
            datapath_id=n.datapath_id,
            services_generation=n.services.generation,
            instance_id=n.instance_id,
        )
        for m in n.maps():
            msg.maps.add(name=m.name, type=m.type, max_entries=m.max_entries, used=m.used)
        for a in n.interfaces():
            msg.interfaces.append(self._xdp_config(
                self._interface_config(_interface(a, n.program_tag))))
        msg.program_tags.update(n.dp.tags)
        return msg

    @rpc
    def AttachInterface(self, request: Any, context: Any) -> pb.Interface:  # noqa: N802
        mode = parse_xdp_mode(request.xdp_mode)
        a = self.node.attach(_require(request.name), mode)
        return self._xdp_config(self._interface_config(_interface(a, self.node.program_tag)))

    @rpc
    def DetachInterface(self, request: Any, context: Any) -> pb.DetachInterfaceResponse:  # noqa: N802
        self.node.detach(_require(request.name))
        return pb.DetachInterfaceResponse()

    @rpc
    def ListInterfaces(self, request: Any, context: Any) -> Iterator[pb.Interface]:  # noqa: N802
        for a in self.node.interfaces():
            yield self._xdp_config(self._interface_config(_interface(a, self.node.program_tag)))

    @rpc
    def PutServices(self, request: Any, context: Any) -> pb.PutServicesResponse:  # noqa: N802
        # A large batch becomes the long-lived table: no cyclic GC pass during the work,
        # and the heap frozen after it, out of later full passes, which otherwise stall
        # every call for a while (~0.4 s with 250,000 services).
        with gcpause.paused(len(request.services) >= BULK, freeze=True):
            bulk = parse_bulk(request.services)  # plain new services: as columns
            written = self.node.put_services_bulk(bulk) if bulk is not None else None
            if written is None:  # the full way (bulk.specs(): parse_services' specs)
                specs = bulk.specs() if bulk is not None \
                    else parse_services(request.services, "services")
                written = self.node.put_services(specs)
        return pb.PutServicesResponse(written=written, datapath_id=self.node.datapath_id,
                                      generation=self.node.services.generation,
                                      instance_id=self.node.instance_id)

    @rpc
    def DeleteServices(self, request: Any, context: Any) -> pb.DeleteServicesResponse:  # noqa: N802
        keys = [parse_service_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
        deleted = self.node.delete_services(keys)
        return pb.DeleteServicesResponse(deleted=deleted, datapath_id=self.node.datapath_id,
                                         generation=self.node.services.generation,
                                         instance_id=self.node.instance_id)

    @rpc
    def ListServices(self, request: Any, context: Any) -> Iterator[pb.Service]:  # noqa: N802
        health = self.node.health
        for spec in self.node.list_services():
            msg = fill_service(pb.Service(), spec)
            if spec.health is not None:
                _fill_status(msg.endpoint_status, health.status(spec.key))
            yield msg

    @rpc
    def GetServicesSummary(self, request: Any, context: Any) -> pb.ServicesSummary:  # noqa: N802
        generation, count = self.node.services.summary()
        return pb.ServicesSummary(datapath_id=self.node.datapath_id,
                                  instance_id=self.node.instance_id,
                                  generation=generation, services=count)

    @rpc
    def GetSummary(self, request: Any, context: Any) -> pb.GetSummaryResponse:  # noqa: N802
        """Every table's summary: services and firewall in O(1), routes with a digest of
        the FIB read back (an `ip route` edit changes it)."""
        n = self.node
        resp = pb.GetSummaryResponse()
        generation, count = n.services.summary()
        resp.tables.add(table="services", generation=generation, count=count)
        generation, count = n.firewall.summary()
        resp.tables.add(table="firewall", generation=generation, count=count)
        generation, count, digest = n.routes.summary()
        resp.tables.add(table="routes", generation=generation, count=count, digest=digest)
        generation, count = n.blocklist.summary()
        resp.tables.add(table="blocklist", generation=generation, count=count)
        generation, count = n.mirrors.summary()
        resp.tables.add(table="mirrors", generation=generation, count=count)
        generation, count = n.policers.summary()
        resp.tables.add(table="policers", generation=generation, count=count)
        generation, count = n.health.summary()
        resp.tables.add(table="health", generation=generation, count=count)
        for t in resp.tables:
            t.datapath_id, t.instance_id = n.datapath_id, n.instance_id
        return resp

    @rpc
    def ListServicesPage(self, request: Any, context: Any) -> pb.ServicesPage:  # noqa: N802
        after = parse_service_key(request.after, "after") if request.has_after else None
        limit = min(request.limit or PAGE_DEFAULT, PAGE_MAX)
        generation, specs, more = self.node.services_page(after, limit)
        page = pb.ServicesPage(more=more, datapath_id=self.node.datapath_id,
                               instance_id=self.node.instance_id, generation=generation)
        add = page.services.add
        for spec in specs:
            fill_service(add(), spec)
        return page

    @rpc
    def ListConntrack(self, request: Any, context: Any) -> Iterator[pb.ConntrackEntry]:  # noqa: N802
        for e in self.node.list_conntrack(_ct_filter(request)):
            msg = pb.ConntrackEntry(
                protocol=types_pb2.Protocol.ValueType(proto_to_api(e.proto)),
                src=e.src,
                src_port=e.src_port,
                dst=e.dst,
                dst_port=e.dst_port,
                direction=pb.Direction.ValueType(e.direction),
                state=pb.ConntrackState.ValueType(e.state),
                nat_address=e.nat_address,
                nat_port=e.nat_port,
                idle_ns=e.idle_ns,
                nat2_address=e.nat2_address,
                nat2_port=e.nat2_port,
            )
            if e.service is not None:
                fill_service_key(msg.service, e.service)
            yield msg

    @rpc
    def FlushConntrack(self, request: Any, context: Any) -> pb.FlushConntrackResponse:  # noqa: N802
        return pb.FlushConntrackResponse(flushed=self.node.flush_conntrack(_ct_filter(request)))

    @rpc
    def ListEndpointHealth(self, request: Any, context: Any) -> pb.ListEndpointHealthResponse:  # noqa: N802
        keys: list[ServiceKey] = [parse_service_key(k, f"services[{i}]")
                                  for i, k in enumerate(request.services)]
        health = self.node.health
        generation, _ = health.summary()
        resp = pb.ListEndpointHealthResponse(generation=generation,
                                             instance_id=self.node.instance_id)
        for key in keys or sorted(health.checked(), key=lambda k: (k.vip, k.port, k.proto)):
            statuses = health.status(key)
            if not statuses:
                continue
            s = resp.services.add()
            fill_service_key(s.service, key)
            _fill_status(s.endpoints, statuses)
        return resp

    @rpc
    def GetStats(self, request: Any, context: Any) -> pb.GetStatsResponse:  # noqa: N802
        keys = [parse_service_key(k, f"services[{i}]") for i, k in enumerate(request.services)]
        resp = pb.GetStatsResponse()
        stats = self.node.global_stats()
        for name, counter in stats.items():
            resp.global_counters[name] = counter.packets
        for name, value in self.node.conntrack_counters(stats).items():
            setattr(resp.conntrack, name, value)
        h = self.node.health
        hc = h.counters
        resp.health.probes, resp.health.failures = hc.probes, hc.failures
        resp.health.went_down, resp.health.went_up = hc.went_down, hc.went_up
        resp.health.deferred, resp.health.targets = hc.deferred, h.targets()
        if not keys:
            self._rule_stats(resp)
        for spec, total, eps in self.node.services.stats(keys or None):
            s = resp.services.add()
            fill_service_key(s.service, spec.key)
            s.counters.packets, s.counters.bytes = total.packets, total.bytes
            for ep, c in eps:
                e = s.endpoints.add()
                e.endpoint.address, e.endpoint.port, e.endpoint.weight = (
                    ep.address, ep.port, ep.weight)
                e.counters.packets, e.counters.bytes = c.packets, c.bytes
        return resp


