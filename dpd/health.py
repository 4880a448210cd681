"""Endpoint health: probe the endpoints of services that have a health check, and take
an endpoint out of selection (new flows only) while it fails (docs/health.md).

- ``Tracker`` is the state machine of one endpoint, pure: UNKNOWN (selectable) until the
  first verdict; UP -> DOWN after ``fall`` consecutive failures, DOWN -> UP after
  ``rise`` consecutive successes; one success in UNKNOWN is UP, ``fall`` failures DOWN.
  Counts are consecutive, so an endpoint that flaps (fails, then answers) never reaches
  ``fall`` and stays where it is.
- ``HealthMonitor`` keeps one target per (address, port probed, check): services that
  share an endpoint and a check share its probes and its state. One scheduler thread
  runs every probe on non-blocking sockets and a selector (no thread per probe), each
  target every ``interval_ms`` from the start of its last probe, at most ``max_inflight``
  probes at a time (a probe that would exceed it waits; one started more than a tenth of
  its interval late, for that or for want of CPU, is counted as deferred). A
  probe that has no answer within ``timeout_ms`` failed.
- A state change rewrites the services it concerns (ServiceTable.set_down: the slot
  and Maglev tables without the endpoint; the configured weights stay), is logged as an
  ``endpoint_health`` event, counted, and handed to ``on_event`` (the hook for a
  WatchEvents stream).

Probes run in dpd's network namespace (the thread inherits it). TCP: a connect (closed
with an RST: no TIME_WAIT); HTTP: a connect, ``GET path HTTP/1.0``, the status line;
UDP: a connected datagram socket, the request, a reply starting with the expected bytes
(an ICMP port unreachable fails it at once); ICMP: one raw socket for every echo (dpd
is root), or an unprivileged ICMP datagram socket where ping_group_range allows.
IPv6 endpoints get the same probes over AF_INET6 sockets; their echo is ICMPv6's (one
more shared socket, the kernel computing the ICMPv6 checksum).
"""

from __future__ import annotations

import enum
import errno
import heapq
import itertools
import operator
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from xlbcore.service import HealthKind, HealthSpec, ServiceKey, ServiceSpec

log = structlog.get_logger("dpd.health")

_HEALTH = operator.attrgetter("health")

MAX_INFLIGHT = 512  # probes in flight (each holds a socket; ICMP shares one)


class State(enum.IntEnum):
    """Values match xlb.types.v1.HealthState."""

    UNKNOWN = 1
    UP = 2
    DOWN = 3


@dataclass
class Tracker:
    """One endpoint's health: consecutive successes and failures, and the verdict."""

    rise: int
    fall: int
    state: State = State.UNKNOWN
    ok: int = 0  # consecutive successes
    bad: int = 0  # consecutive failures
    since_ns: int = 0  # wall clock (ns) of the last change
    reason: str = ""  # the last failure's error

    def record(self, success: bool, reason: str = "", now_ns: int = 0) -> State | None:
        """Count one probe's result; returns the previous state if the state changed."""
        before = self.state
        if success:
            self.bad, self.ok = 0, self.ok + 1
            if before == State.UNKNOWN or (before == State.DOWN and self.ok >= self.rise):
                self.state = State.UP
                self.reason = ""
        else:
            self.ok, self.bad = 0, self.bad + 1
            self.reason = reason
            if before != State.DOWN and self.bad >= self.fall:
                self.state = State.DOWN
        if self.state == before:
            return None
        self.since_ns = now_ns
        return before

    @property
    def selectable(self) -> bool:
        return self.state != State.DOWN


@dataclass(frozen=True)
class EndpointHealth:
    address: str
    port: int
    state: State
    reason: str
    since_ms: int


TargetKey = tuple[str, int, HealthSpec]  # address, port probed, check


@dataclass(eq=False)
class _Target:
    key: TargetKey
    tracker: Tracker
    services: set[ServiceKey] = field(default_factory=set)
    alive: bool = True
    probe: _Probe | None = None  # in flight


@dataclass
class Counters:
    probes: int = 0
    failures: int = 0
    went_down: int = 0
    went_up: int = 0
    deferred: int = 0


_seq = itertools.count()


