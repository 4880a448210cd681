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
from policyd.reconciler import Reconciler
from policyd.store import Store
from policyd.validation import (
    validate_name,
    validate_names,
    validate_node,
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
        return messages.service_to_proto(self._store.get_service(validate_name(request.name)))

    @rpc
    def ListServices(  # noqa: N802
        self, request: policy_pb2.ListServicesRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.Service]:
        for stored in self._store.list_services():
            yield messages.service_to_proto(stored)

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
        return policy_pb2.GetSyncStatusResponse(
            generation=generation, nodes=[messages.status_to_proto(s) for s in statuses]
        )
