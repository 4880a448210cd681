"""xlb.policy.v1 Blocklist and Mirror methods (Apply, ApplyMany, Delete, DeleteMany, Get,
List): a mixin of policyd.servicer.PolicyServicer, as the rule and route methods are
(policyd.xdp_objects has the objects)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import structlog

from policyd import messages
from policyd.validation import (
    validate_expected,
    validate_expected_one,
    validate_name,
    validate_names,
    validate_selectors,
)
from policyd.xdp_objects import (
    validate_blocklist,
    validate_blocklists,
    validate_mirror,
    validate_mirrors,
)
from xlb.policy.v1 import policy_pb2
from xlbcore.rpc import rpc

if TYPE_CHECKING:
    from policyd.reconciler import Reconciler
    from policyd.store import Store

log = structlog.get_logger()


class XdpRpcs:
    _store: Store
    _reconciler: Reconciler

    # -- blocklists ----------------------------------------------------------------------

    @rpc
    def ApplyBlocklist(  # noqa: N802
        self, request: policy_pb2.ApplyBlocklistRequest, context: grpc.ServicerContext
    ) -> policy_pb2.Blocklist:
        name, spec = validate_blocklist(request.blocklist)
        result = self._store.apply_blocklists(
            [(name, spec)], field="",
            selectors=validate_selectors([request.blocklist], "blocklist", single=True),
            expected=validate_expected_one(request, name))
        if result.changed:
            self._reconciler.wake_all()
            log.info("blocklist.applied", name=name, prefixes=len(spec.prefixes),
                     generation=result.generation)
        return messages.blocklist_to_proto(result.objects[0])

    @rpc
    def ApplyBlocklists(  # noqa: N802
        self, request: policy_pb2.ApplyBlocklistsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyBlocklistsResponse:
        items = validate_blocklists(request.blocklists)
        result = self._store.apply_blocklists(
            items, selectors=validate_selectors(request.blocklists, "blocklists"),
            expected=(validate_expected(request.blocklists, "blocklists")
                      if request.check_generations else None))
        if result.changed:
            self._reconciler.wake_all()
            log.info("blocklists.applied", blocklists=len(items), changed=result.changed,
                     generation=result.generation)
        response = policy_pb2.ApplyBlocklistsResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_blocklist_proto(response.blocklists.add(), stored)
        return response

    @rpc
    def DeleteBlocklist(  # noqa: N802
        self, request: policy_pb2.DeleteBlocklistRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteBlocklistResponse:
        name = validate_name(request.name)
        result = self._store.delete_blocklists([name])
        self._reconciler.wake_all()
        log.info("blocklist.deleted", name=name, generation=result.generation)
        return policy_pb2.DeleteBlocklistResponse()

    @rpc
    def DeleteBlocklists(  # noqa: N802
        self, request: policy_pb2.DeleteBlocklistsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteBlocklistsResponse:
        result = self._store.delete_blocklists(validate_names(request.names))
        if result.changed:
            self._reconciler.wake_all()
            log.info("blocklists.deleted", blocklists=result.changed,
                     generation=result.generation)
        return policy_pb2.DeleteBlocklistsResponse(generation=result.generation)

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
        name, spec = validate_mirror(request.mirror)
        result = self._store.apply_mirrors(
            [(name, spec)], field="",
            selectors=validate_selectors([request.mirror], "mirror", single=True),
            expected=validate_expected_one(request, name))
        if result.changed:
            self._reconciler.wake_all()
            log.info("mirror.applied", name=name, interface=spec.interface,
                     mirror_interface=spec.mirror_interface, generation=result.generation)
        return messages.mirror_to_proto(result.objects[0])

    @rpc
    def ApplyMirrors(  # noqa: N802
        self, request: policy_pb2.ApplyMirrorsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ApplyMirrorsResponse:
        items = validate_mirrors(request.mirrors)
        result = self._store.apply_mirrors(
            items, selectors=validate_selectors(request.mirrors, "mirrors"),
            expected=(validate_expected(request.mirrors, "mirrors")
                      if request.check_generations else None))
        if result.changed:
            self._reconciler.wake_all()
            log.info("mirrors.applied", mirrors=len(items), changed=result.changed,
                     generation=result.generation)
        response = policy_pb2.ApplyMirrorsResponse(generation=result.generation)
        for stored in result.objects:
            messages.fill_mirror_proto(response.mirrors.add(), stored)
        return response

    @rpc
    def DeleteMirror(  # noqa: N802
        self, request: policy_pb2.DeleteMirrorRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteMirrorResponse:
        name = validate_name(request.name)
        result = self._store.delete_mirrors([name])
        self._reconciler.wake_all()
        log.info("mirror.deleted", name=name, generation=result.generation)
        return policy_pb2.DeleteMirrorResponse()

    @rpc
    def DeleteMirrors(  # noqa: N802
        self, request: policy_pb2.DeleteMirrorsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.DeleteMirrorsResponse:
        result = self._store.delete_mirrors(validate_names(request.names))
        if result.changed:
            self._reconciler.wake_all()
            log.info("mirrors.deleted", mirrors=result.changed, generation=result.generation)
        return policy_pb2.DeleteMirrorsResponse(generation=result.generation)

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
