"""XDP attachment through pyroute2 (IFLA_XDP): xdp_packet_func on an interface, native
(the driver runs it, before any skb exists) where the driver supports it, generic (the
kernel runs it on the skb) otherwise. An interface carries one XDP program; ours is
recognised by its program name, so a restarted dpd (or --cleanup) finds it."""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dpd import bpfsys
from dpd.attach import _ifindex
from xlbcore.errors import PreconditionError, quote

log = structlog.get_logger("dpd.xdp")

PROGRAM_NAME = "xdp_packet_func"

# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4


class XdpMode(enum.IntEnum):
    """Values match the API's XdpMode."""

    UNSPECIFIED = 0  # in a request: leave XDP as it is
    OFF = 1
    AUTO = 2  # in a request: native where the driver supports it, else generic
    NATIVE = 3
    GENERIC = 4


_ATTACHED = {1: XdpMode.NATIVE, 2: XdpMode.GENERIC}  # IFLA_XDP_ATTACHED values


@dataclass(frozen=True)
class XdpState:
    mode: XdpMode  # OFF, NATIVE or GENERIC
    prog_id: int = 0
    ours: bool = False


def _state(ipr: IPRoute, ifindex: int) -> XdpState:
    links = ipr.get_links(ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    if xdp is None:
        return XdpState(XdpMode.OFF)
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    mode = {"xdp": XdpMode.NATIVE, "xdpgeneric": XdpMode.GENERIC}.get(attached, None)
    if mode is None:
        mode = _ATTACHED.get(attached, XdpMode.OFF) if isinstance(attached, int) else \
            XdpMode.OFF
    prog_id = int(xdp.get_attr("IFLA_XDP_PROG_ID") or 0)
    if mode == XdpMode.OFF or not prog_id:
        return XdpState(XdpMode.OFF)
    return XdpState(mode, prog_id, bpfsys.prog_name_by_id(prog_id) == PROGRAM_NAME)


def state(name: str) -> XdpState:
    with IPRoute() as ipr:
        return _state(ipr, _ifindex(ipr, name))


def _set(ipr: IPRoute, ifindex: int, fd: int, flags: int) -> None:
    ipr.link("set", index=ifindex,
             IFLA_XDP={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def attach(name: str, prog_fd: int, mode: XdpMode = XdpMode.AUTO) -> XdpState:
    """Attach (or atomically replace) our XDP program on `name`. AUTO tries native
    first. Refuses to replace another program's XDP attachment."""
    with IPRoute() as ipr:
        idx = _ifindex(ipr, name)
        now = _state(ipr, idx)
        if now.mode != XdpMode.OFF and not now.ours:
            raise PreconditionError(f"interface {quote(name)} carries another XDP program "
                                    f"(id {now.prog_id}); xlb leaves it alone")
        want = [XdpMode.NATIVE, XdpMode.GENERIC] if mode == XdpMode.AUTO else [mode]
        if now.mode != XdpMode.OFF and now.mode not in want:
            _detach(ipr, idx, now.mode)  # switching modes: one at a time per interface
        err: NetlinkError | None = None
        for m in want:
            flags = XDP_FLAGS_DRV_MODE if m == XdpMode.NATIVE else XDP_FLAGS_SKB_MODE
            try:
                _set(ipr, idx, prog_fd, flags)
            except NetlinkError as e:
                err = e
                if e.code in (errno.EOPNOTSUPP, errno.EINVAL) and m == XdpMode.NATIVE:
                    continue
                raise PreconditionError(
                    f"cannot attach XDP ({m.name.lower()}) to {quote(name)}: "
                    f"{e.args[1] if len(e.args) > 1 else e}") from None
            got = _state(ipr, idx)
            log.info("xdp_attached", interface=name, ifindex=idx, mode=got.mode.name.lower())
            return got
        raise PreconditionError(f"cannot attach XDP to {quote(name)}: {err}")


def _detach(ipr: IPRoute, ifindex: int, mode: XdpMode) -> None:
    flags = XDP_FLAGS_DRV_MODE if mode == XdpMode.NATIVE else XDP_FLAGS_SKB_MODE
    _set(ipr, ifindex, -1, flags)


def detach(name: str) -> bool:
    """Remove our XDP program from `name` (another program is left alone); True if it
    was there."""
    with IPRoute() as ipr:
        idx = _ifindex(ipr, name)
        now = _state(ipr, idx)
        if now.mode == XdpMode.OFF or not now.ours:
            return False
        _detach(ipr, idx, now.mode)
    log.info("xdp_detached", interface=name, ifindex=idx)
    return True


def attached() -> dict[str, XdpState]:
    """Every interface of this network namespace carrying our XDP program."""
    out = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            xdp = link.get_attr("IFLA_XDP")
            if xdp is None or not xdp.get_attr("IFLA_XDP_PROG_ID"):
                continue
            st = _state(ipr, link["index"])
            if st.ours:
                out[link.get_attr("IFLA_IFNAME")] = st
    return out
