"""Domain errors of policyd. The servicer maps them onto gRPC status codes in one place.

Input errors reuse ``dpd.model.ValidationError`` (-> INVALID_ARGUMENT) so that dpd and
policyd reject bad input with the same words.
"""

from __future__ import annotations

from dpd.model import ValidationError

__all__ = ["ConflictError", "NotFoundError", "PolicydError", "ValidationError"]


class PolicydError(Exception):
    """Base of the domain errors below; the message is meant for a person."""


class NotFoundError(PolicydError):
    """The named object does not exist (-> NOT_FOUND)."""


class ConflictError(PolicydError):
    """Another object already holds a unique key (-> ALREADY_EXISTS)."""
