"""The service table: ServiceSpec <-> nat_v4_map entries, with counter slot ids.

Each service is one nat_v4_map entry holding its endpoints and slot table inline, so a
service changes atomically with one map update: a flow never sees half a service.
A batch is checked for room before anything is written and rolled back if the map
refuses a write part-way. Layouts come from the ABI (struct xlb_nat_key, xlb_nat_val,
xlb_ep); the table works on the map seam (dpd/maps.py), so it runs the same over
kernel maps and over in-memory maps.

The table keeps an index of what nat_v4_map holds (read from the map once, when dpd
starts, then maintained by every write), so a write never reads the map back and a
listing never decodes it. Every put/delete call with at least one item bumps
``generation`` by one (also when nothing changed): a client compares (datapath_id,
instance_id, generation) to know whether anyone wrote since it last looked, in O(1).

A Maglev service also has a lookup table in maglev_v4_map (dpd/maglev.py), one of two
keys per service (svc_id * 2 + the XLB_SVC_MAGLEV_B bit of its flags): a change writes
the new table under the other key, then the service value that points at it, then
deletes the old table (make-before-break); a delete removes the service, then its table.
"""

from __future__ import annotations

import bisect
import functools
import os
import socket
import threading
from dataclasses import dataclass

import structlog

from dpd import maglev
from dpd.ids import IdPool
from dpd.loader import Datapath
from dpd.maps import MapFull
from dpd.slots import build_slots
from xlbcore.errors import Exhausted
from xlbcore.service import Algorithm, EndpointSpec, Mode, Proto, ServiceKey, ServiceSpec

log = structlog.get_logger("dpd.services")


@dataclass
class _Entry:
    spec: ServiceSpec
    svc_id: int
    stat_ids: dict[tuple[str, int], int]
    maglev_b: int = 0  # Maglev: which of the service's two table keys is in use


@dataclass(frozen=True)
class Counter:
    packets: int = 0
    bytes: int = 0


