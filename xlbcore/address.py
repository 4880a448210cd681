"""gRPC listen and dial addresses: ``unix:PATH`` or ``HOST:PORT``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from xlbcore.errors import ValidationError, quote

_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


@dataclass(frozen=True)
class Address:
    """A parsed gRPC address: ``unix:PATH`` (path set) or ``HOST:PORT`` (host, port set)."""

    text: str
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def is_unix(self) -> bool:
        return bool(self.path)


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253 or host.replace(".", "").isdigit():
        return False
    return all(_HOST_LABEL_RE.fullmatch(label) and len(label) <= 63 for label in host.split("."))


def parse_address(value: str, field: str = "address", *, allow_port_zero: bool = False) -> Address:
    """``unix:PATH`` or ``HOST:PORT`` (HOST: IPv4, [IPv6] or a DNS name)."""
    text = value.strip()
    usage = "use HOST:PORT or unix:PATH"
    if not text:
        raise ValidationError(f"{field}: an address is required; {usage}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValidationError(f"{field}: {quote(value)} has no socket path; {usage}")
        if "\0" in path or "\n" in path:
            raise ValidationError(f"{field}: {quote(value)} has a control character in its path")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValidationError(
                f"{field}: socket path is {len(path.encode())} bytes, at most {UNIX_PATH_MAX}"
            )
        return Address(text=text, path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValidationError(f"{field}: {quote(value)} has no port; {usage}")
    if ":" in host and not host.startswith("["):
        raise ValidationError(
            f"{field}: {quote(value)}: write an IPv6 host in brackets, [::1]:PORT"
        )
    if not _valid_host(host):
        raise ValidationError(f"{field}: {quote(host)} is not a valid host name or address")
    if not port_text.isdigit():
        raise ValidationError(f"{field}: port {quote(port_text)} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValidationError(f"{field}: port {port} is out of range {low}..65535")
    return Address(text=f"{host}:{port}", host=host, port=port)
