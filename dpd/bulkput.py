"""A PutServices of plain services parsed straight into columns (the bulk fast path).

The common bulk write (IPv4, one port, DNAT, no health check, no conntrack timeouts,
no priority groups, not Maglev, every key new to the table) needs no ServiceSpec per
item to be written: ``parse_bulk`` validates the request column by column and gives a
``Bulk`` (the VIPs, ports, protocols, algorithms, persistence, and the endpoints flat,
sorted within each service as parse_services sorts them, with per-service bounds);
``ServiceTable.put_bulk`` writes it and keeps it as it is, making the services'
ServiceSpecs only when something asks for them (``Bulk.specs``).

``parse_bulk`` gives None for anything it does not take: a service outside those
conditions or anything invalid. The caller then runs parse_services, which either
accepts the batch (the full path) or raises the error naming the field; so the errors
are parse_services' own, and nothing is written before the whole batch is valid.
"""

from __future__ import annotations

import functools
import socket
from collections import deque
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from operator import attrgetter, methodcaller
from typing import Any

import numpy as np

from dpd.natbatch import group
from xlbcore.service import (
    _ALGORITHMS,
    _API_PROTO,
    MAX_ENDPOINTS,
    MAX_PERSISTENCE_S,
    MAX_WEIGHT,
    Algorithm,
    EndpointColumns,
    EndpointSpec,
    Mode,
    Proto,
    ServiceSpec,
    _unicast,
)

_SERVICE = attrgetter("vip", "port", "protocol", "algorithm", "mode", "snat_address",
                      "persistence_timeout_s", "port_last")
_ENDPOINT = attrgetter("address", "port", "weight", "priority")
_EPS = attrgetter("endpoints")
_HAS_HEALTH = methodcaller("HasField", "health")
_HAS_CT = methodcaller("HasField", "conntrack_timeouts")
_HAS_WEIGHT = methodcaller("HasField", "weight")
_MAGLEV = int(Algorithm.MAGLEV)


@dataclass
class Bulk:
    """A batch of plain IPv4 services as columns (see the module's docstring). Per
    service i: vips[i] (canonical text), vip_bytes[i] (4 bytes, network order), ports,
    protos, algos, persist; its endpoints are the flat columns' [bounds[i]:bounds[i+1]],
    in the order parse_services gives them."""

    vips: list[str]
    vip_bytes: list[bytes]
    ports: list[int]
    protos: list[int]
    algos: list[int]
    persist: list[int]
    counts: list[int]
    bounds: list[int]
    ep_texts: tuple[str, ...]  # canonical text, in the request's order
    order: np.ndarray  # ep_texts[order]: in the services' endpoint order
    ep_addrs: np.ndarray  # '>u4', in endpoint order (as all below)
    ep_ports: np.ndarray  # uint16
    ep_weights: np.ndarray  # uint16

    def __len__(self) -> int:
        return len(self.vips)

    def patterns(self) -> tuple[list[tuple[int, ...]], np.ndarray]:
        """The distinct weight tuples of the services (what slot tables are built
        from) and each service's index in them. When every service's endpoints share
        one weight (the usual batch), found without a tuple per service."""
        w = self.ep_weights
        counts = np.asarray(self.counts, np.intp)
        first = w[self.bounds[:-1]]
        if (w == np.repeat(first, counts)).all():
            code = counts * 65536 + first
            if (code == code[0]).all():  # one tuple for all
                codes, which = code[:1], np.zeros(len(code), np.intp)
            else:
                codes, which = np.unique(code, return_inverse=True)
            return [(int(c) & 0xFFFF,) * (int(c) >> 16) for c in codes], which.ravel()
        flat = tuple(w.tolist())
        return group(list(map(flat.__getitem__, map(slice, self.bounds[:-1],
                                                     self.bounds[1:]))))

    def specs(self) -> list[ServiceSpec]:
        """The ServiceSpecs parse_services gives for this batch (with their endpoint
        columns and `grouped` made, as its fast path makes them), built column by
        column: no Python step per service or endpoint."""
        b = self.bounds
        per = list(map(slice, b[:-1], b[1:]))  # each service's part of the flat columns
        addrs = map(self.ep_texts.__getitem__, self.order.tolist())
        ports, weights = tuple(self.ep_ports.tolist()), tuple(self.ep_weights.tolist())
        eps = tuple(map(EndpointSpec, addrs, ports, weights, repeat(0)))
        packed = self.ep_addrs.tobytes()
        columns = map(tuple.__new__, repeat(EndpointColumns),
                      zip(map(packed.__getitem__, map(slice, [4 * i for i in b[:-1]],
                                                      [4 * i for i in b[1:]])),
                          map(ports.__getitem__, per), map(weights.__getitem__, per),
                          strict=True))
        out = list(map(ServiceSpec, self.vips, self.ports, map(_PROTOS.__getitem__, self.protos),
                       map(_ALGOS.__getitem__, self.algos), repeat(Mode.DNAT),
                       map(eps.__getitem__, per), repeat(None), repeat(None), repeat(""),
                       self.persist))
        # the cached properties parse_services' fast path fills in, filled in the same
        made = map(dict, zip(zip(repeat("columns"), columns), repeat(("grouped", False))))
        deque(map(dict.update, map(_DICT, out), made), maxlen=0)
        return out


