"""xlb.dpd.v1 WatchEvents: the node's events (trapped packets, refused flows, policer
drops, health changes) streamed to each client from its own bounded queue.

A mixin of dpd.servicer.DatapathServicer: messages <-> dpd.events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dpd.events import TooManyWatchers
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import Exhausted, ValidationError, quote
from xlbcore.rpc import rpc

if TYPE_CHECKING:
    from dpd.node import Node

WATCHABLE = {v for k, v in tpb.EventKind.items()
             if k not in ("EVENT_KIND_UNSPECIFIED", "EVENT_KIND_DROPPED")}


def parse_kinds(kinds: Any, field: str = "kinds") -> list[int]:
    out = []
    for i, k in enumerate(kinds):
        if k not in WATCHABLE:
            raise ValidationError(f"{field}[{i}]: {quote(k)} is not an EventKind to watch "
                                  "(TRAP, FLOW_REFUSED, POLICER_DROP, HEALTH)")
        out.append(int(k))
    return out


class EventRpcs:
    node: Node

    @rpc
    def WatchEvents(self, request: Any, context: Any) -> Iterator[tpb.Event]:  # noqa: N802
        kinds = parse_kinds(request.kinds)
        hub = self.node.events.hub
        try:
            sub = hub.subscribe(kinds)
        except TooManyWatchers as e:
            raise Exhausted(f"WatchEvents: {e}; close one first") from None
        yield from hub.follow(sub, context.is_active)
