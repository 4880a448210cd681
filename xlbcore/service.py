"""The service model and its validation, shared by dpd and policyd (pure Python).

A service is identified by (vip, port, protocol, port_last): one port (port_last 0), a
port range port..port_last, or every port of the VIP (port 0: any-port). Endpoints are
kept sorted by (address, port) so that the same service always produces the same
datapath entry, on every node, whatever order a client sent them in.
"""

from __future__ import annotations

import collections
import enum
import functools
import operator
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple
from typing import Protocol as TypingProtocol

from xlb.types.v1 import types_pb2
from xlbcore import gcpause
from xlbcore.errors import ValidationError, quote

MAX_ENDPOINTS = 1024  # endpoints per service; fixed by the datapath ABI (bpf/xlb_abi.h)
MAX_WEIGHT = 1000
DEFAULT_WEIGHT = 1
MAX_PRIORITY = 255  # an endpoint's priority group (xlb_ep.prio is a byte)
MAX_PERSISTENCE_S = 65535  # xlb_nat_val.persist_s is 16 bits


class Proto(enum.IntEnum):
    """IP protocol numbers; the API enum maps onto these."""

    TCP = 6
    UDP = 17
    SCTP = 132


class Algorithm(enum.IntEnum):
    """Values match xlb.types.v1.Algorithm (and the datapath's XLB_ALGO_*: checked by
    tests/unit/test_abi.py)."""

    ROUND_ROBIN = 1
    HASH = 2
    MAGLEV = 3
    SOURCE_HASH = 4
    LEAST_CONNECTIONS = 5


class Mode(enum.IntEnum):
    """Values match xlb.types.v1.Mode and the datapath's XLB_MODE_* (docs/modes.md).
    One-arm is FULLNAT on one interface, not a mode of its own."""

    DNAT = 1
    FULLNAT = 2
    DSR = 3
    DSR_IPIP = 4


DSR_MODES = (Mode.DSR, Mode.DSR_IPIP)


# xlb.types.v1.Protocol value -> model value.
_API_PROTO: dict[int, Proto] = {
    types_pb2.PROTOCOL_TCP: Proto.TCP,
    types_pb2.PROTOCOL_UDP: Proto.UDP,
    types_pb2.PROTOCOL_SCTP: Proto.SCTP,
}
_PROTO_API = {v: k for k, v in _API_PROTO.items()}


@dataclass(frozen=True, order=True)
class EndpointSpec:
    address: str
    port: int
    weight: int = DEFAULT_WEIGHT
    priority: int = 0  # group: lower is preferred; the best with a selectable endpoint serves


@dataclass(frozen=True)
class ServiceKey:
    vip: str
    port: int  # one port, a range's first port, or 0: any-port
    proto: Proto
    port_last: int = 0  # a range's last port (> port); 0: one port, or any-port

    def __str__(self) -> str:
        return f"{self.proto.name.lower()}://{host_text(self.vip)}:" \
            f"{ports_text(self.port, self.port_last)}"


def is_v6(address: str) -> bool:
    """An IPv6 address (the canonical text parse_ip gives; "" is neither)."""
    return ":" in address


def host_text(address: str) -> str:
    """An address as it goes before ":port": IPv6 in brackets ([2001:db8::1])."""
    return f"[{address}]" if ":" in address else address


def address_bytes(address: str) -> bytes:
    """The 4 or 16 bytes (network order) of a canonical IPv4 or IPv6 address."""
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def fold6(packed: bytes) -> bytes:
    """The datapath's 32-bit fold of a 16-byte IPv6 address (its four words XORed: what
    an IPv6 endpoint's xlb_ep.addr holds, svc6.h xlb_fold6)."""
    n = int.from_bytes(packed, "big")
    return ((n >> 96) ^ (n >> 64) ^ (n >> 32) ^ n).to_bytes(16, "big")[12:]


def ports_text(port: int, port_last: int) -> str:
    """A service's ports as people read them: "80", "8000-8099" or "*" (any-port)."""
    if not port:
        return "*"
    return f"{port}-{port_last}" if port_last else str(port)


