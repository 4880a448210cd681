"""Events: trapped packets and datapath events from the ``pkt_ring`` ring buffer, health
changes from the prober, fanned out to any number of WatchEvents streams.

- ``Ring`` reads a BPF ring buffer through its mmap (no bcc, no LLVM in the daemon):
  the consumer position page (read-write), then the producer position page and the data
  pages (read-only, mapped twice so that a record never wraps). Records carry an 8-byte
  header (length with the BUSY and DISCARD bits, page offset), 8-byte aligned.
- ``EventHub`` fans events out: each subscriber has its own bounded queue; an event that
  does not fit is dropped for that subscriber only and counted, and the subscriber's next
  read yields a DROPPED event with the count before anything else. A slow client costs
  its own queue (``QUEUE`` events), never dpd's memory or another client's events.
- ``EventReader`` is the thread that drains the ring: at most ``rate`` events a second
  are decoded and published (a token bucket); the rest are consumed undecoded and counted
  (``shed``), and every subscriber gets one DROPPED event a second with their number while
  shedding lasts. A flood of traps thus costs dpd a bounded share of one CPU and a
  bounded amount of memory; the ring itself (1 MiB) drops what dpd does not drain in time
  (the datapath counts ``event_lost``).
"""

from __future__ import annotations

import collections
import ipaddress
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from xlb.types.v1 import types_pb2 as tpb

log = structlog.get_logger("dpd.events")

QUEUE = 1024  # events per subscriber
MAX_WATCHERS = 4  # of dpd's 8 handler threads: the rest stay for the other RPCs
RATE = 2000  # events decoded per second (the rest are shed, counted)

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
PAGE = mmap.PAGESIZE

KIND_NAMES = {k: v for v, k in tpb.EventKind.items()}


# -- the ring -----------------------------------------------------------------------------

