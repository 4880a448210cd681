"""The map values of a batch of services, built in numpy arrays.

Each array is what BPF_MAP_UPDATE_BATCH takes: structs back to back, laid out by the
structured dtypes dpd/abi.py derives from xlb_abi.h (nothing here restates a layout).

- nat_v4_map values (struct xlb_nat_val, NatValues): one row per service, every field a
  column its caller gives (where its endpoints and slot table live: ep_base, slot_base);
- ep_map rows (struct xlb_ep, EndpointRows.eps): a batch's endpoints, service after
  service, from each service's endpoint columns (ServiceSpec.columns: address bytes,
  ports, weights; made once, when the request is parsed): the addresses joined go in
  through one '>u4' view, the other fields as numpy columns;
- slot_map rows (struct xlb_slots, EndpointRows.slot_rows): each service's slot table
  (2-byte endpoint indexes, cached by weight tuple), padded to whole XLB_SLOT_CHUNK
  entries, joined; built per distinct weight tuple of the batch and gathered.

No Python step runs per endpoint or field; per service, a few C calls through map().
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
    """Slot tables by weight tuple (np.uint16 arrays of endpoint indexes), cached, each
    also zero-padded to whole `chunk`s (as slot_map holds it). Bounded: past `limit`
    tuples the cache starts over."""

    def __init__(self, size: int, chunk: int = 1, limit: int = 4096) -> None:
        self.size = size
        self.chunk = chunk
        self.limit = limit
        self._tables: dict[tuple[int, ...], np.ndarray] = {}
        self._padded: dict[tuple[int, ...], np.ndarray] = {}

    def get(self, weights: tuple[int, ...]) -> np.ndarray:
        t = self._tables.get(weights)
        if t is None:
            if len(self._tables) >= self.limit:
                self._tables.clear()
                self._padded.clear()
            table = build_slots(weights, self.size)
            padded = np.zeros(-(-len(table) // self.chunk) * self.chunk, np.uint16)
            padded[:len(table)] = table
            self._padded[weights] = padded
            t = self._tables[weights] = padded[:len(table)]
        return t

    def padded(self, weights: tuple[int, ...]) -> np.ndarray:
        """The table of `weights` (got before) padded to whole chunks."""
        return self._padded[weights]

    def table(self, weights: tuple[int, ...]) -> bytes:
        """One weight tuple's slot table as bytes (2 per slot, little-endian)."""
        return self.get(weights).astype("<u2").tobytes()


CHUNK = 1024  # nat values built at a time into a buffer kept for the next


class NatValues:
    """Encodes the nat_v4_map values (struct xlb_nat_val) of a batch of services.

    Up to CHUNK values go into a buffer the encoder keeps (its pages are faulted in and
    zeroed by the kernel once, not on every batch); a larger batch gets its own array."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.dtype = layout.dtype
        self._kept = np.zeros(CHUNK, self.dtype)
        self.head = frozenset(self.dtype.names)

    def build(self, head: Mapping[str, Any]) -> np.ndarray:
        """The values of a batch, in one array of the layout's dtype (up to CHUNK: the
        kept buffer, valid until the next call). `head`: every field (checked) as a
        column numpy can assign (a list of ints, an array), all of one length, or one
        int for every value."""
        if head.keys() != self.head:
            raise KeyError(f"struct {self.layout.name}: fields {sorted(head)}, "
                           f"the layout has {sorted(self.head)}")
        n = len(head["svc_id"])
        if n <= CHUNK:
            out = self._kept[:n]
            out.view(np.uint8).fill(0)
        else:
            out = np.zeros(n, self.dtype)
        for name, column in head.items():
            out[name] = column
        return out


def runs(starts: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray
         ) -> np.ndarray:
    """The indexes start, start + 1, ..., start + count - 1 of each run, joined (u32)."""
    per = np.asarray(counts, np.intp)
    total = int(per.sum())
    if not total:
        return np.zeros(0, "<u4")
    first = np.repeat(np.asarray(starts, np.int64) - (np.cumsum(per) - per), per)
    return (first + np.arange(total)).astype("<u4")


class EndpointRows:
    """Encodes the ep_map and slot_map rows of a batch of services."""

    def __init__(self, ep: Layout, slots: Layout, max_slots: int) -> None:
        self.ep_dtype = ep.dtype
        self.slot_dtype = slots.dtype
        self.chunk = slots.field("ep").count
        self.tables = SlotTables(max_slots, self.chunk)

    def chunks(self, n_slots: int) -> int:
        """slot_map entries a table of `n_slots` slots takes."""
        return -(-n_slots // self.chunk)

    def eps(self, endpoints: Sequence[EndpointColumns], stat_ids: Iterable[int],
            live: Sequence[tuple[int, ...]], prios: Sequence[tuple[int, ...]],
            down: Sequence[tuple[int, ...]], down_flag: int) -> np.ndarray:
        """The xlb_ep rows of the services' endpoints, service after service.
        `stat_ids`: their counter slots, flat; per service: `live`, the weights selection
        uses (> 0: XLB_EP_LIVE); `prios`, each endpoint's priority group; `down`, 1 for
        each endpoint health found down (`down_flag` set)."""
        m = sum(map(len, map(_WEIGHTS, endpoints)))
        out = np.zeros(m, self.ep_dtype)
        if not m:
            return out
        out["addr"] = np.frombuffer(b"".join(map(_ADDRESSES, endpoints)), ">u4")
        out["port"] = np.fromiter(chain.from_iterable(map(_PORTS, endpoints)), np.uint16, m)
        out["weight"] = np.fromiter(chain.from_iterable(map(_WEIGHTS, endpoints)), np.uint16, m)
        out["stat_id"] = np.fromiter(stat_ids, np.uint32, m)
        out["flags"] = (  # XLB_EP_LIVE is 1
            (np.fromiter(chain.from_iterable(live), np.uint16, m) > 0).astype(np.uint8)
            | np.fromiter(chain.from_iterable(down), np.uint8, m) * np.uint8(down_flag))
        out["prio"] = np.fromiter(chain.from_iterable(prios), np.uint8, m)
        return out

    def slot_rows(self, patterns: Sequence[tuple[int, ...]], which: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The slot tables of a batch of services whose weight tuples are
        `patterns[which[i]]` (few distinct tuples, many services: each table is built or
        looked up once): (each service's slots, each one's slot_map entries, the xlb_slots
        rows of all, padded to whole entries, joined in service order)."""
        chunk = self.chunk
        padded = []
        lens = np.zeros(len(patterns), np.intp)
        for i, p in enumerate(patterns):
            lens[i] = len(self.tables.get(p))
            padded.append(self.tables.padded(p))
        per = np.fromiter(map(len, padded), np.intp, len(padded)) // chunk
        flat = (np.concatenate(padded) if padded else np.zeros(0, np.uint16)).reshape(-1, chunk)
        chunks = per[which]
        out = np.zeros(int(chunks.sum()), self.slot_dtype)
        out["ep"] = flat[runs((np.cumsum(per) - per)[which], chunks)]
        return lens[which], chunks, out


def group(items: Sequence[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """(the distinct tuples of `items` in first-seen order, each item's index in them),
    hashed in C."""
    distinct = list(dict.fromkeys(items))
    index = {t: i for i, t in enumerate(distinct)}
    return distinct, np.fromiter(map(index.__getitem__, items), np.intp, len(items))
