"""Policers: token buckets in ``polx_map``, charged by the incoming packets of the
interfaces they police.

Each policer is one array value (dpd/bpf/xlb_abi.h ``xlb_polx``): the bucket is kept as
GCRA, one 64-bit "theoretical arrival time" that every CPU moves with a compare-and-swap
(dpd/bpf/police.h). Its id is its index; dpd keeps the name, rate and burst in the same
value (a restarted dpd reads them back). ``polx_intf_map`` names the policer of each
policed interface, and tc_police_func (dpd/bpf/police.c), a TC ingress filter of its
own attached to those interfaces only, charges their packets. Counters:
``polx_stats_map[id * 2 + pass|drop]``.

``Bucket`` is the same arithmetic in Python: the model a unit test checks and the
datapath test compares the kernel with.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from dpd import attach as tc
from dpd.firewall import Links
from dpd.loader import Datapath
from dpd.maps import MapError, MapFull
from dpd.services import Counter, sum_counters
from xlbcore.errors import Exhausted, PreconditionError, ValidationError, quote
from xlbcore.firewall import parse_ifname
from xlbcore.policer import check_burst, check_rate

log = structlog.get_logger("dpd.policers")

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")
Q = 16  # byte_ns_q16's fixed point


def byte_ns_q16(rate_bps: int) -> int:
    """Nanoseconds per byte at `rate_bps`, in 48.16 fixed point."""
    return (8_000_000_000 << Q) // rate_bps


def burst_ns(rate_bps: int, burst_bytes: int) -> int:
    return burst_bytes * 8_000_000_000 // rate_bps


@dataclass
class Bucket:
    """The datapath's GCRA step for step (police.h), for tests and reasoning."""

    rate_bps: int
    burst_bytes: int
    tat: int = 0

    def charge(self, length: int, now_ns: int) -> bool:
        """True when a packet of `length` bytes at `now_ns` conforms (and is charged)."""
        cost = (length * byte_ns_q16(self.rate_bps)) >> Q
        nxt = max(self.tat, now_ns) + cost
        if nxt > now_ns + burst_ns(self.rate_bps, self.burst_bytes):
            return False
        self.tat = nxt
        return True


@dataclass(frozen=True)
class PolicerSpec:
    name: str
    rate_bps: int
    burst_bytes: int
    interfaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policer:
    spec: PolicerSpec
    passed: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)


def parse_policer(name: str, rate_bps: int, burst_bytes: int, interfaces: Iterable[str],
                  where: str) -> PolicerSpec:
    if not NAME_RE.fullmatch(name):
        raise ValidationError(f"{where}.name: {quote(name)} is not 1..63 letters, digits, "
                              "'.', '_' or '-'")
    check_rate(rate_bps, f"{where}.rate_bps")
    check_burst(burst_bytes, f"{where}.burst_bytes")
    names: list[str] = []
    for i, n in enumerate(interfaces):
        if not n:
            raise ValidationError(f"{where}.interfaces[{i}]: empty")
        n = parse_ifname(n, f"{where}.interfaces[{i}]")
        if n in names:
            raise ValidationError(f"{where}.interfaces[{i}]: {quote(n)} is listed twice")
        names.append(n)
    return PolicerSpec(name, rate_bps, burst_bytes, tuple(names))


# -- the TC filter ------------------------------------------------------------------------

class Filters(tc.ExtraFilter):
    """tc_police_func's filter on an interface (pyroute2)."""

    NAME = "xlb_tc_police_func"
    # ahead of the mirror filter (tc.PRIO - 1) and of tc_packet_func (tc.PRIO): what a
    # policer drops is neither mirrored nor judged
    PRIO = tc.PRIO - 2


class NoFilters(tc.NotAttached, Filters):
    """The in-memory datapath: no programs, nothing to attach."""


def detach_filter(ifindex: int) -> bool:
    """Remove our policer filter (and the clsact qdisc when nothing else uses it)."""
    return Filters.detach_from(ifindex)


def filtered() -> list[int]:
    """Every interface of this network namespace carrying our policer filter."""
    return Filters.filtered()