def is_range(port: int, port_last: int) -> bool:
    """A port-range or any-port service (its endpoints may keep the client's port)."""
    return not port or bool(port_last)


def check_ranges(keys: Iterable[ServiceKey], field: str = "services") -> None:
    """Refuse port ranges of one (vip, protocol) that overlap (ValidationError): an
    exact-port service inside a range is allowed (it wins), as is any-port (ranges win
    over it), but two ranges could not say which serves a port between them."""
    by: dict[tuple[str, Proto], list[ServiceKey]] = collections.defaultdict(list)
    for k in keys:
        if k.port_last:
            by[(k.vip, k.proto)].append(k)
    for ranges in by.values():
        ranges.sort(key=lambda k: (k.port, k.port_last))
        for a, b in zip(ranges, ranges[1:], strict=False):
            if b.port <= a.port_last:
                raise ValidationError(f"{field}: port range {b} overlaps {a}; ranges of "
                                      "one vip and protocol must not overlap")


class HealthKind(enum.IntEnum):
    """Values match xlb.types.v1.HealthCheckKind."""

    TCP = 1
    UDP = 2
    HTTP = 3
    ICMP = 4


HC_PAYLOAD_MAX = 64  # bytes of udp_request, udp_expect, http_path


@dataclass(frozen=True)
class HealthSpec:
    """A service's health check, canonical: every default filled in (docs/health.md)."""

    kind: HealthKind
    port: int = 0  # 0: the endpoint's port
    interval_ms: int = 1000
    timeout_ms: int = 1000
    rise: int = 2
    fall: int = 3
    udp_request: bytes = b""
    udp_expect: bytes = b""
    http_path: str = ""
    http_status: int = 0


@dataclass(frozen=True)
class CtTimeoutsSpec:
    """Per-state idle timeouts of a service's flows in seconds; 0: the node's default."""

    tcp_handshake: int = 0
    tcp_established: int = 0
    tcp_closing: int = 0
    tcp_closed: int = 0
    udp_new: int = 0
    udp_established: int = 0


CT_TIMEOUT_FIELDS = ("tcp_handshake", "tcp_established", "tcp_closing", "tcp_closed",
                     "udp_new", "udp_established")
CT_TIMEOUT_MAX = 7 * 86400  # a week


class EndpointColumns(NamedTuple):
    """A service's endpoints column by column, in endpoint order: what dpd writes to
    the datapath for them, without reading every endpoint again."""

    addresses: bytes  # 4 bytes each, network order (socket.inet_aton; IPv6: fold6)
    ports: tuple[int, ...]
    weights: tuple[int, ...]


@dataclass(frozen=True)
class ServiceSpec:
    vip: str
    port: int
    proto: Proto
    algorithm: Algorithm = Algorithm.ROUND_ROBIN
    mode: Mode = Mode.DNAT
    endpoints: tuple[EndpointSpec, ...] = ()
    health: HealthSpec | None = None  # None: no health check
    ct_timeouts: CtTimeoutsSpec | None = None  # None: the node's defaults
    # FULLNAT: the flows' source address; DSR_IPIP: the outer source ("": the node's
    # address toward the endpoint)
    snat_addr: str = ""
    persistence_s: int = 0  # session persistence timeout (0: off)
    port_last: int = 0  # a port range's last port; 0: one port (or any-port: port 0)

    @functools.cached_property
    def grouped(self) -> bool:
        """Some endpoint is in a priority group other than 0."""
        return any(ep.priority for ep in self.endpoints)

    @functools.cached_property
    def key(self) -> ServiceKey:  # made once (a frozen spec's key cannot change)
        return ServiceKey(self.vip, self.port, self.proto, self.port_last)

    @functools.cached_property
    def columns(self) -> EndpointColumns:
        """The endpoints as columns, made once (parse_services makes them as it reads
        a message, while the addresses are at hand)."""
        eps = self.endpoints
        if is_v6(self.vip):  # xlb_ep.addr of an IPv6 endpoint: its fold (ep6_map: whole)
            return EndpointColumns(b"".join([fold6(address_bytes(ep.address)) for ep in eps]),
                                   tuple([ep.port for ep in eps]),
                                   tuple([ep.weight for ep in eps]))
        return EndpointColumns(b"".join([socket.inet_aton(ep.address) for ep in eps]),
                               tuple([ep.port for ep in eps]), tuple([ep.weight for ep in eps]))


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


