"""The service model and its validation, shared by dpd and policyd (pure Python).

A service is identified by (vip, port, protocol). Endpoints are kept sorted by
(address, port) so that the same service always produces the same datapath entry,
on every node, whatever order a client sent them in.
"""

from __future__ import annotations

import collections
import enum
import functools
import operator
import socket
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from xlb.types.v1 import types_pb2
from xlbcore import gcpause
from xlbcore.errors import ValidationError, quote

MAX_ENDPOINTS = 64  # endpoints per service; fixed by the datapath ABI (bpf/xlb_abi.h)
MAX_WEIGHT = 1000
DEFAULT_WEIGHT = 1


class Proto(enum.IntEnum):
    """IP protocol numbers; the API enum maps onto these."""

    TCP = 6
    UDP = 17


class Algorithm(enum.IntEnum):
    """Values match xlb.types.v1.Algorithm (and the datapath's XLB_ALGO_*: checked by
    tests/unit/test_abi.py)."""

    ROUND_ROBIN = 1
    HASH = 2
    MAGLEV = 3


class Mode(enum.IntEnum):
    DNAT = 1


# xlb.types.v1.Protocol value -> model value.
_API_PROTO: dict[int, Proto] = {
    types_pb2.PROTOCOL_TCP: Proto.TCP,
    types_pb2.PROTOCOL_UDP: Proto.UDP,
}
_PROTO_API = {v: k for k, v in _API_PROTO.items()}


@dataclass(frozen=True, order=True)
class EndpointSpec:
    address: str
    port: int
    weight: int = DEFAULT_WEIGHT


@dataclass(frozen=True)
class ServiceKey:
    vip: str
    port: int
    proto: Proto

    def __str__(self) -> str:
        return f"{self.proto.name.lower()}://{self.vip}:{self.port}"


@dataclass(frozen=True)
class ServiceSpec:
    vip: str
    port: int
    proto: Proto
    algorithm: Algorithm = Algorithm.ROUND_ROBIN
    mode: Mode = Mode.DNAT
    endpoints: tuple[EndpointSpec, ...] = ()

    @functools.cached_property
    def key(self) -> ServiceKey:  # made once (a frozen spec's key cannot change)
        return ServiceKey(self.vip, self.port, self.proto)


@functools.lru_cache(maxsize=65536)
def _ipv4(value: str) -> tuple[str, int] | None:
    """(canonical dotted quad, integer) or None; strict: exactly four decimal octets."""
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
    except (OSError, TypeError, ValueError):
        return None
    return socket.inet_ntoa(packed), int.from_bytes(packed, "big")


def parse_ipv4(value: str, field: str, *, unicast: bool = True) -> str:
    """Return the canonical dotted quad or raise ValidationError naming `field`."""
    parsed = _ipv4(value.strip()) if isinstance(value, str) else None
    if parsed is None:
        raise ValidationError(f"{field}: {quote(value)} is not an IPv4 address")
    text, n = parsed
    top = n >> 24
    if unicast and (n == 0 or top == 127 or 224 <= top <= 239 or n == 0xFFFFFFFF):
        raise ValidationError(f"{field}: {text} is not a usable unicast address")
    return text


def parse_port(value: int, field: str) -> int:
    if not 1 <= value <= 65535:
        raise ValidationError(f"{field}: port {value} is out of range 1..65535")
    return value


def parse_proto(api_value: int, field: str = "protocol") -> Proto:
    try:
        return _API_PROTO[api_value]
    except KeyError:
        raise ValidationError(
            f"{field}: unknown protocol {api_value}; use PROTOCOL_TCP or PROTOCOL_UDP"
        ) from None


def proto_to_api(proto: Proto) -> int:
    return _PROTO_API[proto]


def parse_algorithm(api_value: int) -> Algorithm:
    if api_value == 0:
        return Algorithm.ROUND_ROBIN
    try:
        return Algorithm(api_value)
    except ValueError:
        raise ValidationError(f"algorithm: unknown algorithm {api_value}") from None


def parse_mode(api_value: int) -> Mode:
    if api_value == 0:
        return Mode.DNAT
    try:
        return Mode(api_value)
    except ValueError:
        raise ValidationError(f"mode: unknown mode {api_value}") from None


class _EndpointMsg(TypingProtocol):
    address: str
    port: int
    weight: int

    def HasField(self, name: str) -> bool: ...  # noqa: N802 (protobuf API)


def parse_endpoints(msgs: Any, field: str = "endpoints") -> tuple[EndpointSpec, ...]:
    eps: list[EndpointSpec] = []
    for i, ep in enumerate(msgs):
        where = f"{field}[{i}]"
        weight = ep.weight if ep.HasField("weight") else DEFAULT_WEIGHT
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValidationError(f"{where}.weight: {weight} is out of range 0..{MAX_WEIGHT}")
        eps.append(
            EndpointSpec(
                parse_ipv4(ep.address, f"{where}.address"),
                parse_port(ep.port, f"{where}.port"),
                weight,
            )
        )
    if not eps:
        raise ValidationError(f"{field}: a service needs at least one endpoint")
    if len(eps) > MAX_ENDPOINTS:
        raise ValidationError(f"{field}: {len(eps)} endpoints, at most {MAX_ENDPOINTS} allowed")
    seen: set[tuple[str, int]] = set()
    for ep_spec in eps:
        if (ep_spec.address, ep_spec.port) in seen:
            raise ValidationError(f"{field}: {ep_spec.address}:{ep_spec.port} is listed twice")
        seen.add((ep_spec.address, ep_spec.port))
    return tuple(sorted(eps))


