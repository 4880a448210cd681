"""xlb.dpd.v1.Datapath servicer: messages <-> domain calls, domain errors -> status codes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog

from dpd import abi
from dpd.attach import InterfaceMissing
from dpd.ids import Exhausted
from dpd.model import (
    ValidationError,
    fill_service,
    fill_service_key,
    parse_service,
    parse_service_key,
    proto_to_api,
)
from dpd.node import Node
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.dpd.v1 import datapath_pb2_grpc as pb_grpc

log = structlog.get_logger("dpd.api")

VERSION = "0.1.0"

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (InterfaceMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def _abort(context: grpc.ServicerContext, method: str, err: Exception) -> None:
    for cls, code in _CODES:
        if isinstance(err, cls):
            log.info("request_refused", method=method, code=code.name, error=str(err))
            context.abort(code, str(err))
    log.exception("request_failed", method=method)
    context.abort(grpc.StatusCode.INTERNAL, f"{method} failed: {err}")


def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as err:  # noqa: BLE001 - mapped to a status code
            _abort(context, fn.__name__, err)

    return wrapper


def streaming(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as err:  # noqa: BLE001
            _abort(context, fn.__name__, err)

    return wrapper


def _interface(a: Any, tag: str) -> pb.Interface:
    return pb.Interface(name=a.name, ifindex=a.ifindex, attached=a.attached,
                        program_tag=tag if a.attached else "")


def _require(name: str, field: str = "name") -> str:
    if not name:
        raise ValidationError(f"{field}: an interface name is required")
    return name


class DatapathServicer(pb_grpc.DatapathServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @unary
    def GetNode(self, request: Any, context: Any) -> pb.Node:  # noqa: N802
        n = self.node
        msg = pb.Node(
            name=n.settings.name,
            bpf_root=n.settings.pin_dir,
            kernel=n.kernel(),
            services=n.services.count(),
            version=VERSION,
            datapath_id=n.datapath_id,
        )
        for m in n.maps():
            msg.maps.add(name=m.name, type=m.type, max_entries=m.max_entries, used=m.used)
        for a in n.interfaces():
            msg.interfaces.append(_interface(a, n.program_tag))
        msg.program_tags.update(n.dp.tags)
        return msg

    @unary
    def AttachInterface(self, request: Any, context: Any) -> pb.Interface:  # noqa: N802
        return _interface(self.node.attach(_require(request.name)), self.node.program_tag)

    @unary
    def DetachInterface(self, request: Any, context: Any) -> pb.DetachInterfaceResponse:  # noqa: N802
        self.node.detach(_require(request.name))
        return pb.DetachInterfaceResponse()

    @streaming
    def ListInterfaces(self, request: Any, context: Any) -> Iterator[pb.Interface]:  # noqa: N802
        for a in self.node.interfaces():
            yield _interface(a, self.node.program_tag)

    @unary
    def PutServices(self, request: Any, context: Any) -> pb.PutServicesResponse:  # noqa: N802
        specs = [parse_service(s, f"services[{i}]") for i, s in enumerate(request.services)]
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValidationError(f"services: {dup} appears more than once in the batch")
        return pb.PutServicesResponse(written=self.node.put_services(specs),
                                      datapath_id=self.node.datapath_id)

    @unary
    def DeleteServices(self, request: Any, context: Any) -> pb.DeleteServicesResponse:  # noqa: N802
        keys = [parse_service_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
        return pb.DeleteServicesResponse(deleted=self.node.delete_services(keys),
                                         datapath_id=self.node.datapath_id)

    @streaming
    def ListServices(self, request: Any, context: Any) -> Iterator[pb.Service]:  # noqa: N802
        for spec in self.node.list_services():
            yield fill_service(pb.Service(), spec)

    @streaming
    def ListConntrack(self, request: Any, context: Any) -> Iterator[pb.ConntrackEntry]:  # noqa: N802
        for e in self.node.list_conntrack():
            msg = pb.ConntrackEntry(
                protocol=pb.Protocol.ValueType(proto_to_api(e.proto)),
                src=e.src,
                src_port=e.src_port,
                dst=e.dst,
                dst_port=e.dst_port,
                direction=pb.Direction.ValueType(e.direction),
                state=pb.ConntrackState.ValueType(e.state),
                nat_address=e.nat_address,
                nat_port=e.nat_port,
                idle_ns=e.idle_ns,
            )
            fill_service_key(msg.service, e.service)
            yield msg

    @unary
    def FlushConntrack(self, request: Any, context: Any) -> pb.FlushConntrackResponse:  # noqa: N802
        return pb.FlushConntrackResponse(flushed=self.node.flush_conntrack())

    @unary
    def GetStats(self, request: Any, context: Any) -> pb.GetStatsResponse:  # noqa: N802
        keys = [parse_service_key(k, f"services[{i}]") for i, k in enumerate(request.services)]
        resp = pb.GetStatsResponse()
        for spec, total, eps in self.node.services.stats(keys or None):
            s = resp.services.add()
            fill_service_key(s.service, spec.key)
            s.counters.packets, s.counters.bytes = total.packets, total.bytes
            for ep, c in eps:
                e = s.endpoints.add()
                e.endpoint.address, e.endpoint.port, e.endpoint.weight = (
                    ep.address, ep.port, ep.weight)
                e.counters.packets, e.counters.bytes = c.packets, c.bytes
        return resp


assert abi.DIR_ORIG == pb.DIRECTION_ORIGINAL and abi.CT_EST == pb.CONNTRACK_STATE_ESTABLISHED
