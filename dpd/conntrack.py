"""Conntrack: read back, flush, and age ct_v4_map.

ct_v4_map is an LRU hash, so a full table evicts the least recently used flows rather
than refusing new ones; aging removes finished and idle flows before that happens.
A flow's two entries (ORIG and REPLY) age together: the flow is idle for as long as
its most recently used direction."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from dpd import abi, bpfsys
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


# struct xlb_ct_key / struct xlb_ct_val (bpf/xlb_abi.h), raw
KEY = struct.Struct("=4s4sHHBxxx")
VAL = struct.Struct("=4sHBBIII4xQ4sHBx")


def peer_key(key: bytes, val: tuple[Any, ...]) -> bytes:
    """The other direction's key, from an entry's raw key and unpacked value."""
    saddr, daddr, sport, dport, proto = KEY.unpack(key)
    nat_addr, nat_port, direction = val[0], val[1], val[2]
    if direction == abi.DIR_ORIG:  # reply: endpoint -> client
        return KEY.pack(nat_addr, saddr, nat_port, sport, proto)
    return KEY.pack(daddr, nat_addr, dport, nat_port, proto)  # original: client -> VIP


class Conntrack:
    def __init__(self, dp: Any, timeouts: Timeouts | None = None) -> None:
        self.fd = dp.table("ct_v4_map").map_fd
        self.timeouts = timeouts or Timeouts()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _raw(self) -> dict[bytes, tuple[Any, ...]]:
        return {k: VAL.unpack(v) for k, v in
                bpfsys.lookup_batch(self.fd, abi.CT_KEY_SIZE, abi.CT_VAL_SIZE)}

    def entries(self) -> list[CtEntry]:
        now = time.monotonic_ns()
        out = []
        for k, v in self._raw().items():
            saddr, daddr, sport, dport, proto = KEY.unpack(k)
            nat_addr, nat_port, direction, state, _sid, _eid, _fl, last, vip, vport, vproto = v
            out.append(CtEntry(
                Proto(proto), socket.inet_ntoa(saddr), socket.ntohs(sport),
                socket.inet_ntoa(daddr), socket.ntohs(dport), direction, state,
                socket.inet_ntoa(nat_addr), socket.ntohs(nat_port),
                ServiceKey(socket.inet_ntoa(vip), socket.ntohs(vport), Proto(vproto)),
                max(0, now - last),
            ))
        return out

    def flush(self) -> int:
        return bpfsys.delete_batch(self.fd, list(self._raw()))

    def age_once(self) -> int:
        """Delete expired flows (both entries); returns the number of entries removed.
        A flow is as idle as its most recently used direction; a REPLY entry whose ORIG
        entry is gone (LRU eviction) goes on its own idle time."""
        now = time.monotonic_ns()
        items = self._raw()
        doomed: list[bytes] = []
        for k, v in items.items():
            direction, state, last = v[2], v[3], v[7]
            peer = peer_key(k, v)
            pv = items.get(peer)
            if direction == abi.DIR_ORIG:
                if pv is not None:
                    last = max(last, pv[7])
                if expired(k[12], state, now - last, self.timeouts):
                    doomed.append(k)
                    if pv is not None:
                        doomed.append(peer)
            elif pv is None and expired(k[12], state, now - last, self.timeouts):
                doomed.append(k)
        removed = bpfsys.delete_batch(self.fd, doomed) if doomed else 0
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
            self._thread.join(timeout=5)
