"""The service table: ServiceSpec <-> nat_v4_map entries, with counter slot ids.

Each service is one small nat_v4_map entry that points at its endpoints (a run of
ep_map entries, struct xlb_ep) and its slot table (a run of slot_map entries, 2-byte
endpoint indexes); the runs are allocated by dpd/extents.py. A changed service is
written make-before-break: its endpoints and slot table go to fresh runs, then one
write of its nat_v4_map value flips it to them, then the old runs are freed; so a flow
never sees half a service. A batch is checked for room (counter slots, runs) before
anything is written and rolled back if a map refuses a write part-way. Layouts come
from the ABI (struct xlb_nat_key, xlb_nat_val, xlb_ep, xlb_slots); the table works on
the map seam (dpd/maps.py), so it runs the same over kernel maps and over in-memory maps.

The table keeps an index of what nat_v4_map holds (read from the map once, when dpd
starts, then maintained by every write), so a write never reads the map back and a
listing never decodes it. Every put/delete call with at least one item bumps
``generation`` by one (also when nothing changed): a client compares (datapath_id,
instance_id, generation) to know whether anyone wrote since it last looked, in O(1).

A Maglev service also has a lookup table in maglev_v4_map (dpd/maglev.py), one of two
keys per service (svc_id * 2 + the XLB_SVC_MAGLEV_B bit of its flags): a change writes
the new table under the other key, then the service value that points at it, then
deletes the old table (make-before-break); a delete removes the service, then its table.

A port-range or any-port service (docs/services.md) is keyed (vip, first port, proto,
range 1) and has its ports in range_v4_map (an LPM trie: the port prefixes that cover
the range exactly; any-port one entry of the bare (vip, proto)), written after its
nat_v4_map entry and deleted before it, so that no prefix ever leads to no service.
Ranges of one (vip, proto) that overlap are refused before anything is written.

Endpoint health (dpd/health.py) takes an endpoint out of selection without changing the
service: ``set_down`` writes the service's runs afresh with the slot table (and Maglev
table) built as if the endpoint's weight were 0 and the endpoint's XLB_EP_LIVE flag
clear, while the endpoints keep the configured weights (selection reads the slots), so
ListServices and a restarted dpd read back what the API gave (and a restarted dpd the
endpoints health found down: XLB_EP_DOWN). It moves no generation.
When every endpoint with weight is down, selection
uses the configured weights (fail open: a check that is wrong must not take a service
down). A service's health check and conntrack timeouts are kept in svc_cfg_map (dpd's
record; the datapath never reads it).
"""

from __future__ import annotations

import bisect
import functools
import os
import socket
import struct
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate, chain, compress, repeat
from operator import attrgetter, is_, itemgetter
from typing import NamedTuple

import numpy as np
import structlog

from dpd import maglev
from dpd.bulkput import Bulk
from dpd.extents import Extents
from dpd.ids import IdPool
from dpd.loader import Datapath
from dpd.maps import Map, MapFull
from dpd.natbatch import CHUNK, EndpointRows, NatValues, group, runs
from xlbcore import gcpause
from xlbcore.errors import Exhausted
from xlbcore.service import (
    CT_TIMEOUT_FIELDS,
    Algorithm,
    CtTimeoutsSpec,
    EndpointSpec,
    HealthKind,
    HealthSpec,
    Mode,
    Proto,
    ServiceKey,
    ServiceSpec,
    address_bytes,
    check_ranges,
    is_range,
)

log = structlog.get_logger("dpd.services")

_VIP, _PORT, _PROTO = attrgetter("vip"), attrgetter("port"), attrgetter("proto")
_LAST = attrgetter("port_last")
_SPEC = attrgetter("spec")
_ENDPOINTS, _ALGORITHM = attrgetter("endpoints"), attrgetter("algorithm")
_WEIGHT = attrgetter("weight")
_HEALTH, _CT_TIMEOUTS = attrgetter("health"), attrgetter("ct_timeouts")
_GROUPED = attrgetter("grouped")
_CONFIGURED = attrgetter("columns.weights")  # a spec's configured weights, read in C


def _any_range(items: Sequence[ServiceKey | ServiceSpec],
               ports: Sequence[int] | None = None) -> bool:
    """Some of `items` is a port-range or any-port service (is_range), found in C."""
    return 0 in (ports if ports is not None else map(_PORT, items)) \
        or any(map(_LAST, items))
_IS_MAGLEV = Algorithm.MAGLEV.__eq__
# what a nat_v4_map value takes from a spec (columns: its endpoints column by column)
_VALUE_FIELDS = attrgetter("algorithm", "mode", "persistence_s", "snat_addr", "columns")


@functools.lru_cache(maxsize=4096)
def _snat_bytes(address: str) -> bytes:
    """xlb_nat_val.snat_addr of a spec's snat_addr ("": 0, the node's address)."""
    return socket.inet_aton(address) if address else bytes(4)
_VIP_OF_KEY = itemgetter(slice(0, 4))  # a nat_v4_map key's first field
_ZERO4 = bytes(4)


def _v6_in(items: Sequence[ServiceKey | ServiceSpec]) -> bool:
    """Some of `items` is an IPv6 service (one C-speed scan of the VIPs)."""
    return ":" in "".join(map(_VIP, items))


class _Entry(NamedTuple):
    """One service as the table holds it: its spec and counter slots. ``ep_ids[i]`` is
    the ep_stats_map slot of ``spec.endpoints[i]``. A tuple, so that a bulk write makes
    its entries without a Python call each (_entries)."""

    spec: ServiceSpec
    svc_id: int
    ep_ids: tuple[int, ...]
    maglev_b: int = 0  # Maglev: which of the service's two table keys is in use
    ep_base: int = 0  # its endpoints: ep_map[ep_base:ep_base + len(ep_ids)]
    slot_base: int = 0  # its slot table: slot_map from slot_base on
    n_slots: int = 0  # slots in its slot table

    @property
    def stat_ids(self) -> dict[tuple[str, int], int]:
        """(endpoint address, port) -> its ep_stats_map slot."""
        return {(ep.address, ep.port): i
                for ep, i in zip(self.spec.endpoints, self.ep_ids, strict=True)}


_EP_BASE, _SLOT_BASE, _N_SLOTS = map(_Entry._fields.index, ("ep_base", "slot_base", "n_slots"))


def _entries(specs: Iterable[ServiceSpec], svc_ids: Iterable[int],
             ep_ids: Iterable[tuple[int, ...]], maglev_b: Iterable[int]) -> list[_Entry]:
    """_Entry(spec, svc_id, ep_ids, maglev_b) of each, made by tuple.__new__ in C."""
    rows = zip(specs, svc_ids, ep_ids, maglev_b, repeat(0), repeat(0), repeat(0),
               strict=False)  # maglev_b and the runs (placed later) repeat
    return list(map(tuple.__new__, repeat(_Entry), rows))


