"""One node's firewall rules, routes, blocklist, mirrors and policers: pushed, diffed and
repaired as services are, at a cost that follows what changed (the node's worker,
policyd.worker, drives it).

Per node and kind (``RULES``, ``ROUTES``, ``BLOCKLIST``, ``MIRRORS``, ``POLICERS``),
``ObjectSync`` keeps ``known`` (what it believes the node holds, by the node's key: a rule's name, a
route's prefix, a blocked prefix (the union of the node's blocklists, each prefix its
own spec: policyd.xdp_objects), a mirrored interface, a policer's name), the
table's identity and generation as last seen (dpd bumps the generation by one on every
write call), for routes the digest of the node's FIB as last seen, and ``refused``: the
objects the node would not take, each with its reason (an ObjectError in the node's
status; the node is ERROR while any remain).

- **Change**: the store's change log names the keys changed since the worker's applied
  generation; only those are compared with ``known`` and written: one DeleteFirewallRules
  / DeleteRoutes call and one Put call (dpd restages its rule set once per call).
- **Older nodes**: a node whose dpd does not have the kind's methods (UNIMPLEMENTED)
  refuses every object of that kind: its other objects and its services still apply.
- **Refusals**: a Put the node refuses with INVALID_ARGUMENT or FAILED_PRECONDITION
  naming ``rules[i]`` / ``routes[i]`` (an interface it does not have, a next hop it
  cannot reach) is sent again without item i, so the node's other objects still
  apply; a refusal that names no item is sorted out one object at a time. Refused
  objects are tried again at every drift check (a next hop may become reachable).
- **Drift** (every drift check of the worker, and after every write): the table's
  summary from GetSummary, O(1) for rules. The table is read back (ListFirewallRules /
  ListRoutes, then one compare and the repair writes) only when the summary shows a
  write that was not ours (the generation moved by more than our writes), a count that
  differs from ``known``, a new table or dpd instance, or, for routes, a FIB digest
  that changed without a write of ours (an ``ip route`` edit).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import structlog

from policyd.nodeclient import NodeClient, TableState, describe_error
from policyd.policer_objects import PolicerSpec, delete_policers, list_policers, put_policers
from policyd.status import ObjectError
from policyd.store import Desired, ObjectChanges, Store
from policyd.xdp_objects import (
    MirrorSpec,
    delete_blocklist,
    delete_mirrors,
    list_blocklist,
    list_mirrors,
    put_blocklist,
    put_mirrors,
)
from xlbcore.firewall import RuleSpec
from xlbcore.route import RouteSpec

log = structlog.get_logger()

S = TypeVar("S", RuleSpec, RouteSpec, str, MirrorSpec, PolicerSpec)

# what a node answers for an object it will not take (others are the node's failure)
REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
_ITEM_RE = re.compile(r"^(?:rules|routes|prefixes|mirrors|policers)\[(\d+)\]")


@dataclass(frozen=True)
class Kind(Generic[S]):
    kind: str  # ObjectError.kind
    table: str  # GetSummary's table name
    digest: bool  # the summary's digest shows drift (routes: edits made outside dpd)
    # (store, since, labels of the node): what it takes of the changes / of everything
    changed: Callable[[Store, int, Mapping[str, str] | None], ObjectChanges[S] | None]
    desired: Callable[[Store, Mapping[str, str] | None], Desired[S]]
    put: Callable[[NodeClient, list[tuple[str, S]], bool], Any]  # (node, items, flush)
    delete: Callable[[NodeClient, list[str]], Any]
    list: Callable[[NodeClient], dict[str, S | None]]


RULES: Kind[RuleSpec] = Kind("firewall_rule", "firewall", False, Store.changed_rules,
                             Store.desired_rules, NodeClient.put_rules,
                             NodeClient.delete_rules, NodeClient.list_rules)
ROUTES: Kind[RouteSpec] = Kind("route", "routes", True, Store.changed_routes,
                               Store.desired_routes,
                               lambda node, routes, _flush: node.put_routes(routes),
                               NodeClient.delete_routes, NodeClient.list_routes)
# the node's blocklist: keyed and specified by prefix, the union of the blocklists
BLOCKLIST: Kind[str] = Kind("blocklist", "blocklist", False, Store.changed_blocklist,
                            Store.desired_blocklist, put_blocklist, delete_blocklist,
                            list_blocklist)
MIRRORS: Kind[MirrorSpec] = Kind("mirror", "mirrors", False, Store.changed_mirrors,
                                 Store.desired_mirrors, put_mirrors, delete_mirrors,
                                 list_mirrors)
POLICERS: Kind[PolicerSpec] = Kind("policer", "policers", False, Store.changed_policers,
                                   Store.desired_policers, put_policers, delete_policers,
                                   list_policers)


def object_reason(exc: BaseException) -> str:
    """The node's reason for refusing one object, said of the object rather than of its
    place in our batch: "rules[3].spec.match.in_interface: ..." -> "spec.match.in_interface:
    ...", "routes[0].next_hops[1]..." -> "spec.next_hops[1]...", "routes[0]: ..." -> "..."."""
    text = describe_error(exc)
    code, sep, details = text.partition(": ")
    m = _ITEM_RE.match(details)
    if not sep or not m:
        return text
    rest = details[m.end():]
    if rest.startswith(": "):
        rest = rest[2:]
    elif rest.startswith("."):
        rest = rest[1:] if details.startswith("rules") else "spec" + rest
    return f"{code}: {rest}"


