"""The service table: ServiceSpec <-> nat_v4_map entries, with counter slot ids.

Each service is one nat_v4_map entry holding its endpoints and slot table inline, so a
service changes atomically with one map update: a flow never sees half a service.
A batch is checked for room before anything is written and rolled back if the kernel
refuses a write part-way."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from dpd import abi
from dpd.codec import (
    be16_to_port,
    be32_to_ip,
    ip_to_be32,
    nat_key_fields,
    port_to_be16,
    service_key_of,
)
from dpd.ids import Exhausted, IdPool
from dpd.model import Algorithm, EndpointSpec, Mode, ServiceKey, ServiceSpec
from dpd.slots import build_slots

log = structlog.get_logger("dpd.services")


@dataclass
class _Entry:
    spec: ServiceSpec
    svc_id: int
    stat_ids: dict[tuple[str, int], int]


@dataclass(frozen=True)
class Counter:
    packets: int = 0
    bytes: int = 0


class ServiceTable:
    def __init__(self, dp: Any) -> None:
        self.nat = dp.table("nat_v4_map")
        self.svc_stats = dp.table("svc_stats_map")
        self.ep_stats = dp.table("ep_stats_map")
        self.rr = dp.table("rr_map")
        self.max_services = dp.settings.max_services
        self._lock = threading.Lock()
        entries = self._read_all()
        self.svc_ids = IdPool(dp.settings.max_services, (e.svc_id for e in entries.values()))
        self.stat_ids = IdPool(
            dp.settings.max_backends,
            (sid for e in entries.values() for sid in e.stat_ids.values()),
        )
        log.info("services_restored", services=len(entries))

    # -- reading back from the map ------------------------------------------------

    def _decode(self, k: Any, v: Any) -> _Entry:
        key = service_key_of(k.vip, k.port, k.proto)
        eps: list[EndpointSpec] = []
        stat_ids: dict[tuple[str, int], int] = {}
        for i in range(min(v.n_eps, abi.MAX_EPS)):
            e = v.eps[i]
            ep = EndpointSpec(be32_to_ip(e.addr), be16_to_port(e.port), e.weight)
            eps.append(ep)
            stat_ids[(ep.address, ep.port)] = e.stat_id
        spec = ServiceSpec(
            key.vip, key.port, key.proto, Algorithm(v.algo), Mode(v.mode), tuple(sorted(eps))
        )
        return _Entry(spec, v.svc_id, stat_ids)

    def _read_all(self) -> dict[ServiceKey, _Entry]:
        out = {}
        for k, v in self.nat.items():
            e = self._decode(k, v)
            out[e.spec.key] = e
        return out

    def _read(self, key: ServiceKey) -> _Entry | None:
        k = self.nat.Key(*nat_key_fields(key))
        try:
            v = self.nat[k]
        except KeyError:
            return None
        return self._decode(k, v)

    def specs(self) -> list[ServiceSpec]:
        return [e.spec for e in self._read_all().values()]

    def count(self) -> int:
        return self.svc_ids.in_use()

    # -- writing --------------------------------------------------------------------

    def _leaf(self, spec: ServiceSpec, svc_id: int, stat_ids: dict[tuple[str, int], int]) -> Any:
        leaf = self.nat.Leaf()
        leaf.svc_id = svc_id
        leaf.algo = int(spec.algorithm)
        leaf.mode = int(spec.mode)
        leaf.n_eps = len(spec.endpoints)
        for i, ep in enumerate(spec.endpoints):
            e = leaf.eps[i]
            e.addr = ip_to_be32(ep.address)
            e.port = port_to_be16(ep.port)
            e.weight = ep.weight
            e.stat_id = stat_ids[(ep.address, ep.port)]
        table = build_slots([ep.weight for ep in spec.endpoints])
        leaf.n_slots = len(table)
        for i, idx in enumerate(table):
            leaf.slots[i] = idx
        return leaf

    def _zero(self, table: Any, ids: Iterable[int]) -> None:
        for i in ids:
            table[table.Key(i)] = table.Leaf()

    def put(self, specs: list[ServiceSpec]) -> int:
        """Upsert all of `specs` or none. Raises Exhausted when there is no room."""
        with self._lock:
            batch: dict[ServiceKey, ServiceSpec] = {s.key: s for s in specs}
            old = {k: self._read(k) for k in batch}
            new_keys = [k for k, e in old.items() if e is None]
            new_eps = 0
            for k, spec in batch.items():
                prev = old[k]
                have = prev.stat_ids if prev else {}
                new_eps += sum((ep.address, ep.port) not in have for ep in spec.endpoints)
            try:
                svc_ids = iter(self.svc_ids.reserve(len(new_keys), "services"))
                stat_pool = iter(self.stat_ids.reserve(new_eps, "endpoints"))
            except Exhausted:
                self.svc_ids.rollback()
                self.stat_ids.rollback()
                raise
            plan: list[tuple[ServiceKey, _Entry, list[int]]] = []
            fresh_stats: list[int] = []
            for k, spec in batch.items():
                prev = old[k]
                have = prev.stat_ids if prev else {}
                stat_ids = {}
                for ep in spec.endpoints:
                    ek = (ep.address, ep.port)
                    if ek in have:
                        stat_ids[ek] = have[ek]
                    else:
                        stat_ids[ek] = next(stat_pool)
                        fresh_stats.append(stat_ids[ek])
                freed = [sid for ek, sid in have.items() if ek not in stat_ids]
                svc_id = prev.svc_id if prev else next(svc_ids)
                plan.append((k, _Entry(spec, svc_id, stat_ids), freed))
            self._zero(self.ep_stats, fresh_stats)
            self._zero(self.svc_stats, (e.svc_id for k, e, _ in plan if old[k] is None))
            self._zero(self.rr, (e.svc_id for k, e, _ in plan if old[k] is None))
            written: list[ServiceKey] = []
            try:
                for k, e, _ in plan:
                    self.nat[self.nat.Key(*nat_key_fields(k))] = self._leaf(
                        e.spec, e.svc_id, e.stat_ids
                    )
                    written.append(k)
            except Exception as err:
                self._restore(written, old)
                self.svc_ids.rollback()
                self.stat_ids.rollback()
                if "No space" in str(err) or "Argument list too long" in str(err):
                    raise Exhausted(f"nat_v4_map is full: {err}") from err
                raise
            self.svc_ids.commit()
            self.stat_ids.commit()
            for _, _, freed in plan:
                self.stat_ids.release(freed)
            return len(plan)

    def _restore(self, written: list[ServiceKey], old: dict[ServiceKey, _Entry | None]) -> None:
        for k in written:
            prev = old[k]
            nk = self.nat.Key(*nat_key_fields(k))
            if prev is None:
                self.nat.pop(nk, None)
            else:
                self.nat[nk] = self._leaf(prev.spec, prev.svc_id, prev.stat_ids)
        log.warning("services_rolled_back", count=len(written))

    def delete(self, keys: list[ServiceKey]) -> int:
        with self._lock:
            deleted = 0
            for k in keys:
                e = self._read(k)
                if e is None:
                    continue
                del self.nat[self.nat.Key(*nat_key_fields(k))]
                self.svc_ids.release([e.svc_id])
                self.stat_ids.release(e.stat_ids.values())
                deleted += 1
            return deleted

    # -- counters ---------------------------------------------------------------------

    @staticmethod
    def _sum(table: Any, idx: int) -> Counter:
        per_cpu = table.getvalue(table.Key(idx))
        return Counter(sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))

    def stats(
        self, keys: list[ServiceKey] | None = None
    ) -> list[tuple[ServiceSpec, Counter, list[tuple[EndpointSpec, Counter]]]]:
        entries = self._read_all()
        wanted = keys if keys else list(entries)
        out = []
        for k in wanted:
            e = entries.get(k)
            if e is None:
                continue
            eps = [
                (ep, self._sum(self.ep_stats, e.stat_ids[(ep.address, ep.port)]))
                for ep in e.spec.endpoints
            ]
            out.append((e.spec, self._sum(self.svc_stats, e.svc_id), eps))
        return out
