"""A minimal rtnetlink client for routes: pipelined writes, dumps and FIB-match lookups.

Why not pyroute2 here (dpd uses it for links, neighbours and TC): building one route
request through pyroute2's generic argument processing costs about 1 ms of Python, so a
put of 10,000 routes took over 10 s. Route messages are simple (an rtmsg header and a
few attributes), so they are packed here with `struct`, many per sendmsg, and the
kernel's acknowledgements are matched back to them by sequence number.

Only what dpd.routes needs: RTM_NEWROUTE (add or replace), RTM_DELROUTE, RTM_GETROUTE
(dump, or a lookup with RTM_F_FIB_MATCH that answers with the FIB entry that matched).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acknowledgements without a copy of the request
NETLINK_GET_STRICT_CHK = 12

RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_DUMP = 0x300
RTM_F_FIB_MATCH = 0x2000

RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 9, 15
RTN_UNICAST = 1
RT_TABLE_UNSPEC = 0

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope,
#                                       type, flags
_RTA = struct.Struct("=HH")
_RTNH = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
CHUNK = 512  # requests per sendmsg


@dataclass(frozen=True)
class Hop:
    gateway: str  # "" on-link
    ifindex: int  # 0: the kernel's choice
    weight: int = 1  # rtnh_hops + 1


@dataclass(frozen=True)
class FibRoute:
    family: int
    prefix: str  # canonical "198.19.0.0/16"
    proto: int
    table: int
    scope: int
    type: int
    priority: int | None
    hops: tuple[Hop, ...]


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    n = _RTA.size + len(payload)
    return _RTA.pack(n, kind) + payload + b"\0" * (_align(n) - n)


def route_body(family: int, prefix: str, table: int, proto: int, scope: int,
               hops: Iterable[Hop] = (), rtype: int = RTN_UNICAST,
               priority: int | None = None) -> bytes:
    """An rtmsg with its attributes, for RTM_NEWROUTE or RTM_DELROUTE."""
    net = ipaddress.ip_network(prefix)
    body = _RTMSG.pack(family, net.prefixlen, 0, 0, table if table < 256 else RT_TABLE_UNSPEC,
                       proto, scope, rtype, 0)
    body += _attr(RTA_DST, net.network_address.packed) + _attr(RTA_TABLE, _U32.pack(table))
    if priority is not None:
        body += _attr(RTA_PRIORITY, _U32.pack(priority))
    hops = list(hops)
    if len(hops) == 1:
        h = hops[0]
        if h.gateway:
            body += _attr(RTA_GATEWAY, ipaddress.ip_address(h.gateway).packed)
        if h.ifindex:
            body += _attr(RTA_OIF, _U32.pack(h.ifindex))
    elif hops:
        mp = b""
        for h in hops:
            inner = _attr(RTA_GATEWAY, ipaddress.ip_address(h.gateway).packed) if h.gateway else b""
            mp += _RTNH.pack(_RTNH.size + len(inner), 0, h.weight - 1, h.ifindex) + inner
        body += _attr(RTA_MULTIPATH, mp)
    return body


def _attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTA.size <= end:
        n, kind = _RTA.unpack_from(data, offset)
        if n < _RTA.size:
            return
        yield kind & 0x3FFF, data[offset + _RTA.size:offset + n]
        offset += _align(n)


def _ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def parse_route(data: bytes, offset: int, end: int) -> FibRoute:
    family, dst_len, _src, _tos, table, proto, scope, rtype, _flags = _RTMSG.unpack_from(
        data, offset)
    dst = "::" if family == socket.AF_INET6 else "0.0.0.0"
    gateway, oif, priority, hops = "", 0, None, []
    for kind, payload in _attrs(data, offset + _RTMSG.size, end):
        if kind == RTA_DST:
            dst = _ip(payload)
        elif kind == RTA_TABLE:
            table = _U32.unpack(payload)[0]
        elif kind == RTA_GATEWAY:
            gateway = _ip(payload)
        elif kind == RTA_OIF:
            oif = _U32.unpack(payload)[0]
        elif kind == RTA_PRIORITY:
            priority = _U32.unpack(payload)[0]
        elif kind == RTA_MULTIPATH:
            at = 0
            while at + _RTNH.size <= len(payload):
                n, _f, weight, ifindex = _RTNH.unpack_from(payload, at)
                if n < _RTNH.size:
                    break
                gw = ""
                for k, p in _attrs(payload, at + _RTNH.size, at + n):
                    if k == RTA_GATEWAY:
                        gw = _ip(p)
                hops.append(Hop(gw, ifindex, weight + 1))
                at += _align(n)
    if not hops:
        hops = [Hop(gateway, oif, 1)]
    prefix = str(ipaddress.ip_network(f"{dst}/{dst_len}"))
    return FibRoute(family, prefix, proto, table, scope, rtype, priority, tuple(hops))


class Rtnl:
    """One NETLINK_ROUTE socket (in the network namespace of the thread that opens it).
    Not thread-safe: dpd.routes serialises its calls."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _messages(self) -> Iterator[tuple[int, int, int, bytes, int, int]]:
        """(type, flags, seq, data, offset, end) of each message of the next datagram."""
        data = self.sock.recv(1 << 20)
        at = 0
        while at + _NLMSG.size <= len(data):
            n, kind, flags, seq, _pid = _NLMSG.unpack_from(data, at)
            if n < _NLMSG.size:
                break
            yield kind, flags, seq, data, at + _NLMSG.size, at + n
            at += _align(n)

    def write(self, requests: list[tuple[int, int, bytes]]) -> list[int]:
        """Send (type, flags, body) requests in order, each acknowledged; returns the
        errno of each (0: done). The kernel applies them one after the other."""
        out = [0] * len(requests)
        for first in range(0, len(requests), CHUNK):
            chunk = requests[first:first + CHUNK]
            seqs: dict[int, int] = {}
            buf = bytearray()
            for i, (kind, flags, body) in enumerate(chunk, start=first):
                seq = self._next()
                seqs[seq] = i
                buf += _NLMSG.pack(_NLMSG.size + len(body), kind,
                                   NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0) + body
            self.sock.sendall(bytes(buf))
            while seqs:
                for kind, _flags, seq, data, at, _end in self._messages():
                    if kind == NLMSG_ERROR and seq in seqs:
                        code = struct.unpack_from("=i", data, at)[0]
                        out[seqs.pop(seq)] = -code
        return out

    def _ask(self, flags: int, body: bytes) -> Iterator[tuple[int, bytes, int, int]]:
        """Send one RTM_GETROUTE request: (type, data, offset, end) of each reply to it, as
        they come, without end (the caller stops when it has its answer)."""
        seq = self._next()
        self.sock.sendall(_NLMSG.pack(_NLMSG.size + len(body), RTM_GETROUTE, flags, seq, 0)
                          + body)
        while True:
            for kind, _flags, mseq, data, at, end in self._messages():
                if mseq == seq:
                    yield kind, data, at, end

    def dump(self, family: int) -> list[FibRoute]:
        """Every route of `family` in every table."""
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        out: list[FibRoute] = []
        for kind, data, at, end in self._ask(NLM_F_REQUEST | NLM_F_DUMP, body):
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, at)[0]
                if code:
                    raise OSError(code, f"route dump: {errno.errorcode.get(code, code)}")
                return out
            if kind == RTM_NEWROUTE:
                out.append(parse_route(data, at, end))
        raise AssertionError("unreachable: the replies have no end")

    def _lookup(self, family: int, address: str, rtm_flags: int = 0,
                oif: int = 0) -> tuple[FibRoute | None, int]:
        """The answer to a lookup of `address` (out of `oif`): (route, 0), or (None, errno)
        when the kernel answers with an error."""
        addr = ipaddress.ip_address(address)
        body = _RTMSG.pack(family, addr.max_prefixlen, 0, 0, 0, 0, 0, 0, rtm_flags)
        body += _attr(RTA_DST, addr.packed)
        if oif:
            body += _attr(RTA_OIF, _U32.pack(oif))
        for kind, data, at, end in self._ask(NLM_F_REQUEST, body):
            if kind == NLMSG_ERROR:
                return None, -struct.unpack_from("=i", data, at)[0]
            if kind == RTM_NEWROUTE:
                return parse_route(data, at, end), 0
        raise AssertionError("unreachable: the replies have no end")

    def fib_match(self, family: int, address: str) -> FibRoute | None:
        """The FIB entry a lookup of `address` matches (None: no route)."""
        route, code = self._lookup(family, address, RTM_F_FIB_MATCH)
        if route is not None or code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH,
                                         errno.ENOENT):
            return route
        raise OSError(code, f"route lookup: {errno.errorcode.get(code, code)}")

    def route_get(self, family: int, address: str, oif: int = 0) -> FibRoute | None:
        """What a lookup of `address` (out of `oif`) resolves to, as `ip route get`."""
        return self._lookup(family, address, oif=oif)[0]