def _text(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


# -- the table ----------------------------------------------------------------------------

class _Undo:
    """What PolicerTable.put has changed so far, to put back when a later step fails
    (a map write, attaching a filter): the buckets' values, the policed interfaces'
    records and their filters."""

    def __init__(self, table: PolicerTable, attached: dict[int, int]) -> None:
        self.t = table
        self.attached = attached  # ifindex -> policer id, before the call
        self.buckets: dict[int, bytes] = {}
        self.intfs: list[int] = []  # ifindexes whose record and filter this call touched
        self.failed_ifindex: int | None = None  # the interface being changed last

    def bucket(self, pid: int) -> None:
        if pid not in self.buckets:
            self.buckets[pid] = self.t.map.get(self.t._key(pid)) or self.t.map.zero_value()

    def detaching(self, ifindex: int) -> None:
        self.intfs.append(ifindex)
        self.failed_ifindex = ifindex

    attaching = detaching

    def run(self) -> None:
        t = self.t
        for ifindex in reversed(self.intfs):
            pid = self.attached.get(ifindex)
            try:
                if pid is None:
                    t.intf.delete(t._key(ifindex))
                    t.filters.detach(ifindex)
                else:
                    t.intf.put(t._key(ifindex), t._key(pid))
                    t.filters.attach(ifindex)
            except Exception as e:  # noqa: BLE001 - put back what can be; say what could not
                log.error("policer_rollback_failed", ifindex=ifindex, error=str(e))
        for pid, raw in self.buckets.items():
            try:
                t.map.put(t._key(pid), raw)
            except Exception as e:  # noqa: BLE001
                log.error("policer_rollback_failed", policer_id=pid, error=str(e))
        log.warning("policers_rolled_back", interfaces=self.intfs, policers=list(self.buckets))


class PolicerTable:
    def __init__(self, dp: Datapath, links: Links, filters: Filters) -> None:
        self.map = dp.maps["polx_map"]
        self.intf = dp.maps["polx_intf_map"]
        self.stats = dp.maps["polx_stats_map"]
        self.links = links
        self.filters = filters
        # the firewall rules that charge a policer (set by the node to its firewall's):
        # a policer a rule uses is not deleted
        self.rules_using: Callable[[str], list[str]] = lambda name: []
        self.capacity = self.map.spec.max_entries
        self._val = dp.abi.structs["xlb_polx"].codec
        self._counter = dp.abi.structs["xlb_counter"].codec
        self._pass = dp.abi.const("XLB_POLX_PASS")
        self._drop = dp.abi.const("XLB_POLX_DROP")
        self._lock = threading.Lock()
        self.generation = 0
        # name -> id, read back from the map (id 0 is never used: "no policer")
        self._ids: dict[str, int] = {}
        for k, v in self.map.items():
            r = self._val.unpack(v)
            if r["byte_ns_q16"]:
                self._ids[_text(r["name"])] = int.from_bytes(k, "little")

    @staticmethod
    def _key(i: int) -> bytes:
        return i.to_bytes(4, "little")

    def _intf_records(self) -> dict[int, int]:
        """policed ifindex -> policer id"""
        return {int.from_bytes(k, "little"): int.from_bytes(v, "little")
                for k, v in self.intf.items()}

    def _record(self, pid: int) -> dict[str, Any]:
        raw = self.map.get(self._key(pid))
        assert raw is not None
        return self._val.unpack(raw)

    def _zero_stats(self, pid: int) -> None:
        for j in (self._pass, self._drop):
            self.stats.put(self._key(pid * 2 + j), self.stats.zero_value())

    def put(self, specs: Sequence[PolicerSpec]) -> int:
        """Create or replace policers by name: all or nothing. A replaced policer keeps its
        bucket and counters; its policed interfaces become `spec.interfaces`."""
        with self._lock:
            attached = self._intf_records()
            by_id = {v: k for k, v in self._ids.items()}
            new_ids: dict[str, int] = {}
            free = (i for i in range(1, self.capacity) if i not in by_id)
            want: dict[int, str] = {}  # ifindex -> policer name
            for i, s in enumerate(specs):
                if s.name not in self._ids:
                    pid = next(free, None)
                    if pid is None:
                        raise Exhausted(f"policers[{i}]: the node holds {self.capacity - 1} "
                                        "policers; nothing was written")
                    new_ids[s.name] = pid
                for j, n in enumerate(s.interfaces):
                    ifindex = self.links.index(n)
                    if ifindex is None:
                        raise ValidationError(f"policers[{i}].interfaces[{j}]: no interface "
                                              f"{quote(n)} on this node")
                    holder = by_id.get(attached.get(ifindex, 0))
                    if holder is not None and holder not in {x.name for x in specs}:
                        raise ValidationError(f"policers[{i}].interfaces[{j}]: {quote(n)} is "
                                              f"policed by {quote(holder)}")
                    if ifindex in want:
                        raise ValidationError(f"policers[{i}].interfaces[{j}]: {quote(n)} is "
                                              f"policed by {quote(want[ifindex])} too")
                    want[ifindex] = s.name
            ids = {**self._ids, **new_ids}
            before_ids = dict(self._ids)
            undo = _Undo(self, attached)
            try:
                for s in specs:
                    pid = ids[s.name]
                    old = self._record(pid) if s.name in self._ids else None
                    undo.bucket(pid)
                    if old is None:
                        self._zero_stats(pid)
                    self.map.put(self._key(pid), self._val.pack(
                        tat=old["tat"] if old else 0,
                        byte_ns_q16=byte_ns_q16(s.rate_bps),
                        burst_ns=burst_ns(s.rate_bps, s.burst_bytes),
                        event_ns=old["event_ns"] if old else 0,
                        rate_bps=s.rate_bps, burst_bytes=s.burst_bytes, name=s.name.encode()))
                self._ids = ids
                names = {s.name for s in specs}
                for ifindex, pid in attached.items():  # interfaces these policers no longer hold
                    if by_id.get(pid) in names and ifindex not in want:
                        undo.detaching(ifindex)
                        self.filters.detach(ifindex)
                        self.intf.delete(self._key(ifindex))
                for ifindex, name in want.items():
                    undo.attaching(ifindex)
                    self.intf.put(self._key(ifindex), self._key(ids[name]))
                    self.filters.attach(ifindex)
            except BaseException as e:
                # nothing half-written: buckets, policed interfaces, filters and the names
                # go back to what they were before the call
                undo.run()
                self._ids = before_ids
                if isinstance(e, MapFull):
                    raise Exhausted(f"policers: {e.strerror}; nothing was written") from None
                if isinstance(e, OSError) and not isinstance(e, MapError) and \
                        undo.failed_ifindex is not None:
                    where = self.links.name(undo.failed_ifindex) or \
                        f"ifindex {undo.failed_ifindex}"
                    raise PreconditionError(f"policers: the policer filter could not be "
                                            f"attached to {quote(where)}: {e}; nothing was "
                                            "written") from None
                raise
            if specs:
                self.generation += 1
                log.info("policers_put", policers=[(s.name, s.rate_bps, s.burst_bytes,
                                                    list(s.interfaces)) for s in specs])
            return len(specs)

    def delete(self, names: Iterable[str]) -> int:
        """Remove policers by name (idempotent); their interfaces are no longer policed."""
        with self._lock:
            gone = [n for n in dict.fromkeys(names) if n in self._ids]
            for i, n in enumerate(gone):
                rules = self.rules_using(n)
                if rules:
                    raise PreconditionError(
                        f"names[{i}]: policer {quote(n)} is charged by firewall rule"
                        f"{'s' if len(rules) > 1 else ''} "
                        f"{', '.join(quote(r) for r in rules[:3])}"
                        f"{' and more' if len(rules) > 3 else ''}: delete or change "
                        "them first; nothing was deleted")
            ids = {self._ids[n] for n in gone}
            for ifindex, pid in self._intf_records().items():
                if pid in ids:
                    self.filters.detach(ifindex)
                    self.intf.delete(self._key(ifindex))
            for n in gone:
                pid = self._ids.pop(n)
                self.map.put(self._key(pid), self.map.zero_value())
                self._zero_stats(pid)
            if gone:
                self.generation += 1
                log.info("policers_deleted", names=gone)
            return len(gone)

    def _counter_of(self, idx: int) -> Counter:
        raw = self.stats.get(self._key(idx))
        return sum_counters(self._counter, self.stats.split(raw) if raw else [])

    def dropped(self, pid: int) -> Counter:
        return self._counter_of(pid * 2 + self._drop)

    def id_of(self, name: str) -> int | None:
        """The policer's id (its polx_map index), None when the node has no such policer."""
        with self._lock:
            return self._ids.get(name)

    def name_of(self, pid: int) -> str | None:
        for n, i in self._ids.items():
            if i == pid:
                return n
        return None

    def entries(self) -> list[Policer]:
        with self._lock:
            ids = dict(self._ids)
        attached = self._intf_records()
        out = []
        for name, pid in sorted(ids.items()):
            r = self._record(pid)
            intfs = tuple(sorted(self.links.name(ifindex) or f"ifindex {ifindex}"
                                 for ifindex, p in attached.items() if p == pid))
            out.append(Policer(PolicerSpec(name, r["rate_bps"], r["burst_bytes"], intfs),
                               self._counter_of(pid * 2 + self._pass),
                               self._counter_of(pid * 2 + self._drop)))
        return out

    def reattach(self) -> None:
        """Every policed interface onto the current program (after a new build)."""
        for ifindex in self._intf_records():
            if self.links.name(ifindex) is not None:
                self.filters.attach(ifindex)

    def count(self) -> int:
        return len(self._ids)

    def summary(self) -> tuple[int, int]:
        """(generation, policers): GetSummary's "policers" table."""
        with self._lock:
            return self.generation, len(self._ids)
