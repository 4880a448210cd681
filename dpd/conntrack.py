"""Conntrack: read back, flush, and age ct_v4_map and ct_v6_map (IPv6 services' flows).

ct_v4_map is an LRU hash, so a full table evicts the least recently used flows rather
than refusing new ones (docs/conntrack.md says why); aging removes finished and idle
flows before that happens, each by the timeouts of its service (a service's
ConntrackTimeouts over the node's defaults, xlb-dpd --ct-timeout).
A flow's two entries (ORIG and REPLY) age together: the flow is idle for as long as
its most recently used direction. Entries are decoded by field name with the ABI's
struct xlb_ct_key / xlb_ct_val (IPv6: xlb_ct6_key / xlb_ct6_val, whose embedded IPv4
value `c` carries the state machine, read as IPv4's with the 16-byte addresses put in its
place: one code path for both families, addresses as raw bytes of 4 or 16); the table
works on the map seam (dpd/maps.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import structlog

from dpd.abi import Abi
from dpd.loader import Datapath
from xlbcore.errors import ValidationError, quote
from xlbcore.service import (
    CT_TIMEOUT_FIELDS,
    CtTimeoutsSpec,
    Proto,
    ServiceKey,
    address_bytes,
    is_range,
)

log = structlog.get_logger("dpd.conntrack")

SECOND = 1_000_000_000


def _ntop(raw: bytes) -> str:
    """An address's text from its 4 or 16 bytes."""
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


@dataclass(frozen=True)
class Timeouts:
    """Idle time (ns) after which a flow in a state is removed."""

    tcp_syn: int = 30 * SECOND  # NEW, REPLIED: handshake not finished
    tcp_established: int = 3600 * SECOND
    tcp_closing: int = 60 * SECOND
    tcp_closed: int = 10 * SECOND
    udp_new: int = 30 * SECOND
    udp_established: int = 180 * SECOND

    def over(self, spec: CtTimeoutsSpec | None) -> Timeouts:
        """These timeouts with a service's (seconds; 0: keep this one) over them."""
        if spec is None:
            return self
        values = [getattr(spec, f) for f in CT_TIMEOUT_FIELDS]
        return Timeouts(*[v * SECOND if v else getattr(self, f.name)
                          for v, f in zip(values, fields(self), strict=True)])

    @classmethod
    def parse(cls, items: list[str]) -> Timeouts:
        """From STATE=SECONDS items (xlb-dpd --ct-timeout), STATE one of
        ConntrackTimeouts' fields (tcp_handshake, ..., udp_established)."""
        t = cls()
        names = dict(zip(CT_TIMEOUT_FIELDS, [f.name for f in fields(cls)], strict=True))
        for item in items:
            name, _, value = item.partition("=")
            if name not in names or not value.isdigit() or not 0 < int(value) <= 7 * 86400:
                raise ValidationError(f"--ct-timeout: {quote(item)} is not STATE=SECONDS "
                                      f"(1..604800) with STATE one of {', '.join(names)}")
            t = replace(t, **{names[name]: int(value) * SECOND})
        return t


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
class CtFilter:
    """What ListConntrack/FlushConntrack match: every field set must match a flow."""

    service: ServiceKey | None = None
    endpoint: str = ""  # the endpoint's address
    endpoint_port: int = 0
    client: str = ""
    state: int = 0

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("service", self.service or ""),
                                         ("endpoint", self.endpoint),
                                         ("endpoint_port", self.endpoint_port or ""),
                                         ("client", self.client), ("state", self.state or ""))
                 if v]
        return " ".join(parts)


@dataclass
class CtCounters:
    """Flows removed by dpd since it started (docs/conntrack.md)."""

    expired: int = 0
    flushed: int = 0


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
    nat2_address: str = ""  # full-NAT's second rewrite, IP-in-IP's outer source
    nat2_port: int = 0


