"""`xlb-dpd --attach auto`: attach to every interface that carries the node's traffic,
now and as interfaces appear later.

Which interfaces (`eligible`): Ethernet links (the datapath parses Ethernet) that are
physical NICs (no link kind), veths or bonds, and are not enslaved to a bond, a bridge or
a team (their packets belong to the master: a bond's are seen on the bond, a bridge
port's are switched, not routed). Not loopback, not bridges, VLANs, tunnels (vxlan,
gre, ipip, wireguard), dummies or macvlans: a VLAN's packets already pass the TC hook
of its parent NIC (offloaded tags included), a bridge or tunnel is rarely where a load
balancer's traffic enters; name any of them with `--attach auto,NAME` when it is.

How: a netlink socket subscribed to link events is opened first, then the links present
are attached, so an interface created meanwhile is not missed. A thread then waits for
link events on that socket and, for each burst of them, reads every link again: it
attaches every eligible link not seen before, detaches one that stopped being eligible
(enslaved later) and forgets one that is gone (the kernel removed its filter with it).
The events only wake it: what it acts on is the kernel's list of links, so an event that
arrived with another (a veth pair's two links), or that the socket lost (ENOBUFS), is
not missed. (pyroute2's own event reader queues the datagrams it reads beyond the one it
returns, where a select() on its socket no longer sees them.) The thread wakes every
POLL seconds to see whether it should stop, so `stop()` returns within the daemon's
bounded stop.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("dpd.autoattach")

ARPHRD_ETHER = 1
NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
IFF_LOOPBACK = 0x8
KINDS = (None, "veth", "bond")  # None: a physical NIC (no IFLA_LINKINFO kind)
MASTER_KINDS_SKIPPED = ("bond", "bridge", "team")
POLL = 0.2  # seconds between looks at the stop flag


def link_kind(msg: Any) -> str | None:
    info = msg.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def eligible(ifi_type: int, flags: int, kind: str | None, master_kind: str | None) -> bool:
    """Whether `--attach auto` attaches to a link with these properties (master_kind: the
    kind of the link's master, None when it has none)."""
    if ifi_type != ARPHRD_ETHER or flags & IFF_LOOPBACK:
        return False
    if kind not in KINDS:
        return False
    return master_kind not in MASTER_KINDS_SKIPPED


class AutoAttacher:
    """Keeps `attach(name)` applied to every eligible link of this network namespace."""

    def __init__(self, attach: Callable[[str], object], detach: Callable[[str], object]) -> None:
        self._attach = attach
        self._detach = detach
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()  # _sync runs in start() and in the thread
        self._thread: threading.Thread | None = None
        self.attached: dict[int, str] = {}  # ifindex -> name, what this attacher attached

    def _eligible(self, ipr: Any, msg: Any) -> bool:
        master = msg.get_attr("IFLA_MASTER")
        master_kind = None
        if master:
            links = ipr.get_links(master)
            master_kind = link_kind(links[0]) if links else None
        return eligible(int(msg["ifi_type"]), int(msg["flags"]), link_kind(msg), master_kind)

    def start(self) -> list[str]:
        """Subscribe to link events, attach to the links present, follow the rest in a
        thread. Returns the names attached now."""
        from pyroute2 import IPRoute

        # the thread subscribes first (a pyroute2 socket is read in the thread that made it)
        self._thread = threading.Thread(target=self._run, name="dpd-autoattach", daemon=True)
        self._thread.start()
        if not self._ready.wait(5.0):
            raise RuntimeError("--attach auto: the link monitor did not start")
        with IPRoute() as ipr:
            self._sync(ipr)
        return sorted(self.attached.values())

    def _consider_locked(self, ipr: Any, msg: Any) -> None:
        index = int(msg["index"])
        name = str(msg.get_attr("IFLA_IFNAME"))
        ok = self._eligible(ipr, msg)
        if index in self.attached:
            if not ok:
                self.attached.pop(index)
                self._call(self._detach, name, "interface_detach_failed")
            else:
                self.attached[index] = name  # a rename keeps the filter
            return
        if ok and self._call(self._attach, name, "interface_attach_failed"):
            self.attached[index] = name

    @staticmethod
    def _call(fn: Callable[[str], object], name: str, event: str) -> bool:
        try:
            fn(name)
            return True
        except Exception as e:  # noqa: BLE001 - the link may be gone already; keep following
            log.warning(event, interface=name, error=str(e))
            return False

    def _run(self) -> None:
        from pyroute2 import IPRoute

        events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                               NETLINK_ROUTE)
        with events, IPRoute() as ipr:
            events.bind((0, RTMGRP_LINK))
            self._ready.set()
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([events], [], [], POLL)
                    if not ready or self._stop.is_set():
                        continue
                    _drain(events)
                    self._sync(ipr)
                except Exception:  # noqa: BLE001 - a monitor that dies silently is worse
                    if self._stop.is_set():
                        break
                    log.exception("autoattach_error")
                    self._stop.wait(POLL)

    def _sync(self, ipr: Any) -> None:
        """Look at every link: attach the new eligible ones, forget those gone."""
        links = ipr.get_links()
        present = {int(link["index"]) for link in links}
        with self._lock:
            for index in [i for i in self.attached if i not in present]:
                log.info("interface_gone", interface=self.attached.pop(index), ifindex=index)
            for link in links:
                self._consider_locked(ipr, link)

    def stop(self, timeout: float = 2 * POLL) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _drain(sock: socket.socket) -> None:
    """Read every event waiting on `sock` (a burst wakes one look at the links)."""
    while True:
        try:
            if not sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError as e:  # ENOBUFS: events were lost; the look at the links covers it
            log.info("autoattach_events_lost", error=str(e))
