"""Domain errors -> gRPC status codes, in one place for both servers.

Servicer methods are wrapped with ``rpc``: a domain error (xlbcore.errors) becomes its
status code with the error's message; anything else is logged with its traceback and
answered INTERNAL with a short message (never a traceback, never the raw input).
A servicer may add codes for its own exception types with a ``STATUS_FOR`` attribute.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar, cast

import grpc
import structlog

from xlbcore.errors import (
    ConflictError,
    Exhausted,
    NotFoundError,
    PreconditionError,
    UnavailableError,
    ValidationError,
)

log = structlog.get_logger("xlb.rpc")

F = TypeVar("F", bound=Callable[..., Any])

MESSAGE_MAX = 1024  # a status message longer than this is cut (a backstop: see quote())

STATUS_FOR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(
    exc: BaseException,
    extra: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (),
) -> grpc.StatusCode | None:
    """The status code of a domain error, or None for an unexpected exception."""
    for kind, code in (*extra, *STATUS_FOR):
        if isinstance(exc, kind):
            return code
    return None


def _short(text: str) -> str:
    return text if len(text) <= MESSAGE_MAX else text[:MESSAGE_MAX] + "..."


def abort(context: grpc.ServicerContext, method: str, exc: Exception,
          extra: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = ()) -> NoReturn:
    code = status_for(exc, extra)
    if code is not None:
        message = _short(str(exc))
        log.info("rpc_refused", method=method, code=code.name, reason=message)
        context.abort(code, message)
    log.exception("rpc_failed", method=method)
    context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in {method} ({type(exc).__name__}); see the server's log",
    )
    raise AssertionError("unreachable")  # context.abort raises


def rpc(method: F) -> F:
    """Map domain errors of a unary or server-streaming handler to status codes."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                abort(context, name, exc, getattr(self, "STATUS_FOR", ()))

        return cast(F, stream)

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            abort(context, name, exc, getattr(self, "STATUS_FOR", ()))

    return cast(F, unary)
