"""The blocklist: source prefixes the XDP stage drops before TC sees them.

Two LPM tries (``blk_v4_map``, ``blk_v6_map``; key: prefix length, then the address)
hold the prefixes; each entry's value is its id, the index of its own drop counter in
``blk_stats_map``. The ids of both families come from one pool of
``XLB_BLOCKLIST_SIZE``, so a put that does not fit is refused before anything is
written. The maps are the record: a restarted dpd reads its view (prefixes, ids) back
from them. Works on any map seam (kernel or in-memory maps).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from dpd.ids import IdPool
from dpd.loader import Datapath
from dpd.maps import MapFull
from dpd.services import Counter, sum_counters
from xlbcore.errors import Exhausted
from xlbcore.firewall import parse_prefix

log = structlog.get_logger("dpd.blocklist")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_prefixes(values: Sequence[str], field: str = "prefixes") -> list[str]:
    """Each value as a canonical prefix ("198.18.66.0/24"; an address is its /32 or
    /128; host bits set are refused), duplicates removed, order kept."""
    out: dict[str, None] = {}
    for i, v in enumerate(values):
        out[parse_prefix(v, f"{field}[{i}]")] = None
    return list(out)


@dataclass(frozen=True)
class BlockedPrefix:
    prefix: str
    counters: Counter


class Blocklist:
    def __init__(self, dp: Datapath) -> None:
        abi = dp.abi
        self.maps = {4: dp.maps["blk_v4_map"], 6: dp.maps["blk_v6_map"]}
        self.stats = dp.maps["blk_stats_map"]
        self._key = {4: abi.structs["xlb_blk_v4_key"].codec,
                     6: abi.structs["xlb_blk_v6_key"].codec}
        self._val = abi.structs["xlb_blk_val"].codec
        self._counter = abi.structs["xlb_counter"].codec
        self._lock = threading.Lock()
        self.generation = 0  # +1 on every Put/Delete call with at least one item
        self._ids: dict[str, int] = {}  # prefix -> id, read back from the maps
        for family, m in self.maps.items():
            for k, v in m.items():
                self._ids[self._prefix(family, k)] = self._val.unpack(v)["id"]
        size = self.stats.spec.max_entries
        self.pool = IdPool(size, self._ids.values(), assume_dirty=dp.reused)
        if self._ids:
            log.info("blocklist_restored", prefixes=len(self._ids))

    # -- keys ------------------------------------------------------------------------------

    def _encode(self, prefix: str) -> tuple[int, bytes]:
        net = ipaddress.ip_network(prefix)
        family = net.version
        addr = net.network_address.packed
        if family == 4:
            return 4, self._key[4].pack(prefixlen=net.prefixlen, addr=addr)
        return 6, self._key[6].pack(prefixlen=net.prefixlen, addr=addr)

    def _prefix(self, family: int, key: bytes) -> str:
        k = self._key[family].unpack(key)
        raw = bytes(k["addr"])
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        return f"{socket.inet_ntop(af, raw)}/{k['prefixlen']}"

    # -- operations ------------------------------------------------------------------------

    def put(self, prefixes: Iterable[str]) -> int:
        """Add prefixes (canonical, see parse_prefixes): all or nothing. Prefixes already
        there are kept as they are (their counters too). Returns how many were added."""
        with self._lock:
            new = [p for p in dict.fromkeys(prefixes) if p not in self._ids]
            if not new:
                return 0
            ids = self.pool.reserve(len(new), "blocklist")
            written: list[tuple[int, bytes]] = []
            try:
                dirty = self.pool.take_dirty(ids)
                self.stats.zero(dirty)
                for prefix, i in zip(new, ids, strict=True):
                    family, key = self._encode(prefix)
                    self.maps[family].put(key, self._val.pack(id=i))
                    written.append((family, key))
            except BaseException as e:
                for family, key in written:
                    self.maps[family].delete(key)
                self.pool.rollback()
                if isinstance(e, MapFull):
                    raise Exhausted(f"blocklist: {e.strerror}; nothing was written") from None
                raise
            self.pool.commit()
            self._ids.update(zip(new, ids, strict=True))
            self.generation += 1
            log.info("blocklist_put", added=len(new), prefixes=len(self._ids))
            return len(new)

    def delete(self, prefixes: Iterable[str]) -> int:
        """Remove prefixes (idempotent); returns how many were there."""
        with self._lock:
            gone = [p for p in dict.fromkeys(prefixes) if p in self._ids]
            for prefix in gone:
                family, key = self._encode(prefix)
                self.maps[family].delete(key)
            self.pool.release(self._ids.pop(p) for p in gone)
            if gone:
                self.generation += 1
                log.info("blocklist_deleted", deleted=len(gone), prefixes=len(self._ids))
            return len(gone)

    def entries(self) -> list[BlockedPrefix]:
        """Every prefix, read back from the maps, with its drop counter; v4 then v6,
        each by address and length."""
        out: list[BlockedPrefix] = []
        for family, m in self.maps.items():
            found: list[tuple[Network, BlockedPrefix]] = []
            for k, v in m.items():
                prefix = self._prefix(family, k)
                raw = self.stats.get(self._val.unpack(v)["id"].to_bytes(4, "little"))
                found.append((ipaddress.ip_network(prefix), BlockedPrefix(
                    prefix, sum_counters(self._counter, self.stats.split(raw) if raw else []))))
            out.extend(b for _, b in sorted(found, key=lambda t: (t[0].network_address,
                                                                  t[0].prefixlen)))
        return out

    def count(self) -> int:
        return len(self._ids)

    def summary(self) -> tuple[int, int]:
        return self.generation, len(self._ids)

