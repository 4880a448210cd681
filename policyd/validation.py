"""Input rules of policyd: names and node addresses here; the service, firewall rule and
route specs are checked by the shared models (``xlbcore.service``, ``xlbcore.firewall``,
``xlbcore.route``) so that policyd accepts exactly what dpd accepts. Interface names
and next hops are checked for syntax only: whether they exist or are reachable differs
between nodes, and each node reports it (NodeSyncStatus.errors).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from policyd.selectors import Labels, validate_labels
from xlbcore.address import parse_address
from xlbcore.errors import ValidationError, quote
from xlbcore.firewall import RuleSpec, parse_rule
from xlbcore.route import RouteSpec, parse_route
from xlbcore.service import ServiceSpec, parse_service

S = TypeVar("S")

NAME_MAX = 63
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")


def validate_name(value: str, field: str = "name") -> str:
    """A service or node name: 1..63 of [a-z0-9-], starting with a letter or digit."""
    if not value:
        raise ValidationError(f"{field}: a name is required")
    if len(value) > NAME_MAX:
        raise ValidationError(
            f"{field}: {quote(value)} is {len(value)} characters, at most {NAME_MAX}"
        )
    if not _NAME_RE.fullmatch(value):
        raise ValidationError(
            f"{field}: {quote(value)} is not a valid name; use lower-case letters, digits and '-',"
            " starting with a letter or digit"
        )
    return value


def validate_node(name: str, address: str, field: str = "node") -> tuple[str, str]:
    """Return (name, canonical address) of a node or raise ValidationError."""
    prefix = f"{field}." if field else ""
    return (
        validate_name(name, f"{prefix}name"),
        parse_address(address, f"{prefix}address").text,
    )


def validate_service(msg: Any, field: str = "service") -> tuple[str, ServiceSpec]:
    """Return (name, spec) of an xlb.policy.v1.Service or raise ValidationError.

    Output-only fields (generation, update_time) are ignored.
    """
    prefix = f"{field}." if field else ""
    name = validate_name(msg.name, f"{prefix}name")
    try:
        return name, parse_service(msg, field)
    except ValidationError as exc:
        # The shared model names some fields without the prefix (e.g. "algorithm: ...").
        if prefix and not str(exc).startswith(prefix):
            raise ValidationError(f"{prefix}{exc}") from None
        raise


def validate_services(
    msgs: Sequence[Any], field: str = "services"
) -> list[tuple[str, ServiceSpec]]:
    """Validate a batch: every service (errors name ``services[i]``), then uniqueness of
    names and of keys (vip, port, protocol, port_last: an exact-port service and a port
    range starting at its port are two keys) within the batch. Port ranges that overlap
    are the store's to refuse (it sees the stored ones too). Returns (name, spec) in
    order."""
    items: list[tuple[str, ServiceSpec]] = []
    names: dict[str, int] = {}
    keys: dict[tuple[str, int, int, int], int] = {}  # cheaper to build than a ServiceKey
    for i, msg in enumerate(msgs):
        where = f"{field}[{i}]"
        name, spec = validate_service(msg, where)
        first = names.setdefault(name, i)
        if first != i:
            raise ValidationError(f"{where}.name: {quote(name)} is also {field}[{first}]")
        first = keys.setdefault((spec.vip, spec.port, spec.proto, spec.port_last), i)
        if first != i:
            raise ValidationError(
                f"{where}: {spec.key} is also used by {field}[{first}] ({quote(items[first][0])})"
            )
        items.append((name, spec))
    return items


def validate_names(values: Sequence[str], field: str = "names") -> list[str]:
    """A batch of service names: each valid, none listed twice."""
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        validate_name(value, f"{field}[{i}]")
        first = seen.setdefault(value, i)
        if first != i:
            raise ValidationError(f"{field}[{i}]: {quote(value)} is also {field}[{first}]")
    return list(values)


def validate_named(msg: Any, field: str, parse: Callable[[Any, str], S]) -> tuple[str, S]:
    """(name, spec) of a named object message (its spec read by `parse`); errors name
    ``field.name`` and ``field.spec...``. Output-only fields are ignored."""
    prefix = f"{field}." if field else ""
    return validate_name(msg.name, f"{prefix}name"), parse(msg.spec, f"{prefix}spec")


def validate_batch(msgs: Sequence[Any], field: str,
                   validate: Callable[[Any, str], tuple[str, S]],
                   key: Callable[[S], Hashable] | None = None,
                   clash: Callable[[S], str] | None = None) -> list[tuple[str, S]]:
    """A batch of named objects: each valid by `validate` (errors name ``field[i]``), no
    name twice and, with `key`, no key of a spec twice (the error ``field[i].`` followed
    by `clash(spec)` and the first holder, ``field[j] ('name')``)."""
    items: list[tuple[str, S]] = []
    names: dict[str, int] = {}
    keys: dict[Hashable, int] = {}
    for i, msg in enumerate(msgs):
        where = f"{field}[{i}]"
        name, spec = validate(msg, where)
        first = names.setdefault(name, i)
        if first != i:
            raise ValidationError(f"{where}.name: {quote(name)} is also {field}[{first}]")
        if key is not None:
            first = keys.setdefault(key(spec), i)
            if first != i:
                said = clash(spec) if clash is not None else "spec: the same as"
                raise ValidationError(
                    f"{where}.{said} {field}[{first}] ({quote(items[first][0])})")
        items.append((name, spec))
    return items


def validate_rule(msg: Any, field: str = "rule") -> tuple[str, RuleSpec]:
    """(name, spec) of an xlb.policy.v1.FirewallRule; output-only fields are ignored."""
    return validate_named(msg, field, parse_rule)


def validate_rules(msgs: Sequence[Any], field: str = "rules") -> list[tuple[str, RuleSpec]]:
    """A batch of rules: each valid (errors name ``rules[i]``), no name twice."""
    return validate_batch(msgs, field, validate_rule)


def validate_route(msg: Any, field: str = "route") -> tuple[str, RouteSpec]:
    """(name, spec) of an xlb.policy.v1.Route; output-only fields are ignored."""
    return validate_named(msg, field, parse_route)


def validate_routes(msgs: Sequence[Any], field: str = "routes") -> list[tuple[str, RouteSpec]]:
    """A batch of routes: each valid, no name and no prefix twice."""
    return validate_batch(
        msgs, field, validate_route, key=lambda spec: spec.prefix,
        clash=lambda spec: f"spec.prefix: {spec.prefix} is also the prefix of")


def validate_selectors(msgs: Sequence[Any], field: str,
                       single: bool = False) -> dict[str, Labels]:
    """Node selectors by object name (objects without one left out); errors name
    ``field[i].node_selector`` (``field.node_selector`` when `single`)."""
    out: dict[str, Labels] = {}
    for i, msg in enumerate(msgs):
        if msg.node_selector:
            where = field if single else f"{field}[{i}]"
            out[msg.name] = validate_labels(msg.node_selector, f"{where}.node_selector")
    return out


def validate_expected(msgs: Sequence[Any], field: str) -> dict[str, int]:
    """Compare-and-swap of a batch: each object's ``generation`` is the one expected."""
    out: dict[str, int] = {}
    for i, msg in enumerate(msgs):
        if msg.generation < 0:
            raise ValidationError(f"{field}[{i}].generation: {msg.generation} is negative")
        out[msg.name] = int(msg.generation)
    return out


def validate_expected_one(request: Any, name: str) -> dict[str, int] | None:
    """Compare-and-swap of a single apply: its optional ``expected_generation``."""
    if not request.HasField("expected_generation"):
        return None
    if request.expected_generation < 0:
        raise ValidationError(
            f"expected_generation: {request.expected_generation} is negative")
    return {name: int(request.expected_generation)}


def validate_node_labels(msg: Any, field: str = "node") -> Labels:
    return validate_labels(msg.labels, f"{field}.labels")