class Conntrack:
    def __init__(self, dp: Datapath, timeouts: Timeouts | None = None,
                 clock: Callable[[], int] = time.monotonic_ns,
                 per_service: Callable[[], dict[int, CtTimeoutsSpec]] = dict,
                 least_conn: Callable[[], dict[int, list[int]]] = dict,
                 range_last: Callable[[str, int, Proto], int] = lambda *_: 0) -> None:
        """`clock`: the clock of last_ns (bpf_ktime_get_coarse_ns is CLOCK_MONOTONIC);
        `per_service`: svc_id -> the timeouts of the services that set them;
        `least_conn`: svc_id -> the endpoint slots of each least-connections service;
        `range_last`: (vip, first port, proto) of a port-range service -> its last port
        (a flow's entry records the range's nat_v4_map key: vip, first port, range 1)."""
        self.map = dp.maps["ct_v4_map"]
        self.map6 = dp.maps["ct_v6_map"]
        self.key6 = dp.abi.structs["xlb_ct6_key"].codec
        self.val6 = dp.abi.structs["xlb_ct6_val"].codec
        self._key4_size = dp.abi.structs["xlb_ct_key"].size
        self.per_service = per_service
        self.least_conn = least_conn
        self.range_last = range_last
        self.ep_conn = dp.maps["ep_conn_map"]
        self.counters = CtCounters()
        self.key = dp.abi.structs["xlb_ct_key"].codec
        self.val = dp.abi.structs["xlb_ct_val"].codec
        self.states = States.of(dp.abi)
        self.fnat = dp.abi.const("XLB_CTF_FNAT")
        self.nat2 = self.fnat | dp.abi.const("XLB_CTF_IPIP")
        self.timeouts = timeouts or Timeouts()
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _decoded(self) -> list[tuple[bytes, dict[str, Any], dict[str, Any]]]:
        """Every entry of both maps: (raw key, key, value) decoded, IPv6's as IPv4's
        (_value6)."""
        out = [(k, self.key.unpack(k), self.val.unpack(v)) for k, v in self.map.items()]
        unkey, unval = self.key6.unpack, self.val6.unpack
        out.extend([(k, unkey(k), self._value6(unval(v))) for k, v in self.map6.items()])
        return out

    @staticmethod
    def _value6(v: dict[str, Any]) -> dict[str, Any]:
        """A decoded struct xlb_ct6_val as an IPv4 value: its `c` with the 16-byte
        addresses and the IPv6 service key (range 0: IPv6 services have none) in place."""
        c = v["c"]
        c["nat_addr"], c["nat2_addr"] = v["nat_addr"], v["nat2_addr"]
        c["svc"] = {**v["svc"], "range": 0}
        return c

    def _delete(self, raws: list[bytes]) -> int:
        """Delete entries of either map by their raw keys (the maps' keys differ in
        length)."""
        four = self._key4_size
        v6 = [k for k in raws if len(k) != four]
        if not v6:
            return self.map.delete_batch(raws)
        n = self.map6.delete_batch(v6)
        return n + self.map.delete_batch([k for k in raws if len(k) == four])

    def peer_key(self, k: dict[str, Any], v: dict[str, Any]) -> bytes:
        """The other direction's key, from an entry's decoded key and value (full-NAT:
        the SNAT address and port stand for the client's, nat2_*)."""
        fnat = v["flags"] & self.fnat
        pack = self.key6.pack if len(k["saddr"]) == 16 else self.key.pack
        if v["dir"] == self.states.orig:  # reply: endpoint -> client (SNAT address)
            return pack(saddr=v["nat_addr"], sport=v["nat_port"],
                                 daddr=v["nat2_addr"] if fnat else k["saddr"],
                                 dport=v["nat2_port"] if fnat else k["sport"], proto=k["proto"])
        return pack(saddr=v["nat2_addr"] if fnat else k["daddr"],
                             sport=v["nat2_port"] if fnat else k["dport"],
                             daddr=v["nat_addr"], dport=v["nat_port"],
                             proto=k["proto"])  # original: client -> VIP

    def _matcher(self, f: CtFilter) -> Callable[[dict[str, Any], dict[str, Any]], bool]:
        """A test of one decoded entry (both of a flow's entries answer alike)."""
        orig = self.states.orig
        svc_key = (address_bytes(f.service.vip), f.service.port, int(f.service.proto),
                   int(is_range(f.service.port, f.service.port_last))) \
            if f.service is not None else None
        ep = address_bytes(f.endpoint) if f.endpoint else None
        client = address_bytes(f.client) if f.client else None

        def match(k: dict[str, Any], v: dict[str, Any]) -> bool:
            if f.state and v["state"] != f.state:
                return False
            if svc_key is not None:
                s = v["svc"]
                if (s["vip"], s["port"], s["proto"], s["range"]) != svc_key:
                    return False
            if v["dir"] == orig:  # client -> VIP, rewritten to the endpoint
                e_addr, e_port, c_addr = v["nat_addr"], v["nat_port"], k["saddr"]
            else:  # endpoint -> client (full-NAT: -> SNAT address; the client in nat2)
                e_addr, e_port = k["saddr"], k["sport"]
                c_addr = v["nat2_addr"] if v["flags"] & self.fnat else k["daddr"]
            if ep is not None and (e_addr != ep or (f.endpoint_port
                                                    and e_port != f.endpoint_port)):
                return False
            return client is None or c_addr == client

        return match

    def entries(self, match: CtFilter | None = None) -> list[CtEntry]:
        now = self.clock()
        out = []
        test = self._matcher(match) if match else None
        for _, k, v in self._decoded():
            if test is not None and not test(k, v):
                continue
            svc = v["svc"]
            out.append(CtEntry(
                Proto(k["proto"]), _ntop(k["saddr"]), k["sport"],
                _ntop(k["daddr"]), k["dport"], v["dir"], v["state"],
                _ntop(v["nat_addr"]), v["nat_port"],
                self._service(svc) if svc["proto"] else None,
                max(0, now - v["last_ns"]),
                _ntop(v["nat2_addr"]) if v["flags"] & self.nat2 else "",
                v["nat2_port"] if v["flags"] & self.fnat else 0,
            ))
        return out

    def _service(self, svc: dict[str, Any]) -> ServiceKey:
        """The service of a flow's entry (its xlb_nat_key)."""
        vip, proto = _ntop(svc["vip"]), Proto(svc["proto"])
        last = self.range_last(vip, svc["port"], proto) if svc["range"] else 0
        return ServiceKey(vip, svc["port"], proto, last)

    def count(self) -> int:
        return self.map.count() + self.map6.count()

    def flush(self, match: CtFilter | None = None) -> int:
        """Remove the entries of every flow `match` matches (all without it)."""
        if match is None:
            doomed = [k for k, _ in self.map.items()] + [k for k, _ in self.map6.items()]
        else:
            test = self._matcher(match)
            doomed = [raw for raw, k, v in self._decoded() if test(k, v)]
        n = self._delete(doomed)
        self.counters.flushed += (n + 1) // 2
        return n

    def age_once(self) -> int:
        """Delete expired flows (both entries); returns the number of entries removed.
        A flow is as idle as its most recently used direction; a REPLY entry whose ORIG
        entry is gone (LRU eviction) goes on its own idle time."""
        now = self.clock()
        lc = self.least_conn()
        before = self._conn_counts(lc) if lc else {}
        items = self._decoded()
        last_of = {raw: v["last_ns"] for raw, _, v in items}
        doomed: list[bytes] = []
        flows = 0
        base = self.timeouts
        # svc_id -> its timeouts over the defaults (a firewall pass flow, no service: -1)
        per_service = {i: base.over(spec) for i, spec in self.per_service().items()}
        for raw, k, v in items:
            t = per_service.get(v["svc_id"] if v["svc"]["proto"] else -1, base) \
                if per_service else base
            peer = self.peer_key(k, v)
            peer_last = last_of.get(peer)
            last = v["last_ns"]
            if v["dir"] == self.states.orig:
                if peer_last is not None:
                    last = max(last, peer_last)
                if expired(k["proto"], v["state"], now - last, self.states, t):
                    doomed.append(raw)
                    flows += 1
                    if peer_last is not None:
                        doomed.append(peer)
            elif peer_last is None and expired(k["proto"], v["state"], now - last,
                                               self.states, t):
                doomed.append(raw)
                flows += 1
        removed = self._delete(doomed) if doomed else 0
        if lc:
            self._recount(lc, before, items, set(doomed))
        if removed:
            self.counters.expired += flows
            log.info("conntrack_aged", removed=removed, remaining=len(items) - removed)
        return removed

    def _conn_counts(self, lc: dict[int, list[int]]) -> dict[int, int]:
        """ep_conn_map's counts of the endpoints of `lc`."""
        out = {}
        for ids in lc.values():
            for sid in ids:
                raw = self.ep_conn.get(sid.to_bytes(4, "little"))
                out[sid] = int.from_bytes(raw, "little") if raw else 0
        return out

    def _recount(self, lc: dict[int, list[int]], before: dict[int, int],
                 items: list[tuple[bytes, dict[str, Any], dict[str, Any]]],
                 doomed: set[bytes]) -> None:
        """Least connections: set each endpoint's active flows (ep_conn_map, which the
        datapath increments as it opens flows) to the live flows this sweep saw (ORIG
        entries neither closed nor aged out), plus the increments made since the sweep
        began (flows opened meanwhile may be counted twice until the next sweep: an
        over-count of at most one sweep's new flows, never a drift that stays)."""
        live: dict[int, int] = dict.fromkeys(before, 0)
        orig, closed = self.states.orig, self.states.closed
        for raw, _, v in items:
            if v["dir"] == orig and v["svc_id"] in lc and v["state"] != closed \
                    and raw not in doomed and v["stat_id"] in live:
                live[v["stat_id"]] += 1
        after = self._conn_counts(lc)
        keys, vals = [], []
        for sid, n in live.items():
            n += max(0, after.get(sid, 0) - before.get(sid, 0))
            keys.append(sid.to_bytes(4, "little"))
            vals.append(min(n, 0xFFFFFFFF).to_bytes(4, "little"))
        self.ep_conn.put_batch(keys, vals)

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
