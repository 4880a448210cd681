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
are attached, so an interface created meanwhile is not missed; a thread then attaches
every eligible link that appears (RTM_NEWLINK for an index not seen), detaches one that
stops being eligible (enslaved later) and forgets one that goes (RTM_DELLINK: the kernel
removed its filter with it). The thread wakes every POLL seconds to see whether it should
stop, so `stop()` returns within the daemon's bounded stop.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("dpd.autoattach")

ARPHRD_ETHER = 1
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
        self._lock = threading.Lock()  # _consider runs in start() and in the thread
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
            for link in ipr.get_links():
                self._consider(ipr, link)
        return sorted(self.attached.values())

    def _consider(self, ipr: Any, msg: Any) -> None:
        with self._lock:
            self._consider_locked(ipr, msg)

    def _consider_locked(self, ipr: Any, msg: Any) -> None:
        index = int(msg["index"])
        name = str(msg.get_attr("IFLA_IFNAME"))
        if msg["event"] == "RTM_DELLINK":
            if self.attached.pop(index, None) is not None:
                log.info("interface_gone", interface=name, ifindex=index)
            return
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
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        with IPRoute() as mon, IPRoute() as ipr:
            mon.bind(groups=RTMGRP_LINK)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([mon.fileno()], [], [], POLL)
                    if not ready or self._stop.is_set():
                        continue
                    for msg in mon.get():
                        if msg.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
                            self._consider(ipr, msg)
                except Exception:  # noqa: BLE001 - a monitor that dies silently is worse
                    if self._stop.is_set():
                        break
                    log.exception("autoattach_error")  # e.g. ENOBUFS: events were lost
                    self._stop.wait(POLL)
                    self._resync(ipr)

    def _resync(self, ipr: Any) -> None:
        """Look at every link again (after lost events)."""
        try:
            links = ipr.get_links()
        except Exception:  # noqa: BLE001
            log.exception("autoattach_resync_failed")
            return
        present = {int(link["index"]) for link in links}
        for index in [i for i in self.attached if i not in present]:
            self.attached.pop(index)
        for link in links:
            self._consider(ipr, link)

    def stop(self, timeout: float = 2 * POLL) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