class Ring:
    """A BPF_MAP_TYPE_RINGBUF consumer on the map's fd (`size`: its max_entries)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.mask = size - 1
        self._cons = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=0)
        self._prod = mmap.mmap(fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=PAGE)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def wait(self, timeout: float) -> None:
        self._poll.poll(int(timeout * 1000))

    def drain(self, handle: Callable[[memoryview], None], limit: int = 4096) -> int:
        """Hand each committed record to `handle` (a view valid during the call), at most
        `limit`; returns how many."""
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        n = 0
        view = memoryview(self._prod)
        try:
            while cons < prod and n < limit:
                off = PAGE + (cons & self.mask)
                length = struct.unpack_from("<I", self._prod, off)[0]
                if length & _BUSY:
                    break  # reserved, not committed yet
                if not length & _DISCARD:
                    handle(view[off + _HDR: off + _HDR + (length & ~(_BUSY | _DISCARD))])
                    n += 1
                cons += (((length & ~(_BUSY | _DISCARD)) + _HDR + 7) // 8) * 8
                struct.pack_into("<Q", self._cons, 0, cons)
        finally:
            view.release()
        return n

    def close(self) -> None:
        self._cons.close()
        self._prod.close()


# -- decoding -----------------------------------------------------------------------------

_TCP_FLAGS = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")


def decode_headers(raw: bytes, into: Any) -> None:
    """Fill a PacketHeaders message from an Ethernet frame's first bytes (VLAN tags,
    IPv4, IPv6 fixed header, TCP/UDP/SCTP ports, TCP flags, ICMP type and code); stops quietly
    where the bytes end."""
    off = 12
    if len(raw) < off + 2:
        return
    etype = int.from_bytes(raw[off:off + 2], "big")
    off += 2
    while etype in (0x8100, 0x88A8) and len(raw) >= off + 4:
        etype = int.from_bytes(raw[off + 2:off + 4], "big")
        off += 4
    if etype == 0x0800 and len(raw) >= off + 20:
        ihl = (raw[off] & 0x0F) * 4
        proto = raw[off + 9]
        into.src = str(ipaddress.IPv4Address(raw[off + 12:off + 16]))
        into.dst = str(ipaddress.IPv4Address(raw[off + 16:off + 20]))
        frag = int.from_bytes(raw[off + 6:off + 8], "big") & 0x1FFF
        l4 = off + max(ihl, 20)
        if frag:
            proto_l4 = -1  # a later fragment: no L4 header
        else:
            proto_l4 = proto
    elif etype == 0x86DD and len(raw) >= off + 40:
        proto = proto_l4 = raw[off + 6]
        into.src = str(ipaddress.IPv6Address(raw[off + 8:off + 24]))
        into.dst = str(ipaddress.IPv6Address(raw[off + 24:off + 40]))
        l4 = off + 40
    else:
        return
    into.ip_protocol = proto
    if proto_l4 in (6, 17, 132) and len(raw) >= l4 + 4:  # SCTP's common header: ports first
        into.src_port = int.from_bytes(raw[l4:l4 + 2], "big")
        into.dst_port = int.from_bytes(raw[l4 + 2:l4 + 4], "big")
        if proto_l4 == 6 and len(raw) >= l4 + 14:
            bits = raw[l4 + 13]
            into.tcp_flags.extend(n for i, n in enumerate(_TCP_FLAGS) if bits & (1 << i))
    elif proto_l4 in (1, 58) and len(raw) >= l4 + 2:
        into.icmp_type, into.icmp_code = raw[l4], raw[l4 + 1]


# -- fan-out ------------------------------------------------------------------------------

@dataclass
class Subscription:
    kinds: frozenset[int]  # empty: every kind
    maxlen: int = QUEUE
    queue: collections.deque[tpb.Event] = field(default_factory=collections.deque)
    dropped: int = 0  # events lost since the last DROPPED event this subscriber got
    closed: bool = False

    def wants(self, kind: int) -> bool:
        return not self.kinds or kind in self.kinds


class TooManyWatchers(Exception):
    pass


class EventHub:
    def __init__(self, max_watchers: int = MAX_WATCHERS, queue: int = QUEUE) -> None:
        self.max_watchers = max_watchers
        self.queue = queue
        self._subs: list[Subscription] = []
        self._cond = threading.Condition()
        self.published = 0

    def subscribe(self, kinds: Iterable[int] = ()) -> Subscription:
        with self._cond:
            if len(self._subs) >= self.max_watchers:
                raise TooManyWatchers(f"{self.max_watchers} event watchers already")
            sub = Subscription(frozenset(kinds), self.queue)
            self._subs.append(sub)
            return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._cond:
            sub.closed = True
            if sub in self._subs:
                self._subs.remove(sub)
            self._cond.notify_all()

    def watchers(self) -> int:
        with self._cond:
            return len(self._subs)

    def publish(self, ev: tpb.Event) -> None:
        with self._cond:
            self.published += 1
            for sub in self._subs:
                if not sub.wants(ev.kind):
                    continue
                if len(sub.queue) >= sub.maxlen:
                    sub.dropped += 1
                else:
                    sub.queue.append(ev)
            self._cond.notify_all()

    def lost(self, count: int) -> None:
        """`count` events were shed before reaching any queue: every subscriber hears."""
        with self._cond:
            for sub in self._subs:
                sub.dropped += count
            self._cond.notify_all()

    def next(self, sub: Subscription, timeout: float) -> tpb.Event | None:
        """The subscriber's next event (a DROPPED event first when it lost some), or None
        after `timeout` seconds or once unsubscribed."""
        with self._cond:
            deadline = time.monotonic() + timeout
            while not sub.closed:
                if sub.dropped:
                    n, sub.dropped = sub.dropped, 0
                    return tpb.Event(kind=tpb.EVENT_KIND_DROPPED, time_unix_ns=time.time_ns(),
                                     count=n, reason=f"dropped {n}")
                if sub.queue:
                    return sub.queue.popleft()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return None

    def follow(self, sub: Subscription, alive: Callable[[], bool],
               poll: float = 0.5) -> Iterator[tpb.Event]:
        """Events for one stream until `alive()` turns false; unsubscribes at the end."""
        try:
            while alive() and not sub.closed:
                ev = self.next(sub, poll)
                if ev is not None:
                    yield ev
        finally:
            self.unsubscribe(sub)

    def close(self) -> None:
        with self._cond:
            for sub in self._subs:
                sub.closed = True
            self._subs.clear()
            self._cond.notify_all()


def health_event(ev: dict[str, Any]) -> tpb.Event:
    """dpd.health's endpoint_health event as an Event."""
    return tpb.Event(kind=tpb.EVENT_KIND_HEALTH, time_unix_ns=time.time_ns(),
                     service=ev.get("service", ""), endpoint=ev.get("endpoint", ""),
                     state=ev.get("state", ""),
                     reason=f"{ev.get('previous', '')} -> {ev.get('state', '')}"
                     + (f": {ev['reason']}" if ev.get("reason") else ""))


# -- the reader thread --------------------------------------------------------------------

@dataclass
class Names:
    """How the reader names what the datapath gives by number."""

    interface: Callable[[int], str | None]
    rule: Callable[[int], str | None]
    policer: Callable[[int], str | None]
    policer_dropped: Callable[[int], int]
    stat: Callable[[int], str | None]


