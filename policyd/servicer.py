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
from policyd.events import NodeEventsRpcs
from policyd.ha_status import StatusSource
from policyd.health import fill_status
from policyd.object_rpcs import ObjectKind
from policyd.policer_rpcs import PolicerRpcs
from policyd.reconciler import Reconciler
from policyd.selectors import describe
from policyd.store import GenerationConflict, Store
from policyd.validation import (
    validate_expected,
    validate_expected_one,
    validate_name,
    validate_names,
    validate_node,
    validate_node_labels,
    validate_route,
    validate_routes,
    validate_rule,
    validate_rules,
    validate_selectors,
    validate_service,
    validate_services,
)
from policyd.watch import ObjectWatch, OutOfRange, Stopping, check_kinds
from policyd.xdp_rpcs import XdpRpcs
from xlb.policy.v1 import policy_pb2, policy_pb2_grpc
from xlbcore.errors import Exhausted
from xlbcore.rpc import rpc

log = structlog.get_logger()

RULE = ObjectKind("rule", "rules", "firewall_rule",
                  lambda spec: {"action": spec.action.name.lower(), "priority": spec.priority})
ROUTE = ObjectKind("route", "routes", "route",
                   lambda spec: {"prefix": spec.prefix, "next_hops": len(spec.next_hops)})

