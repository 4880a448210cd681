"""xlb.policy.v1 Blocklist and Mirror methods (Apply, ApplyMany, Delete, DeleteMany, Get,
List): a mixin of policyd.servicer.PolicyServicer, as the rule and route methods are
(policyd.xdp_objects has the objects, policyd.object_rpcs the shared steps)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from policyd import messages
from policyd.object_rpcs import ObjectKind, ObjectRpcs
from policyd.validation import validate_name
from policyd.xdp_objects import (
    validate_blocklist,
    validate_blocklists,
    validate_mirror,
    validate_mirrors,
)
from xlb.policy.v1 import policy_pb2
from xlbcore.rpc import rpc

BLOCKLIST = ObjectKind("blocklist", "blocklists", "blocklist",
                       lambda spec: {"prefixes": len(spec.prefixes)})
MIRROR = ObjectKind("mirror", "mirrors", "mirror",
                    lambda spec: {"interface": spec.interface,
                                  "mirror_interface": spec.mirror_interface})


class XdpRpcs(ObjectRpcs):
    # -- blocklists ----------------------------------------------------------------------

    @rpc
    def ApplyBlocklist(  # noqa: N802
        self, request: policy_pb2.ApplyBlocklistRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Blocklist:
        return messages.blocklist_to_proto(self._apply_one(
            BLOCKLIST, request, validate_blocklist, self._store.apply_blocklists))

    @rpc
    def ApplyBlocklists(  # noqa: N802
        self, request: policy_pb2.ApplyBlocklistsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyBlocklistsResponse:
        result = self._apply_many(BLOCKLIST, request, validate_blocklists,
                                  self._store.apply_blocklists)
        response = policy_pb2.ApplyBlocklistsResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_blocklist_proto(response.blocklists.add(), stored)
        return response

    @rpc
    def DeleteBlocklist(  # noqa: N802
        self, request: policy_pb2.DeleteBlocklistRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteBlocklistResponse:
        self._delete_one(BLOCKLIST, request, self._store.delete_blocklists)
        return policy_pb2.DeleteBlocklistResponse()

    @rpc
    def DeleteBlocklists(  # noqa: N802
        self, request: policy_pb2.DeleteBlocklistsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteBlocklistsResponse:
        return policy_pb2.DeleteBlocklistsResponse(
            generation=self._delete_many(BLOCKLIST, request, self._store.delete_blocklists))

    @rpc
    def GetBlocklist(  # noqa: N802
        self, request: policy_pb2.GetBlocklistRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Blocklist:
        return messages.blocklist_to_proto(
            self._store.get_blocklist(validate_name(request.name)))

    @rpc
    def ListBlocklists(  # noqa: N802
        self, request: policy_pb2.ListBlocklistsRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.Blocklist]:
        for stored in self._store.list_blocklists():
            yield messages.blocklist_to_proto(stored)

    # -- mirrors -------------------------------------------------------------------------

    @rpc
    def ApplyMirror(  # noqa: N802
        self, request: policy_pb2.ApplyMirrorRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Mirror:
        return messages.mirror_to_proto(self._apply_one(
            MIRROR, request, validate_mirror, self._store.apply_mirrors))

    @rpc
    def ApplyMirrors(  # noqa: N802
        self, request: policy_pb2.ApplyMirrorsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyMirrorsResponse:
        result = self._apply_many(MIRROR, request, validate_mirrors, self._store.apply_mirrors)
        response = policy_pb2.ApplyMirrorsResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_mirror_proto(response.mirrors.add(), stored)
        return response

    @rpc
    def DeleteMirror(  # noqa: N802
        self, request: policy_pb2.DeleteMirrorRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteMirrorResponse:
        self._delete_one(MIRROR, request, self._store.delete_mirrors)
        return policy_pb2.DeleteMirrorResponse()

    @rpc
    def DeleteMirrors(  # noqa: N802
        self, request: policy_pb2.DeleteMirrorsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteMirrorsResponse:
        return policy_pb2.DeleteMirrorsResponse(
            generation=self._delete_many(MIRROR, request, self._store.delete_mirrors))

    @rpc
    def GetMirror(  # noqa: N802
        self, request: policy_pb2.GetMirrorRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Mirror:
        return messages.mirror_to_proto(self._store.get_mirror(validate_name(request.name)))

    @rpc
    def ListMirrors(  # noqa: N802
        self, request: policy_pb2.ListMirrorsRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.Mirror]:
        for stored in self._store.list_mirrors():
            yield messages.mirror_to_proto(stored)
