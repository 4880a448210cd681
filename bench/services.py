"""The services a benchmark programs: the measured one plus fillers ahead of it.

Fillers use VIPs in 198.19.1.0-198.19.63.255 and fake endpoints from 198.19.64.0 on
(inside 198.18.0.0/15); no traffic is ever sent to them. The measured service is
programmed last, so a linear lookup (iptables) walks every filler before it.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass, field

FILLER_VIP_BASE = int(ipaddress.IPv4Address("198.19.1.0"))
FILLER_VIP_LAST = int(ipaddress.IPv4Address("198.19.63.255"))
FAKE_EP_BASE = int(ipaddress.IPv4Address("198.19.64.0"))
FAKE_EP_LAST = int(ipaddress.IPv4Address("198.19.255.254"))


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int


@dataclass(frozen=True)
class ServiceSpec:
    """One L4 service: ``vip:port/proto`` -> endpoints."""

    name: str  # "namespace/name", as a Kubernetes service would be called
    vip: str
    port: int
    endpoints: tuple[Endpoint, ...]
    proto: str = "tcp"
    tags: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def key_hash(self, salt: str = "") -> str:
        """16 upper-case base32 chars from the service identity (kube-proxy chain names)."""
        raw = f"{self.name}:{self.proto}:{self.port}{salt}".encode()
        return base64.b32encode(hashlib.sha256(raw).digest()).decode()[:16]


def filler_services(count: int, endpoints_per: int = 4, port: int = 80) -> list[ServiceSpec]:
    """``count`` fake services with ``endpoints_per`` fake endpoints each."""
    vips = FILLER_VIP_LAST - FILLER_VIP_BASE + 1
    eps = FAKE_EP_LAST - FAKE_EP_BASE + 1
    out: list[ServiceSpec] = []
    for k in range(count):
        vip = str(ipaddress.IPv4Address(FILLER_VIP_BASE + k % vips))
        svc_port = port + k // vips  # distinct vip:port beyond 16k services
        endpoints = tuple(
            Endpoint(str(ipaddress.IPv4Address(FAKE_EP_BASE + (k * endpoints_per + e) % eps)),
                     port)
            for e in range(endpoints_per)
        )
        out.append(ServiceSpec(f"bench/filler-{k}", vip, svc_port, endpoints))
    return out


def measured_service(vip: str, port: int, backends: list[Endpoint]) -> ServiceSpec:
    return ServiceSpec("bench/measured", vip, port, tuple(backends))


def service_set(
    services: int, measured_vip: str, port: int, backends: list[Endpoint],
    endpoints_per: int = 4,
) -> list[ServiceSpec]:
    """``services`` services in total: ``services - 1`` fillers, then the measured one."""
    if services < 1:
        raise ValueError("services counts the measured one: at least 1")
    return [*filler_services(services - 1, endpoints_per, port),
            measured_service(measured_vip, port, backends)]
