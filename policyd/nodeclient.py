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

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog

from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlbcore.errors import quote
from xlbcore.service import (
    ServiceKey,
    ServiceSpec,
    ValidationError,
    fill_service,
    fill_service_key,
    parse_service,
    parse_service_key,
)

log = structlog.get_logger()

T = TypeVar("T")

# dpd's gRPC server takes messages up to grpc's default 4 MiB; stay well below it (a
# service with 64 endpoints is ~1.2 KiB, so 5000 of them would not fit in one call).
BATCH_BYTES = 3 * 1024 * 1024
BATCH_COUNT = 5000  # services per PutServices / keys per DeleteServices

CHANNEL_OPTIONS = [
    # grpc's own reconnect backoff defaults to 1 s .. 120 s; keep it within ours so a
    # node that comes back is noticed on the next retry.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


DETAILS_MAX = 200  # characters of an error's text kept in a node's status and the log


def _brief(text: str, limit: int = DETAILS_MAX) -> str:
    """`text` itself when short, else its quoted prefix with the length noted."""
    return text if len(text) <= limit else quote(text, limit)


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def describe_error(exc: BaseException) -> str:
    """A one-line, person-readable reason for a failed call (or pass), cut to about
    DETAILS_MAX characters: the text of a node's error is not policyd's to trust."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else None
        name = code.name if code is not None else "RPC_ERROR"
        return f"{name}: {_brief(details or 'no details')}"
    return f"{type(exc).__name__}: {_brief(str(exc))}"


# -- requests ---------------------------------------------------------------------------


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def put_requests(
    specs: Iterable[ServiceSpec], max_count: int = BATCH_COUNT, max_bytes: int = BATCH_BYTES
) -> Iterator[datapath_pb2.PutServicesRequest]:
    """PutServices requests for `specs`, in order, each with at most `max_count`
    services and (unless one service alone is bigger) at most `max_bytes` bytes."""
    request = datapath_pb2.PutServicesRequest()
    size = 0
    for spec in specs:
        msg = fill_service(request.services.add(), spec)
        grown = msg.ByteSize() + 8  # + tag and length prefix (generously)
        if len(request.services) > 1 and (
            len(request.services) > max_count or size + grown > max_bytes
        ):
            del request.services[-1]
            yield request
            request = datapath_pb2.PutServicesRequest()
            fill_service(request.services.add(), spec)
            size = 0
        size += grown
    if request.services:
        yield request


def delete_requests(
    keys: Sequence[ServiceKey], max_count: int = BATCH_COUNT
) -> Iterator[datapath_pb2.DeleteServicesRequest]:
    """DeleteServices requests for `keys`, in order, each with at most `max_count` keys."""
    for chunk in batches(keys, max_count):
        request = datapath_pb2.DeleteServicesRequest()
        for key in chunk:
            fill_service_key(request.keys.add(), key)
        yield request


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

    def put_services(self, specs: Iterable[ServiceSpec]) -> Writes:
        return self._send(self.stub.PutServices, put_requests(specs, self.batch_size,
                                                              self.batch_bytes))

    def delete_services(self, keys: Sequence[ServiceKey]) -> Writes:
        return self._send(self.stub.DeleteServices, delete_requests(keys, self.batch_size))

    def _send(self, method: Callable[..., Any], requests: Iterable[Any]) -> Writes:
        clock = time.perf_counter
        seconds = 0.0
        calls = 0
        datapath_id = ""
        for request in requests:
            before = clock()
            reply = method(request, timeout=self.timeout)
            seconds += clock() - before
            calls += 1
            datapath_id = getattr(reply, "datapath_id", "") or datapath_id
        return Writes(calls, seconds, datapath_id)
