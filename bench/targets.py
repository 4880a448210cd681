"""Benchmark targets: what sits in the lb namespace between the client and the backends.

A target programs ``services`` services (``services - 1`` fillers, then the measured one
whose endpoints are the real backends) and says where the client connects. To add one,
subclass :class:`Target`, give it a ``name``, and decorate it with :func:`register`; put
it in ``bench/target_<name>.py`` and ``bench.run`` imports it (see bench/README.md).
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from typing import ClassVar

import structlog

from bench import rulesets
from bench.services import Endpoint, service_set
from lab import netns
from lab.topology import Topology

log = structlog.get_logger(__name__)

TARGETS: dict[str, type[Target]] = {}


def register(cls: type[Target]) -> type[Target]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    TARGETS[cls.name] = cls
    return cls


class Target(ABC):
    """One way of getting the client's traffic to the backends.

    Life cycle (one instance per setup): ``setup(...)`` -> traffic to ``address()`` ->
    ``teardown()``. ``setup`` sets ``program_seconds`` to the time the programming step
    took (the control-plane figure) or leaves it None when nothing is programmed.
    """

    name: ClassVar[str] = ""
    #: whether this target translates a VIP (False only for the plain-routing floor)
    uses_vip: ClassVar[bool] = True
    #: whether the control-plane phase times this target
    control_plane: ClassVar[bool] = True
    #: whether the traffic phase measures this target
    traffic: ClassVar[bool] = True
    #: a variant of another target (e.g. "xlb" with every service in Maglev): the table
    #: shows its CRR row beside that target's, so only CRR is measured, and a quick run
    #: measures it only at the larger scale (the one its row is about)
    variant_of: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.topo: Topology | None = None
        self.vip = ""
        self.port = 0
        self.backends: list[Endpoint] = []
        self.program_seconds: float | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this target cannot run on this host (None: it can)."""
        return None

    @abstractmethod
    def setup(self, topo: Topology, services: int, measured_vip: str, port: int,
              backends: list[Endpoint]) -> None:
        """Program ``services`` services in total, the measured one (``measured_vip:port``
        -> ``backends``) last, the others fillers (see :func:`bench.services.service_set`)."""

    @abstractmethod
    def teardown(self) -> None:
        """Remove everything ``setup`` made, leaving the lb namespace as it was."""

    def address(self) -> tuple[str, int]:
        """Where the client sends its requests."""
        return self.vip, self.port

    def addresses(self, streams: int) -> list[tuple[str, int]]:
        """One address per client stream (wrk process); all the VIP by default."""
        return [self.address()] * streams

    def _remember(self, topo: Topology, measured_vip: str, port: int,
                  backends: list[Endpoint]) -> None:
        self.topo = topo
        self.vip = measured_vip
        self.port = port
        self.backends = list(backends)


@register
class PlainTarget(Target):
    """No load balancer: the client talks to the backends' own addresses, routed by the lb
    node (one client stream per backend; ``address()`` is the first backend)."""

    name = "plain"
    uses_vip = False
    control_plane = False

    def setup(self, topo: Topology, services: int, measured_vip: str, port: int,
              backends: list[Endpoint]) -> None:
        self._remember(topo, measured_vip, port, backends)

    def teardown(self) -> None:
        self.topo = None

    def address(self) -> tuple[str, int]:
        return self.backends[0].ip, self.backends[0].port

    def addresses(self, streams: int) -> list[tuple[str, int]]:
        """Stream i goes straight to backend i (mod n): the same spread over the backends
        as a balancer gives, with no balancer in the path."""
        eps = [self.backends[i % len(self.backends)] for i in range(streams)]
        return [(ep.ip, ep.port) for ep in eps]


def flush_conntrack(topo: Topology, ns: str) -> None:
    """Empty the conntrack table of ``ns`` (so one target's entries don't burden the next)."""
    code = "from pyroute2 import Conntrack\nwith Conntrack() as ct:\n    ct.flush()\n"
    res = topo.run(ns, [sys.executable, "-c", code], check=False, timeout=30,
                   env=netns.python_env())
    if res.returncode != 0:
        log.warning("bench.conntrack_flush_failed", ns=ns, stderr=res.stderr.strip()[-500:])


@register
class IptablesTarget(Target):
    """kube-proxy iptables mode: KUBE-SERVICES -> KUBE-SVC (statistic) -> KUBE-SEP (DNAT).

    Loaded with one ``iptables-restore`` of the whole nat table (Debian's default
    ``iptables`` is the nf_tables backend)."""

    name = "iptables"
    restore = "iptables-restore"
    cmd = "iptables"

    def setup(self, topo: Topology, services: int, measured_vip: str, port: int,
              backends: list[Endpoint]) -> None:
        self._remember(topo, measured_vip, port, backends)
        text = rulesets.iptables_restore_text(service_set(services, measured_vip, port, backends))
        t0 = time.monotonic()
        topo.run(topo.lb_ns, [self.restore], input=text, timeout=900)
        self.program_seconds = time.monotonic() - t0
        log.info("bench.programmed", target=self.name, services=services,
                 seconds=round(self.program_seconds, 3), bytes=len(text))

    def teardown(self) -> None:
        topo = self.topo
        if topo is None:
            return
        self.topo = None
        for args in (["-t", "nat", "-F"], ["-t", "nat", "-X"]):
            topo.run(topo.lb_ns, [self.cmd, *args], check=False, timeout=300)
        if self.cmd != "iptables-legacy":
            # iptables-nft leaves an empty 'ip nat' table with hooked base chains
            topo.run(topo.lb_ns, ["nft", "delete", "table", "ip", "nat"], check=False)
        flush_conntrack(topo, topo.lb_ns)


@register
class IptablesLegacyTarget(IptablesTarget):
    """The same rules through the legacy x_tables backend (not in the default set)."""

    name = "iptables-legacy"
    restore = "iptables-legacy-restore"
    cmd = "iptables-legacy"


@register
class NftablesTarget(Target):
    """kube-proxy nftables mode: vmap ``service-ips`` -> service chain (numgen) -> dnat."""

    name = "nftables"

    def setup(self, topo: Topology, services: int, measured_vip: str, port: int,
              backends: list[Endpoint]) -> None:
        self._remember(topo, measured_vip, port, backends)
        text = rulesets.nft_text(service_set(services, measured_vip, port, backends))
        path = topo.workdir / "kube-proxy.nft"
        path.write_text(text)
        try:
            t0 = time.monotonic()
            topo.run(topo.lb_ns, ["nft", "-f", str(path)], timeout=900)
            self.program_seconds = time.monotonic() - t0
        finally:
            path.unlink(missing_ok=True)
        log.info("bench.programmed", target=self.name, services=services,
                 seconds=round(self.program_seconds or 0, 3), bytes=len(text))

    def teardown(self) -> None:
        topo = self.topo
        if topo is None:
            return
        self.topo = None
        topo.run(topo.lb_ns, ["nft", "delete", "table", "ip", rulesets.NFT_TABLE],
                 check=False, timeout=300)
        flush_conntrack(topo, topo.lb_ns)