class ServiceTable:
    def __init__(self, dp: Datapath, maglev_size: int = maglev.DEFAULT_SIZE) -> None:
        abi = dp.abi
        self.maglev_size = maglev.check_size(maglev_size)
        self.maglev = dp.maps["maglev_v4_map"]
        self._maglev = abi.structs["xlb_maglev"].codec
        self._maglev_flag = abi.const("XLB_SVC_MAGLEV_B")
        self.nat = dp.maps["nat_v4_map"]
        self.svc_stats = dp.maps["svc_stats_map"]
        self.ep_stats = dp.maps["ep_stats_map"]
        self.rr = dp.maps["rr_map"]
        self._key = abi.structs["xlb_nat_key"].codec
        self._val = abi.structs["xlb_nat_val"].codec
        self._ep = abi.structs["xlb_ep"].codec
        self._counter = abi.structs["xlb_counter"].codec
        # positional packers (field names checked once against the ABI)
        self._pack_ep = self._ep.packer("addr", "port", "weight", "stat_id")
        self._pack_val = self._val.packer("svc_id", "algo", "mode", "n_eps", "flags",
                                          "n_slots", "eps", "slots")
        self.max_eps = abi.const("XLB_MAX_EPS")
        self.n_slots = abi.const("XLB_SLOTS")
        self.max_services = self.nat.spec.max_entries
        self._lock = threading.Lock()
        entries = self._read_all()
        self.svc_ids = IdPool(self.max_services, (e.svc_id for e in entries.values()),
                              assume_dirty=dp.reused)
        self.stat_ids = IdPool(
            self.ep_stats.spec.max_entries,
            (sid for e in entries.values() for sid in e.stat_ids.values()),
            assume_dirty=dp.reused,
        )
        self._index: dict[ServiceKey, _Entry] = entries
        self.generation = 0
        self.instance_id = os.urandom(8).hex()
        self._sorted: tuple[int, list[tuple[bytes, int, int]], list[ServiceKey]] | None = None
        # vip_v4_map: VIP -> how many services it carries (the datapath answers ICMP echo
        # to a VIP); made to match the services at start, then kept by every write
        self.vips = dp.maps["vip_v4_map"]
        self._vip_count: dict[bytes, int] = {}
        self._count_vips(list(entries), +1)
        self.vips.delete_batch([v for v, _ in self.vips.items() if v not in self._vip_count])
        # Maglev tables no service points at (a dpd stopped between two writes)
        live = {self._maglev_key(e) for e in entries.values()
                if e.spec.algorithm == Algorithm.MAGLEV}
        self.maglev.delete_batch([k for k, _ in self.maglev.items() if k not in live])
        log.info("services_restored", services=len(entries))

    # -- encoding --------------------------------------------------------------------

    @functools.lru_cache(maxsize=1 << 17)  # noqa: B019 - one table per node, bounded
    def key_bytes(self, key: ServiceKey) -> bytes:
        return self._key.pack(vip=socket.inet_aton(key.vip), port=key.port,
                              proto=int(key.proto))

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one table per process, bounded
    def _slot_table(self, weights: tuple[int, ...]) -> bytes:
        return bytes(build_slots(weights, self.n_slots))

    @functools.lru_cache(maxsize=512)  # noqa: B019 - one table per process, bounded
    def _maglev_table(self, eps: tuple[tuple[str, int, int], ...]) -> bytes:
        return self._maglev.pack(size=self.maglev_size, ep=maglev.build(eps, self.maglev_size))

    @staticmethod
    def _maglev_key(e: _Entry) -> bytes:
        return (e.svc_id * 2 + e.maglev_b).to_bytes(4, "little")

    def _maglev_value(self, spec: ServiceSpec) -> bytes:
        return self._maglev_table(tuple((ep.address, ep.port, ep.weight)
                                        for ep in spec.endpoints))

    def _value_bytes(self, e: _Entry) -> bytes:
        spec = e.spec
        table = self._slot_table(tuple(ep.weight for ep in spec.endpoints))
        ep_pack, aton, ids = self._pack_ep, socket.inet_aton, e.stat_ids
        eps = b"".join([ep_pack(aton(ep.address), ep.port, ep.weight, ids[(ep.address, ep.port)])
                        for ep in spec.endpoints])
        return self._pack_val(e.svc_id, int(spec.algorithm), int(spec.mode),
                              len(spec.endpoints), self._maglev_flag if e.maglev_b else 0,
                              len(table), eps, table)

    def _decode(self, kraw: bytes, vraw: bytes) -> _Entry:
        k = self._key.unpack(kraw)
        v = self._val.unpack(vraw)
        eps: list[EndpointSpec] = []
        stat_ids: dict[tuple[str, int], int] = {}
        slots = v["eps"]
        for i in range(min(v["n_eps"], self.max_eps)):
            raw = slots[i]
            ep = EndpointSpec(socket.inet_ntoa(raw["addr"]), raw["port"], raw["weight"])
            eps.append(ep)
            stat_ids[(ep.address, ep.port)] = raw["stat_id"]
        spec = ServiceSpec(socket.inet_ntoa(k["vip"]), k["port"], Proto(k["proto"]),
                           Algorithm(v["algo"]), Mode(v["mode"]), tuple(sorted(eps)))
        return _Entry(spec, v["svc_id"], stat_ids,
                      1 if v["flags"] & self._maglev_flag else 0)

    # -- reading back from the map -----------------------------------------------------

    def _read_all(self) -> dict[ServiceKey, _Entry]:
        out = {}
        for kraw, vraw in self.nat.items():
            e = self._decode(kraw, vraw)
            out[e.spec.key] = e
        return out

    def _read(self, key: ServiceKey) -> _Entry | None:
        return self._index.get(key)

    def entries(self) -> list[tuple[ServiceKey, _Entry]]:
        """What the table holds, with each service's counter slots (svc_id, stat_ids),
        read atomically. Entries are replaced, never changed in place, so a caller may
        keep one and compare it by identity to notice a change."""
        with self._lock:
            return list(self._index.items())

    def specs(self) -> list[ServiceSpec]:
        with self._lock:
            return [e.spec for e in self._index.values()]

    def count(self) -> int:
        return self.svc_ids.in_use()

    def summary(self) -> tuple[int, int]:
        """(generation, services), read together."""
        with self._lock:
            return self.generation, len(self._index)

    @staticmethod
    def _order(key: ServiceKey) -> tuple[bytes, int, int]:
        return socket.inet_aton(key.vip), key.port, int(key.proto)

    def page(self, after: ServiceKey | None, limit: int) -> tuple[int, list[ServiceSpec], bool]:
        """(generation, up to `limit` specs with keys after `after` in key order, more
        follow), read atomically. The key order is sorted once per generation."""
        with self._lock:
            if self._sorted is None or self._sorted[0] != self.generation:
                keys = sorted(self._index, key=self._order)
                self._sorted = (self.generation, [self._order(k) for k in keys], keys)
            _, order, keys = self._sorted
            start = 0 if after is None else bisect.bisect_right(order, self._order(after))
            chosen = keys[start:start + limit]
            return (self.generation, [self._index[k].spec for k in chosen],
                    start + limit < len(keys))

    # -- writing -----------------------------------------------------------------------

    def _write_vips(self, vips: list[bytes]) -> None:
        """Write the counts of `vips` (deleting those that carry no service any more)."""
        gone = [v for v in vips if not self._vip_count.get(v)]
        live = [v for v in vips if self._vip_count.get(v)]
        for v in gone:
            self._vip_count.pop(v, None)
        self.vips.delete_batch(gone)
        self.vips.put_batch(live, [self._vip_count[v].to_bytes(4, "little") for v in live])

    def _count_vips(self, keys: list[ServiceKey], step: int) -> None:
        touched = []
        for k in keys:
            vip = socket.inet_aton(k.vip)
            self._vip_count[vip] = self._vip_count.get(vip, 0) + step
            touched.append(vip)
        if touched:
            self._write_vips(list(dict.fromkeys(touched)))

    def _write(self, entries: list[_Entry]) -> None:
        """Write entries with one batched update."""
        if entries:
            self.nat.put_batch([self.key_bytes(e.spec.key) for e in entries],
                               [self._value_bytes(e) for e in entries])

    def put(self, specs: list[ServiceSpec]) -> int:
        """Upsert all of `specs` or none. Raises Exhausted when there is no room."""
        with self._lock:
            for s in specs:
                if len(s.endpoints) > self.max_eps:
                    raise Exhausted(f"service {s.key}: {len(s.endpoints)} endpoints, the "
                                    f"datapath holds at most {self.max_eps}")
            if specs:
                self.generation += 1  # every write call, also when nothing changes
            index = self._index
            batch: dict[ServiceKey, ServiceSpec] = {}
            for s in specs:
                k = s.key
                prev = index.get(k)
                if prev is None or prev.spec != s:
                    batch[k] = s
                else:
                    batch.pop(k, None)  # a later duplicate equal to what is held
            old = {k: index.get(k) for k in batch}
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
                # Maglev: the new table goes under the key the service does not use now
                maglev_b = prev.maglev_b ^ 1 if prev else 0
                plan.append((k, _Entry(spec, svc_id, stat_ids, maglev_b), freed))
            tables = [e for _, e, _ in plan if e.spec.algorithm == Algorithm.MAGLEV]
            try:
                self.ep_stats.zero(self.stat_ids.take_dirty(fresh_stats))
                fresh_svc = self.svc_ids.take_dirty(
                    e.svc_id for k, e, _ in plan if old[k] is None)
                self.svc_stats.zero(fresh_svc)
                self.rr.zero(fresh_svc)
                for i in range(0, len(tables), 256):  # 32 KiB values: bounded batches
                    part = tables[i:i + 256]
                    self.maglev.put_batch([self._maglev_key(e) for e in part],
                                          [self._maglev_value(e.spec) for e in part])
                self._write([e for _, e, _ in plan])
            except Exception as err:
                self._restore([k for k, _, _ in plan], old)
                self.maglev.delete_batch([self._maglev_key(e) for e in tables])
                self.svc_ids.rollback()
                self.stat_ids.rollback()
                if isinstance(err, MapFull):
                    raise Exhausted(f"nat_v4_map has no room: {err.strerror}") from err
                raise
            self.svc_ids.commit()
            self.stat_ids.commit()
            # the services point at their new tables: the old ones go
            self.maglev.delete_batch([self._maglev_key(p) for k, _, _ in plan
                                      if (p := old[k]) is not None
                                      and p.spec.algorithm == Algorithm.MAGLEV])
            for k, e, freed in plan:
                self.stat_ids.release(freed)
                index[k] = e
            self._count_vips(new_keys, +1)
            return len(specs)

    def _restore(self, written: list[ServiceKey], old: dict[ServiceKey, _Entry | None]) -> None:
        """Put back what `written` held before: delete new keys, rewrite replaced ones."""
        for k in written:
            if old[k] is None:
                self.nat.delete(self.key_bytes(k))
        self._write([e for k in written if (e := old[k]) is not None])
        log.warning("services_rolled_back", count=len(written))

    def delete(self, keys: list[ServiceKey]) -> int:
        with self._lock:
            if keys:
                self.generation += 1
            gone: list[ServiceKey] = []
            for k in keys:
                e = self._index.get(k)
                if e is None:
                    continue
                self.nat.delete(self.key_bytes(k))
                if e.spec.algorithm == Algorithm.MAGLEV:  # the service first, then its table
                    self.maglev.delete_batch([self._maglev_key(e)])
                del self._index[k]
                self.svc_ids.release([e.svc_id])
                self.stat_ids.release(e.stat_ids.values())
                gone.append(k)
            self._count_vips(gone, -1)
            return len(gone)

    # -- counters ------------------------------------------------------------------------

    def sum_counter(self, table: str, idx: int) -> Counter:
        m = {"svc": self.svc_stats, "ep": self.ep_stats}[table]
        raw = m.get(idx.to_bytes(4, "little"))
        return sum_counters(self._counter, m.split(raw) if raw else [])

    def stats(
        self, keys: list[ServiceKey] | None = None
    ) -> list[tuple[ServiceSpec, Counter, list[tuple[EndpointSpec, Counter]]]]:
        with self._lock:
            entries = dict(self._index)
        wanted = keys if keys else list(entries)
        out = []
        for k in wanted:
            e = entries.get(k)
            if e is None:
                continue
            eps = [
                (ep, self.sum_counter("ep", e.stat_ids[(ep.address, ep.port)]))
                for ep in e.spec.endpoints
            ]
            out.append((e.spec, self.sum_counter("svc", e.svc_id), eps))
        return out


def sum_counters(codec: object, per_cpu: list[bytes]) -> Counter:
    """Sum per-CPU struct xlb_counter values."""
    packets = nbytes = 0
    for raw in per_cpu:
        c = codec.unpack(raw)  # type: ignore[attr-defined]
        packets += c["packets"]
        nbytes += c["bytes"]
    return Counter(packets, nbytes)
