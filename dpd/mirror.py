"""Mirroring: every packet arriving on an interface copied, as it arrived, out of a mirror
interface.

``mirr_map`` (mirrored ifindex -> the mirror's ifindex and both names as the API gave
them) is the record; ``mirr_stats_map`` counts the copies per mirrored interface. The
copying is tc_mirror_func (dpd/bpf/mirror.c), a TC ingress filter of its own, ahead of
tc_packet_func, attached to the mirrored interfaces only (the others pay nothing). The
filter attachment goes through the ``Filters`` seam: pyroute2 on a kernel datapath,
nothing on the in-memory one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from dpd import attach as tc
from dpd.firewall import Links
from dpd.loader import Datapath
from dpd.maps import MapFull
from dpd.services import Counter, sum_counters
from xlbcore.errors import Exhausted, ValidationError, quote
from xlbcore.firewall import parse_ifname

log = structlog.get_logger("dpd.mirror")


@dataclass(frozen=True)
class MirrorSpec:
    interface: str  # the mirrored interface
    mirror_interface: str  # copies leave by it


@dataclass(frozen=True)
class Mirror:
    spec: MirrorSpec
    counters: Counter


def parse_mirror(interface: str, mirror_interface: str, field: str) -> MirrorSpec:
    a = parse_ifname(interface, f"{field}.interface")
    b = parse_ifname(mirror_interface, f"{field}.mirror_interface")
    if a == b:
        raise ValidationError(f"{field}.mirror_interface: {quote(b)} is the mirrored "
                              "interface itself")
    return MirrorSpec(a, b)


# -- the TC filter ------------------------------------------------------------------------

class Filters(tc.ExtraFilter):
    """tc_mirror_func's filter on an interface (pyroute2)."""

    NAME = "xlb_tc_mirror_func"
    PRIO = tc.PRIO - 1  # ahead of tc_packet_func


class NoFilters(tc.NotAttached, Filters):
    """The in-memory datapath: no programs, nothing to attach."""


def detach_filter(ifindex: int) -> bool:
    """Remove our mirror filter (and the clsact qdisc when nothing else uses it)."""
    return Filters.detach_from(ifindex)


def filtered() -> list[int]:
    """Every interface of this network namespace carrying our mirror filter."""
    return Filters.filtered()


def _text(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


# -- the table ----------------------------------------------------------------------------

class MirrorTable:
    def __init__(self, dp: Datapath, links: Links, filters: Filters) -> None:
        self.map = dp.maps["mirr_map"]
        self.stats = dp.maps["mirr_stats_map"]
        self.links = links
        self.filters = filters
        self._val = dp.abi.structs["xlb_mirr"].codec
        self._counter = dp.abi.structs["xlb_counter"].codec
        self._lock = threading.Lock()
        self.generation = 0

    def _records(self) -> dict[int, dict[str, Any]]:
        return {int.from_bytes(k, "little"): self._val.unpack(v) for k, v in self.map.items()}

    def put(self, specs: Sequence[MirrorSpec]) -> int:
        """Mirror each interface to its mirror interface (replacing an earlier mirror of
        it): all or nothing. Both interfaces must exist."""
        with self._lock:
            resolved = []
            for i, s in enumerate(specs):
                src = self.links.index(s.interface)
                if src is None:
                    raise ValidationError(f"mirrors[{i}].interface: no interface "
                                          f"{quote(s.interface)} on this node")
                dst = self.links.index(s.mirror_interface)
                if dst is None:
                    raise ValidationError(f"mirrors[{i}].mirror_interface: no interface "
                                          f"{quote(s.mirror_interface)} on this node")
                resolved.append((src, dst, s))
            before = self._records()
            done: list[int] = []
            try:
                for src, dst, s in resolved:
                    key = src.to_bytes(4, "little")
                    if src not in before:
                        self.stats.put(key, self.stats.zero_value())
                    self.map.put(key, self._val.pack(
                        ifindex=dst, name=s.interface.encode(),
                        mirror_name=s.mirror_interface.encode()))
                    done.append(src)
                    self.filters.attach(src)
            except BaseException as e:
                for src in done:  # put back what was there before the call
                    key = src.to_bytes(4, "little")
                    if src in before:
                        self.map.put(key, self._val.pack(**before[src]))
                    else:
                        self.map.delete(key)
                        self.stats.delete(key)
                        self.filters.detach(src)
                if isinstance(e, MapFull):
                    raise Exhausted(f"mirrors: {e.strerror}; nothing was written") from None
                raise
            if resolved:
                self.generation += 1
                log.info("mirrors_put", mirrors=[(s.interface, s.mirror_interface)
                                                 for _, _, s in resolved])
            return len(resolved)

    def delete(self, interfaces: Iterable[str]) -> int:
        """Stop mirroring these interfaces (by name; idempotent)."""
        with self._lock:
            by_name = {_text(r["name"]): ifindex for ifindex, r in self._records().items()}
            gone = [by_name[n] for n in dict.fromkeys(interfaces) if n in by_name]
            for ifindex in gone:
                key = ifindex.to_bytes(4, "little")
                self.filters.detach(ifindex)
                self.map.delete(key)
                self.stats.delete(key)
            if gone:
                self.generation += 1
                log.info("mirrors_deleted", count=len(gone))
            return len(gone)

    def entries(self) -> list[Mirror]:
        out = []
        for ifindex, r in sorted(self._records().items()):
            raw = self.stats.get(ifindex.to_bytes(4, "little"))
            spec = MirrorSpec(_text(r["name"]), _text(r["mirror_name"]))
            out.append(Mirror(spec, sum_counters(self._counter,
                                                 self.stats.split(raw) if raw else [])))
        return out

    def reattach(self) -> None:
        """Every mirrored interface onto the current program (after a new build)."""
        for ifindex in self._records():
            if self.links.name(ifindex) is not None:
                self.filters.attach(ifindex)

    def count(self) -> int:
        return self.map.count()

    def summary(self) -> tuple[int, int]:
        """(generation, mirrored interfaces): GetSummary's "mirrors" table."""
        with self._lock:
            return self.generation, self.map.count()
