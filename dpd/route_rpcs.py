"""xlb.dpd.v1 route and neighbour methods (PutRoutes, ListRoutes, ListNeighbors, ...).

A mixin of dpd.servicer.DatapathServicer: messages <-> dpd.routes calls."""

from __future__ import annotations


class RouteRpcs:
    pass