_PROTOS = {int(p): p for p in Proto}
_ALGOS = {int(a): a for a in Algorithm}
_DICT = attrgetter("__dict__")


def parse_bulk(msgs: Any) -> Bulk | None:
    """`msgs` (xlb.dpd.v1.Service messages) as a Bulk when every one is a valid plain
    service (module docstring), else None (parse_services then decides)."""
    n = len(msgs)
    if not n or any(map(_HAS_HEALTH, msgs)) or any(map(_HAS_CT, msgs)):
        return None
    vips, ports, protos, algos, modes, snats, persist, lasts = zip(*map(_SERVICE, msgs),
                                                                   strict=True)
    if any(snats) or any(lasts) or not set(modes) <= {0, int(Mode.DNAT)} \
            or max(persist) > MAX_PERSISTENCE_S or min(ports) < 1 or max(ports) > 65535:
        return None
    proto_of = {a: int(p) for a, p in _API_PROTO.items()}
    algo_of = {a: int(v) for a, v in _ALGORITHMS.items() if v != _MAGLEV}
    protos_m = list(map(proto_of.get, protos))
    algos_m = list(map(algo_of.get, algos))
    if None in protos_m or None in algos_m:
        return None
    vip_parsed = {v: _unicast(v) for v in set(vips)}
    if None in vip_parsed.values():
        return None
    vip_cols = list(map(vip_parsed.__getitem__, vips))
    vip_text, vip_bytes = zip(*vip_cols, strict=True)  # type: ignore[misc]
    keys = list(zip(vip_text, ports, protos_m, strict=True))
    if len(set(keys)) != n:
        return None  # a key twice: parse_services names it
    ep_lists = list(map(_EPS, msgs))
    counts = list(map(len, ep_lists))
    if min(counts) < 1 or max(counts) > MAX_ENDPOINTS:
        return None
    flat = list(chain.from_iterable(ep_lists))
    addrs, eports, weights, prios = zip(*map(_ENDPOINT, flat), strict=True)
    if any(prios) or min(eports) < 1 or max(eports) > 65535 or max(weights) > MAX_WEIGHT:
        return None
    weights_l = list(weights)
    if 0 in weights_l:  # an unset weight is the default (1), a set 0 stays 0
        for j, w in enumerate(weights_l):
            if not w and not _HAS_WEIGHT(flat[j]):
                weights_l[j] = 1
    packed = _ipv4s(addrs)
    if packed is None:
        return None  # parse_services (it also takes an address with spaces around)
    # each service's endpoints sorted as EndpointSpec orders them: address text, port
    # (a tie on both is a duplicate, refused below); the texts are ASCII, so their
    # bytes sort as the strings do
    svc = np.repeat(np.arange(n), counts)
    text = np.array(addrs, "S15")
    pt = np.asarray(eports, np.int64)
    order = np.lexsort((pt, text, svc))
    ts, ps, ss = text[order], pt[order], svc[order]
    if ((ts[1:] == ts[:-1]) & (ps[1:] == ps[:-1]) & (ss[1:] == ss[:-1])).any():
        return None  # an endpoint listed twice: parse_services names it
    return Bulk(vips=list(vip_text), vip_bytes=list(vip_bytes), ports=list(ports),
                protos=protos_m, algos=algos_m,  # type: ignore[arg-type]  # no None
                persist=list(persist), counts=counts,
                bounds=list(accumulate(counts, initial=0)),
                ep_texts=addrs, order=order, ep_addrs=packed[order],
                ep_ports=ps.astype(np.uint16),
                ep_weights=np.asarray(weights_l, np.uint16)[order])


def _ipv4s(addrs: tuple[str, ...]) -> np.ndarray | None:
    """The addresses as '>u4' when each is a canonical dotted quad that parse_ipv4
    takes as it is (inet_pton takes exactly those texts: four decimal octets, no
    leading zeros, no spaces) and a usable unicast address; else None."""
    pton = functools.partial(socket.inet_pton, socket.AF_INET)
    try:
        raw = b"".join(map(pton, addrs))
    except (OSError, TypeError, ValueError):
        return None
    a = np.frombuffer(raw, ">u4")
    top = a >> 24
    if ((a == 0) | (top == 127) | ((top >= 224) & (top <= 239)) | (a == 0xFFFFFFFF)).any():
        return None
    return a