@functools.lru_cache(maxsize=65536)
def _ipv6(value: str) -> tuple[str, bytes] | None:
    """(canonical RFC 5952 text, 16 bytes) or None."""
    try:
        packed = socket.inet_pton(socket.AF_INET6, value)
    except (OSError, TypeError, ValueError):
        return None
    return socket.inet_ntop(socket.AF_INET6, packed), packed


def parse_ipv6(value: str, field: str, *, unicast: bool = True) -> str:
    """Return the canonical IPv6 text or raise ValidationError naming `field`. Unicast:
    not ::, ::1, multicast (ff00::/8) nor IPv4-mapped (::ffff:0:0/96: give the IPv4
    address itself)."""
    parsed = _ipv6(value.strip()) if isinstance(value, str) else None
    if parsed is None:
        raise ValidationError(f"{field}: {quote(value)} is not an IPv6 address")
    text, packed = parsed
    if unicast:
        if packed[0] == 0xFF or packed in (bytes(16), bytes(15) + b"\x01"):
            raise ValidationError(f"{field}: {text} is not a usable unicast address")
        if packed[:12] == bytes(10) + b"\xff\xff":
            raise ValidationError(f"{field}: {text} is an IPv4-mapped address; give the "
                                  "IPv4 address itself")
    return text


def parse_ip(value: str, field: str, *, unicast: bool = True) -> str:
    """An IPv4 or IPv6 address, canonical; else ValidationError naming `field`."""
    if isinstance(value, str) and ":" in value:
        return parse_ipv6(value, field, unicast=unicast)
    parsed = _ipv4(value.strip()) if isinstance(value, str) else None
    if parsed is None:
        raise ValidationError(f"{field}: {quote(value)} is not an IPv4 or IPv6 address")
    return parse_ipv4(value, field, unicast=unicast)


def check_family(address: str, vip: str, field: str) -> str:
    """`address` (canonical) when of `vip`'s family, else ValidationError naming `field`."""
    if is_v6(address) != is_v6(vip):
        fam, vfam = ("IPv6", "IPv4") if is_v6(address) else ("IPv4", "IPv6")
        raise ValidationError(f"{field}: {quote(address)} is {fam} but the vip "
                              f"{quote(vip)} is {vfam}; a service's endpoints and "
                              "addresses are of its vip's family")
    return address


def parse_port(value: int, field: str) -> int:
    if not 1 <= value <= 65535:
        raise ValidationError(f"{field}: port {value} is out of range 1..65535")
    return value


