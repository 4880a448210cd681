"""Domain errors shared by dpd and policyd, and the one helper that quotes bad input.

Each error class stands for one gRPC status code (xlbcore.rpc maps them); the message
is meant for a person and names the field at fault. A bad value is quoted through
``quote`` so that a huge value never comes back whole in a status message or a log line.
"""

from __future__ import annotations

QUOTE_MAX = 40  # characters of a bad value shown in a message


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """``repr`` of `value`, cut to `limit` characters with the full length noted."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} characters)"


def brief(text: str, limit: int = QUOTE_MAX) -> str:
    """`text` itself when short, else its quoted prefix with the length noted."""
    return text if len(text) <= limit else quote(text, limit)


class XlbError(Exception):
    """Base of the domain errors; the message is meant for a person."""


class ValidationError(XlbError, ValueError):
    """Input that cannot be accepted (-> INVALID_ARGUMENT). The message names the field."""


class NotFoundError(XlbError, LookupError):
    """The named object does not exist (-> NOT_FOUND)."""


class ConflictError(XlbError):
    """Another object already holds a unique key (-> ALREADY_EXISTS)."""


class Exhausted(XlbError):
    """A table is full; nothing was written (-> RESOURCE_EXHAUSTED)."""


class PreconditionError(XlbError):
    """The system is not in a state that allows the call, e.g. a missing interface or a
    datapath that is not loaded (-> FAILED_PRECONDITION)."""


class UnavailableError(XlbError):
    """A dependency (a node, the store) cannot be reached now (-> UNAVAILABLE)."""
