"""Conntrack: read back, flush, and age ct_v4_map.

ct_v4_map is an LRU hash, so a full table evicts the least recently used flows rather
than refusing new ones; aging removes finished and idle flows before that happens.
A flow's two entries (ORIG and REPLY) age together: the flow is idle for as long as
its most recently used direction."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from dpd import abi
from dpd.codec import be16_to_port, be32_to_ip, service_key_of
from dpd.model import Proto, ServiceKey

log = structlog.get_logger("dpd.conntrack")

SECOND = 1_000_000_000


@dataclass(frozen=True)
class Timeouts:
    """Idle time (ns) after which a flow in a state is removed."""

    tcp_syn: int = 30 * SECOND  # NEW, REPLIED: handshake not finished
    tcp_established: int = 3600 * SECOND
    tcp_closing: int = 60 * SECOND
    tcp_closed: int = 10 * SECOND
    udp_new: int = 30 * SECOND
    udp_established: int = 180 * SECOND


def expired(proto: int, state: int, idle_ns: int, t: Timeouts = Timeouts()) -> bool:
    if proto == Proto.UDP:
        limit = t.udp_established if state == abi.CT_EST else t.udp_new
    elif state == abi.CT_EST:
        limit = t.tcp_established
    elif state == abi.CT_CLOSING:
        limit = t.tcp_closing
    elif state == abi.CT_CLOSED:
        limit = t.tcp_closed
    else:
        limit = t.tcp_syn
    return idle_ns >= limit


@dataclass(frozen=True)
class CtEntry:
    proto: Proto
    src: str
    src_port: int
    dst: str
    dst_port: int
    direction: int
    state: int
    nat_address: str
    nat_port: int
    service: ServiceKey
    idle_ns: int


def peer_key_fields(k: Any, v: Any) -> tuple[int, int, int, int, int]:
    """(saddr, daddr, sport, dport, proto) of the other direction's entry."""
    if v.dir == abi.DIR_ORIG:
        return v.nat_addr, k.saddr, v.nat_port, k.sport, k.proto
    return k.daddr, v.nat_addr, k.dport, v.nat_port, k.proto


class Conntrack:
    def __init__(self, dp: Any, timeouts: Timeouts | None = None) -> None:
        self.ct = dp.table("ct_v4_map")
        self.timeouts = timeouts or Timeouts()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, fields: tuple[int, int, int, int, int]) -> Any:
        k = self.ct.Key()
        k.saddr, k.daddr, k.sport, k.dport, k.proto = fields
        return k

    def entries(self) -> list[CtEntry]:
        now = time.monotonic_ns()
        out = []
        for k, v in self.ct.items():
            out.append(
                CtEntry(
                    Proto(k.proto),
                    be32_to_ip(k.saddr),
                    be16_to_port(k.sport),
                    be32_to_ip(k.daddr),
                    be16_to_port(k.dport),
                    v.dir,
                    v.state,
                    be32_to_ip(v.nat_addr),
                    be16_to_port(v.nat_port),
                    service_key_of(v.svc.vip, v.svc.port, v.svc.proto),
                    max(0, now - v.last_ns),
                )
            )
        return out

    def flush(self) -> int:
        n = 0
        for k in list(self.ct.keys()):
            try:
                del self.ct[k]
                n += 1
            except KeyError:
                pass
        return n

    def age_once(self) -> int:
        """Delete expired flows (both entries); returns the number of entries removed."""
        now = time.monotonic_ns()
        items = {bytes(k): (k, v) for k, v in self.ct.items()}
        doomed: set[bytes] = set()
        for raw, (k, v) in items.items():
            if raw in doomed or v.dir != abi.DIR_ORIG:
                continue
            peer = self._key(peer_key_fields(k, v))
            pv = items.get(bytes(peer), (None, None))[1]
            last = max(v.last_ns, pv.last_ns) if pv is not None else v.last_ns
            if expired(k.proto, v.state, now - last, self.timeouts):
                doomed.add(raw)
                doomed.add(bytes(peer))
        # REPLY entries whose ORIG entry is gone (LRU eviction) go once they are idle.
        for raw, (k, v) in items.items():
            if v.dir == abi.DIR_REPLY and raw not in doomed:
                orig = self._key(peer_key_fields(k, v))
                if bytes(orig) not in items and expired(k.proto, v.state, now - v.last_ns,
                                                         self.timeouts):
                    doomed.add(raw)
        removed = 0
        for raw in doomed:
            entry = items.get(raw)
            if entry is None:
                continue
            try:
                del self.ct[entry[0]]
                removed += 1
            except KeyError:
                pass
        if removed:
            log.info("conntrack_aged", removed=removed, remaining=len(items) - removed)
        return removed

    def start_aging(self, interval: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.age_once()
                except Exception as e:  # keep aging alive; report and retry next tick
                    log.error("conntrack_aging_failed", error=str(e))

        self._thread = threading.Thread(target=loop, name="ct-aging", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