def parse_proto(api_value: int, field: str = "protocol") -> Proto:
    try:
        return _API_PROTO[api_value]
    except KeyError:
        raise ValidationError(
            f"{field}: unknown protocol {api_value}; use PROTOCOL_TCP, PROTOCOL_UDP "
            "or PROTOCOL_SCTP"
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


def parse_mode(api_value: int, field: str = "mode") -> Mode:
    if api_value == 0:
        return Mode.DNAT
    try:
        return Mode(api_value)
    except ValueError:
        raise ValidationError(f"{field}: unknown mode {api_value}") from None


class _EndpointMsg(TypingProtocol):
    address: str
    port: int
    weight: int

    def HasField(self, name: str) -> bool: ...  # noqa: N802 (protobuf API)


def parse_endpoints(msgs: Any, field: str = "endpoints",
                    keep_port: bool = False, vip: str = "") -> tuple[EndpointSpec, ...]:
    """`keep_port`: port 0 is allowed (a port-range or any-port service's endpoint that
    keeps the client's destination port). `vip`: the service's; every endpoint address
    must be of its family (IPv4 when not given)."""
    eps: list[EndpointSpec] = []
    for i, ep in enumerate(msgs):
        where = f"{field}[{i}]"
        weight = ep.weight if ep.HasField("weight") else DEFAULT_WEIGHT
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValidationError(f"{where}.weight: {weight} is out of range 0..{MAX_WEIGHT}")
        priority = ep.priority
        if not 0 <= priority <= MAX_PRIORITY:
            raise ValidationError(
                f"{where}.priority: {priority} is out of range 0..{MAX_PRIORITY}")
        eps.append(
            EndpointSpec(
                check_family(parse_ip(ep.address, f"{where}.address"), vip,
                             f"{where}.address"),
                0 if keep_port and ep.port == 0 else parse_port(ep.port, f"{where}.port"),
                weight,
                priority,
            )
        )
    if not eps:
        raise ValidationError(f"{field}: a service needs at least one endpoint")
    if len(eps) > MAX_ENDPOINTS:
        raise ValidationError(f"{field}: {len(eps)} endpoints, at most {MAX_ENDPOINTS} allowed")
    seen: set[tuple[str, int]] = set()
    for ep_spec in eps:
        if (ep_spec.address, ep_spec.port) in seen:
            raise ValidationError(f"{field}: {host_text(ep_spec.address)}:{ep_spec.port} is "
                                  "listed twice")
        seen.add((ep_spec.address, ep_spec.port))
    return tuple(sorted(eps))


def parse_health(msg: Any, field: str = "health") -> HealthSpec | None:
    """An xlb.types.v1.HealthCheck, canonical (defaults filled); None: no check."""
    kind = msg.kind
    if kind == 0:
        if msg.ByteSize():
            raise ValidationError(f"{field}.kind: a health check states its kind "
                                  "(HEALTH_CHECK_KIND_TCP, _UDP, _HTTP or _ICMP)")
        return None
    try:
        hk = HealthKind(kind)
    except ValueError:
        raise ValidationError(f"{field}.kind: unknown health check kind {kind}") from None
    port = msg.port
    if port and not 1 <= port <= 65535:
        raise ValidationError(f"{field}.port: port {port} is out of range 1..65535")
    if port and hk == HealthKind.ICMP:
        raise ValidationError(f"{field}.port: an ICMP check has no port")
    interval = msg.interval_ms or 1000
    if not 50 <= interval <= 3_600_000:
        raise ValidationError(f"{field}.interval_ms: {interval} is out of range 50..3600000")
    timeout = msg.timeout_ms or min(interval, 1000)
    if not 10 <= timeout <= interval:
        raise ValidationError(f"{field}.timeout_ms: {timeout} is out of range "
                              f"10..interval_ms ({interval})")
    rise, fall = msg.rise or 2, msg.fall or 3
    for name, value in (("rise", rise), ("fall", fall)):
        if not 1 <= value <= 100:
            raise ValidationError(f"{field}.{name}: {value} is out of range 1..100")
    request, expect = bytes(msg.udp_request), bytes(msg.udp_expect)
    path, status = msg.http_path, msg.http_status
    if hk != HealthKind.UDP and (request or expect):
        raise ValidationError(f"{field}.udp_request: only a UDP check sends a request")
    if hk != HealthKind.HTTP and (path or status):
        raise ValidationError(f"{field}.http_path: only an HTTP check has a path and status")
    for name, value in (("udp_request", request), ("udp_expect", expect)):
        if len(value) > HC_PAYLOAD_MAX:
            raise ValidationError(f"{field}.{name}: {len(value)} bytes, at most "
                                  f"{HC_PAYLOAD_MAX}")
    if hk == HealthKind.UDP and not request:
        request = b"\0"
    if hk == HealthKind.HTTP:
        path = path or "/"
        if (len(path) > HC_PAYLOAD_MAX or not path.startswith("/")
                or not all(33 <= ord(c) <= 126 for c in path)):
            raise ValidationError(f"{field}.http_path: {quote(path)} is not a path "
                                  f"('/', printable ASCII, at most {HC_PAYLOAD_MAX})")
        status = status or 200
        if not 100 <= status <= 599:
            raise ValidationError(f"{field}.http_status: {status} is out of range 100..599")
    return HealthSpec(hk, port, interval, timeout, rise, fall, request, expect, path, status)


def fill_health(msg: Any, spec: HealthSpec) -> Any:
    msg.kind = int(spec.kind)
    msg.port = spec.port
    msg.interval_ms = spec.interval_ms
    msg.timeout_ms = spec.timeout_ms
    msg.rise = spec.rise
    msg.fall = spec.fall
    msg.udp_request = spec.udp_request
    msg.udp_expect = spec.udp_expect
    msg.http_path = spec.http_path
    msg.http_status = spec.http_status
    return msg


def parse_ct_timeouts(msg: Any, field: str = "conntrack_timeouts") -> CtTimeoutsSpec | None:
    """An xlb.types.v1.ConntrackTimeouts; None when every field is 0 (the node's defaults)."""
    values = [getattr(msg, name) for name in CT_TIMEOUT_FIELDS]
    if not any(values):
        return None
    for name, value in zip(CT_TIMEOUT_FIELDS, values, strict=True):
        if value > CT_TIMEOUT_MAX:
            raise ValidationError(f"{field}.{name}: {value} s is beyond {CT_TIMEOUT_MAX} s")
    return CtTimeoutsSpec(*values)


def fill_ct_timeouts(msg: Any, spec: CtTimeoutsSpec) -> Any:
    for name in CT_TIMEOUT_FIELDS:
        setattr(msg, name, getattr(spec, name))
    return msg


def parse_ports(port: int, port_last: int, prefix: str = "") -> tuple[int, int]:
    """(port, port_last) of a service: one port 1..65535 (port_last 0, or equal to
    port), a range port < port_last <= 65535, or any-port (both 0)."""
    if port == 0:
        if port_last:
            raise ValidationError(f"{prefix}port_last: {port_last} with port 0; a range "
                                  "starts at port 1..65534 (port 0 alone: every port)")
        return 0, 0
    parse_port(port, f"{prefix}port")
    if port_last in (0, port):
        return port, 0
    if not port < port_last <= 65535:
        raise ValidationError(f"{prefix}port_last: {port_last} is out of range "
                              f"{port + 1}..65535 (port is {port}; 0: one port)")
    return port, port_last


def parse_service_key(msg: Any, field: str = "") -> ServiceKey:
    """From any message with vip, port and protocol fields (and port_last, if it has
    one)."""
    prefix = f"{field}." if field else ""
    port, last = parse_ports(msg.port, getattr(msg, "port_last", 0), prefix)
    vip = parse_ip(msg.vip, f"{prefix}vip")
    if is_v6(vip) and is_range(port, last):
        field_name = "port_last" if last else "port"
        raise ValidationError(f"{prefix}{field_name}: an IPv6 service has one port (1..65535); "
                              "port ranges and any-port are IPv4 only")
    proto = parse_proto(msg.protocol, f"{prefix}protocol")
    if is_v6(vip) and proto == Proto.SCTP:
        raise ValidationError(f"{prefix}protocol: PROTOCOL_SCTP services are IPv4 only; an "
                              "IPv6 service is PROTOCOL_TCP or PROTOCOL_UDP")
    return ServiceKey(
        vip,
        port,
        proto,
        last,
    )


def parse_snat(msg: Any, mode: Mode, port: int, endpoints: tuple[EndpointSpec, ...],
               prefix: str, ranged: bool = False, vip: str = "") -> str:
    """The SNAT address of a service in `mode` ("" when unset), and the mode's rules on
    the endpoints (DSR does not rewrite ports: each endpoint's port is the service's;
    a port-range or any-port service's (`ranged`): 0, the client's port)."""
    if mode in DSR_MODES:
        if ranged:
            port = 0
        for i, ep in enumerate(endpoints):
            if ep.port != port:
                raise ValidationError(
                    f"{prefix}endpoints[{i}].port: {ep.port}; a DSR service's endpoints "
                    f"listen on the service port ({port}): DSR rewrites no port")
    value = msg.snat_address
    if not value:
        return ""
    if mode not in (Mode.FULLNAT, Mode.DSR_IPIP):
        raise ValidationError(f"{prefix}snat_address: {quote(value)} is set, but only "
                              "MODE_FULLNAT and MODE_DSR_IPIP use one")
    return check_family(parse_ip(value, f"{prefix}snat_address"), vip,
                        f"{prefix}snat_address")


def parse_persistence(value: int, field: str) -> int:
    if not 0 <= value <= MAX_PERSISTENCE_S:
        raise ValidationError(f"{field}: {value} is out of range 0..{MAX_PERSISTENCE_S} "
                              "(seconds; 0: off)")
    return value


def parse_service(msg: Any, field: str = "") -> ServiceSpec:
    """From an xlb.dpd.v1.Service or xlb.policy.v1.Service (the shared fields)."""
    prefix = f"{field}." if field else ""
    key = parse_service_key(msg, field)
    mode = parse_mode(msg.mode, f"{prefix}mode")
    ranged = is_range(key.port, key.port_last)
    endpoints = parse_endpoints(msg.endpoints, f"{prefix}endpoints", keep_port=ranged,
                                vip=key.vip)
    health = parse_health(msg.health, f"{prefix}health") if msg.HasField("health") else None
    if health is not None and health.kind != HealthKind.ICMP and not health.port \
            and any(not ep.port for ep in endpoints):
        raise ValidationError(f"{prefix}health.port: 0, but an endpoint has port 0 (it "
                              "keeps the client's port): the check needs a port")
    return ServiceSpec(
        vip=key.vip,
        port=key.port,
        proto=key.proto,
        algorithm=parse_algorithm(msg.algorithm),
        mode=mode,
        endpoints=endpoints,
        snat_addr=parse_snat(msg, mode, key.port, endpoints, prefix, ranged, key.vip),
        persistence_s=parse_persistence(msg.persistence_timeout_s,
                                        f"{prefix}persistence_timeout_s"),
        health=health,
        ct_timeouts=parse_ct_timeouts(msg.conntrack_timeouts, f"{prefix}conntrack_timeouts")
        if msg.HasField("conntrack_timeouts") else None,
        port_last=key.port_last,
    )


def fill_service(msg: Any, spec: ServiceSpec) -> Any:
    """Write `spec` into an xlb.dpd.v1.Service or xlb.policy.v1.Service message."""
    msg.vip = spec.vip
    msg.port = spec.port
    msg.protocol = proto_to_api(spec.proto)
    msg.algorithm = int(spec.algorithm)
    msg.mode = int(spec.mode)
    msg.snat_address = spec.snat_addr
    msg.persistence_timeout_s = spec.persistence_s
    msg.port_last = spec.port_last
    del msg.endpoints[:]
    for ep in spec.endpoints:
        msg.endpoints.add(address=ep.address, port=ep.port, weight=ep.weight,
                          priority=ep.priority)
    if spec.health is not None:
        fill_health(msg.health, spec.health)
    else:
        msg.ClearField("health")
    if spec.ct_timeouts is not None:
        fill_ct_timeouts(msg.conntrack_timeouts, spec.ct_timeouts)
    else:
        msg.ClearField("conntrack_timeouts")
    return msg


def fill_service_key(msg: Any, key: ServiceKey) -> Any:
    msg.vip = key.vip
    msg.port = key.port
    msg.protocol = proto_to_api(key.proto)
    msg.port_last = key.port_last
    return msg


@functools.lru_cache(maxsize=65536)
def _unicast(value: str) -> tuple[str, bytes] | None:
    """(the canonical dotted quad, its 4 bytes) when parse_ipv4(value, ...) accepts it,
    else None."""
    try:
        text = parse_ipv4(value, "")
    except ValidationError:
        return None
    return text, socket.inet_aton(text)


_ALGORITHMS = {0: Algorithm.ROUND_ROBIN, **{int(a): a for a in Algorithm}}
_MODES = {0: Mode.DNAT, **{int(m): m for m in Mode}}


_SERVICE_FIELDS = operator.attrgetter("vip", "port", "protocol", "algorithm", "mode",
                                      "endpoints", "snat_address", "persistence_timeout_s")
_ENDPOINT_FIELDS = operator.attrgetter("address", "port", "weight", "priority")
_KEY_FIELDS = operator.attrgetter("vip", "port", "proto", "port_last")  # a ServiceKey's


def _service_fast(msg: Any) -> ServiceSpec | None:
    """parse_service's result for a valid service, read with few Python steps and no
    error names; None for anything parse_service might refuse (it then says why), and
    for a service with a health check or conntrack timeouts (parse_service reads them)."""
    if msg.HasField("health") or msg.HasField("conntrack_timeouts") or msg.port_last:
        return None
    vip, port, api_proto, api_algorithm, api_mode, ep_msgs, snat, persist = \
        _SERVICE_FIELDS(msg)
    vip_parsed = _unicast(vip)
    proto = _API_PROTO.get(api_proto)
    algorithm = _ALGORITHMS.get(api_algorithm)
    mode = _MODES.get(api_mode)
    if vip_parsed is None or proto is None or algorithm is None or mode is not Mode.DNAT \
            or snat or not 0 < port <= 65535 or persist > MAX_PERSISTENCE_S:
        return None  # other modes (their rules, snat_address): parse_service
    rows = list(map(_ENDPOINT_FIELDS, ep_msgs))
    n = len(rows)
    if not 0 < n <= MAX_ENDPOINTS:
        return None
    eps = []
    for i, (address, ep_port, weight, priority) in enumerate(rows):
        parsed = _unicast(address)
        if not weight and not ep_msgs[i].HasField("weight"):
            weight = DEFAULT_WEIGHT
        if parsed is None or not 0 < ep_port <= 65535 or not 0 <= weight <= MAX_WEIGHT \
                or priority > MAX_PRIORITY:
            return None
        eps.append((parsed[0], ep_port, weight, priority, parsed[1]))
    eps.sort()  # as EndpointSpec orders: address, port, weight, priority (then the bytes)
    addresses, ports, weights, priorities, packed = zip(*eps, strict=True)
    if len(set(zip(addresses, ports, strict=True))) != n:
        return None
    spec = ServiceSpec(vip_parsed[0], port, proto, algorithm, mode,
                       tuple(map(EndpointSpec, addresses, ports, weights, priorities)),
                       persistence_s=persist)
    # what dpd's put reads of the endpoints, made while they are at hand (cached
    # properties: set in the spec's __dict__; the columns made in C, a NamedTuple's own
    # __new__ being Python)
    made = spec.__dict__
    made["columns"] = tuple.__new__(EndpointColumns, (b"".join(packed), ports, weights))
    made["grouped"] = any(priorities)
    return spec


def parse_services(msgs: Any, field: str = "services") -> list[ServiceSpec]:
    """A batch of services, each as parse_service gives it; refuses a key given twice.
    Valid services take a fast path; the first one it does not take is parsed by
    parse_service, which raises the error naming the field."""
    with gcpause.paused(len(msgs) >= 256):
        specs = []
        for i, msg in enumerate(msgs):
            spec = _service_fast(msg)
            specs.append(spec if spec is not None else parse_service(msg, f"{field}[{i}]"))
        keys = list(map(_KEY_FIELDS, specs))  # as ServiceKey compares, read in C
    if len(set(keys)) != len(keys):
        counts = collections.Counter(keys)
        dup = next(k for k in keys if counts[k] > 1)
        raise ValidationError(f"{field}: {ServiceKey(*dup)} appears more than once in the "
                              "batch")
    if any(k[3] for k in keys):
        check_ranges([ServiceKey(*k) for k in keys if k[3]], field)
    return specs
