"""xlb.policy.v1 Policer methods (Apply, ApplyMany, Delete, DeleteMany, Get, List): a
mixin of policyd.servicer.PolicyServicer, as the blocklist and mirror methods are
(policyd.policer_objects has the objects, policyd.object_rpcs the shared steps)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from policyd import messages
from policyd.object_rpcs import ObjectKind, ObjectRpcs
from policyd.policer_objects import validate_policer, validate_policers
from policyd.validation import validate_name
from xlb.policy.v1 import policy_pb2
from xlbcore.rpc import rpc

POLICER = ObjectKind("policer", "policers", "policer",
                     lambda spec: {"rate_bps": spec.rate_bps, "burst_bytes": spec.burst_bytes,
                                   "interfaces": list(spec.interfaces)})


class PolicerRpcs(ObjectRpcs):
    @rpc
    def ApplyPolicer(  # noqa: N802
        self, request: policy_pb2.ApplyPolicerRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Policer:
        return messages.policer_to_proto(self._apply_one(
            POLICER, request, validate_policer, self._store.apply_policers))

    @rpc
    def ApplyPolicers(  # noqa: N802
        self, request: policy_pb2.ApplyPolicersRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyPolicersResponse:
        result = self._apply_many(POLICER, request, validate_policers,
                                  self._store.apply_policers)
        response = policy_pb2.ApplyPolicersResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_policer_proto(response.policers.add(), stored)
        return response

    @rpc
    def DeletePolicer(  # noqa: N802
        self, request: policy_pb2.DeletePolicerRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeletePolicerResponse:
        self._delete_one(POLICER, request, self._store.delete_policers)
        return policy_pb2.DeletePolicerResponse()

    @rpc
    def DeletePolicers(  # noqa: N802
        self, request: policy_pb2.DeletePolicersRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeletePolicersResponse:
        return policy_pb2.DeletePolicersResponse(
            generation=self._delete_many(POLICER, request, self._store.delete_policers))

    @rpc
    def GetPolicer(  # noqa: N802
        self, request: policy_pb2.GetPolicerRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Policer:
        return messages.policer_to_proto(self._store.get_policer(validate_name(request.name)))

    @rpc
    def ListPolicers(  # noqa: N802
        self, request: policy_pb2.ListPolicersRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.Policer]:
        for stored in self._store.list_policers():
            yield messages.policer_to_proto(stored)
