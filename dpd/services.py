"""The service table: ServiceSpec <-> nat_v4_map entries, with counter slot ids.

Each service is one nat_v4_map entry holding its endpoints and slot table inline, so a
service changes atomically with one map update: a flow never sees half a service.
A batch is checked for room before anything is written and rolled back if the kernel
refuses a write part-way."""

from __future__ import annotations

import functools
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

import structlog

from dpd import abi, bpfsys
from dpd.ids import IdPool
from dpd.slots import build_slots
from xlbcore.errors import Exhausted
from xlbcore.service import Algorithm, EndpointSpec, Mode, Proto, ServiceKey, ServiceSpec

# struct xlb_nat_val: header, endpoints[XLB_MAX_EPS], slots[XLB_SLOTS]
_HEAD = struct.Struct("=IBBBBH")
_EP = struct.Struct("=4sHHI")  # addr bytes; port given as htons(port): network order
_EPS_OFF = 16
_SLOTS_OFF = _EPS_OFF + abi.MAX_EPS * 12


@functools.lru_cache(maxsize=4096)
def slot_table(weights: tuple[int, ...]) -> bytes:
    return bytes(build_slots(weights))

log = structlog.get_logger("dpd.services")


@dataclass
class _Entry:
    spec: ServiceSpec
    svc_id: int
    stat_ids: dict[tuple[str, int], int]


_KEY = struct.Struct("=4sHBx")


def _decode_raw(kraw: bytes, vraw: bytes) -> _Entry:
    vip, port, proto = _KEY.unpack(kraw)
    svc_id, algo, mode, n_eps, _flags, _n_slots = _HEAD.unpack_from(vraw, 0)
    eps: list[EndpointSpec] = []
    stat_ids: dict[tuple[str, int], int] = {}
    for i in range(min(n_eps, abi.MAX_EPS)):
        addr, eport, weight, stat_id = _EP.unpack_from(vraw, _EPS_OFF + i * _EP.size)
        ep = EndpointSpec(socket.inet_ntoa(addr), socket.ntohs(eport), weight)
        eps.append(ep)
        stat_ids[(ep.address, ep.port)] = stat_id
    spec = ServiceSpec(socket.inet_ntoa(vip), socket.ntohs(port), Proto(proto),
                       Algorithm(algo), Mode(mode), tuple(sorted(eps)))
    return _Entry(spec, svc_id, stat_ids)


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
        reused = bool(dp.reused_maps)
        self.svc_ids = IdPool(dp.settings.max_services, (e.svc_id for e in entries.values()),
                              assume_dirty=reused)
        self.stat_ids = IdPool(
            dp.settings.max_backends,
            (sid for e in entries.values() for sid in e.stat_ids.values()),
            assume_dirty=reused,
        )
        log.info("services_restored", services=len(entries))

    # -- reading back from the map ------------------------------------------------

    def _read_all(self) -> dict[ServiceKey, _Entry]:
        """Every service, read back from nat_v4_map with batched lookups."""
        out = {}
        for kraw, vraw in bpfsys.lookup_batch(self.nat.map_fd, abi.NAT_KEY_SIZE,
                                              abi.NAT_VAL_SIZE):
            e = _decode_raw(kraw, vraw)
            out[e.spec.key] = e
        return out

    def _key(self, key: ServiceKey) -> Any:
        """The nat_v4_map key (struct xlb_nat_key) of a service."""
        return self.nat.Key.from_buffer_copy(
            _KEY.pack(socket.inet_aton(key.vip), socket.htons(key.port), int(key.proto)))

    def _read(self, key: ServiceKey) -> _Entry | None:
        k = self._key(key)
        try:
            v = self.nat[k]
        except KeyError:
            return None
        return _decode_raw(bytes(k), bytes(v))

    def specs(self) -> list[ServiceSpec]:
        return [e.spec for e in self._read_all().values()]

    def count(self) -> int:
        return self.svc_ids.in_use()

    # -- writing --------------------------------------------------------------------

    def _write(self, entries: list[_Entry]) -> None:
        """Write entries with one BPF_MAP_UPDATE_BATCH: keys and xlb_nat_val values are
        packed straight into the arrays handed to the kernel."""
        if not entries:
            return
        n = len(entries)
        keys = (self.nat.Key * n)(*(self._key(e.spec.key) for e in entries))
        buf = bytearray(n * abi.NAT_VAL_SIZE)
        for j, e in enumerate(entries):
            base = j * abi.NAT_VAL_SIZE
            spec = e.spec
            table = slot_table(tuple(ep.weight for ep in spec.endpoints))
            _HEAD.pack_into(buf, base, e.svc_id, int(spec.algorithm), int(spec.mode),
                            len(spec.endpoints), 0, len(table))
            for i, ep in enumerate(spec.endpoints):
                _EP.pack_into(buf, base + _EPS_OFF + i * _EP.size, socket.inet_aton(ep.address),
                              socket.htons(ep.port), ep.weight,
                              e.stat_ids[(ep.address, ep.port)])
            slots = base + _SLOTS_OFF
            buf[slots:slots + len(table)] = table
        self.nat.items_update_batch(keys, (self.nat.Leaf * n).from_buffer(buf))

    @staticmethod
    def _zero(table: Any, ids: list[int]) -> None:
        if ids:
            keys = (table.Key * len(ids))(*(table.Key(i) for i in ids))
            table.items_update_batch(keys, (table.Leaf * len(ids))())

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
            self._zero(self.ep_stats, self.stat_ids.take_dirty(fresh_stats))
            fresh_svc = self.svc_ids.take_dirty(e.svc_id for k, e, _ in plan if old[k] is None)
            self._zero(self.svc_stats, fresh_svc)
            self._zero(self.rr, fresh_svc)
            try:
                self._write([e for _, e, _ in plan])
            except Exception as err:
                self._restore([k for k, _, _ in plan], old)
                self.svc_ids.rollback()
                self.stat_ids.rollback()
                if any(t in str(err) for t in ("No space", "Argument list too long",
                                               "Cannot allocate")):
                    raise Exhausted(f"nat_v4_map is full: {err}") from err
                raise
            self.svc_ids.commit()
            self.stat_ids.commit()
            for _, _, freed in plan:
                self.stat_ids.release(freed)
            return len(plan)

    def _restore(self, written: list[ServiceKey], old: dict[ServiceKey, _Entry | None]) -> None:
        """Put back what `written` held before: delete new keys, rewrite replaced ones."""
        for k in written:
            if old[k] is None:
                self.nat.pop(self._key(k), None)
        self._write([e for k in written if (e := old[k]) is not None])
        log.warning("services_rolled_back", count=len(written))

    def delete(self, keys: list[ServiceKey]) -> int:
        with self._lock:
            deleted = 0
            for k in keys:
                e = self._read(k)
                if e is None:
                    continue
                del self.nat[self._key(k)]
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
