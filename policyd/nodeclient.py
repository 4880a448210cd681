"""The calls policyd makes to one node's dpd, through the generated xlb.dpd.v1 API only.

``NodeClient`` lists, puts and deletes services with a deadline on every call, and builds
the requests: the shared model (``xlbcore.service``) is written into xlb.dpd.v1 messages,
in batches that stay under dpd's message limit. It imports nothing from dpd.

    client = NodeClient.connect("unix:/run/xlb/dpd.sock", timeout=10.0)
    held = client.list_services()            # {ServiceKey: ServiceSpec | None}
    writes = client.put_services(specs)      # calls made, seconds in them, datapath id
    client.close()
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlbcore.errors import brief
from xlbcore.firewall import RuleSpec, fill_rule, parse_rule, parse_rule_name
from xlbcore.route import RouteSpec, fill_route, parse_route
from xlbcore.service import (
    ServiceKey,
    ServiceSpec,
    ValidationError,
    fill_service,
    fill_service_key,
    parse_service,
    parse_service_key,
)
from xlbcore.tls import ClientTLS

log = structlog.get_logger()


# dpd's gRPC server takes messages up to grpc's default 4 MiB; stay well below it (a
# service with 64 endpoints is ~1.2 KiB, so 5000 of them would not fit in one call).
BATCH_BYTES = 3 * 1024 * 1024
BATCH_COUNT = 5000  # services per PutServices / keys per DeleteServices

CHANNEL_OPTIONS = [
    # grpc's own reconnect backoff defaults to 1 s .. 120 s; keep it within ours so a
    # node that comes back is noticed on the next retry.
    # A node that comes back should be READY (and its worker woken) within a second,
    # read-back included: tries at most 0.2 s apart (0.5 s let a restarted node wait
    # ~0.3 s on average before its read-back began).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 200),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


DETAILS_MAX = 200  # characters of an error's text kept in a node's status and the log


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None
                 ) -> grpc.Channel:
    """A channel to a dpd: with `credentials` (TLS with policyd's client certificate)
    to a HOST:PORT; a unix socket is always plaintext (its file mode guards it)."""
    if credentials is not None and not address.startswith("unix:"):
        return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def node_channels(tls: ClientTLS | None) -> dict[str, Callable[[str], grpc.Channel]]:
    """Reconciler keyword arguments for nodes reached with `tls` (none: the default)."""
    if tls is None:
        return {}
    return {"channel_factory": functools.partial(open_channel, credentials=tls.credentials())}


def describe_error(exc: BaseException) -> str:
    """A one-line, person-readable reason for a failed call (or pass), cut to about
    DETAILS_MAX characters: the text of a node's error is not policyd's to trust."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else None
        name = code.name if code is not None else "RPC_ERROR"
        return f"{name}: {brief(details or 'no details', DETAILS_MAX)}"
    return f"{type(exc).__name__}: {brief(str(exc), DETAILS_MAX)}"


# -- requests ---------------------------------------------------------------------------


# -- requests built once, sent to every node --------------------------------------------
#
# A service's PutServicesRequest field (tag, length, xlb.dpd.v1.Service bytes) is built
# once per ServiceSpec and cached; a request is the concatenation of its fields (what
# protobuf would serialize), sent as bytes through a raw method on the channel. So a
# change going to 200 nodes is encoded once, not 200 times.

_FIELD_CACHE_MAX = 1 << 18


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field1(body: bytes) -> bytes:
    return b"\x0a" + _varint(len(body)) + body  # field 1, length-delimited


@functools.lru_cache(maxsize=_FIELD_CACHE_MAX)
def service_body(spec: ServiceSpec) -> bytes:
    """`spec` as xlb.dpd.v1.Service bytes (cached). dpd lists a service it holds as
    these same bytes, so a read-back recognises known services without parsing them."""
    return fill_service(datapath_pb2.Service(), spec).SerializeToString(deterministic=True)


@functools.lru_cache(maxsize=_FIELD_CACHE_MAX)
def service_field(spec: ServiceSpec) -> bytes:
    """`spec` as one ``services`` field of a PutServicesRequest (cached)."""
    return _field1(service_body(spec))


@functools.lru_cache(maxsize=_FIELD_CACHE_MAX)
def key_field(key: ServiceKey) -> bytes:
    """`key` as one ``keys`` field of a DeleteServicesRequest (cached)."""
    return _field1(fill_service_key(datapath_pb2.ServiceKey(), key).SerializeToString(
        deterministic=True))


def encoded_batches(fields: Iterable[bytes], max_count: int,
                    max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """(request bytes, items) for `fields`, each request with at most `max_count`
    fields and (unless one alone is bigger) at most `max_bytes` bytes."""
    parts: list[bytes] = []
    size = 0
    for f in fields:
        if parts and (len(parts) >= max_count or size + len(f) > max_bytes):
            yield b"".join(parts), len(parts)
            parts, size = [], 0
        parts.append(f)
        size += len(f)
    if parts:
        yield b"".join(parts), len(parts)


# -- reading a node back ----------------------------------------------------------------


def read_actual(stub: Any, timeout: float) -> dict[ServiceKey, ServiceSpec | None]:
    """The node's services by key; None for an entry that is not a valid service
    (it gets replaced or deleted). Entries without even a valid key are logged and
    left alone: they cannot be addressed."""
    actual: dict[ServiceKey, ServiceSpec | None] = {}
    # grpc's core ends the call at its deadline, also after the node's GOAWAY or when
    # the node vanished mid-stream (tests/unit/test_policyd_nodeclient.py checks it).
    for msg in stub.ListServices(datapath_pb2.ListServicesRequest(), timeout=timeout):
        _read_one(actual, msg)
    return actual


def _read_one(actual: dict[ServiceKey, ServiceSpec | None], msg: Any) -> None:
    try:
        key = parse_service_key(msg)
    except ValidationError as exc:
        log.warning("node.unreadable_service", error=str(exc))
        return
    try:
        actual[key] = parse_service(msg)
    except ValidationError:
        actual[key] = None


# -- the client -------------------------------------------------------------------------


@dataclass(frozen=True)
class Writes:
    """What a batch of PutServices or DeleteServices calls did."""

    calls: int = 0
    seconds: float = 0.0  # spent in the calls (not building the requests)
    datapath_id: str = ""  # the node's table identity from the last reply that had one


@dataclass(frozen=True)
class Summary:
    """A node's service table in O(1): who it is and how often it was written."""

    datapath_id: str
    instance_id: str
    generation: int
    services: int

    @property
    def ident(self) -> tuple[str, str]:
        return self.datapath_id, self.instance_id


@dataclass(frozen=True)
class TableState:
    """One table of GetSummary: who holds it, how often it was written, and for routes
    a digest of the FIB (edits made outside dpd change it)."""

    table: str
    datapath_id: str
    instance_id: str
    generation: int
    count: int
    digest: str = ""

    @property
    def ident(self) -> tuple[str, str]:
        return self.datapath_id, self.instance_id


@dataclass(frozen=True)
class Page:
    """One page of a node's services, read atomically at `generation`."""

    services: dict[ServiceKey, ServiceSpec | None]
    last: ServiceKey | None  # the last key of the page (the next page's cursor)
    more: bool
    datapath_id: str
    instance_id: str
    generation: int

    @property
    def ident(self) -> tuple[str, str]:
        return self.datapath_id, self.instance_id


class NodeClient:
    """One node's xlb.dpd.v1.Datapath: list, put and delete services.

    `stub` is a ``DatapathStub`` or a stand-in with the same three methods. Every call
    has the deadline `timeout`; a PutServices carries at most `batch_size` services and
    `batch_bytes` bytes, a DeleteServices at most `batch_size` keys. Calls raise
    grpc.RpcError when they fail.
    """

    def __init__(
        self,
        stub: Any,
        *,
        timeout: float = 10.0,
        batch_size: int = BATCH_COUNT,
        batch_bytes: int = BATCH_BYTES,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.stub = stub
        self.timeout = timeout
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self._channel = channel
        self._raw_put: Callable[..., Any] | None = None
        self._raw_delete: Callable[..., Any] | None = None
        if channel is not None:  # requests go as bytes built once (see service_field)
            self._raw_put = channel.unary_unary(
                "/xlb.dpd.v1.Datapath/PutServices", request_serializer=None,
                response_deserializer=datapath_pb2.PutServicesResponse.FromString)
            self._raw_delete = channel.unary_unary(
                "/xlb.dpd.v1.Datapath/DeleteServices", request_serializer=None,
                response_deserializer=datapath_pb2.DeleteServicesResponse.FromString)

    @property
    def channel(self) -> grpc.Channel | None:
        return self._channel

    @classmethod
    def connect(
        cls,
        address: str,
        channel_factory: Callable[[str], grpc.Channel] = open_channel,
        **settings: Any,
    ) -> NodeClient:
        """A client on its own channel to `address`; ``close`` closes the channel."""
        channel = channel_factory(address)
        return cls(datapath_pb2_grpc.DatapathStub(channel), channel=channel, **settings)

    def close(self) -> None:
        """Close the channel (if this client opened it): a call in flight is cancelled."""
        if self._channel is not None:
            self._channel.close()

    def list_services(self) -> dict[ServiceKey, ServiceSpec | None]:
        """What the node holds (see ``read_actual``)."""
        return read_actual(self.stub, self.timeout)

    def summary(self, timeout: float | None = None, wait_for_ready: bool = False) -> Summary:
        """The node's table summary (GetServicesSummary): O(1) on the node."""
        r = self.stub.GetServicesSummary(datapath_pb2.GetServicesSummaryRequest(),
                                         timeout=timeout or self.timeout,
                                         wait_for_ready=wait_for_ready)
        return Summary(r.datapath_id, r.instance_id, int(r.generation), int(r.services))

    def tables(self, timeout: float | None = None) -> dict[str, TableState] | None:
        """Every table's summary (GetSummary) by table name; None when the node does not
        have GetSummary (an older dpd)."""
        try:
            r = self.stub.GetSummary(datapath_pb2.GetSummaryRequest(),
                                     timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            if hasattr(exc, "code") and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise
        return {t.table: TableState(t.table, t.datapath_id, t.instance_id, int(t.generation),
                                    int(t.count), t.digest) for t in r.tables}

    # firewall rules (keyed by name) and routes (keyed by prefix): one call per batch,
    # as dpd restages its rule set per call; refusals are the caller's to sort out

    def put_rules(self, rules: Sequence[tuple[str, RuleSpec]], flush: bool = False) -> Any:
        """PutFirewallRules; `flush`: also end the established flows the node's new rule
        set drops."""
        request = datapath_pb2.PutFirewallRulesRequest(flush_existing=flush)
        for name, spec in rules:
            fill_rule(request.rules.add(name=name).spec, spec)
        return self.stub.PutFirewallRules(request, timeout=self.timeout)

    def delete_rules(self, names: Sequence[str]) -> Any:
        return self.stub.DeleteFirewallRules(
            datapath_pb2.DeleteFirewallRulesRequest(names=names), timeout=self.timeout)

    def list_rules(self) -> dict[str, RuleSpec | None]:
        """The node's rules by name; None for one that does not parse (it is replaced or
        deleted). A rule without a valid name is logged and left alone."""
        out: dict[str, RuleSpec | None] = {}
        for msg in self.stub.ListFirewallRules(datapath_pb2.ListFirewallRulesRequest(),
                                               timeout=self.timeout):
            try:
                name = parse_rule_name(msg.name)
            except ValidationError as exc:
                log.warning("node.unreadable_rule", error=str(exc))
                continue
            try:
                out[name] = parse_rule(msg.spec)
            except ValidationError:
                out[name] = None
        return out

    def put_routes(self, routes: Sequence[tuple[str, RouteSpec]]) -> Any:
        request = datapath_pb2.PutRoutesRequest()
        for _prefix, spec in routes:
            fill_route(request.routes.add(), spec)
        return self.stub.PutRoutes(request, timeout=self.timeout)

    def delete_routes(self, prefixes: Sequence[str]) -> Any:
        return self.stub.DeleteRoutes(datapath_pb2.DeleteRoutesRequest(prefixes=prefixes),
                                      timeout=self.timeout)

    def list_routes(self) -> dict[str, RouteSpec | None]:
        """The node's routes (xlb's, as dpd lists them) by prefix; None for one that does
        not parse."""
        out: dict[str, RouteSpec | None] = {}
        for msg in self.stub.ListRoutes(datapath_pb2.ListRoutesRequest(), timeout=self.timeout):
            try:
                spec = parse_route(msg)
            except ValidationError as exc:
                log.warning("node.unreadable_route", error=str(exc), prefix=brief(msg.prefix))
                if msg.prefix:
                    out[msg.prefix] = None
                continue
            out[spec.prefix] = spec
        return out

    def list_page(self, after: ServiceKey | None, limit: int,
                  known: Mapping[bytes, ServiceSpec] | None = None) -> Page:
        """Up to `limit` services after `after` (None: from the first), one call with
        its own deadline: a read-back's deadline is per page, not per table. `known`
        maps service bytes (``service_body``) to specs: those are taken as they are,
        only the others are parsed and validated."""
        request = datapath_pb2.ListServicesPageRequest(limit=limit)
        if after is not None:
            request.has_after = True
            fill_service_key(request.after, after)
        reply = self.stub.ListServicesPage(request, timeout=self.timeout)
        services: dict[ServiceKey, ServiceSpec | None] = {}
        for msg in reply.services:
            spec = known.get(msg.SerializeToString(deterministic=True)) if known else None
            if spec is not None:
                services[spec.key] = spec
            else:
                _read_one(services, msg)
        last = None
        if len(reply.services):
            try:
                last = parse_service_key(reply.services[len(reply.services) - 1])
            except ValidationError:
                last = None
        return Page(services, last, bool(reply.more) and last is not None, reply.datapath_id,
                    reply.instance_id, int(reply.generation))

    def put_services(self, specs: Iterable[ServiceSpec],
                     on_reply: Callable[[Any, list[ServiceSpec]], None] | None = None) -> Writes:
        """PutServices `specs` in batches; `on_reply(reply, batch)` after each call."""
        items = list(specs)
        return self._send_fields(self._raw_put, self.stub.PutServices,
                                 datapath_pb2.PutServicesRequest,
                                 [service_field(s) for s in items], items, on_reply)

    def delete_services(self, keys: Sequence[ServiceKey],
                        on_reply: Callable[[Any, list[ServiceKey]], None] | None = None
                        ) -> Writes:
        items = list(keys)
        return self._send_fields(self._raw_delete, self.stub.DeleteServices,
                                 datapath_pb2.DeleteServicesRequest,
                                 [key_field(k) for k in items], items, on_reply)

    def _send_fields(self, raw: Callable[..., Any] | None, method: Callable[..., Any],
                     message: Any, fields: list[bytes], items: list[Any],
                     on_reply: Callable[[Any, list[Any]], None] | None) -> Writes:
        clock = time.perf_counter
        seconds = 0.0
        calls = 0
        datapath_id = ""
        done = 0
        for data, count in encoded_batches(fields, self.batch_size, self.batch_bytes):
            before = clock()
            if raw is not None:
                reply = raw(data, timeout=self.timeout)
            else:
                reply = method(message.FromString(data), timeout=self.timeout)
            seconds += clock() - before
            calls += 1
            datapath_id = getattr(reply, "datapath_id", "") or datapath_id
            if on_reply is not None:
                on_reply(reply, items[done:done + count])
            done += count
        return Writes(calls, seconds, datapath_id)
