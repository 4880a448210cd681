"""xlb.policy.v1.Policy servicer: messages in, domain calls, messages out.

Domain errors become gRPC status codes in ``xlbcore.rpc`` (shared with dpd); a store
error is UNAVAILABLE.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import grpc
import structlog

from policyd import messages
from policyd.health import fill_status
from policyd.reconciler import Reconciler
from policyd.store import Store
from policyd.validation import (
    validate_name,
    validate_names,
    validate_node,
    validate_route,
    validate_routes,
    validate_rule,
    validate_rules,
    validate_service,
    validate_services,
)
from xlb.policy.v1 import policy_pb2, policy_pb2_grpc
from xlbcore.rpc import rpc

log = structlog.get_logger()

class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    STATUS_FOR = ((sqlite3.Error, grpc.StatusCode.UNAVAILABLE),)

    def __init__(self, store: Store, reconciler: Reconciler) -> None:
        self._store = store
        self._reconciler = reconciler

    # -- services ----------------------------------------------------------------------

    @rpc
    def ApplyService(  # noqa: N802 (gRPC method name)
        self, request: policy_pb2.ApplyServiceRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Service:
        name, spec = validate_service(request.service)
        stored, changed = self._store.apply_service(name, spec)
        if changed:
            self._reconciler.wake_all()
            log.info(
                "service.applied",
                name=name,
                key=str(spec.key),
                endpoints=len(spec.endpoints),
                generation=stored.generation,
            )
        return messages.service_to_proto(stored)

    @rpc
    def ApplyServices(  # noqa: N802
        self, request: policy_pb2.ApplyServicesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyServicesResponse:
        items = validate_services(request.services)
        result = self._store.apply_services(items)
        if result.changed:
            self._reconciler.wake_all()  # before building the reply: the pass starts now
            log.info(
                "services.applied",
                services=len(items),
                changed=result.changed,
                generation=result.generation,
            )
        response = policy_pb2.ApplyServicesResponse(generation=result.generation)
        for stored in result.services:
            messages.fill_service_proto(response.services.add(), stored)
        return response

    @rpc
    def DeleteServices(  # noqa: N802
        self, request: policy_pb2.DeleteServicesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteServicesResponse:
        names = validate_names(request.names)
        result = self._store.delete_services(names)
        if result.changed:
            self._reconciler.wake_all()
            log.info("services.deleted", services=result.changed, generation=result.generation)
        return policy_pb2.DeleteServicesResponse(generation=result.generation)

    @rpc
    def DeleteService(  # noqa: N802
        self, request: policy_pb2.DeleteServiceRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteServiceResponse:
        name = validate_name(request.name)
        generation = self._store.delete_service(name)
        self._reconciler.wake_all()
        log.info("service.deleted", name=name, generation=generation)
        return policy_pb2.DeleteServiceResponse()

    @rpc
    def GetService(  # noqa: N802
        self, request: policy_pb2.GetServiceRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Service:
        stored = self._store.get_service(validate_name(request.name))
        msg = messages.service_to_proto(stored)
        if stored.spec.health is not None:
            for node, health in sorted(self._reconciler.node_health().items()):
                states = health.service(stored.spec.key)
                if states:
                    fill_status(msg.node_health.add(node=node).endpoints, states)
        return msg

    @rpc
    def ListServices(  # noqa: N802
        self, request: policy_pb2.ListServicesRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.Service]:
        for stored in self._store.list_services():
            yield messages.service_to_proto(stored)

    # -- firewall rules ----------------------------------------------------------------

    @rpc
    def ApplyFirewallRule(  # noqa: N802
        self, request: policy_pb2.ApplyFirewallRuleRequest, context: grpc.ServicerContext
    ) -> policy_pb2.FirewallRule:
        name, spec = validate_rule(request.rule)
        flush = [name] if request.rule.flush_existing else []
        result = self._store.apply_rules([(name, spec)], field="", flush=flush)
        if result.changed:
            self._reconciler.wake_all()
            log.info("firewall_rule.applied", name=name, action=spec.action.name.lower(),
                     priority=spec.priority, generation=result.generation)
        return messages.rule_to_proto(result.objects[0])

    @rpc
    def ApplyFirewallRules(  # noqa: N802
        self, request: policy_pb2.ApplyFirewallRulesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyFirewallRulesResponse:
        items = validate_rules(request.rules)
        result = self._store.apply_rules(
            items, flush={r.name for r in request.rules if r.flush_existing})
        if result.changed:
            self._reconciler.wake_all()
            log.info("firewall_rules.applied", rules=len(items), changed=result.changed,
                     generation=result.generation)
        response = policy_pb2.ApplyFirewallRulesResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_rule_proto(response.rules.add(), stored)
        return response

    @rpc
    def DeleteFirewallRule(  # noqa: N802
        self, request: policy_pb2.DeleteFirewallRuleRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteFirewallRuleResponse:
        name = validate_name(request.name)
        result = self._store.delete_rules([name])
        self._reconciler.wake_all()
        log.info("firewall_rule.deleted", name=name, generation=result.generation)
        return policy_pb2.DeleteFirewallRuleResponse()

    @rpc
    def DeleteFirewallRules(  # noqa: N802
        self, request: policy_pb2.DeleteFirewallRulesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteFirewallRulesResponse:
        result = self._store.delete_rules(validate_names(request.names))
        if result.changed:
            self._reconciler.wake_all()
            log.info("firewall_rules.deleted", rules=result.changed, generation=result.generation)
        return policy_pb2.DeleteFirewallRulesResponse(generation=result.generation)

    @rpc
    def GetFirewallRule(  # noqa: N802
        self, request: policy_pb2.GetFirewallRuleRequest, context: grpc.ServicerContext
    ) -> policy_pb2.FirewallRule:
        return messages.rule_to_proto(self._store.get_rule(validate_name(request.name)))

    @rpc
    def ListFirewallRules(  # noqa: N802
        self, request: policy_pb2.ListFirewallRulesRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.FirewallRule]:
        for stored in self._store.list_rules():
            yield messages.rule_to_proto(stored)

    # -- routes --------------------------------------------------------------------------

    @rpc
    def ApplyRoute(  # noqa: N802
        self, request: policy_pb2.ApplyRouteRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Route:
        name, spec = validate_route(request.route)
        result = self._store.apply_routes([(name, spec)], field="")
        if result.changed:
            self._reconciler.wake_all()
            log.info("route.applied", name=name, prefix=spec.prefix,
                     next_hops=len(spec.next_hops), generation=result.generation)
        return messages.route_to_proto(result.objects[0])

    @rpc
    def ApplyRoutes(  # noqa: N802
        self, request: policy_pb2.ApplyRoutesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyRoutesResponse:
        items = validate_routes(request.routes)
        result = self._store.apply_routes(items)
        if result.changed:
            self._reconciler.wake_all()
            log.info("routes.applied", routes=len(items), changed=result.changed,
                     generation=result.generation)
        response = policy_pb2.ApplyRoutesResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_route_proto(response.routes.add(), stored)
        return response

    @rpc
    def DeleteRoute(  # noqa: N802
        self, request: policy_pb2.DeleteRouteRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteRouteResponse:
        name = validate_name(request.name)
        result = self._store.delete_routes([name])
        self._reconciler.wake_all()
        log.info("route.deleted", name=name, generation=result.generation)
        return policy_pb2.DeleteRouteResponse()

    @rpc
    def DeleteRoutes(  # noqa: N802
        self, request: policy_pb2.DeleteRoutesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteRoutesResponse:
        result = self._store.delete_routes(validate_names(request.names))
        if result.changed:
            self._reconciler.wake_all()
            log.info("routes.deleted", routes=result.changed, generation=result.generation)
        return policy_pb2.DeleteRoutesResponse(generation=result.generation)

    @rpc
    def GetRoute(  # noqa: N802
        self, request: policy_pb2.GetRouteRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Route:
        return messages.route_to_proto(self._store.get_route(validate_name(request.name)))

    @rpc
    def ListRoutes(  # noqa: N802
        self, request: policy_pb2.ListRoutesRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.Route]:
        for stored in self._store.list_routes():
            yield messages.route_to_proto(stored)

    # -- nodes -------------------------------------------------------------------------

    @rpc
    def RegisterNode(  # noqa: N802
        self, request: policy_pb2.RegisterNodeRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Node:
        name, address = validate_node(request.node.name, request.node.address)
        node, changed = self._store.register_node(name, address)
        self._reconciler.refresh_nodes()
        if changed:
            log.info("node.registered", node=name, address=address)
        return messages.node_to_proto(node)

    @rpc
    def DeregisterNode(  # noqa: N802
        self, request: policy_pb2.DeregisterNodeRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeregisterNodeResponse:
        name = validate_name(request.name)
        self._store.deregister_node(name)
        self._reconciler.refresh_nodes()
        log.info("node.deregistered", node=name, datapath="left as is")
        return policy_pb2.DeregisterNodeResponse()

    @rpc
    def ListNodes(  # noqa: N802
        self, request: policy_pb2.ListNodesRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.Node]:
        for node in self._store.list_nodes():
            yield messages.node_to_proto(node)

    # -- status ------------------------------------------------------------------------

    @rpc
    def GetSyncStatus(  # noqa: N802
        self, request: policy_pb2.GetSyncStatusRequest, context: grpc.ServicerContext
    ) -> policy_pb2.GetSyncStatusResponse:
        name = validate_name(request.node, "node") if request.node else ""
        generation, statuses = self._reconciler.status(name)
        resp = policy_pb2.GetSyncStatusResponse(
            generation=generation, nodes=[messages.status_to_proto(s) for s in statuses]
        )
        self._fill_health(resp, request.with_health)
        return resp

    def _fill_health(self, resp: policy_pb2.GetSyncStatusResponse, listed: bool) -> None:
        """Each node's endpoint counts by health, and with `listed` every checked
        service's endpoints (by the service's name)."""
        health = self._reconciler.node_health()
        names = ({s.spec.key: s.name for s in self._store.list_services()}
                 if listed else {})
        for status in resp.nodes:
            node = health.get(status.node)
            if node is None:
                continue
            status.endpoints_up, status.endpoints_down, status.endpoints_unknown = (
                node.counts())
            if listed:
                for key, states in sorted(node.services().items(),
                                          key=lambda kv: names.get(kv[0], str(kv[0]))):
                    fill_status(status.service_health.add(
                        service=names.get(key, str(key))).endpoints, states)
