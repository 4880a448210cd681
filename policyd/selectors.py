"""Node labels and object node selectors (pure).

A node carries labels (``key=value``); an object (service, firewall rule, route) carries
an optional node selector: the labels a node must all have, with equal values, to take
the object (Kubernetes ``matchLabels``). An empty selector selects every node.

Both are kept canonical as a sorted tuple of (key, value) pairs (``Labels``): hashable,
comparable, cheap to store. Keys and values follow Kubernetes' label syntax: a key is an
optional DNS prefix and ``/``, then a name of at most 63 characters (letters, digits,
``-``, ``_``, ``.``; starting and ending with a letter or digit); a value is empty or
such a name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from xlbcore.errors import ValidationError, quote

Labels = tuple[tuple[str, str], ...]

MAX_LABELS = 32
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def _check_key(key: str, field: str) -> None:
    prefix, sep, name = key.rpartition("/")
    if sep and (not prefix or len(prefix) > 253 or not _PREFIX.match(prefix)):
        raise ValidationError(f"{field}: key {quote(key)}: the prefix before '/' must be a"
                              " DNS subdomain (lower-case, at most 253 characters)")
    if not _NAME.match(name):
        raise ValidationError(f"{field}: key {quote(key)}: 1..63 letters, digits, '-', '_'"
                              " or '.', starting and ending with a letter or digit")


def validate_labels(value: Mapping[str, str], field: str) -> Labels:
    """Canonical labels or selector from a proto map (or any mapping); ValidationError
    naming `field` (``node.labels``, ``services[2].node_selector``)."""
    if len(value) > MAX_LABELS:
        raise ValidationError(f"{field}: {len(value)} labels; at most {MAX_LABELS}")
    for key, val in value.items():
        _check_key(key, field)
        if val and not _NAME.match(val):
            raise ValidationError(f"{field}[{key}]: value {quote(val)}: empty, or 1..63"
                                  " letters, digits, '-', '_' or '.', starting and ending"
                                  " with a letter or digit")
    return tuple(sorted(value.items()))


def matches(selector: Labels, labels: Mapping[str, str]) -> bool:
    """True when `labels` has every pair of `selector` (an empty selector: always)."""
    return all(labels.get(k) == v for k, v in selector)


def to_text(labels: Labels) -> str:
    """As stored in SQLite ('' for none)."""
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":")) if labels else ""


def from_text(text: str) -> Labels:
    return tuple(sorted(json.loads(text).items())) if text else ()


def describe(labels: Iterable[tuple[str, str]]) -> str:
    """``a=1,b=2`` (for logs and tables)."""
    return ",".join(f"{k}={v}" for k, v in labels)
