"""nat_v4_map values of a whole batch, built in one numpy array.

The array is what BPF_MAP_UPDATE_BATCH takes: struct xlb_nat_val back to back, laid out
by the structured dtype dpd/abi.py derives from xlb_abi.h (nothing here restates a
layout). A batch is encoded column by column from each service's endpoint columns
(ServiceSpec.columns: address bytes, ports, weights; made once, when the request is
parsed): the addresses of the batch are joined and go into the array through one '>u4'
view, ports, weights and counter slots are numpy columns put into the services'
endpoint arrays in one assignment, and a service's slot table is a row of a cached
matrix of slot tables (one row per weight tuple seen). No Python step runs per
endpoint or field; per service, a few C calls through map().
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np

from dpd.abi import Layout
from dpd.slots import build_slots
from xlbcore.service import EndpointColumns

_ADDRESSES, _PORTS, _WEIGHTS = (attrgetter("addresses"), attrgetter("ports"),
                                attrgetter("weights"))


class SlotTables:
    """Slot tables by weight tuple, as rows of one zero-padded matrix (``tables``, the
    length of each in ``lengths``), so that a batch's tables are one gather. Bounded:
    past `limit` tuples the cache starts over (a batch's own tuples always fit)."""

    def __init__(self, size: int, limit: int = 4096) -> None:
        self.size = size
        self.limit = limit
        self._row: dict[tuple[int, ...], int] = {}
        self.tables = np.zeros((64, size), np.uint8)
        self.lengths = np.zeros(64, np.uint16)

    def rows(self, weights: Sequence[tuple[int, ...]]) -> np.ndarray:
        """The row of each weight tuple's table (built when first seen)."""
        rows = list(map(self._row.get, weights))
        if None in rows:
            missing = set(weights).difference(self._row)
            if len(self._row) + len(missing) > self.limit:
                self._row.clear()
                missing = set(weights)
            for w in missing:
                self._add(w)
            rows = list(map(self._row.__getitem__, weights))
        return np.fromiter(rows, np.intp, len(rows))

    def table(self, weights: tuple[int, ...]) -> bytes:
        """One weight tuple's slot table (as the value holds it: `length` bytes)."""
        row = int(self.rows([weights])[0])
        return self.tables[row, :self.lengths[row]].tobytes()

    def _add(self, weights: tuple[int, ...]) -> None:
        row = len(self._row)
        if row == len(self.lengths):  # grow by doubling
            self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
        table = build_slots(weights, self.size)
        self.tables[row] = 0
        self.tables[row, :len(table)] = table
        self.lengths[row] = len(table)
        self._row[weights] = row


CHUNK = 1024  # values built at a time into a buffer kept for the next: ~1 MiB


class NatValues:
    """Encodes the nat_v4_map values (struct xlb_nat_val) of a batch of services.

    Up to CHUNK values go into a buffer the encoder keeps (its pages are faulted in and
    zeroed by the kernel once, not on every batch: for fresh memory that costs as much
    as the encoding); a larger batch gets an array of its own."""

    def __init__(self, layout: Layout, slot_limit: int = 4096) -> None:
        self.layout = layout
        self.dtype = layout.dtype
        self._kept = np.zeros(CHUNK, self.dtype)
        self._ep_dtype = self.dtype["eps"].base
        self.slots = SlotTables(layout.field("slots").count, slot_limit)
        # what build() computes itself; every other field is a column its caller gives
        own = {"n_eps", "eps", "n_slots", "slots"}
        self.head = frozenset(self.dtype.names) - own

    def build(self, head: Mapping[str, Any], endpoints: Sequence[EndpointColumns],
              stat_ids: Iterable[int],
              selection: Mapping[int, tuple[int, ...]] | None = None) -> np.ndarray:
        """The values of len(endpoints) services, in one array of the layout's dtype
        (up to CHUNK: the kept buffer, valid until the next call).

        `head`: each header field (all but n_eps, n_slots, eps and slots: checked) as a
        column numpy can assign (a list of ints, an array). `endpoints`: each service's
        endpoints (ServiceSpec.columns); `stat_ids`: their counter slots, flat, in the
        same order. `selection`: service (its position) -> the weights its slot table
        is built from, when not the configured ones (health took an endpoint out, a
        priority group stands by); the values keep the configured weights."""
        if head.keys() != self.head:
            raise KeyError(f"struct {self.layout.name}: header fields {sorted(head)}, "
                           f"the layout has {sorted(self.head)}")
        n = len(endpoints)
        if n <= CHUNK:
            out = self._kept[:n]
            out.view(np.uint8).fill(0)
        else:
            out = np.zeros(n, self.dtype)
        for name, column in head.items():
            out[name] = column
        weights = list(map(_WEIGHTS, endpoints))
        counts = list(map(len, weights))
        out["n_eps"] = counts
        m = sum(counts)
        eps = np.empty(m, self._ep_dtype)
        eps["addr"] = np.frombuffer(b"".join(map(_ADDRESSES, endpoints)), ">u4")
        eps["port"] = np.fromiter(chain.from_iterable(map(_PORTS, endpoints)), np.uint16, m)
        eps["weight"] = np.fromiter(chain.from_iterable(weights), np.uint16, m)
        eps["stat_id"] = np.fromiter(stat_ids, np.uint32, m)
        if n and counts.count(counts[0]) == n:  # one endpoint count: a reshape
            out["eps"][:, :counts[0]] = eps.reshape(n, counts[0])
        else:
            per = np.array(counts, np.intp)
            starts = np.cumsum(per) - per
            rows = np.repeat(np.arange(n), per)
            out["eps"][rows, np.arange(m) - np.repeat(starts, per)] = eps
        for i, w in (selection or {}).items():
            weights[i] = w
        table = self.slots.rows(weights)
        lengths = self.slots.lengths[table]
        out["n_slots"] = lengths
        used = int(lengths.max(initial=0))  # the columns past every table stay zero
        out["slots"][:, :used] = self.slots.tables[table, :used]
        return out