def unimplemented(exc: BaseException) -> bool:
    """The node's dpd does not have the method (an older dpd, during an upgrade)."""
    return (isinstance(exc, grpc.RpcError) and hasattr(exc, "code")
            and exc.code() == grpc.StatusCode.UNIMPLEMENTED)


def refused_item(exc: BaseException) -> tuple[bool, int | None]:
    """(the node refused an object, the index of the item it named or None)."""
    if not isinstance(exc, grpc.RpcError) or not hasattr(exc, "code"):
        return False, None
    if exc.code() not in REFUSED:
        return False, None
    m = _ITEM_RE.match(exc.details() or "")
    return True, int(m.group(1)) if m else None


def plan(keys: Iterable[str], desired: Mapping[str, S | None],
         known: Mapping[str, S | None] | None) -> tuple[list[tuple[str, S]], list[str]]:
    """(puts, deletes) that bring `keys` on the node from `known` (None: unknown, write
    every key) to `desired`. O(len(keys))."""
    puts: list[tuple[str, S]] = []
    deletes: list[str] = []
    for k in sorted(keys):
        want = desired.get(k)
        if known is not None and k in known:
            if want is None:
                deletes.append(k)
            elif known[k] != want:
                puts.append((k, want))
        elif want is not None:
            puts.append((k, want))
        elif known is None:
            deletes.append(k)
    return puts, deletes


@dataclass
class Writes:
    calls: int = 0
    put: int = 0
    deleted: int = 0
    refused: int = 0
    drift: int | None = None  # read-back (not the first): objects that differed