class EventReader:
    def __init__(self, ring: Ring, hub: EventHub, layout: Any, consts: dict[str, int],
                 names: Names, rate: int = RATE) -> None:
        self.ring = ring
        self.hub = hub
        self.codec = layout.codec
        self.size = layout.size
        self.names = names
        self.k = {"trap": consts["XLB_EV_TRAP"], "refused": consts["XLB_EV_FLOW_REFUSED"],
                  "policer": consts["XLB_EV_POLICER_DROP"]}
        self.rate = rate
        self._tokens = float(rate)
        self._last = time.monotonic()
        self._shed_pending = 0
        self._shed_reported = 0.0
        self.shed = 0  # events consumed undecoded (over the rate)
        self.read = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # ktime (CLOCK_MONOTONIC) -> wall clock
        self._offset = time.time_ns() - time.monotonic_ns()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dpd-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.ring.wait(0.2)
                self.poll_once()
            except Exception as e:  # never let a bad record stop the reader
                log.error("event_reader_failed", error=str(e))
                time.sleep(0.2)

    def poll_once(self) -> int:
        now = time.monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now
        n = self.ring.drain(self._handle)
        if self._shed_pending and now - self._shed_reported >= 1.0:
            self.hub.lost(self._shed_pending)
            log.warning("events_shed", count=self._shed_pending, total=self.shed)
            self._shed_pending = 0
            self._shed_reported = now
        return n

    def _handle(self, rec: memoryview) -> None:
        self.read += 1
        if self._tokens < 1:
            self.shed += 1
            self._shed_pending += 1
            return
        self._tokens -= 1
        ev = self.decode(bytes(rec[:self.size]))
        if ev is not None:
            self.hub.publish(ev)

    def decode(self, raw: bytes) -> tpb.Event | None:
        r = self.codec.unpack(raw)
        kind = r["kind"]
        ev = tpb.Event(time_unix_ns=r["time_ns"] + self._offset)
        ifname = self.names.interface(r["ifindex"]) if r["ifindex"] else None
        ev.interface = ifname or (f"ifindex {r['ifindex']}" if r["ifindex"] else "")
        if kind == self.k["trap"]:
            ev.kind = tpb.EVENT_KIND_TRAP
            data = bytes(r["data"])[:r["cap_len"]]
            ev.raw = data
            ev.packet_length = r["pkt_len"]
            ev.reason = self.names.rule(r["id"]) or f"rule {r['id']}"
            decode_headers(data, ev.packet)
        elif kind == self.k["refused"]:
            ev.kind = tpb.EVENT_KIND_FLOW_REFUSED
            ev.reason = self.names.stat(r["id"]) or f"stat {r['id']}"
        elif kind == self.k["policer"]:
            ev.kind = tpb.EVENT_KIND_POLICER_DROP
            ev.policer = self.names.policer(r["id"]) or f"policer {r['id']}"
            ev.count = self.names.policer_dropped(r["id"])
        else:
            log.warning("event_unknown_kind", kind=kind)
            return None
        return ev


def open_ring(pin: str) -> Ring | None:
    """The pinned ring of a kernel datapath (None when the build has none)."""
    from dpd import bpfsys

    if not os.path.exists(pin):
        return None
    fd = bpfsys.obj_get(pin)
    size = bpfsys.map_info(fd).max_entries
    return Ring(fd, size)


class NodeEvents:
    """A node's event hub: the ring's reader (kernel datapath) and the prober's health
    changes."""

    def __init__(self, node: Any) -> None:
        self.hub = EventHub()
        self.reader: EventReader | None = None
        self._rules: tuple[int, dict[int, str]] = (-1, {})
        self._node = node
        node.health.on_event = lambda ev: self.hub.publish(health_event(ev))
        if node.dp.kind != "kernel":
            return
        ring = open_ring(node.dp.pin("pkt_ring"))
        if ring is None:
            log.warning("event_ring_missing", pin=node.dp.pin("pkt_ring"))
            return
        abi = node.dp.abi
        stats = abi.stat_names()
        names = Names(interface=node.firewall.links.name, rule=self._rule_name,
                      policer=node.policers.name_of, policer_dropped=self._policer_dropped,
                      stat=stats.get)
        self.reader = EventReader(ring, self.hub, abi.structs["xlb_event"], abi.constants,
                                  names)
        self.reader.start()

    def _rule_name(self, rule_id: int) -> str | None:
        fw = self._node.firewall
        gen = fw.generation
        if self._rules[0] != gen:
            self._rules = (gen, {r.rule_id: r.name for r in fw.rules()})
        return self._rules[1].get(rule_id)

    def _policer_dropped(self, pid: int) -> int:
        return self._node.policers.dropped(pid).packets

    def close(self) -> None:
        if self.reader is not None:
            self.reader.stop()
            self.reader.ring.close()
            os.close(self.reader.ring.fd)
        self.hub.close()
