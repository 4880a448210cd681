"""xlb.dpd.v1 policer methods (PutPolicers, DeletePolicers, ListPolicers).

A mixin of dpd.servicer.DatapathServicer: messages <-> dpd.policers calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dpd.policers import parse_policer
from xlb.dpd.v1 import datapath_pb2 as pb
from xlbcore.errors import ValidationError, quote
from xlbcore.rpc import rpc

if TYPE_CHECKING:
    from dpd.node import Node


class PolicerRpcs:
    node: Node

    @rpc
    def PutPolicers(self, request: Any, context: Any) -> pb.PutPolicersResponse:  # noqa: N802
        specs = [parse_policer(p.name, p.rate_bps, p.burst_bytes, p.interfaces, f"policers[{i}]")
                 for i, p in enumerate(request.policers)]
        seen: set[str] = set()
        for i, s in enumerate(specs):
            if s.name in seen:
                raise ValidationError(f"policers[{i}].name: {quote(s.name)} is given twice "
                                      "in one call")
            seen.add(s.name)
        table = self.node.policers
        written = table.put(specs)
        return pb.PutPolicersResponse(written=written, generation=table.generation)

    @rpc
    def DeletePolicers(self, request: Any, context: Any) -> pb.DeletePolicersResponse:  # noqa: N802
        table = self.node.policers
        deleted = table.delete(request.names)
        return pb.DeletePolicersResponse(deleted=deleted, generation=table.generation)

    @rpc
    def ListPolicers(self, request: Any, context: Any) -> Iterator[pb.Policer]:  # noqa: N802
        for p in self.node.policers.entries():
            msg = pb.Policer(name=p.spec.name, rate_bps=p.spec.rate_bps,
                             burst_bytes=p.spec.burst_bytes, interfaces=p.spec.interfaces)
            msg.passed.packets, msg.passed.bytes = p.passed.packets, p.passed.bytes
            msg.dropped.packets, msg.dropped.bytes = p.dropped.packets, p.dropped.bytes
            yield msg
