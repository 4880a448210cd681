"""The shape every named object kind of xlb.policy.v1 (firewall rules, routes, blocklists,
mirrors) shares in its Apply, ApplyMany, Delete and DeleteMany methods: validate, write
through the store (all or nothing, at one generation), wake the reconciler when
something changed, log it. The servicers keep one thin method per RPC (its messages);
services have their own store calls and stay in policyd.servicer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from policyd.validation import (
    validate_expected,
    validate_expected_one,
    validate_name,
    validate_names,
    validate_selectors,
)

if TYPE_CHECKING:
    from policyd.reconciler import Reconciler
    from policyd.store import ObjectBatch, Store, StoredObject

log = structlog.get_logger()


@dataclass(frozen=True)
class ObjectKind:
    one: str  # the single request's field ("rule"): selector errors name it
    many: str  # the batch request's field ("rules"): selector errors, the count logged
    event: str  # log events' prefix ("firewall_rule": firewall_rule.applied, ...)
    details: Callable[[Any], dict[str, object]] = field(default=lambda spec: {})  # logged

    @property
    def events(self) -> str:
        return f"{self.event}s"


class ObjectRpcs:
    _store: Store
    _reconciler: Reconciler

    def _apply_one(self, kind: ObjectKind, request: Any,
                   validate: Callable[[Any], tuple[str, Any]],
                   apply: Callable[..., ObjectBatch[Any]],
                   flush: Callable[[str], Sequence[str]] | None = None) -> StoredObject[Any]:
        """Apply `request`'s object (its field `kind.one`); `flush(name)`: the names to
        flush, for the kinds that have it."""
        msg = getattr(request, kind.one)
        name, spec = validate(msg)
        extra = {"flush": flush(name)} if flush is not None else {}
        result = apply(
            [(name, spec)], field="", **extra,
            selectors=validate_selectors([msg], kind.one, single=True),
            expected=validate_expected_one(request, name))
        if result.changed:
            self._reconciler.wake_all()
            log.info(f"{kind.event}.applied", name=name, **kind.details(spec),
                     generation=result.generation)
        return result.objects[0]

    def _apply_many(self, kind: ObjectKind, request: Any,
                    validate: Callable[[Sequence[Any]], list[tuple[str, Any]]],
                    apply: Callable[..., ObjectBatch[Any]], **extra: Any) -> ObjectBatch[Any]:
        """Apply `request`'s objects (its field `kind.many`), with `extra` store arguments."""
        msgs = getattr(request, kind.many)
        items = validate(msgs)
        result = apply(
            items, **extra, selectors=validate_selectors(msgs, kind.many),
            expected=(validate_expected(msgs, kind.many) if request.check_generations
                      else None))
        if result.changed:
            self._reconciler.wake_all()
            log.info(f"{kind.events}.applied", **{kind.many: len(items)},
                     changed=result.changed, generation=result.generation)
        return result

    def _delete_one(self, kind: ObjectKind, request: Any,
                    delete: Callable[[list[str]], ObjectBatch[Any]]) -> None:
        name = validate_name(request.name)
        result = delete([name])
        self._reconciler.wake_all()
        log.info(f"{kind.event}.deleted", name=name, generation=result.generation)

    def _delete_many(self, kind: ObjectKind, request: Any,
                     delete: Callable[[list[str]], ObjectBatch[Any]]) -> int:
        """Delete `request.names`; the store's generation afterwards."""
        result = delete(validate_names(request.names))
        if result.changed:
            self._reconciler.wake_all()
            log.info(f"{kind.events}.deleted", **{kind.many: result.changed},
                     generation=result.generation)
        return result.generation