class _Probe:
    """One probe in flight; the monitor calls ``on_ready`` when its socket is ready and
    ``finish`` with the verdict."""

    sock: socket.socket | None = None

    def __init__(self, target: _Target, deadline: float) -> None:
        self.target = target
        self.deadline = deadline
        self.done = False
        self.seq = next(_seq)

    def on_ready(self, mask: int) -> tuple[bool, str] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _rst_socket(kind: int, address: str) -> socket.socket:
    s = socket.socket(_family(address), kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if kind == socket.SOCK_STREAM:  # close with an RST: no TIME_WAIT per probe
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return s


class _TcpProbe(_Probe):
    """A connect; HTTP: then the request and the status line."""

    def __init__(self, target: _Target, deadline: float) -> None:
        super().__init__(target, deadline)
        address, port, spec = target.key
        self.http = spec.kind == HealthKind.HTTP
        self.buf = b""
        self.sent = False
        self.sock = _rst_socket(socket.SOCK_STREAM, address)
        err = self.sock.connect_ex((address, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        host = f"[{address}]" if ":" in address else address
        self.request = (f"GET {spec.http_path} HTTP/1.0\r\nHost: {host}\r\n"
                        "User-Agent: xlb-health\r\nConnection: close\r\n\r\n").encode()
        self.status = spec.http_status

    def on_ready(self, mask: int) -> tuple[bool, str] | None:
        assert self.sock is not None
        if not self.sent:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return False, os.strerror(err)
            if not self.http:
                return True, ""
            self.sock.send(self.request)  # small: fits an empty socket buffer
            self.sent = True
            return None
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return None
        except OSError as e:
            return False, e.strerror or str(e)
        self.buf += data
        line, nl, _ = self.buf.partition(b"\r\n")
        if not nl and data and len(self.buf) < 4096:
            return None  # the status line is not complete yet
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return False, "no HTTP status line"
        got = int(parts[1])
        return (True, "") if got == self.status else (False, f"HTTP status {got}")

    @property
    def events(self) -> int:
        return selectors.EVENT_READ if self.sent else selectors.EVENT_WRITE


class _UdpProbe(_Probe):
    def __init__(self, target: _Target, deadline: float) -> None:
        super().__init__(target, deadline)
        address, port, spec = target.key
        self.expect = spec.udp_expect
        self.sock = _rst_socket(socket.SOCK_DGRAM, address)
        self.sock.connect((address, port))
        self.sock.send(spec.udp_request)

    def on_ready(self, mask: int) -> tuple[bool, str] | None:
        assert self.sock is not None
        try:
            data = self.sock.recv(2048)
        except BlockingIOError:
            return None
        except OSError as e:  # ECONNREFUSED: an ICMP port unreachable came back
            return False, e.strerror or str(e)
        if data.startswith(self.expect):
            return True, ""
        return False, "unexpected reply"

    events = selectors.EVENT_READ


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class _Pinger:
    """One ICMP socket for every echo probe: raw (root) or an unprivileged datagram
    socket; replies are matched to probes by (address, sequence). `v6`: ICMPv6 (echo
    request 128, reply 129; the kernel fills the checksum, no IP header is read)."""

    def __init__(self, v6: bool = False) -> None:
        family, proto = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6
                         else (socket.AF_INET, socket.IPPROTO_ICMP))
        self.v6 = v6
        self.request, self.reply = (128, 129) if v6 else (8, 0)
        try:
            self.sock = socket.socket(family, socket.SOCK_RAW, proto)
            self.raw = True
        except PermissionError:
            self.sock = socket.socket(family, socket.SOCK_DGRAM, proto)
            self.raw = False
        self.sock.setblocking(False)
        self.ident = random.getrandbits(16)
        self.seq = 0
        self.pending: dict[tuple[str, int], _IcmpProbe] = {}

    def send(self, probe: _IcmpProbe, address: str) -> None:
        self.seq = (self.seq + 1) & 0xFFFF
        payload = b"xlb-health" + struct.pack("!Q", probe.seq)
        head = struct.pack("!BBHHH", self.request, 0, 0, self.ident, self.seq)
        csum = 0 if self.v6 else _checksum(head + payload)  # ICMPv6: the kernel's
        self.sock.sendto(struct.pack("!BBHHH", self.request, 0, csum, self.ident, self.seq)
                         + payload, (address, 0))
        probe.key = (address, self.seq)
        self.pending[probe.key] = probe

    def receive(self) -> list[_IcmpProbe]:
        """The probes answered by what the socket holds."""
        out: list[_IcmpProbe] = []
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
                src = peer[0]
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                return out
            if self.raw and not self.v6:
                data = data[(data[0] & 0x0F) * 4:]
            if len(data) < 8 or data[0] != self.reply:  # echo replies only
                continue
            ident, seq = struct.unpack("!HH", data[4:8])
            if self.raw and ident != self.ident:
                continue  # someone else's ping (an unprivileged socket's id is the kernel's)
            probe = self.pending.pop((src, seq), None)
            if probe is not None:
                out.append(probe)

    def forget(self, probe: _IcmpProbe) -> None:
        if probe.key is not None:
            self.pending.pop(probe.key, None)

    def close(self) -> None:
        self.sock.close()


class _IcmpProbe(_Probe):
    key: tuple[str, int] | None = None

    def on_ready(self, mask: int) -> tuple[bool, str] | None:  # answered via the pinger
        return True, ""


class HealthMonitor:
    """Probes the endpoints of every service with a health check; see the module doc.

    `clock` is the monotonic clock of the schedule (seconds), `wall` the wall clock of
    ``since`` (ns); `apply(changes)` is ServiceTable.set_down."""

    def __init__(self, apply: Callable[[dict[ServiceKey, frozenset[tuple[str, int]]]], int],
                 max_inflight: int = MAX_INFLIGHT,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], int] = time.time_ns,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._apply = apply
        self.max_inflight = max_inflight
        self.clock, self.wall = clock, wall
        self.on_event = on_event
        self.counters = Counters()
        self.generation = 0  # +1 on every endpoint state change
        self._lock = threading.RLock()
        self._services: dict[ServiceKey, tuple[HealthSpec, tuple[tuple[str, int], ...]]] = {}
        self._targets: dict[TargetKey, _Target] = {}
        self._due: list[tuple[float, int, _Target]] = []  # (when, seq, target)
        self._deadlines: list[tuple[float, int, _Probe]] = []
        self._inflight = 0
        self._dirty: set[ServiceKey] = set()
        self._sel: selectors.BaseSelector | None = None
        self._pingers: dict[bool, _Pinger] = {}  # IPv6?  -> its echo socket
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- configuration (gRPC threads) -----------------------------------------------

    @staticmethod
    def _target_keys(spec: HealthSpec, eps: tuple[tuple[str, int], ...]) -> list[TargetKey]:
        return [(a, 0 if spec.kind == HealthKind.ICMP else (spec.port or p), spec)
                for a, p in eps]

    def update(self, specs: Iterable[ServiceSpec],
               down: Callable[[ServiceKey], frozenset[tuple[str, int]]] | None = None) -> None:
        """Services put (new or replaced): start, change or stop their probes. `down`:
        the endpoints each service has out of selection already (a restarted dpd reads
        them back): their new targets start DOWN, so they come back after `rise`
        successes, not at once."""
        specs = list(specs)
        if not self._services and not any(map(_HEALTH, specs)):
            return  # nothing checked before or now: the common case, no work
        with self._lock:
            for spec in specs:
                self._set(spec.key, spec.health, tuple((ep.address, ep.port)
                                                       for ep in spec.endpoints),
                          down(spec.key) if down is not None and spec.health else frozenset())
            self._flush()
        self._wake()

    def remove(self, keys: Iterable[ServiceKey]) -> None:
        """Services deleted."""
        if not self._services:
            return
        with self._lock:
            for key in keys:
                self._set(key, None, ())
                self._dirty.discard(key)  # a deleted service needs no rewrite

    def _set(self, key: ServiceKey, health: HealthSpec | None,
             eps: tuple[tuple[str, int], ...],
             down: frozenset[tuple[str, int]] = frozenset()) -> None:
        """Point `key` at the targets of (health, eps), creating those missing; targets
        the service keeps (same endpoint and check) keep their state."""
        now = (health, eps) if health is not None else None
        was = self._services.get(key)
        if was == now:
            return
        if now is not None:
            assert health is not None
            self._services[key] = now
            start = self.clock()
            for tk, ep in zip(self._target_keys(health, eps), eps, strict=True):
                t = self._targets.get(tk)
                if t is None:
                    t = self._targets[tk] = _Target(tk, Tracker(
                        health.rise, health.fall,
                        State.DOWN if ep in down else State.UNKNOWN, since_ns=self.wall(),
                        reason="down before dpd started" if ep in down else ""))
                    # spread first probes over the interval: no burst after a bulk put
                    first = start + random.random() * health.interval_ms / 1000
                    heapq.heappush(self._due, (first, next(_seq), t))
                t.services.add(key)
        else:
            self._services.pop(key, None)
        if was is not None:
            keep = set(self._target_keys(health, eps)) if health is not None else set()
            for tk in self._target_keys(was[0], was[1]):
                t = self._targets.get(tk)
                if t is not None and tk not in keep:
                    t.services.discard(key)
                    if not t.services:
                        self._drop(t)
        self._dirty.add(key)  # health off: every endpoint back in selection

    def _drop(self, t: _Target) -> None:
        t.alive = False
        del self._targets[t.key]
        if t.probe is not None:
            self._end(t.probe)

    # -- reading -------------------------------------------------------------------

    def status(self, key: ServiceKey) -> list[EndpointHealth]:
        """Each endpoint's health in the service's endpoint order; [] without a check."""
        with self._lock:
            held = self._services.get(key)
            if held is None:
                return []
            spec, eps = held
            out = []
            for tk, (address, port) in zip(self._target_keys(spec, eps), eps,
                                           strict=True):
                t = self._targets[tk].tracker
                out.append(EndpointHealth(address, port, t.state,
                                          t.reason if t.state != State.UP else "",
                                          t.since_ns // 1_000_000))
            return out

    def checked(self) -> list[ServiceKey]:
        with self._lock:
            return list(self._services)

    def state_counts(self) -> dict[State, int]:
        """Endpoints of checked services by state (an endpoint counted per service)."""
        out = dict.fromkeys(State, 0)
        with self._lock:
            for spec, eps in self._services.values():
                for tk in self._target_keys(spec, eps):
                    out[self._targets[tk].tracker.state] += 1
        return out

    def summary(self) -> tuple[int, int]:
        """(generation, endpoints DOWN counted per service)."""
        with self._lock:
            down = sum(1 for spec, eps in self._services.values()
                       for tk in self._target_keys(spec, eps)
                       if self._targets[tk].tracker.state == State.DOWN)
            return self.generation, down

    def targets(self) -> int:
        return len(self._targets)

    # -- results -------------------------------------------------------------------

    def record(self, t: _Target, success: bool, reason: str) -> None:
        """One probe's verdict for `t` (the scheduler thread; tests call it directly)."""
        with self._lock:
            self.counters.probes += 1
            if not success:
                self.counters.failures += 1
            if not t.alive:
                return
            before = t.tracker.record(success, reason, self.wall())
            if before is None:
                return
            state = t.tracker.state
            self.generation += 1
            if state == State.DOWN:
                self.counters.went_down += 1
            elif state == State.UP:
                self.counters.went_up += 1
            address, port, spec = t.key
            for key in sorted(t.services, key=str):
                event = {"service": str(key), "endpoint": f"{address}:{port}",
                         "check": spec.kind.name.lower(), "state": state.name,
                         "previous": before.name, "reason": t.tracker.reason if not success
                         else ""}
                log.info("endpoint_health", **event)
                if self.on_event is not None:
                    try:
                        self.on_event(event)
                    except Exception as e:  # a hook must not stop probing
                        log.error("endpoint_health_hook_failed", error=str(e))
            if (before == State.DOWN) != (state == State.DOWN):
                self._dirty.update(t.services)

    def _flush(self) -> None:
        """Rewrite the services whose set of endpoints out of selection changed."""
        if not self._dirty:
            return
        changes: dict[ServiceKey, frozenset[tuple[str, int]]] = {}
        for key in self._dirty:
            held = self._services.get(key)
            if held is None:
                changes[key] = frozenset()
                continue
            spec, eps = held
            changes[key] = frozenset(
                ep for ep, tk in zip(eps, self._target_keys(spec, eps), strict=True)
                if not self._targets[tk].tracker.selectable)
        self._dirty.clear()
        try:
            self._apply(changes)
        except Exception as e:  # the map refused: try again with the next change
            log.error("endpoint_health_apply_failed", error=str(e), services=len(changes))
            self._dirty.update(changes)

    # -- the scheduler thread -----------------------------------------------------------

    def start(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=1)
        with self._lock:
            for _, _, p in self._deadlines:
                self._end(p)
            self._deadlines.clear()
        for pinger in self._pingers.values():
            pinger.close()
        if self._sel is not None:
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or stopped

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as e:  # keep probing; report and go on
                log.error("health_loop_failed", error=str(e))
                time.sleep(0.1)

    def _step(self) -> None:
        assert self._sel is not None
        with self._lock:
            now = self.clock()
            self._start_due(now)
            wait = 0.5
            if self._due and self._inflight < self.max_inflight:
                wait = min(wait, self._due[0][0] - now)
            if self._deadlines:
                wait = min(wait, self._deadlines[0][0] - now)
        events = self._sel.select(max(0.0, wait))
        with self._lock:
            for key, mask in events:
                if key.data is None:
                    try:
                        while self._wake_r.recv(512):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                elif isinstance(key.data, _Pinger):
                    for answered in key.data.receive():
                        self._finish(answered, True, "")
                else:
                    p = key.data
                    try:
                        verdict = p.on_ready(mask)
                    except OSError as e:
                        verdict = (False, e.strerror or str(e))
                    if verdict is not None:
                        self._finish(p, *verdict)
                    elif isinstance(p, _TcpProbe) and p.sock is not None:
                        self._sel.modify(p.sock, p.events, p)
            now = self.clock()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, late = heapq.heappop(self._deadlines)
                if not late.done:
                    self._finish(late, False, "timeout")
            self._flush()

    def _start_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            if self._inflight >= self.max_inflight:
                return  # the rest when probes end
            when, _, t = heapq.heappop(self._due)
            if not t.alive:
                continue
            spec = t.key[2]
            if now - when > spec.interval_ms / 10_000:  # a tenth of the interval late
                self.counters.deferred += 1
            # the next probe from this one's due time (not its end): a fixed rate; a
            # target that fell far behind (deferred) starts again from now
            nxt = when + spec.interval_ms / 1000
            heapq.heappush(self._due, (nxt if nxt > now else now + spec.interval_ms / 1000,
                                       next(_seq), t))
            if t.probe is not None:
                continue  # the last one is still in flight (timeout <= interval: rare)
            self._launch(t, now + spec.timeout_ms / 1000)

    def _launch(self, t: _Target, deadline: float) -> None:
        assert self._sel is not None
        address, _, spec = t.key
        probe: _Probe
        try:
            if spec.kind == HealthKind.ICMP:
                v6 = ":" in address
                pinger = self._pingers.get(v6)
                if pinger is None:
                    pinger = self._pingers[v6] = _Pinger(v6)
                    self._sel.register(pinger.sock, selectors.EVENT_READ, pinger)
                probe = _IcmpProbe(t, deadline)
                pinger.send(probe, address)
            elif spec.kind == HealthKind.UDP:
                probe = _UdpProbe(t, deadline)
                self._sel.register(probe.sock, selectors.EVENT_READ, probe)  # type: ignore[arg-type]
            else:
                probe = _TcpProbe(t, deadline)
                self._sel.register(probe.sock, selectors.EVENT_WRITE, probe)  # type: ignore[arg-type]
        except OSError as e:  # unreachable network, no fds left: a failed probe
            self.record(t, False, e.strerror or str(e))
            return
        t.probe = probe
        self._inflight += 1
        heapq.heappush(self._deadlines, (deadline, probe.seq, probe))

    def _end(self, p: _Probe) -> None:
        if p.done:
            return
        p.done = True
        self._inflight -= 1
        if p.target.probe is p:
            p.target.probe = None
        if isinstance(p, _IcmpProbe):
            pinger = self._pingers.get(":" in p.target.key[0])
            if pinger is not None:
                pinger.forget(p)
        elif p.sock is not None:
            if self._sel is not None:
                try:
                    self._sel.unregister(p.sock)
                except (KeyError, ValueError):
                    pass
            p.close()

    def _finish(self, p: _Probe, success: bool, reason: str) -> None:
        if p.done:
            return
        self._end(p)
        self.record(p.target, success, reason)
