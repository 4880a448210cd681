"""One node's datapath as domain operations: what the gRPC servicer calls."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import structlog

from dpd import abi, attach, bpfsys
from dpd.attach import Attachment
from dpd.conntrack import Conntrack, CtEntry
from dpd.loader import Datapath, Settings, remove_pins, unmount_if_empty
from dpd.services import ServiceTable
from xlbcore.service import ServiceKey, ServiceSpec

log = structlog.get_logger("dpd.node")


@dataclass(frozen=True)
class MapFill:
    name: str
    type: str
    max_entries: int
    used: int


class Node:
    def __init__(self, settings: Settings, ct_aging_interval: float = 5.0) -> None:
        self.settings = settings
        self.dp = Datapath(settings)
        self.services = ServiceTable(self.dp)
        # the kernel's id of nat_v4_map: new whenever the table is created anew
        self.datapath_id = str(bpfsys.map_info(self.dp.table("nat_v4_map").map_fd).id)
        self.conntrack = Conntrack(self.dp)
        if ct_aging_interval > 0:
            self.conntrack.start_aging(ct_aging_interval)
        if not self.dp.unchanged:
            # New program code: move every existing attachment onto it (atomic replace).
            for a in attach.attached():
                attach.attach(a.name, self.dp.fast_fd)

    # interfaces
    def attach(self, name: str) -> Attachment:
        for a in attach.attached():
            if a.name == name and self.dp.unchanged:
                return a  # already carries this program
        return attach.attach(name, self.dp.fast_fd)

    def detach(self, name: str) -> Attachment:
        return attach.detach(name)

    def interfaces(self) -> list[Attachment]:
        return attach.attached()

    @property
    def program_tag(self) -> str:
        return self.dp.tags["tc_packet_func"]

    # services
    def put_services(self, specs: list[ServiceSpec]) -> int:
        n = self.services.put(specs)
        log.info("services_put", count=n)
        return n

    def delete_services(self, keys: list[ServiceKey]) -> int:
        n = self.services.delete(keys)
        log.info("services_deleted", requested=len(keys), deleted=n)
        return n

    def list_services(self) -> list[ServiceSpec]:
        return self.services.specs()

    # conntrack
    def list_conntrack(self) -> list[CtEntry]:
        return self.conntrack.entries()

    def flush_conntrack(self) -> int:
        n = self.conntrack.flush()
        log.info("conntrack_flushed", entries=n)
        return n

    # node
    def maps(self) -> list[MapFill]:
        out = []
        for name in sorted(os.listdir(self.settings.pin_dir)):
            path = self.dp.pin(name)
            try:
                info = bpfsys.pinned_map_info(path)
            except OSError:
                continue  # a program pin
            used = 0
            if name == "nat_v4_map":
                used = self.services.count()
            elif name == "ct_v4_map":
                used = sum(1 for _ in bpfsys.lookup_batch(
                    self.conntrack.fd, abi.CT_KEY_SIZE, abi.CT_VAL_SIZE))
            out.append(MapFill(name, info.type, info.max_entries, used))
        return out

    @staticmethod
    def kernel() -> str:
        return platform.release()

    def close(self) -> None:
        """Stop background work and release fds; the datapath keeps running."""
        self.conntrack.stop()
        self.dp.close()


def cleanup(settings: Settings) -> dict[str, object]:
    """Detach from every interface of this network namespace and remove the pins."""
    detached = []
    for a in attach.attached():
        attach.detach(a.name)
        detached.append(a.name)
    removed = remove_pins(settings)
    unmounted = unmount_if_empty(settings.bpf_root)
    log.info("cleanup_done", detached=detached, pins_removed=len(removed), unmounted=unmounted)
    return {"detached": detached, "pins_removed": removed, "unmounted": unmounted}
