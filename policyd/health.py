"""Endpoint health as each node reports it (docs/health.md), kept per node worker.

A node's dpd probes the endpoints; policyd only reads the verdicts, and cheaply: the
drift check's GetSummary carries a "health" table whose generation moves on every
endpoint state change, so ListEndpointHealth is called only when that generation (or
the dpd instance) changed since the last read. A dpd without the method (an older one)
is asked once per instance and then left alone.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import grpc
import structlog

from xlb.dpd.v1 import datapath_pb2
from xlbcore.service import ServiceKey, parse_service_key

log = structlog.get_logger("policyd.health")

UNKNOWN, UP, DOWN = 1, 2, 3  # xlb.types.v1.HealthState


class EndpointState(NamedTuple):
    address: str
    port: int
    health: int  # xlb.types.v1.HealthState
    reason: str
    since_unix_ms: int


class NodeHealth:
    """One node's endpoint health as last read; safe to read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: tuple[Any, ...] | None = None  # (ident, generation) last read
        self._unsupported: tuple[str, str] | None = None  # dpd instance without the method
        self._services: dict[ServiceKey, tuple[EndpointState, ...]] = {}
        self.reads = 0

    def observe(self, tables: Mapping[str, Any] | None, node: Any) -> None:
        """After a GetSummary (`tables`): read the node's health if it changed.
        `node` is the worker's NodeClient (its stub and timeout)."""
        if not tables or "health" not in tables:
            return
        t = tables["health"]
        seen = (t.ident, t.generation)
        if seen == self._seen or self._unsupported == t.ident:
            return
        try:
            reply = node.stub.ListEndpointHealth(datapath_pb2.ListEndpointHealthRequest(),
                                                 timeout=node.timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported = t.ident
            else:
                log.info("node.health_read_failed", error=str(e.details() or e.code()))
            return
        services = {}
        for s in reply.services:
            try:
                key = parse_service_key(s.service)
            except ValueError:
                continue
            services[key] = tuple(EndpointState(e.address, e.port, e.health, e.reason,
                                                e.since_unix_ms) for e in s.endpoints)
        with self._lock:
            self._services = services
            self._seen = seen
            self.reads += 1

    def service(self, key: ServiceKey) -> tuple[EndpointState, ...]:
        with self._lock:
            return self._services.get(key, ())

    def services(self) -> dict[ServiceKey, tuple[EndpointState, ...]]:
        with self._lock:
            return dict(self._services)

    def counts(self) -> tuple[int, int, int]:
        """(up, down, unknown) endpoints over the node's checked services."""
        up = down = unknown = 0
        with self._lock:
            for eps in self._services.values():
                for e in eps:
                    if e.health == UP:
                        up += 1
                    elif e.health == DOWN:
                        down += 1
                    else:
                        unknown += 1
        return up, down, unknown


def fill_status(msgs: Any, states: tuple[EndpointState, ...]) -> None:
    """Add `states` to a repeated xlb.types.v1.EndpointStatus field."""
    add = msgs.add
    for e in states:
        add(address=e.address, port=e.port, health=e.health, reason=e.reason,  # type: ignore[arg-type]
            since_unix_ms=e.since_unix_ms)