class PolicyServicer(XdpRpcs, PolicerRpcs, NodeEventsRpcs, policy_pb2_grpc.PolicyServicer):
    STATUS_FOR = ((sqlite3.Error, grpc.StatusCode.UNAVAILABLE),
                  (GenerationConflict, grpc.StatusCode.ABORTED),
                  (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
                  (Stopping, grpc.StatusCode.UNAVAILABLE))
    POLL = 0.5  # seconds a stream waits for events before it checks its call

    def __init__(self, store: Store, reconciler: Reconciler,
                 watch: ObjectWatch | None = None, status: StatusSource | None = None) -> None:
        self._store = store
        self._reconciler = reconciler
        self.watch = watch if watch is not None else ObjectWatch(store)
        # GetSyncStatus' and WatchSyncStatus' answers (replicas: policyd.ha_status)
        self._status: StatusSource = status if status is not None else reconciler

    def close(self) -> None:
        """End every Watch and WatchSyncStatus stream (policyd stopping)."""
        self.watch.close()
        self._reconciler.status_watch.close()

    # -- services ----------------------------------------------------------------------

    @rpc
    def ApplyService(  # noqa: N802 (gRPC method name)
        self, request: policy_pb2.ApplyServiceRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Service:
        name, spec = validate_service(request.service)
        selector = validate_selectors([request.service], "service", single=True).get(name, ())
        stored, changed = self._store.apply_service(
            name, spec, selector=selector,
            expected=(validate_expected_one(request, name) or {}).get(name))
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
        result = self._store.apply_services(
            items, selectors=validate_selectors(request.services, "services"),
            expected=(validate_expected(request.services, "services")
                      if request.check_generations else None))
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
        return messages.rule_to_proto(self._apply_one(
            RULE, request, validate_rule, self._store.apply_rules,
            flush=lambda name: [name] if request.rule.flush_existing else []))

    @rpc
    def ApplyFirewallRules(  # noqa: N802
        self, request: policy_pb2.ApplyFirewallRulesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyFirewallRulesResponse:
        result = self._apply_many(RULE, request, validate_rules, self._store.apply_rules,
                                  flush={r.name for r in request.rules if r.flush_existing})
        response = policy_pb2.ApplyFirewallRulesResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_rule_proto(response.rules.add(), stored)
        return response

    @rpc
    def DeleteFirewallRule(  # noqa: N802
        self, request: policy_pb2.DeleteFirewallRuleRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteFirewallRuleResponse:
        self._delete_one(RULE, request, self._store.delete_rules)
        return policy_pb2.DeleteFirewallRuleResponse()

    @rpc
    def DeleteFirewallRules(  # noqa: N802
        self, request: policy_pb2.DeleteFirewallRulesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteFirewallRulesResponse:
        return policy_pb2.DeleteFirewallRulesResponse(
            generation=self._delete_many(RULE, request, self._store.delete_rules))

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
        return messages.route_to_proto(self._apply_one(
            ROUTE, request, validate_route, self._store.apply_routes))

    @rpc
    def ApplyRoutes(  # noqa: N802
        self, request: policy_pb2.ApplyRoutesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyRoutesResponse:
        result = self._apply_many(ROUTE, request, validate_routes, self._store.apply_routes)
        response = policy_pb2.ApplyRoutesResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_route_proto(response.routes.add(), stored)
        return response

    @rpc
    def DeleteRoute(  # noqa: N802
        self, request: policy_pb2.DeleteRouteRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteRouteResponse:
        self._delete_one(ROUTE, request, self._store.delete_routes)
        return policy_pb2.DeleteRouteResponse()

    @rpc
    def DeleteRoutes(  # noqa: N802
        self, request: policy_pb2.DeleteRoutesRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteRoutesResponse:
        return policy_pb2.DeleteRoutesResponse(
            generation=self._delete_many(ROUTE, request, self._store.delete_routes))

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
        labels = validate_node_labels(request.node)
        node, changed = self._store.register_node(name, address, labels)
        self._reconciler.refresh_nodes()
        if changed:
            log.info("node.registered", node=name, address=address,
                     labels=describe(labels))
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

    # -- watch -------------------------------------------------------------------------

    @rpc
    def Watch(  # noqa: N802
        self, request: policy_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.WatchEvent]:
        kinds = check_kinds(request.kinds)
        watcher, initial, revision = self.watch.subscribe(int(request.from_revision), kinds)
        context.add_callback(lambda: self.watch.fanout.remove(watcher))
        log.info("watch.started", from_revision=request.from_revision, kinds=sorted(kinds),
                 initial=len(initial))
        try:
            for rev, change in initial:
                yield messages.change_to_event(rev, change)
            if request.from_revision == 0:
                yield policy_pb2.WatchEvent(type=policy_pb2.EVENT_TYPE_CURRENT,
                                            revision=revision)
            while context.is_active():
                for rev, change in watcher.get(self.POLL):
                    yield messages.change_to_event(rev, change)
        except Exhausted:
            log.warning("watch.dropped", reason="fell behind", limit=watcher.limit)
            raise
        finally:
            self.watch.fanout.remove(watcher)

    @rpc
    def WatchSyncStatus(  # noqa: N802
        self, request: policy_pb2.WatchSyncStatusRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.SyncStatusEvent]:
        name = validate_name(request.node, "node") if request.node else ""
        hub = self._status.status_watch
        current = self._status.statuses()
        if name and name not in current:
            self._store.get_node(name)  # NOT_FOUND
        watcher, initial = hub.subscribe(name, current)
        context.add_callback(lambda: hub.fanout.remove(watcher))
        try:
            for event in initial:
                yield messages.status_event(event)
            yield policy_pb2.SyncStatusEvent(generation=self._store.generation, current=True)
            while context.is_active():
                for event in watcher.get(self.POLL):
                    yield messages.status_event(event)
        except Exhausted:
            log.warning("watch_sync_status.dropped", reason="fell behind", limit=watcher.limit)
            raise
        finally:
            hub.fanout.remove(watcher)

    # -- status ------------------------------------------------------------------------

    @rpc
    def GetSyncStatus(  # noqa: N802
        self, request: policy_pb2.GetSyncStatusRequest, context: grpc.ServicerContext
    ) -> policy_pb2.GetSyncStatusResponse:
        name = validate_name(request.node, "node") if request.node else ""
        generation, statuses = self._status.status(name)
        resp = policy_pb2.GetSyncStatusResponse(
            generation=generation, nodes=[messages.status_to_proto(s) for s in statuses]
        )
        self._fill_health(resp, request.with_health)
        return resp

    def _fill_health(self, resp: policy_pb2.GetSyncStatusResponse, listed: bool) -> None:
        """Each node's endpoint counts by health, and with `listed` every checked
        service's endpoints (by the service's name)."""
        health = self._status.node_health()
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