class ObjectSync(Generic[S]):
    """One node's objects of one kind (see the module docstring). Used by the node's
    worker thread only."""

    def __init__(self, kind: Kind[S], node: NodeClient, store: Store, node_name: str,
                 labels: Mapping[str, str] | None = None) -> None:
        self.kind: Kind[S] = kind
        self._node = node
        self._store = store
        # the node's labels (the worker's dict, updated in place on a relabel)
        self.labels: Mapping[str, str] = labels if labels is not None else {}
        self._reads = 0  # read-backs done (the first finds what is foreign)
        self.known: dict[str, S | None] | None = None
        self.refused: dict[str, ObjectError] = {}
        self.need_read = True
        self.synced = False  # a read-back and full compare ran since `known` was voided
        self.supported = True  # False: the node has no GetSummary (an older dpd)
        self._ident: tuple[str, str] | None = None
        self._gen: int | None = None  # the table's generation after our last look/write
        self._unsure = 0  # refused write calls since: each may or may not have bumped it
        self._digest: str | None = None
        self._wrote = False  # we wrote since the last summary (the digest moved)
        self._lacking = False  # the node answered UNIMPLEMENTED for this kind
        self._log = log.bind(node=node_name, kind=kind.kind)

    # -- accounting ----------------------------------------------------------------------

    def _seen_write(self, reply: Any) -> None:
        generation = int(reply.generation)
        if self._gen is not None and not (
                self._gen + 1 <= generation <= self._gen + 1 + self._unsure):
            self._log.info("node.drift_suspected", expected=self._gen + 1, generation=generation)
            self.need_read = True  # someone else wrote too
        self._gen, self._unsure, self._wrote = generation, 0, True

    def observe(self, tables: Mapping[str, TableState] | None) -> None:
        """Compare the table's summary with what we last saw and did."""
        if tables is None:
            return
        state = tables.get(self.kind.table)
        if state is None:
            return
        if state.ident != self._ident:
            if self._ident is not None:
                self._log.warning("node.table_replaced", was=self._ident, now=state.ident)
            self._ident = state.ident
            self.known = None  # whatever we believed is void
            self.synced = False
            self.need_read = True
        elif self._gen is None or not self._gen <= state.generation <= self._gen + self._unsure:
            self._log.info("node.drift_suspected", expected=self._gen,
                           generation=state.generation)
            self.need_read = True
        elif self.known is not None and state.count != len(self.known):
            self._log.info("node.drift_suspected", known=len(self.known), count=state.count)
            self.need_read = True
        elif (self.kind.digest and not self._wrote and self._digest is not None
              and state.digest != self._digest):
            self._log.info("node.drift_suspected", digest=state.digest, was=self._digest)
            self.need_read = True
        self._gen, self._unsure, self._digest, self._wrote = (
            state.generation, 0, state.digest, False)

    # -- writes --------------------------------------------------------------------------

    def _refuse(self, key: str, names: Mapping[str, str], exc: BaseException) -> None:
        error = ObjectError(self.kind.kind, names.get(key, key), object_reason(exc))
        if self.refused.get(key) != error:
            self._log.warning("node.object_refused", name=error.name, error=error.message)
        self.refused[key] = error

    def _put(self, items: list[tuple[str, S]], names: Mapping[str, str], w: Writes,
             flush: frozenset[str] = frozenset()) -> None:
        """Put `items`; an item the node refuses is recorded and the rest sent again. A
        call carries flush_existing when one of its items' objects asks for it."""
        pending = list(items)
        one_by_one = False
        while pending:
            batch = pending[:1] if one_by_one else pending
            try:
                w.calls += 1
                reply = self.kind.put(self._node, batch,
                                      bool(flush) and any(k in flush for k, _ in batch))
            except grpc.RpcError as exc:
                if unimplemented(exc):  # the node cannot hold this kind at all
                    self._lacking = True
                    for key, _spec in batch:
                        self._refuse(key, names, exc)
                    w.refused += len(batch)
                    pending = pending[len(batch):]
                    continue
                refused, index = refused_item(exc)
                if not refused:
                    raise
                self._unsure += 1
                if len(batch) == 1:
                    index = 0
                if index is None or index >= len(batch):
                    one_by_one = True  # the node named no item: find it
                    continue
                self._refuse(batch[index][0], names, exc)
                w.refused += 1
                pending.remove(batch[index])
                continue
            self._seen_write(reply)
            self._lacking = False
            for key, spec in batch:
                if self.known is not None:
                    self.known[key] = spec
                self.refused.pop(key, None)
            w.put += len(batch)
            pending = pending[len(batch):]

    def _delete(self, keys: list[str], w: Writes) -> None:
        if not keys:
            return
        w.calls += 1
        try:
            reply = self.kind.delete(self._node, keys)
        except grpc.RpcError as exc:
            if not unimplemented(exc):
                raise
            reply = None  # a node without this kind holds none of it
        if reply is not None:
            self._seen_write(reply)
        for key in keys:
            if self.known is not None:
                self.known.pop(key, None)
        w.deleted += len(keys)

    def push(self, since: int) -> Writes:
        """Write what changed in the store after `since`: O(changed)."""
        changes = self.kind.changed(self._store, since, self.labels)
        if changes is None:  # the change log does not reach back: compare everything
            every = self.kind.desired(self._store, self.labels)
            keys: Iterable[str] = set(every.specs) | set(self.known or ()) | set(self.refused)
            specs: Mapping[str, S | None] = every.specs
            names, flush = every.names, every.flush
        else:
            keys, specs, names, flush = changes.specs, changes.specs, changes.names, changes.flush
        return self._apply(keys, specs, names, flush)

    def apply_changes(self, changes: ObjectChanges[S]) -> Writes:
        """Bring the keys of `changes` to their specs (a relabel: the objects with a
        node selector, each wanted here or not)."""
        return self._apply(changes.specs, changes.specs, changes.names, changes.flush)

    def _apply(self, keys: Iterable[str], specs: Mapping[str, S | None],
               names: Mapping[str, str], flush: frozenset[str]) -> Writes:
        for key in keys:
            if specs.get(key) is None:
                self.refused.pop(key, None)  # no longer desired: nothing to report
        puts, deletes = plan(keys, specs, self.known)
        w = Writes()
        self._delete(deletes, w)
        self._put(puts, names, w, flush)
        return w

    def retry_refused(self) -> Writes:
        """Offer the refused objects again, one at a time (reachability may have
        changed): O(refused)."""
        w = Writes()
        if not self.refused:
            return w
        every = self.kind.desired(self._store, self.labels)
        for key in list(self.refused):
            spec = every.specs.get(key)
            if spec is None:
                del self.refused[key]
            else:
                self._put([(key, spec)], every.names, w, every.flush)
                if self._lacking:  # still an older dpd: one call told us, not one each
                    break
        return w

    def read_back(self, foreign: Callable[[str, list[str]], None] | None = None
                  ) -> Writes | None:
        """List the node's table, compare with everything desired once, repair. None
        when the node has no such table (an older dpd): nothing to read. At the first
        read-back, `foreign(kind, keys)` is told what will be removed before it is; at
        the others, Writes.drift counts what differed."""
        tables = self._node.tables()
        if tables is None or self.kind.table not in tables:
            if self.supported:
                self._log.warning("node.no_table_summary",
                                  reason="the node's dpd has no GetSummary for this table")
            self.supported = False
            self.known, self.need_read, self.synced = {}, False, True
            return None
        self.supported = True
        self._ident = None  # take the table as it is now: the baseline
        self.observe(tables)
        actual = self.kind.list(self._node)
        every = self.kind.desired(self._store, self.labels)
        self.known = dict(actual)
        self.refused = {}
        self.need_read = False
        self.synced = True
        keys = set(every.specs) | set(actual)
        puts, deletes = plan(keys, every.specs, self.known)
        w = Writes()
        if self._reads == 0 and foreign is not None:
            foreign(self.kind.kind, deletes)
        elif self._reads:
            w.drift = len(puts) + len(deletes)
        self._reads += 1
        self._delete(deletes, w)
        self._put(puts, every.names, w, every.flush)
        return w

    @property
    def count(self) -> int:
        """Objects the node holds, as far as we know."""
        return sum(1 for v in (self.known or {}).values() if v is not None)