def parse_service_key(msg: Any, field: str = "") -> ServiceKey:
    """From any message with vip, port and protocol fields."""
    prefix = f"{field}." if field else ""
    return ServiceKey(
        parse_ipv4(msg.vip, f"{prefix}vip"),
        parse_port(msg.port, f"{prefix}port"),
        parse_proto(msg.protocol, f"{prefix}protocol"),
    )


def parse_service(msg: Any, field: str = "") -> ServiceSpec:
    """From an xlb.dpd.v1.Service or xlb.policy.v1.Service (the shared fields)."""
    prefix = f"{field}." if field else ""
    key = parse_service_key(msg, field)
    return ServiceSpec(
        vip=key.vip,
        port=key.port,
        proto=key.proto,
        algorithm=parse_algorithm(msg.algorithm),
        mode=parse_mode(msg.mode),
        endpoints=parse_endpoints(msg.endpoints, f"{prefix}endpoints"),
    )


def fill_service(msg: Any, spec: ServiceSpec) -> Any:
    """Write `spec` into an xlb.dpd.v1.Service or xlb.policy.v1.Service message."""
    msg.vip = spec.vip
    msg.port = spec.port
    msg.protocol = proto_to_api(spec.proto)
    msg.algorithm = int(spec.algorithm)
    msg.mode = int(spec.mode)
    del msg.endpoints[:]
    for ep in spec.endpoints:
        msg.endpoints.add(address=ep.address, port=ep.port, weight=ep.weight)
    return msg


def fill_service_key(msg: Any, key: ServiceKey) -> Any:
    msg.vip = key.vip
    msg.port = key.port
    msg.protocol = proto_to_api(key.proto)
    return msg


@functools.lru_cache(maxsize=65536)
def _unicast(value: str) -> str | None:
    """The canonical dotted quad when parse_ipv4(value, ...) accepts it, else None."""
    try:
        return parse_ipv4(value, "")
    except ValidationError:
        return None


_ALGORITHMS = {0: Algorithm.ROUND_ROBIN, **{int(a): a for a in Algorithm}}
_MODES = {0: Mode.DNAT, **{int(m): m for m in Mode}}


_SERVICE_FIELDS = operator.attrgetter("vip", "port", "protocol", "algorithm", "mode",
                                      "endpoints")
_ENDPOINT_FIELDS = operator.attrgetter("address", "port", "weight")


def _service_fast(msg: Any) -> ServiceSpec | None:
    """parse_service's result for a valid service, read with few Python steps and no
    error names; None for anything parse_service might refuse (it then says why)."""
    vip, port, api_proto, api_algorithm, api_mode, ep_msgs = _SERVICE_FIELDS(msg)
    vip = _unicast(vip)
    proto = _API_PROTO.get(api_proto)
    algorithm = _ALGORITHMS.get(api_algorithm)
    mode = _MODES.get(api_mode)
    if vip is None or proto is None or algorithm is None or mode is None \
            or not 0 < port <= 65535:
        return None
    rows = list(map(_ENDPOINT_FIELDS, ep_msgs))
    n = len(rows)
    if not 0 < n <= MAX_ENDPOINTS:
        return None
    eps = []
    for i, (address, ep_port, weight) in enumerate(rows):
        address = _unicast(address)
        if not weight and not ep_msgs[i].HasField("weight"):
            weight = DEFAULT_WEIGHT
        if address is None or not 0 < ep_port <= 65535 or not 0 <= weight <= MAX_WEIGHT:
            return None
        eps.append((address, ep_port, weight))
    if len({(a, p) for a, p, _ in eps}) != n:
        return None
    eps.sort()  # as EndpointSpec orders: address, port, weight
    return ServiceSpec(vip, port, proto, algorithm, mode,
                       tuple([EndpointSpec(a, p, w) for a, p, w in eps]))


def parse_services(msgs: Any, field: str = "services") -> list[ServiceSpec]:
    """A batch of services, each as parse_service gives it; refuses a key given twice.
    Valid services take a fast path; the first one it does not take is parsed by
    parse_service, which raises the error naming the field."""
    with gcpause.paused(len(msgs) >= 256):
        specs = []
        for i, msg in enumerate(msgs):
            spec = _service_fast(msg)
            specs.append(spec if spec is not None else parse_service(msg, f"{field}[{i}]"))
        keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        counts = collections.Counter(keys)
        dup = next(k for k in keys if counts[k] > 1)
        raise ValidationError(f"{field}: {dup} appears more than once in the batch")
    return specs
