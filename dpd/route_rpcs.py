"""xlb.dpd.v1 route and neighbour methods (PutRoutes, ListRoutes, ListNeighbors, ...).

A mixin of dpd.servicer.DatapathServicer: messages <-> dpd.routes calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2
from xlbcore.route import fill_route, parse_route
from xlbcore.rpc import rpc

if TYPE_CHECKING:
    from dpd.node import Node


class RouteRpcs:
    node: Node

    @rpc
    def PutRoutes(self, request: Any, context: Any) -> pb.PutRoutesResponse:  # noqa: N802
        routes = [parse_route(r, f"routes[{i}]") for i, r in enumerate(request.routes)]
        written = self.node.routes.put(routes)
        return pb.PutRoutesResponse(written=written, generation=self.node.routes.generation)

    @rpc
    def DeleteRoutes(self, request: Any, context: Any) -> pb.DeleteRoutesResponse:  # noqa: N802
        deleted = self.node.routes.delete(list(request.prefixes))
        return pb.DeleteRoutesResponse(deleted=deleted, generation=self.node.routes.generation)

    @rpc
    def ListRoutes(self, request: Any, context: Any) -> Iterator[types_pb2.RouteSpec]:  # noqa: N802
        for spec in self.node.routes.specs():
            yield fill_route(types_pb2.RouteSpec(), spec)

    @rpc
    def ListNeighbors(self, request: Any, context: Any) -> Iterator[pb.Neighbor]:  # noqa: N802
        for n in self.node.routes.neighbors():
            yield pb.Neighbor(address=n.address, mac=n.mac, interface=n.interface,
                              state=pb.NeighborState.ValueType(n.state))
