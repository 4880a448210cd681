"""TC attachment through pyroute2: a clsact qdisc and one direct-action bpf filter on
ingress per interface, named FILTER_NAME so a restarted dpd finds its attachments."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xlbcore.errors import PreconditionError, quote

log = structlog.get_logger("dpd.attach")

FILTER_NAME = "xlb_tc_packet_func"
INGRESS = 0xFFFFFFF2
PRIO = 0xC000 - 0x100  # below tc's default auto priority, so ours runs first
HANDLE = 1


class InterfaceMissing(PreconditionError):
    """The interface does not exist in this network namespace."""


@dataclass(frozen=True)
class Attachment:
    name: str
    ifindex: int
    attached: bool


def _ifindex(ipr: IPRoute, name: str) -> int:
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        raise InterfaceMissing(f"interface {quote(name)} does not exist in this network namespace")
    return int(idx[0])


def _our_filters(ipr: IPRoute, ifindex: int) -> list[object]:
    try:
        filters = ipr.get_filters(index=ifindex, parent=INGRESS)
    except NetlinkError as e:
        if e.code in (errno.EINVAL, errno.ENOENT):
            return []  # no clsact qdisc
        raise
    return [f for f in filters if f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") == FILTER_NAME]


def attach(name: str, prog_fd: int) -> Attachment:
    """Attach (or atomically replace) the ingress program on `name`."""
    with IPRoute() as ipr:
        idx = _ifindex(ipr, name)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        ipr.tc(
            "replace-filter",
            "bpf",
            idx,
            HANDLE,
            fd=prog_fd,
            name=FILTER_NAME,
            parent=INGRESS,
            prio=PRIO,
            classid=1,
            direct_action=True,
        )
    log.info("interface_attached", interface=name, ifindex=idx)
    return Attachment(name, idx, True)


def detach(name: str) -> Attachment:
    """Remove our filter; remove the clsact qdisc too when nothing else uses it."""
    with IPRoute() as ipr:
        idx = _ifindex(ipr, name)
        if _our_filters(ipr, idx):
            ipr.tc("del-filter", "bpf", idx, HANDLE, parent=INGRESS, prio=PRIO)
            log.info("interface_detached", interface=name, ifindex=idx)
        others = ipr.get_filters(index=idx, parent=INGRESS) if _has_clsact(ipr, idx) else []
        egress = ipr.get_filters(index=idx, parent=0xFFFFFFF3) if _has_clsact(ipr, idx) else []
        if _has_clsact(ipr, idx) and not others and not egress:
            ipr.tc("del", "clsact", idx)
    return Attachment(name, idx, False)


def _has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


def attached() -> list[Attachment]:
    """Every interface of this network namespace carrying our filter."""
    out = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            idx = link["index"]
            if _our_filters(ipr, idx):
                out.append(Attachment(link.get_attr("IFLA_IFNAME"), idx, True))
    return out


# -- programs beside tc_packet_func ---------------------------------------------------------

class ExtraFilter:
    """Another ingress program on an interface beside tc_packet_func (mirroring,
    policing): a direct-action bpf filter of its own, at its own priority (ahead of
    tc_packet_func's), found again by its name. A subclass names it (NAME, PRIO)."""

    NAME = ""
    PRIO = 0

    def __init__(self, prog_fd: int) -> None:
        self.prog_fd = prog_fd

    def attach(self, ifindex: int) -> None:
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", ifindex, HANDLE, fd=self.prog_fd,
                   name=self.NAME, parent=INGRESS, prio=self.PRIO, classid=1,
                   direct_action=True)

    def detach(self, ifindex: int) -> None:
        self.detach_from(ifindex)

    @classmethod
    def _present(cls, ipr: IPRoute, ifindex: int) -> bool:
        try:
            filters = ipr.get_filters(index=ifindex, parent=INGRESS)
        except NetlinkError as e:
            if e.code in (errno.EINVAL, errno.ENOENT):
                return False  # no clsact qdisc
            raise
        return any(f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") == cls.NAME for f in filters)

    @classmethod
    def detach_from(cls, ifindex: int) -> bool:
        """Remove this filter from `ifindex` (and the clsact qdisc when nothing else uses
        it). False: it was not there."""
        with IPRoute() as ipr:
            if not cls._present(ipr, ifindex):
                return False
            try:
                ipr.tc("del-filter", "bpf", ifindex, HANDLE, parent=INGRESS, prio=cls.PRIO)
            except NetlinkError as e:
                if e.code != errno.ENOENT:
                    raise
            others = ipr.get_filters(index=ifindex, parent=INGRESS)
            egress = ipr.get_filters(index=ifindex, parent=0xFFFFFFF3)
            if not others and not egress:
                ipr.tc("del", "clsact", ifindex)
        return True

    @classmethod
    def filtered(cls) -> list[int]:
        """Every interface of this network namespace carrying this filter."""
        with IPRoute() as ipr:
            return [link["index"] for link in ipr.get_links()
                    if cls._present(ipr, link["index"])]


class NotAttached(ExtraFilter):
    """The in-memory datapath: no programs, nothing to attach (mixed in before the
    subclass that names the filter)."""

    def __init__(self) -> None:
        super().__init__(-1)

    def attach(self, ifindex: int) -> None:
        pass

    def detach(self, ifindex: int) -> None:
        pass
