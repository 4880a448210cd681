"""Conntrack: read back, flush, and age ct_v4_map.

ct_v4_map is an LRU hash, so a full table evicts the least recently used flows rather
than refusing new ones; aging removes finished and idle flows before that happens.
A flow's two entries (ORIG and REPLY) age together: the flow is idle for as long as
its most recently used direction. Entries are decoded by field name with the ABI's
struct xlb_ct_key / xlb_ct_val; the table works on the map seam (dpd/maps.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from dpd.abi import Abi
from dpd.loader import Datapath
from xlbcore.service import Proto, ServiceKey

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


@dataclass(frozen=True)
class States:
    """The conntrack state and direction numbers of the ABI (XLB_CT_*, XLB_DIR_*)."""

    est: int
    closing: int
    closed: int
    orig: int
    reply: int

    @classmethod
    def of(cls, abi: Abi) -> States:
        c = abi.const
        return cls(c("XLB_CT_EST"), c("XLB_CT_CLOSING"), c("XLB_CT_CLOSED"),
                   c("XLB_DIR_ORIG"), c("XLB_DIR_REPLY"))


def expired(proto: int, state: int, idle_ns: int, s: States, t: Timeouts) -> bool:
    if proto == Proto.UDP:
        limit = t.udp_established if state == s.est else t.udp_new
    elif state == s.est:
        limit = t.tcp_established
    elif state == s.closing:
        limit = t.tcp_closing
    elif state == s.closed:
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
    service: ServiceKey | None  # None: a flow the firewall passed (no service)
    idle_ns: int


class Conntrack:
    def __init__(self, dp: Datapath, timeouts: Timeouts | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        """`clock`: the clock of last_ns (bpf_ktime_get_coarse_ns is CLOCK_MONOTONIC)."""
        self.map = dp.maps["ct_v4_map"]
        self.key = dp.abi.structs["xlb_ct_key"].codec
        self.val = dp.abi.structs["xlb_ct_val"].codec
        self.states = States.of(dp.abi)
        self.timeouts = timeouts or Timeouts()
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _decoded(self) -> list[tuple[bytes, dict[str, Any], dict[str, Any]]]:
        return [(k, self.key.unpack(k), self.val.unpack(v)) for k, v in self.map.items()]

    def peer_key(self, k: dict[str, Any], v: dict[str, Any]) -> bytes:
        """The other direction's key, from an entry's decoded key and value."""
        if v["dir"] == self.states.orig:  # reply: endpoint -> client
            return self.key.pack(saddr=v["nat_addr"], daddr=k["saddr"], sport=v["nat_port"],
                                 dport=k["sport"], proto=k["proto"])
        return self.key.pack(saddr=k["daddr"], daddr=v["nat_addr"], sport=k["dport"],
                             dport=v["nat_port"], proto=k["proto"])  # original: client -> VIP

    def entries(self) -> list[CtEntry]:
        now = self.clock()
        out = []
        for _, k, v in self._decoded():
            svc = v["svc"]
            out.append(CtEntry(
                Proto(k["proto"]), socket.inet_ntoa(k["saddr"]), k["sport"],
                socket.inet_ntoa(k["daddr"]), k["dport"], v["dir"], v["state"],
                socket.inet_ntoa(v["nat_addr"]), v["nat_port"],
                ServiceKey(socket.inet_ntoa(svc["vip"]), svc["port"], Proto(svc["proto"]))
                if svc["proto"] else None,
                max(0, now - v["last_ns"]),
            ))
        return out

    def count(self) -> int:
        return self.map.count()

    def flush(self) -> int:
        return self.map.delete_batch([k for k, _ in self.map.items()])

    def age_once(self) -> int:
        """Delete expired flows (both entries); returns the number of entries removed.
        A flow is as idle as its most recently used direction; a REPLY entry whose ORIG
        entry is gone (LRU eviction) goes on its own idle time."""
        now = self.clock()
        items = self._decoded()
        last_of = {raw: v["last_ns"] for raw, _, v in items}
        doomed: list[bytes] = []
        for raw, k, v in items:
            peer = self.peer_key(k, v)
            peer_last = last_of.get(peer)
            last = v["last_ns"]
            if v["dir"] == self.states.orig:
                if peer_last is not None:
                    last = max(last, peer_last)
                if expired(k["proto"], v["state"], now - last, self.states, self.timeouts):
                    doomed.append(raw)
                    if peer_last is not None:
                        doomed.append(peer)
            elif peer_last is None and expired(k["proto"], v["state"], now - last,
                                               self.states, self.timeouts):
                doomed.append(raw)
        removed = self.map.delete_batch(doomed) if doomed else 0
        if removed:
            log.info("conntrack_aged", removed=removed, remaining=len(items) - removed)
        return removed

    def start_aging(self, interval: float) -> None:
        """Sweep every `interval` seconds, or every 4x the last sweep's duration if longer,
        so that a huge table costs at most a quarter of a core (1M entries: ~3 s)."""

        def loop() -> None:
            wait = interval
            while not self._stop.wait(wait):
                t0 = time.monotonic()
                try:
                    self.age_once()
                except Exception as e:  # keep aging alive; report and retry next tick
                    log.error("conntrack_aging_failed", error=str(e))
                wait = max(interval, 4 * (time.monotonic() - t0))

        self._thread = threading.Thread(target=loop, name="ct-aging", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=1)
