"""One node's datapath as domain operations: what the gRPC servicer calls."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from dpd import attach, bpfsys, maglev, routes, xdp
from dpd import policers as polx
from dpd.attach import Attachment
from dpd.blocklist import Blocklist
from dpd.bulkput import Bulk
from dpd.conntrack import Conntrack, CtEntry, CtFilter, Timeouts
from dpd.events import NodeEvents
from dpd.firewall import FirewallTable, Links, StaticLinks
from dpd.health import HealthMonitor
from dpd.loader import Datapath, Settings, remove_pins, unmount_if_empty
from dpd.mirror import Filters, MirrorTable, NoFilters, detach_filter, filtered
from dpd.services import Counter, ServiceTable, sum_counters
from dpd.xdp import XdpMode, XdpState
from xlbcore.errors import PreconditionError
from xlbcore.service import MAX_ENDPOINTS, ServiceKey, ServiceSpec

log = structlog.get_logger("dpd.node")


@dataclass(frozen=True)
class MapFill:
    name: str
    type: str
    max_entries: int
    used: int


class Node:
    def __init__(self, dp: Datapath, ct_aging_interval: float = 5.0,
                 maglev_size: int = maglev.DEFAULT_SIZE,
                 ct_timeouts: Timeouts | None = None,
                 health_probes: bool | None = None) -> None:
        """`health_probes`: run the prober (default: on a kernel datapath; a simulated
        node probes nothing and reports its endpoints UNKNOWN)."""
        self.settings: Settings = dp.settings
        self.dp = dp
        if dp.abi.const("XLB_MAX_EPS") < MAX_ENDPOINTS:
            raise PreconditionError(
                f"the datapath holds {dp.abi.const('XLB_MAX_EPS')} endpoints per service, "
                f"the API allows {MAX_ENDPOINTS}")
        self.services = ServiceTable(dp, maglev_size)
        # the kernel's id of nat_v4_map: new whenever the table is created anew
        self.datapath_id = dp.datapath_id
        self.conntrack = Conntrack(dp, ct_timeouts, per_service=self.services.ct_timeouts,
                                   least_conn=self.services.lc_stat_ids,
                                   range_last=self.services.range_last)
        self.health = HealthMonitor(self.services.set_down)
        # what a restarted dpd read back, endpoints out of selection still out
        self.health.update(self.services.specs(), down=self.services.down)
        if health_probes if health_probes is not None else dp.kind == "kernel":
            self.health.start()
        self.blocklist = Blocklist(dp)
        self.firewall = FirewallTable(dp, Links() if dp.kind == "kernel" else StaticLinks())
        self.mirrors = MirrorTable(dp, self.firewall.links,
                                   Filters(dp.mirror_fd) if dp.kind == "kernel" else NoFilters())
        self.policers = polx.PolicerTable(
            dp, self.firewall.links,
            polx.Filters(dp.police_fd) if dp.kind == "kernel" else polx.NoFilters())
        # POLICE rules name policers; a policer a rule charges is not deleted
        self.firewall.policer_id = self.policers.id_of
        self.policers.rules_using = self.firewall.policer_rules
        self.events = NodeEvents(self)  # after health, firewall and policers: it names by them
        self.routes: routes.RouteTable = (routes.KernelRoutes(dp.settings.route_proto)
                                          if dp.kind == "kernel" else routes.MemoryRoutes())
        self._stat_names = dp.abi.stat_names()
        self._counter = dp.abi.structs["xlb_counter"].codec
        # what the datapath had created and held when this dpd started: the baseline
        # of the evicted estimate (conntrack_counters)
        self._ct_base = (self._created(self.global_stats()), self.conntrack.count() // 2)
        if ct_aging_interval > 0:
            self.conntrack.start_aging(ct_aging_interval)
        if dp.kind == "kernel" and dp.programs_changed:
            # New program code: move every existing attachment onto it (atomic replace).
            for a in attach.attached():
                attach.attach(a.name, dp.fast_fd)
            for name, st in xdp.attached().items():
                xdp.attach(name, dp.xdp_fd, st.mode)
            self.mirrors.reattach()
            self.policers.reattach()

    @classmethod
    def load(cls, settings: Settings, ct_aging_interval: float = 5.0,
             should_stop: Callable[[], bool] = lambda: False,
             maglev_size: int = maglev.DEFAULT_SIZE,
             ct_timeouts: Timeouts | None = None) -> Node:
        """A node on the kernel datapath (compiled, or reused from the pins)."""
        from dpd.loader import KernelDatapath

        dp = KernelDatapath(settings, should_stop)
        try:
            return cls(dp, ct_aging_interval, maglev_size, ct_timeouts)
        except BaseException:
            dp.close()
            raise

    def _kernel(self) -> None:
        if self.dp.kind != "kernel":
            raise PreconditionError(f"node {self.settings.name} runs a {self.dp.kind} "
                                    "datapath: it has no programs to attach")

    # interfaces
    def attach(self, name: str, xdp_mode: XdpMode = XdpMode.UNSPECIFIED) -> Attachment:
        """TC on `name`; with `xdp_mode` also the XDP stage (AUTO, NATIVE, GENERIC) or
        without it (OFF); UNSPECIFIED leaves XDP as it is."""
        self._kernel()
        a = next((a for a in attach.attached()
                  if a.name == name and not self.dp.programs_changed), None)
        if a is None:  # not yet, or not this program
            a = attach.attach(name, self.dp.fast_fd)
            self.firewall.ensure_interface(a.ifindex)  # its own drop counters
        self.set_xdp(name, xdp_mode)
        return a

    def set_xdp(self, name: str, mode: XdpMode) -> XdpState:
        self._kernel()
        if mode == XdpMode.UNSPECIFIED:
            return xdp.state(name)
        if mode == XdpMode.OFF:
            xdp.detach(name)
            return xdp.state(name)
        now = xdp.state(name)
        if now.ours and not self.dp.programs_changed and (
                mode in (XdpMode.AUTO, now.mode)):
            return now  # already carries this program in a mode asked for
        return xdp.attach(name, self.dp.xdp_fd, mode)

    def xdp_state(self, name: str) -> XdpState:
        if self.dp.kind != "kernel":
            return XdpState(XdpMode.OFF)
        try:
            return xdp.state(name)
        except PreconditionError:
            return XdpState(XdpMode.OFF)

    def detach(self, name: str) -> Attachment:
        """TC and XDP off `name`."""
        self._kernel()
        xdp.detach(name)
        return attach.detach(name)

    def interfaces(self) -> list[Attachment]:
        return attach.attached() if self.dp.kind == "kernel" else []

    @property
    def program_tag(self) -> str:
        return self.dp.tags.get("tc_packet_func", "")

    # services
    def put_services(self, specs: list[ServiceSpec]) -> int:
        n = self.services.put(specs)
        self.health.update(specs)
        log.debug("services_put", count=n)
        return n

    def put_services_bulk(self, bulk: Bulk) -> int | None:
        """A batch of new plain services (dpd/bulkput.py) written as columns; None when
        put_services must do it (nothing done)."""
        if self.health.checked():
            return None  # health.update must see the services: put_services
        n = self.services.put_bulk(bulk)
        if n is not None:
            log.debug("services_put", count=n)
        return n

    def delete_services(self, keys: list[ServiceKey]) -> int:
        n = self.services.delete(keys)
        self.health.remove(keys)
        log.debug("services_deleted", requested=len(keys), deleted=n)
        return n

    def list_services(self) -> list[ServiceSpec]:
        return self.services.specs()

    def services_page(self, after: ServiceKey | None,
                      limit: int) -> tuple[int, list[ServiceSpec], bool]:
        return self.services.page(after, limit)

    @property
    def instance_id(self) -> str:
        return self.services.instance_id

    # conntrack
    def list_conntrack(self, match: CtFilter | None = None) -> list[CtEntry]:
        return self.conntrack.entries(match)

    def flush_conntrack(self, match: CtFilter | None = None) -> int:
        n = self.conntrack.flush(match)
        log.info("conntrack_flushed", entries=n, filter=str(match) if match else "")
        return n

    # counters
    def global_stats(self) -> dict[str, Counter]:
        """Every global counter (XLB_STAT_*) by name, summed over CPUs."""
        m = self.dp.maps["stats_map"]
        out = {}
        for index, name in self._stat_names.items():
            raw = m.get(index.to_bytes(4, "little"))
            out[name] = sum_counters(self._counter, m.split(raw) if raw else [])
        return out

    @staticmethod
    def _created(stats: Mapping[str, Counter]) -> int:
        return sum(stats[n].packets for n in ("new_flow", "fw_pass_flow") if n in stats)

    def conntrack_counters(self, stats: Mapping[str, Counter]) -> dict[str, int]:
        """created, refused (from the datapath's counters `stats`), expired, flushed,
        evicted (estimated since this dpd started), live and capacity, in flows."""
        live = self.conntrack.count() // 2
        created = self._created(stats)
        c = self.conntrack.counters
        base_created, base_live = self._ct_base
        evicted = (created - base_created) - c.expired - c.flushed - (live - base_live)
        return {"created": created,
                "refused": sum(stats[n].packets for n in ("drop_ct_insert", "drop_ct_clash")
                               if n in stats),
                "expired": c.expired, "flushed": c.flushed, "evicted": max(0, evicted),
                "live": live, "capacity": self.conntrack.map.spec.max_entries // 2}

    def reset_global_stats(self) -> None:
        self.dp.maps["stats_map"].zero(list(self._stat_names))
        self._ct_base = (0, self.conntrack.count() // 2)
        self.conntrack.counters.expired = self.conntrack.counters.flushed = 0

    # node
    def maps(self, used: Mapping[str, int] | None = None) -> list[MapFill]:
        """Every map with its fill level: entries present in hash maps, 0 for arrays.
        `used`: counts the caller already has (e.g. conntrack), not read again."""
        out = []
        known = dict(used or {})
        for name, m in sorted(self.dp.maps.items()):
            if name in known:
                used_now = known[name]
            elif name == "nat_v4_map":  # the services less the IPv6 ones (nat_v6_map's)
                used_now = self.services.count() - self.dp.maps["nat_v6_map"].count()
            elif m.spec.type in ("hash", "lru_hash", "lpm_trie", "percpu_hash"):
                used_now = m.count()
            else:
                used_now = 0
            out.append(MapFill(name, m.spec.type, m.spec.max_entries, used_now))
        return out

    def pins(self) -> dict[str, str]:
        """Every pin of this node by name, with what it is (map or prog)."""
        if self.dp.kind != "kernel":
            return {}
        d = self.settings.pin_dir
        return {e: bpfsys.pinned_kind(os.path.join(d, e)) for e in sorted(os.listdir(d))}

    @staticmethod
    def kernel() -> str:
        return platform.release()

    def close(self) -> None:
        """Stop background work and release fds; the datapath keeps running."""
        self.conntrack.stop()
        self.health.stop()
        self.events.close()
        self.routes.close()
        self.dp.close()


def cleanup(settings: Settings, remove_routes: bool = False) -> dict[str, object]:
    """Detach from every interface of this network namespace and remove the pins; with
    `remove_routes` (xlb-dpd --cleanup) also every route of xlb's protocol in it."""
    detached = []
    for a in attach.attached():
        attach.detach(a.name)
        detached.append(a.name)
    for name in xdp.attached():
        xdp.detach(name)
        detached.append(f"{name} (xdp)")
    for ifindex in filtered():
        detach_filter(ifindex)
        detached.append(f"ifindex {ifindex} (mirror)")
    for ifindex in polx.filtered():
        polx.detach_filter(ifindex)
        detached.append(f"ifindex {ifindex} (policer)")
    removed = remove_pins(settings)
    unmounted = unmount_if_empty(settings.bpf_root)
    routes_removed = routes.cleanup(settings.route_proto) if remove_routes else []
    log.info("cleanup_done", detached=detached, pins_removed=len(removed), unmounted=unmounted,
             routes_removed=len(routes_removed))
    return {"detached": detached, "pins_removed": removed, "unmounted": unmounted,
            "routes_removed": routes_removed}