class _BulkPut(NamedTuple):
    """A bulk put (ServiceTable.put_bulk) as written: the batch's columns, its
    nat_v4_map keys and, per service, its ids and runs (its endpoints' stat ids flat,
    split by the batch's bounds)."""

    bulk: Bulk
    keys: list[bytes]
    svc_ids: np.ndarray
    stat_ids: np.ndarray
    ep_base: np.ndarray
    slot_base: np.ndarray
    n_slots: np.ndarray

    def entries(self) -> list[_Entry]:
        """Its services as the table's entries (made now: their ServiceSpecs too)."""
        bounds = self.bulk.bounds
        pool = tuple(self.stat_ids.tolist())
        ep_ids = map(pool.__getitem__, map(slice, bounds[:-1], bounds[1:]))
        rows = zip(self.bulk.specs(), self.svc_ids.tolist(), ep_ids, repeat(0),
                   self.ep_base.tolist(), self.slot_base.tolist(), self.n_slots.tolist(),
                   strict=False)
        return list(map(tuple.__new__, repeat(_Entry), rows))


@dataclass(frozen=True)
class Counter:
    packets: int = 0
    bytes: int = 0


BULK = 256  # a put or delete of this many services pauses the cyclic GC (xlbcore.gcpause)


class ServiceTable:
    def __init__(self, dp: Datapath, maglev_size: int = maglev.DEFAULT_SIZE) -> None:
        abi = dp.abi
        self.maglev_size = maglev.check_size(maglev_size)
        self.maglev = dp.maps["maglev_v4_map"]
        self._maglev = abi.structs["xlb_maglev"].codec
        self._maglev_flag = abi.const("XLB_SVC_MAGLEV_B")
        self.nat = dp.maps["nat_v4_map"]
        # IPv6 services (svc6.h): nat_v6_map, keyed by struct xlb_nat6_key, its value
        # struct xlb_nat6_val (IPv4's value as `sel`, the 16-byte SNAT address beside);
        # their endpoints in ep_map runs as IPv4's (addr: the fold of the address) with
        # the addresses in ep6_map at the same indexes. One id space with IPv4's.
        self.nat6 = dp.maps["nat_v6_map"]
        self.ep6_map = dp.maps["ep6_map"]
        self._key6 = abi.structs["xlb_nat6_key"].codec.wire_struct(("vip", "port", "proto"))
        self._val6 = abi.structs["xlb_nat6_val"].dtype
        self._key4_size = abi.structs["xlb_nat_key"].size
        self.svc_stats = dp.maps["svc_stats_map"]
        self.ep_stats = dp.maps["ep_stats_map"]
        self.rr = dp.maps["rr_map"]
        self.ep_conn = dp.maps["ep_conn_map"]
        self._counter = abi.structs["xlb_counter"].codec
        # Keys and values go through one struct.Struct each (the fields in the ABI's
        # layout order, checked by wire_struct): a value for n endpoints is one pack
        # call, no Python call per field.
        key = abi.structs["xlb_nat_key"].codec
        self._key = key.wire_struct(("vip", "port", "proto", "range"))
        self._key_dtype = abi.structs["xlb_nat_key"].dtype
        self.ranges = dp.maps["range_v4_map"]
        self._range_key = abi.structs["xlb_range_key"].codec.wire_struct(
            ("prefixlen", "vip", "proto", "port"))
        self._range_val = abi.structs["xlb_range_val"].codec.wire_struct(("first", "last"))
        self._range_base = abi.const("XLB_RANGE_BASE_BITS")
        self._val = abi.structs["xlb_nat_val"].codec
        self._val_head = self._val.wire_struct(
            ("svc_id", "algo", "mode", "flags", "n_eps", "n_slots", "persist_s", "snat_addr",
             "ep_base", "slot_base"))
        self._ep_row = abi.structs["xlb_ep"].codec.wire_struct(
            ("addr", "port", "weight", "stat_id", "flags", "prio"))
        self._ep_live = abi.const("XLB_EP_LIVE")
        self._ep_down = abi.const("XLB_EP_DOWN")
        # the values and rows of a batch in arrays (dpd/natbatch.py), slot tables cached
        self._values_of = NatValues(abi.structs["xlb_nat_val"])
        self.max_eps = abi.const("XLB_MAX_EPS")
        self.n_slots = abi.const("XLB_SLOTS")
        self._rows = EndpointRows(abi.structs["xlb_ep"], abi.structs["xlb_slots"], self.n_slots)
        self.ep_map = dp.maps["ep_map"]
        self.slot_map = dp.maps["slot_map"]
        self._live: dict[int, tuple[int, ...]] = {}  # svc_id -> XLB_EP_DOWN read at start
        self.max_services = self.nat.spec.max_entries
        self.cfg = dp.maps["svc_cfg_map"]
        self._cfg = abi.structs["xlb_svc_cfg"].codec
        # svc_id -> (address, port) of its endpoints out of selection (health)
        self._down: dict[int, frozenset[tuple[str, int]]] = {}
        self._lock = threading.Lock()
        # weights -> slot table (cached, bounded: a process holds one table per node)
        self._slot_table: Callable[[tuple[int, ...]], bytes] = self._rows.tables.table
        with gcpause.paused():
            entries = self._read_all()
        # the runs of ep_map and slot_map the services hold; the rest is free
        self.ep_space = Extents(self.ep_map.spec.max_entries,
                                ((e.ep_base, len(e.ep_ids)) for e in entries.values()),
                                "ep_map (endpoints)")
        self.slot_space = Extents(self.slot_map.spec.max_entries,
                                  ((e.slot_base, self._rows.chunks(e.n_slots))
                                   for e in entries.values()), "slot_map (slot tables)")
        self.svc_ids = IdPool(self.max_services, (e.svc_id for e in entries.values()),
                              assume_dirty=dp.reused)
        self.stat_ids = IdPool(
            self.ep_stats.spec.max_entries,
            (sid for e in entries.values() for sid in e.ep_ids),
            assume_dirty=dp.reused,
        )
        # nat_v4_map key bytes -> entry
        self._held: dict[bytes, _Entry] = entries
        # bulk puts kept as their columns (dpd/bulkput.py), made into entries of _held
        # when anything but put_bulk or summary reads the table (_index)
        self._bulk: list[_BulkPut] = []
        self._bulk_keys: set[bytes] = set()
        # (vip, first port, proto) -> entry, of the port-range and any-port services
        self._range_first: dict[tuple[str, int, Proto], _Entry] = {
            (e.spec.vip, e.spec.port, e.spec.proto): e for e in entries.values()
            if is_range(e.spec.port, e.spec.port_last)}
        self.generation = 0
        self.instance_id = os.urandom(8).hex()
        self._sorted: tuple[int, list[bytes]] | None = None
        # vip_v4_map, vip_v6_map: VIP -> how many services it carries (the datapath
        # answers ICMP and ICMPv6 echo to a VIP); made to match the services at start,
        # then kept by every write (one tally: 4- and 16-byte keys)
        self.vips = dp.maps["vip_v4_map"]
        self.vips6 = dp.maps["vip_v6_map"]
        self._vip_count: Tally[bytes] = Tally()
        self._count_vips(list(entries), +1)
        for vmap in (self.vips, self.vips6):
            vmap.delete_batch([v for v, _ in vmap.items() if v not in self._vip_count])
        # Maglev tables no service points at (a dpd stopped between two writes)
        live = {self._maglev_key(e) for e in entries.values()
                if e.spec.algorithm == Algorithm.MAGLEV}
        self.maglev.delete_batch([k for k, _ in self.maglev.items() if k not in live])
        log.info("services_restored", services=len(entries))

    # -- encoding --------------------------------------------------------------------

    def key_bytes(self, key: ServiceKey | ServiceSpec) -> bytes:
        """The nat_v4_map (IPv6: nat_v6_map) key of a service (the table's index key too;
        the two maps' keys differ in length)."""
        if ":" in key.vip:
            return self._key6.pack(address_bytes(key.vip), socket.htons(key.port), key.proto)
        return self._key.pack(socket.inet_aton(key.vip), socket.htons(key.port), key.proto,
                              is_range(key.port, key.port_last))

    def _keys(self, items: Sequence[ServiceKey | ServiceSpec]) -> list[bytes]:
        """key_bytes of each of `items`, column by column (no Python step per item)."""
        if _v6_in(items):
            return list(map(self.key_bytes, items))
        ports = list(map(_PORT, items))
        ranged = (map(is_range, ports, map(_LAST, items)) if _any_range(items, ports)
                  else repeat(False))
        return list(map(self._key.pack, map(socket.inet_aton, map(_VIP, items)),
                        map(socket.htons, ports), map(_PROTO, items), ranged))

    # -- port-range and any-port services (range_v4_map) ------------------------------

    def _range_keys(self, spec: ServiceSpec | ServiceKey) -> list[bytes]:
        """range_v4_map keys of a port-range or any-port service."""
        vip = socket.inet_aton(spec.vip)
        base = self._range_base
        if not spec.port:
            return [self._range_key.pack(base, vip, spec.proto, 0)]
        return [self._range_key.pack(base + bits, vip, spec.proto, socket.htons(port))
                for port, bits in port_prefixes(spec.port, spec.port_last)]

    def _write_ranges(self, specs: list[ServiceSpec]) -> None:
        """The prefixes of `specs` (new range services); all or none (MapFull)."""
        done: list[bytes] = []
        try:
            for spec in specs:
                val = self._range_val.pack(socket.htons(spec.port), socket.htons(spec.port_last))
                for k in self._range_keys(spec):
                    self.ranges.put(k, val)
                    done.append(k)
        except Exception as err:
            self.ranges.delete_batch(done)
            if isinstance(err, MapFull):
                raise Exhausted(f"range_v4_map has no room for the port ranges: "
                                f"{err.strerror}") from err
            raise

    def range_last(self, vip: str, port: int, proto: Proto) -> int:
        """The last port of the port-range service (vip, first `port`, proto); 0 when
        there is none (or it is any-port)."""
        with self._lock:
            e = self._range_first.get((vip, port, proto))
            return e.spec.port_last if e is not None else 0

    def _check_ranges(self, specs: list[ServiceSpec]) -> None:
        """Refuse (ValidationError) ranges of `specs` that overlap each other or a held one."""
        new = [s.key for s in specs if s.port_last]
        if new:
            held = [e.spec.key for e in self._range_first.values()]
            check_ranges(list(dict.fromkeys(held + new)))

    @functools.lru_cache(maxsize=512)  # noqa: B019 - one table per process, bounded
    def _maglev_table(self, eps: tuple[tuple[str, int, int], ...]) -> bytes:
        return self._maglev.pack(size=self.maglev_size, ep=maglev.build(eps, self.maglev_size))

    @staticmethod
    def _maglev_key(e: _Entry) -> bytes:
        return (e.svc_id * 2 + e.maglev_b).to_bytes(4, "little")

    def _maglev_value(self, e: _Entry) -> bytes:
        weights = self._effective(e)
        return self._maglev_table(tuple((ep.address, ep.port, w)
                                        for ep, w in zip(e.spec.endpoints, weights, strict=True)))

    def _effective(self, e: _Entry, health: bool = True) -> tuple[int, ...]:
        """The weights selection uses: 0 for an endpoint health took out of selection,
        the configured weights when that leaves none (fail open); then, with priority
        groups, 0 for every endpoint outside the best (lowest) group that has one left.
        `health` False: as if every endpoint were up."""
        configured = tuple(map(_WEIGHT, e.spec.endpoints))
        down = self._down.get(e.svc_id) if health and e.spec.health is not None else None
        weights = configured
        if down:
            weights = tuple(0 if (ep.address, ep.port) in down else ep.weight
                            for ep in e.spec.endpoints)
            if not any(weights):
                weights = configured
        if e.spec.grouped and any(weights):
            best = min(ep.priority for ep, w in zip(e.spec.endpoints, weights, strict=True)
                       if w)
            weights = tuple(w if ep.priority == best else 0
                            for ep, w in zip(e.spec.endpoints, weights, strict=True))
        return weights

    # -- the record of health checks and conntrack timeouts (svc_cfg_map) -------------

    def _cfg_value(self, spec: ServiceSpec) -> bytes:
        h, ct = spec.health, spec.ct_timeouts
        fields: dict[str, object] = {}
        if h is not None:
            path = h.http_path.encode()
            fields.update(hc_kind=int(h.kind), hc_rise=h.rise, hc_fall=h.fall,
                          hc_port=h.port, hc_status=h.http_status,
                          hc_interval_ms=h.interval_ms, hc_timeout_ms=h.timeout_ms,
                          hc_req_len=len(h.udp_request), hc_req=h.udp_request,
                          hc_expect_len=len(h.udp_expect), hc_expect=h.udp_expect,
                          hc_path_len=len(path), hc_path=path)
        if ct is not None:
            fields["ct_timeouts"] = tuple(getattr(ct, f) for f in CT_TIMEOUT_FIELDS)
        return self._cfg.pack(**fields)

    def _cfg_spec(self, raw: bytes) -> tuple[HealthSpec | None, CtTimeoutsSpec | None]:
        v = self._cfg.unpack(raw)
        health = None
        if v["hc_kind"]:
            health = HealthSpec(HealthKind(v["hc_kind"]), v["hc_port"], v["hc_interval_ms"],
                                v["hc_timeout_ms"], v["hc_rise"], v["hc_fall"],
                                bytes(v["hc_req"][:v["hc_req_len"]]),
                                bytes(v["hc_expect"][:v["hc_expect_len"]]),
                                bytes(v["hc_path"][:v["hc_path_len"]]).decode(),
                                v["hc_status"])
        ct = CtTimeoutsSpec(*v["ct_timeouts"]) if any(v["ct_timeouts"]) else None
        return health, ct

    @staticmethod
    def _svc_key(svc_id: int) -> bytes:
        return svc_id.to_bytes(4, "little")

    def _write_cfg(self, entries: list[_Entry], old: list[_Entry | None]) -> None:
        """The svc_cfg_map records of `entries` (what each replaced: `old`)."""
        specs = list(map(_SPEC, entries))
        olds = list(map(_SPEC, filter(None, old)))  # no Python step per item
        if not (any(map(_HEALTH, specs)) or any(map(_CT_TIMEOUTS, specs))
                or any(map(_HEALTH, olds)) or any(map(_CT_TIMEOUTS, olds))
                or any(map(_GROUPED, specs)) or any(map(_GROUPED, olds))):
            return  # the common case: nothing set, nothing was
        keys, vals, gone = [], [], []
        for e in entries:
            if e.spec.health is not None or e.spec.ct_timeouts is not None or e.spec.grouped:
                keys.append(self._svc_key(e.svc_id))
                vals.append(self._cfg_value(e.spec))
            else:
                gone.append(self._svc_key(e.svc_id))
        self.cfg.put_batch(keys, vals)
        self.cfg.delete_batch(gone)

    def _values(self, entries: list[_Entry], v6: bool = False) -> np.ndarray:
        """nat_v4_map values of `entries` (placed: their runs allocated), in one array
        (dpd/natbatch.py), the fields as columns. `v6`: IPv6 services, whose values are
        these with snat_addr 0 (nat_v6_map's `sel`: _values6)."""
        if not entries:
            return np.zeros(0, self._values_of.dtype)
        specs, svc_ids, ep_ids, maglev_b, ep_base, slot_base, n_slots = zip(
            *entries, strict=True)  # columns, in C
        algos, modes, persist, snats, _ = zip(*map(_VALUE_FIELDS, specs), strict=True)
        if v6:
            snats = ("",) * len(snats)
        head = {"svc_id": svc_ids, "algo": algos, "mode": modes, "persist_s": persist,
                "flags": np.array(maglev_b, np.uint8) * self._maglev_flag,
                "snat_addr": np.frombuffer(b"".join(map(_snat_bytes, snats)), ">u4"),
                "n_eps": list(map(len, ep_ids)), "n_slots": n_slots, "ep_base": ep_base,
                "slot_base": slot_base}
        return self._values_of.build(head)

    def _values6(self, entries: list[_Entry]) -> np.ndarray:
        """nat_v6_map values (struct xlb_nat6_val) of IPv6 `entries`."""
        out = np.zeros(len(entries), self._val6)
        if entries:
            out["sel"] = self._values(entries, v6=True)
            snat = b"".join([address_bytes(e.spec.snat_addr) if e.spec.snat_addr
                             else bytes(16) for e in entries])
            out["snat_addr"] = np.frombuffer(snat, ">u4").reshape(-1, 4)
        return out

    def _nat_of(self, key: bytes) -> Map:
        """The map a service key is of: nat_v4_map or nat_v6_map (by its length)."""
        return self.nat if len(key) == self._key4_size else self.nat6

    def _place(self, entries: list[_Entry]) -> list[_Entry]:
        """`entries` with fresh runs of ep_map and slot_map, their endpoints and slot
        tables (from the weights selection uses: health, priority groups) written there.
        No service points at the runs yet. Exhausted when either map has no room: then
        nothing is written and nothing held."""
        if not entries:
            return []
        down = self._down
        specs = list(map(_SPEC, entries))
        grouped = any(map(_GROUPED, specs))
        if down or grouped:
            weights = [self._effective(e) if e.svc_id in down or e.spec.grouped
                       else e.spec.columns.weights for e in entries]
        else:  # the configured weights of each
            weights = list(map(_CONFIGURED, specs))
        counts = list(map(len, map(_ENDPOINTS, specs)))
        n_slots, chunk_arr, srows = self._rows.slot_rows(*group(weights))
        chunks = chunk_arr.tolist()  # _rows.chunks of each
        ep_base = self.ep_space.reserve(counts)
        try:
            slot_base = self.slot_space.reserve(chunks)
        except Exhausted:
            self.ep_space.discard(zip(ep_base, counts, strict=True))
            raise
        try:
            zeros = list(map((0,).__mul__, counts))  # a 0 for each endpoint
            prios = [tuple(ep.priority for ep in s.endpoints) if s.grouped else z
                     for s, z in zip(specs, zeros, strict=True)] if grouped else zeros
            downs = zeros
            if down and any(map(_HEALTH, specs)):
                gone = [down.get(e.svc_id) if e.spec.health is not None else None
                        for e in entries]
                downs = [tuple((ep.address, ep.port) in out for ep in s.endpoints) if out
                         else z for s, z, out in zip(specs, zeros, gone, strict=True)]
            rows = self._rows.eps([s.columns for s in specs],
                                  chain.from_iterable(e.ep_ids for e in entries), weights, prios,
                                  downs, self._ep_down)
            keys = runs(ep_base, counts)
            for i in range(0, len(rows), 65536):
                self.ep_map.put_batch_raw(keys[i:i + 65536].data, rows[i:i + 65536].data)
            six = [i for i, e in enumerate(entries) if ":" in e.spec.vip] \
                if _v6_in(specs) else []
            if six:  # IPv6 endpoints' addresses, in ep6_map at their ep_map indexes
                keys6 = runs([ep_base[i] for i in six], [counts[i] for i in six])
                rows6 = b"".join([address_bytes(ep.address) for i in six
                                  for ep in specs[i].endpoints])
                self.ep6_map.put_batch_raw(keys6.data, rows6)
            skeys = runs(slot_base, chunks)
            for i in range(0, len(srows), 65536):
                self.slot_map.put_batch_raw(skeys[i:i + 65536].data, srows[i:i + 65536].data)
        except Exception:
            self.ep_space.discard(zip(ep_base, counts, strict=True))
            self.slot_space.discard(zip(slot_base, chunks, strict=True))
            raise
        # each entry with its runs: made column by column (no _replace per entry)
        columns: list[Sequence[object]] = list(zip(*entries, strict=True))
        columns[_EP_BASE], columns[_SLOT_BASE], columns[_N_SLOTS] = \
            ep_base, slot_base, n_slots.tolist()
        return list(map(tuple.__new__, repeat(_Entry), zip(*columns, strict=True)))

    def _unplace(self, entries: Iterable[_Entry]) -> None:
        """Free the runs of `entries` (no service points at them any more; reusable
        after the allocator's grace: a packet may still be reading them)."""
        entries = list(entries)
        self.ep_space.free([(e.ep_base, len(e.ep_ids)) for e in entries])
        self.slot_space.free([(e.slot_base, self._rows.chunks(e.n_slots)) for e in entries])

    def _read_eps(self, base: int, n: int) -> list[tuple[bytes, int, int, int, int, int]]:
        """ep_map[base:base + n] decoded: (addr, port (network order), weight, stat_id,
        flags, prio) each."""
        get, unpack = self.ep_map.get, self._ep_row.unpack
        zero = bytes(self.ep_map.value_bytes)
        return [unpack(get((base + i).to_bytes(4, "little")) or zero) for i in range(n)]

    def _write_nat(self, keys: list[bytes], entries: list[_Entry]) -> None:
        """Write `entries` under `keys`, in batches of natbatch.CHUNK (keys and values
        each one array, the values in the encoder's kept buffer). A failure part-way
        leaves the earlier batches written: the caller restores what `keys` held."""
        if len(set(map(len, keys))) > 1 or (keys and len(keys[0]) != self._key4_size):
            four = self._key4_size
            k6 = [k for k in keys if len(k) != four]
            e6 = [e for k, e in zip(keys, entries, strict=True) if len(k) != four]
            for i in range(0, len(e6), CHUNK):
                self.nat6.put_batch_raw(b"".join(k6[i:i + CHUNK]),
                                        self._values6(e6[i:i + CHUNK]).data)
            entries = [e for k, e in zip(keys, entries, strict=True) if len(k) == four]
            keys = [k for k in keys if len(k) == four]
        for i in range(0, len(entries), CHUNK):
            self.nat.put_batch_raw(b"".join(keys[i:i + CHUNK]),
                                   self._values(entries[i:i + CHUNK]).data)

    def _read_all(self) -> dict[bytes, _Entry]:
        """What nat_v4_map holds, decoded (once, when dpd starts)."""
        out: dict[bytes, _Entry] = {}
        kunpack, head = self._key.unpack, self._val_head.unpack
        ntoa, ntohs = socket.inet_ntoa, socket.ntohs
        read_eps, down_flag = self._read_eps, self._ep_down
        flag, max_eps = self._maglev_flag, self.max_eps
        lasts = {}
        for rk, rv in self.ranges.items():
            _, rvip, rproto, _ = self._range_key.unpack(rk)
            first, last = self._range_val.unpack(rv)
            lasts[(rvip, rproto, first)] = ntohs(last)
        for kraw, vraw in self.nat.items():
            vip, port, proto, ranged = kunpack(kraw)
            (svc_id, algo, mode, flags, n, n_slots, persist, snat, ep_base,
             slot_base) = head(vraw)
            rows = read_eps(ep_base, min(n, max_eps))  # in the spec's order
            eps = [(ntoa(a), ntohs(p), w, g, sid) for a, p, w, sid, _, g in rows]
            self._live[svc_id] = tuple([fl & down_flag for *_, fl, _ in rows])
            spec = ServiceSpec(ntoa(vip), ntohs(port), Proto(proto), Algorithm(algo),
                               Mode(mode),
                               tuple([EndpointSpec(a, p, w, g) for a, p, w, g, _ in eps]),
                               snat_addr=ntoa(snat) if any(snat) else "",
                               persistence_s=persist,
                               port_last=lasts.get((vip, proto, port), 0) if ranged else 0)
            out[self.key_bytes(spec)] = _Entry(spec, svc_id, tuple([i for *_, i in eps]),
                                               1 if flags & flag else 0, ep_base, slot_base,
                                               n_slots)
        out.update(self._read_all6())
        cfgs = {int.from_bytes(k, "little"): v for k, v in self.cfg.items()}
        if cfgs:
            for k, e in list(out.items()):
                raw = cfgs.pop(e.svc_id, None)
                if raw is not None:
                    health, ct = self._cfg_spec(raw)
                    out[k] = e._replace(spec=replace(e.spec, health=health, ct_timeouts=ct))
                    if health is not None:
                        self._restore_down(out[k])
            self.cfg.delete_batch([self._svc_key(i) for i in cfgs])  # of no service
        self._live.clear()
        return out

    def _read_all6(self) -> dict[bytes, _Entry]:
        """What nat_v6_map holds, decoded (IPv6 services: addresses from ep6_map)."""
        out: dict[bytes, _Entry] = {}
        ntop, ntohs = functools.partial(socket.inet_ntop, socket.AF_INET6), socket.ntohs
        head, size = self._val_head.unpack_from, self._val_head.size
        zero6 = bytes(16)
        for kraw, vraw in self.nat6.items():
            vip, port, proto = self._key6.unpack(kraw)
            (svc_id, algo, mode, flags, n, n_slots, persist, _, ep_base,
             slot_base) = head(vraw)
            snat = bytes(vraw[size:size + 16])
            n = min(n, self.max_eps)
            rows = self._read_eps(ep_base, n)
            addrs = [self.ep6_map.get((ep_base + i).to_bytes(4, "little")) or zero6
                     for i in range(n)]
            self._live[svc_id] = tuple([fl & self._ep_down for *_, fl, _ in rows])
            spec = ServiceSpec(ntop(vip), ntohs(port), Proto(proto), Algorithm(algo), Mode(mode),
                               tuple([EndpointSpec(ntop(a), ntohs(p), w, g)
                                      for a, (_, p, w, _, _, g) in zip(addrs, rows, strict=True)]),
                               snat_addr=ntop(snat) if any(snat) else "",
                               persistence_s=persist)
            out[bytes(kraw)] = _Entry(spec, svc_id, tuple([r[3] for r in rows]),
                                      1 if flags & self._maglev_flag else 0, ep_base,
                                      slot_base, n_slots)
        return out

    def _restore_down(self, e: _Entry) -> None:
        """The endpoints a previous dpd's health checks found down (XLB_EP_DOWN)."""
        flags = self._live.get(e.svc_id, ())
        out = frozenset((ep.address, ep.port)
                        for ep, fl in zip(e.spec.endpoints, flags, strict=False) if fl)
        if out:
            self._down[e.svc_id] = out

    # -- reading ---------------------------------------------------------------------

    def entries(self) -> list[tuple[ServiceKey, _Entry]]:
        """What the table holds, with each service's counter slots (svc_id, stat_ids),
        read atomically. Entries are replaced, never changed in place, so a caller may
        keep one and compare it by identity to notice a change."""
        with self._lock:
            return [(e.spec.key, e) for e in self._index.values()]

    def specs(self) -> list[ServiceSpec]:
        with self._lock:
            return [e.spec for e in self._index.values()]

    def count(self) -> int:
        return self.svc_ids.in_use()

    def summary(self) -> tuple[int, int]:
        """(generation, services), read together."""
        with self._lock:
            return self.generation, len(self._held) + len(self._bulk_keys)

    def page(self, after: ServiceKey | None, limit: int) -> tuple[int, list[ServiceSpec], bool]:
        """(generation, up to `limit` specs with keys after `after` in key order, more
        follow), read atomically. Key order is the order of the map keys' bytes (VIP,
        port, protocol), sorted once per generation."""
        with self._lock:
            if self._sorted is None or self._sorted[0] != self.generation:
                self._sorted = (self.generation, sorted(self._index))
            _, keys = self._sorted
            start = 0 if after is None else bisect.bisect_right(keys, self.key_bytes(after))
            index = self._index
            return (self.generation, [index[k].spec for k in keys[start:start + limit]],
                    start + limit < len(keys))

    # -- writing -----------------------------------------------------------------------

    def _write_vips(self, vips: list[bytes], vmap: Map) -> None:
        """Write the counts of `vips` into `vmap` (deleting those that carry no service
        any more)."""
        counts = self._vip_count
        held = list(map(counts.get, vips))
        if held.count(0):  # some carry no service any more
            gone = [v for v, n in zip(vips, held, strict=True) if not n]
            for v in gone:
                del counts[v]
            vmap.delete_batch(gone)
            vips, held = list(compress(vips, held)), list(filter(None, held))
        # vip_v4_map and vip_v6_map values: each a __u32, the VIP's service count
        vmap.put_batch_raw(b"".join(vips), struct.pack(f"<{len(held)}I", *held))

    def _count_vips(self, keys: list[bytes], step: int) -> None:
        """Count the services of `keys` (nat_v4_map keys: the VIP is the first 4 bytes;
        nat_v6_map keys: the first 16, counted into vip_v6_map)."""
        vips6: list[bytes] = []
        if len(set(map(len, keys))) > 1 or (keys and len(keys[0]) != self._key4_size):
            vips6 = [k[:16] for k in keys if len(k) != self._key4_size]
            keys = [k for k in keys if len(k) == self._key4_size]
        for vips, vmap in ((list(map(_VIP_OF_KEY, keys)), self.vips), (vips6, self.vips6)):
            if step > 0:
                self._vip_count.update(vips)  # counted in C
            else:
                self._vip_count.subtract(vips)
            if vips:
                self._write_vips(list(dict.fromkeys(vips)), vmap)

    @property
    def _index(self) -> dict[bytes, _Entry]:
        """nat_v4_map (and nat_v6_map) key bytes -> entry, every service (the bulk puts
        kept as columns made into entries first). Read under the lock."""
        if self._bulk:
            for b in self._bulk:
                self._held.update(zip(b.keys, b.entries(), strict=True))
            self._bulk.clear()
            self._bulk_keys.clear()
        return self._held

    def _reserve_ids(self, services: int, endpoints: int) -> tuple[np.ndarray, np.ndarray]:
        """Counter ids for `services` new services and `endpoints` new endpoints, held
        until commit() or rollback() of both pools; Exhausted, with nothing held, when
        either pool is short."""
        try:
            return (self.svc_ids.reserve_array(services, "services"),
                    self.stat_ids.reserve_array(endpoints, "endpoints"))
        except Exhausted:
            self.svc_ids.rollback()
            self.stat_ids.rollback()
            raise

    def _zero_reused(self, svc_ids: np.ndarray, stat_ids: np.ndarray) -> None:
        """Zero the counter slots of the reserved ids that held counts before (a reused
        id's service and endpoint counters, round-robin position, least connections'
        active flows)."""
        dirty_eps = self.stat_ids.take_dirty(stat_ids)
        self.ep_stats.zero(dirty_eps)
        self.ep_conn.zero(dirty_eps)
        fresh_svc = self.svc_ids.take_dirty(svc_ids)
        self.svc_stats.zero(fresh_svc)
        self.rr.zero(fresh_svc)

    def put_bulk(self, bulk: Bulk) -> int | None:
        """Write a batch of new plain services (dpd/bulkput.py) as put would, all or
        none, keeping it as columns (no ServiceSpec made until something reads the
        table); None, with nothing done, when put must do it (a key the table holds,
        more endpoints than the datapath takes). Raises Exhausted when there is no room."""
        n = len(bulk)
        with self._lock, gcpause.paused(n >= BULK):
            if not n or max(bulk.counts) > self.max_eps:
                return None
            karr = np.zeros(n, self._key_dtype)  # the nat_v4_map keys, column by column
            karr["vip"] = np.frombuffer(b"".join(bulk.vip_bytes), ">u4")
            karr["port"] = bulk.ports
            karr["proto"] = bulk.protos
            keys: list[bytes] = karr.view(f"V{karr.itemsize}").tolist()
            if any(map(self._held.__contains__, keys)) or not self._bulk_keys.isdisjoint(keys):
                return None
            self.generation += 1
            total = bulk.bounds[-1]
            svc_ids, stat_pool = self._reserve_ids(n, total)
            rows = self._rows
            n_slots, chunks, srows = rows.slot_rows(*bulk.patterns())
            ep_base: np.ndarray | None = None
            slot_base: np.ndarray | None = None
            try:
                self._zero_reused(svc_ids, stat_pool)
                ep_base = self.ep_space.reserve_array(bulk.counts)
                slot_base = self.slot_space.reserve_array(chunks)
                eps = np.zeros(total, rows.ep_dtype)
                w = bulk.ep_weights
                eps["addr"] = bulk.ep_addrs
                eps["port"] = bulk.ep_ports
                eps["weight"] = w
                eps["stat_id"] = stat_pool
                eps["flags"] = w > 0  # XLB_EP_LIVE is 1
                ekeys = runs(ep_base, bulk.counts)
                for i in range(0, total, 65536):
                    self.ep_map.put_batch_raw(ekeys[i:i + 65536].data, eps[i:i + 65536].data)
                skeys = runs(slot_base, chunks)
                for i in range(0, len(srows), 65536):
                    self.slot_map.put_batch_raw(skeys[i:i + 65536].data,
                                                srows[i:i + 65536].data)
                head: dict[str, Sequence[int] | np.ndarray | int] = {
                        "svc_id": svc_ids, "algo": bulk.algos, "mode": int(Mode.DNAT),
                        "flags": 0, "n_eps": bulk.counts, "n_slots": n_slots,
                        "persist_s": bulk.persist, "snat_addr": 0, "ep_base": ep_base,
                        "slot_base": slot_base}
                for i in range(0, n, CHUNK):
                    part = {f: c[i:i + CHUNK] if isinstance(c, Sequence | np.ndarray) else c
                            for f, c in head.items()}
                    self.nat.put_batch_raw(b"".join(keys[i:i + CHUNK]),
                                           self._values_of.build(part).data)
            except Exception as err:
                self.nat.delete_batch(keys)  # no service points at the runs, then they go
                if ep_base is not None:
                    self.ep_space.free(zip(ep_base.tolist(), bulk.counts, strict=True))
                if slot_base is not None:
                    self.slot_space.free(zip(slot_base.tolist(), chunks.tolist(), strict=True))
                self.svc_ids.rollback()
                self.stat_ids.rollback()
                log.warning("services_rolled_back", count=n)
                if isinstance(err, MapFull):
                    raise Exhausted(f"nat_v4_map has no room: {err.strerror}") from err
                raise
            self.svc_ids.commit()
            self.stat_ids.commit()
            self._bulk.append(_BulkPut(bulk, keys, svc_ids, stat_pool, ep_base, slot_base,
                                       n_slots))
            self._bulk_keys.update(keys)
            self._count_vips(keys, +1)
            return n

    def put(self, specs: list[ServiceSpec]) -> int:
        """Upsert all of `specs` or none. Raises Exhausted when there is no room."""
        with self._lock, gcpause.paused(len(specs) >= BULK):
            max_eps = self.max_eps
            counts = list(map(len, map(_ENDPOINTS, specs)))  # endpoints of each
            if max(counts, default=0) > max_eps:
                s = next(s for s in specs if len(s.endpoints) > max_eps)
                raise Exhausted(f"service {s.key}: {len(s.endpoints)} endpoints, the "
                                f"datapath holds at most {max_eps}")
            if any(map(_LAST, specs)):
                self._check_ranges(specs)
            any_range = _any_range(specs)
            if specs:
                self.generation += 1  # every write call, also when nothing changes
            index = self._index
            get = index.get
            keys = self._keys(specs)
            old = list(map(get, keys))
            batch: dict[bytes, ServiceSpec]
            if old.count(None) == len(old) and len(set(keys)) == len(keys):
                batch = dict(zip(keys, specs, strict=True))  # all new (e.g. an empty table)
            else:
                batch = {}
                for k, s, prev in zip(keys, specs, old, strict=True):
                    if prev is None or prev.spec != s:
                        batch[k] = s
                    else:
                        batch.pop(k, None)  # a later duplicate equal to what is held
                keys = list(batch)
                old = list(map(get, keys))
            new_svcs = old.count(None)
            if len(batch) != len(specs):  # the counts of what is written
                counts = list(map(len, map(_ENDPOINTS, batch.values())))
            new_eps = sum(counts) if new_svcs == len(old) else sum(
                compress(counts, map(is_, old, repeat(None))))
            for spec, prev in zip(batch.values(), old, strict=True) \
                    if new_svcs != len(old) else ():  # some replace a service
                if prev is not None:
                    have = prev.stat_ids
                    new_eps += sum([(ep.address, ep.port) not in have
                                    for ep in spec.endpoints])
            svc_arr, stat_arr = self._reserve_ids(new_svcs, new_eps)
            svc_ids, stat_pool = svc_arr.tolist(), stat_arr.tolist()
            plan, freed = self._plan(list(batch.values()), counts, old, svc_ids, stat_pool)
            tables = list(compress(plan, map(_IS_MAGLEV, map(_ALGORITHM, batch.values()))))
            placed: list[_Entry] = []
            try:
                self._zero_reused(svc_arr, stat_arr)
                plan = placed = self._place(plan)  # the new endpoint sets, not used yet
                for i in range(0, len(tables), 256):  # 32 KiB values: bounded batches
                    part = tables[i:i + 256]
                    self.maglev.put_batch([self._maglev_key(e) for e in part],
                                          [self._maglev_value(e) for e in part])
                if plan:
                    self._write_nat(keys, plan)
                ranged = [e.spec for e, p in zip(plan, old, strict=True)
                          if p is None and is_range(e.spec.port, e.spec.port_last)] \
                    if any_range else []
                if ranged:
                    self._write_ranges(ranged)  # after their services: all or none
                self._write_cfg(plan, old)
            except Exception as err:
                self._restore(keys, old)
                self._write_cfg([p for p in old if p is not None],
                                [e for e, p in zip(plan, old, strict=True) if p is not None])
                self.cfg.delete_batch([self._svc_key(e.svc_id)
                                       for e, p in zip(plan, old, strict=True) if p is None])
                self.maglev.delete_batch([self._maglev_key(e) for e in tables])
                self._unplace(placed)  # no service points at them (restored above)
                self.svc_ids.rollback()
                self.stat_ids.rollback()
                if isinstance(err, MapFull):
                    raise Exhausted(f"{'nat_v6_map' if _v6_in(specs) else 'nat_v4_map'} "
                                    f"has no room: {err.strerror}") from err
                raise
            self.svc_ids.commit()
            self.stat_ids.commit()
            # the services point at their new tables: the old ones go
            self.maglev.delete_batch([self._maglev_key(p) for p in old
                                      if p is not None and p.spec.algorithm == Algorithm.MAGLEV])
            self._unplace([p for p in old if p is not None])  # the replaced sets
            self.stat_ids.release(freed)
            index.update(zip(keys, plan, strict=True))
            for e in plan if any_range else ():
                if is_range(e.spec.port, e.spec.port_last):
                    self._range_first[(e.spec.vip, e.spec.port, e.spec.proto)] = e
            self._count_vips(keys if new_svcs == len(old)
                             else list(compress(keys, map(is_, old, repeat(None)))), +1)
            return len(specs)

    @staticmethod
    def _plan(specs: list[ServiceSpec], counts: list[int], old: list[_Entry | None],
              svc_ids: list[int], stat_pool: list[int]) -> tuple[list[_Entry], list[int]]:
        """The entries `specs` (with `counts` endpoints each) become (`old`: what each
        key holds now) with ids from the reserved `svc_ids` (one per new service) and
        `stat_pool` (one per new endpoint), and the endpoint slots they free."""
        if old.count(None) == len(old):  # all new: entries made column by column
            bounds = list(accumulate(counts, initial=0))
            pool = tuple(stat_pool)  # its slices are the entries' ep_ids
            return _entries(specs, svc_ids,
                            map(pool.__getitem__, map(slice, bounds[:-1], bounds[1:])),
                            repeat(0)), []
        plan: list[_Entry] = []
        freed: list[int] = []
        next_svc = iter(svc_ids).__next__
        at = 0
        for spec, prev in zip(specs, old, strict=True):
            if prev is None:
                n = len(spec.endpoints)
                plan.append(_Entry(spec, next_svc(), tuple(stat_pool[at:at + n])))
                at += n
                continue
            have = prev.stat_ids
            ids = []
            for ep in spec.endpoints:
                sid = have.pop((ep.address, ep.port), None)
                if sid is None:
                    sid = stat_pool[at]
                    at += 1
                ids.append(sid)
            freed.extend(have.values())
            # Maglev: the new table goes under the key the service does not use now
            plan.append(_Entry(spec, prev.svc_id, tuple(ids), prev.maglev_b ^ 1))
        return plan, freed

    def _restore(self, written: list[bytes], old: list[_Entry | None]) -> None:
        """Put back what `written` held before: delete new keys, rewrite replaced ones."""
        for k, e in zip(written, old, strict=True):
            if e is None:
                self._nat_of(k).delete(k)
        back = [(k, e) for k, e in zip(written, old, strict=True) if e is not None]
        if back:
            self._write_nat([k for k, _ in back], [e for _, e in back])
        log.warning("services_rolled_back", count=len(written))

    def delete(self, keys: list[ServiceKey]) -> int:
        with self._lock, gcpause.paused(len(keys) >= BULK):
            if keys:
                self.generation += 1
            gone: list[bytes] = []
            for k in self._keys(keys):
                e = self._index.get(k)
                if e is None:
                    continue
                if is_range(e.spec.port, e.spec.port_last):  # its ports first, then it
                    self.ranges.delete_batch(self._range_keys(e.spec))
                    self._range_first.pop((e.spec.vip, e.spec.port, e.spec.proto), None)
                self._nat_of(k).delete(k)
                if e.spec.algorithm == Algorithm.MAGLEV:  # the service first, then its table
                    self.maglev.delete_batch([self._maglev_key(e)])
                self._unplace([e])  # and its endpoint set
                if e.spec.health is not None or e.spec.ct_timeouts is not None \
                        or e.spec.grouped:
                    self.cfg.delete_batch([self._svc_key(e.svc_id)])
                self._down.pop(e.svc_id, None)
                del self._index[k]
                self.svc_ids.release([e.svc_id])
                self.stat_ids.release(e.ep_ids)
                gone.append(k)
            self._count_vips(gone, -1)
            return len(gone)

    # -- health ------------------------------------------------------------------------

    def set_down(self, changes: dict[ServiceKey, frozenset[tuple[str, int]]]) -> int:
        """Take endpoints out of selection, or put them back: for each service of
        `changes`, the (address, port) of its endpoints that health found down (empty:
        none). Rewrites each service whose set changed (slot and Maglev tables from the
        weights less those endpoints); the spec, the index's configured weights and the
        generation stay. Returns the services rewritten."""
        with self._lock:
            index, down = self._index, self._down
            keys, plan, old = [], [], []
            for key, out in changes.items():
                k = self.key_bytes(key)
                e = index.get(k)
                if e is None:
                    continue
                if e.spec.health is None:
                    out = frozenset()
                now = down.get(e.svc_id, frozenset())
                out = out & {(ep.address, ep.port) for ep in e.spec.endpoints}
                if out == now:
                    continue
                if out:
                    down[e.svc_id] = out
                else:
                    down.pop(e.svc_id, None)
                maglev_b = e.maglev_b ^ 1 if e.spec.algorithm == Algorithm.MAGLEV else e.maglev_b
                keys.append(k)
                plan.append(e._replace(maglev_b=maglev_b))
                old.append((e, now))
            if not plan:
                return 0
            tables = [e for e in plan if e.spec.algorithm == Algorithm.MAGLEV]
            placed: list[_Entry] = []
            try:
                plan = placed = self._place(plan)  # fresh sets, with the new LIVE flags
                if tables:
                    self.maglev.put_batch([self._maglev_key(e) for e in tables],
                                          [self._maglev_value(e) for e in tables])
                self._write_nat(keys, plan)
            except Exception:
                for e, was in old:
                    if was:
                        down[e.svc_id] = was
                    else:
                        down.pop(e.svc_id, None)
                self.maglev.delete_batch([self._maglev_key(e) for e in tables])
                if placed:  # the services back on their old sets, then the new go
                    self._write_nat(keys, [e for e, _ in old])
                    self._unplace(placed)
                raise
            self.maglev.delete_batch([self._maglev_key(e) for e, _ in old
                                      if e.spec.algorithm == Algorithm.MAGLEV])
            self._unplace([e for e, _ in old])
            index.update(zip(keys, plan, strict=True))
            return len(plan)

    def lc_stat_ids(self) -> dict[int, list[int]]:
        """svc_id -> the ep_conn_map slots of its endpoints, for the least-connections
        services (whose active flows dpd's conntrack sweep recounts)."""
        with self._lock:
            out = {e.svc_id: list(e.ep_ids) for e in self._held.values()
                   if e.spec.algorithm == Algorithm.LEAST_CONNECTIONS}
            lc = int(Algorithm.LEAST_CONNECTIONS)
            for b in self._bulk:  # read from the columns (they stay columns)
                bounds = b.bulk.bounds
                for i in compress(range(len(b.svc_ids)), map(lc.__eq__, b.bulk.algos)):
                    out[int(b.svc_ids[i])] = b.stat_ids[bounds[i]:bounds[i + 1]].tolist()
            return out

    def ct_timeouts(self) -> dict[int, CtTimeoutsSpec]:
        """svc_id -> its conntrack timeouts, for the services that set them."""
        with self._lock:
            return {e.svc_id: t for e in self._held.values()  # a bulk put sets none
                    if (t := e.spec.ct_timeouts) is not None}

    def down(self, key: ServiceKey) -> frozenset[tuple[str, int]]:
        """The endpoints of `key` out of selection now."""
        with self._lock:
            e = self._index.get(self.key_bytes(key))
            return self._down.get(e.svc_id, frozenset()) if e is not None else frozenset()

    def held_selection(self, key: ServiceKey) -> tuple[list[int], list[int]] | None:
        """What the datapath selects from for `key`, read back from the maps: its slot
        table (endpoint indexes) and each endpoint's XLB_EP_LIVE flag; None when
        nat_v4_map holds no such service."""
        k = self.key_bytes(key)
        raw = self._nat_of(k).get(k)
        if raw is None:
            return None
        _, _, _, _, n, n_slots, _, _, ep_base, slot_base = self._val_head.unpack_from(raw)
        live = [fl & self._ep_live for *_, fl, _ in self._read_eps(ep_base, n)]
        chunks = [self.slot_map.get((slot_base + i).to_bytes(4, "little")) or b""
                  for i in range(self._rows.chunks(n_slots))]
        table = list(struct.unpack(f"<{n_slots}H", b"".join(chunks)[:2 * n_slots]))
        return table, live

    # -- counters ------------------------------------------------------------------------

    def sum_counter(self, table: str, idx: int) -> Counter:
        m = {"svc": self.svc_stats, "ep": self.ep_stats}[table]
        raw = m.get(idx.to_bytes(4, "little"))
        return sum_counters(self._counter, m.split(raw) if raw else [])

    def stats(
        self, keys: list[ServiceKey] | None = None
    ) -> list[tuple[ServiceSpec, Counter, list[tuple[EndpointSpec, Counter]]]]:
        with self._lock:
            index = self._index
            chosen = ([e for k in self._keys(keys) if (e := index.get(k)) is not None]
                      if keys else list(index.values()))
        out = []
        for e in chosen:
            eps = [(ep, self.sum_counter("ep", sid))
                   for ep, sid in zip(e.spec.endpoints, e.ep_ids, strict=True)]
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


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """The port prefixes (port, prefix bits of 16) that cover first..last exactly, fewest
    first-to-last (at most 30)."""
    out = []
    port = first
    while port <= last:
        size = port & -port if port else 1 << 16  # the largest block aligned at port
        while port + size - 1 > last:
            size >>= 1
        out.append((port, 16 - size.bit_length() + 1))
        port += size
    return out
