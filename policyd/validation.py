"""Input rules of policyd: names and node addresses here; the service itself is checked
by the shared ``dpd.model.parse_service`` so that policyd accepts exactly what dpd accepts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpd.model import ServiceSpec, ValidationError, parse_service

NAME_MAX = 63
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


def validate_name(value: str, field: str = "name") -> str:
    """A service or node name: 1..63 of [a-z0-9-], starting with a letter or digit."""
    if not value:
        raise ValidationError(f"{field}: a name is required")
    if len(value) > NAME_MAX:
        raise ValidationError(f"{field}: {value!r} is {len(value)} characters, at most {NAME_MAX}")
    if not _NAME_RE.fullmatch(value):
        raise ValidationError(
            f"{field}: {value!r} is not a valid name; use lower-case letters, digits and '-',"
            " starting with a letter or digit"
        )
    return value


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
            raise ValidationError(f"{field}: {value!r} has no socket path; {usage}")
        if "\0" in path or "\n" in path:
            raise ValidationError(f"{field}: {value!r} has a control character in its path")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValidationError(
                f"{field}: socket path is {len(path.encode())} bytes, at most {UNIX_PATH_MAX}"
            )
        return Address(text=text, path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValidationError(f"{field}: {value!r} has no port; {usage}")
    if ":" in host and not host.startswith("["):
        raise ValidationError(f"{field}: {value!r}: write an IPv6 host in brackets, [::1]:PORT")
    if not _valid_host(host):
        raise ValidationError(f"{field}: {host!r} is not a valid host name or address")
    if not port_text.isdigit():
        raise ValidationError(f"{field}: port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValidationError(f"{field}: port {port} is out of range {low}..65535")
    return Address(text=f"{host}:{port}", host=host, port=port)


def validate_node(name: str, address: str, field: str = "node") -> tuple[str, str]:
    """Return (name, canonical address) of a node or raise ValidationError."""
    prefix = f"{field}." if field else ""
    return (
        validate_name(name, f"{prefix}name"),
        parse_address(address, f"{prefix}address").text,
    )


def validate_service(msg: Any, field: str = "service") -> tuple[str, ServiceSpec]:
    """Return (name, spec) of an xlb.policy.v1.Service or raise ValidationError.

    Output-only fields (generation, update_time) are ignored.
    """
    prefix = f"{field}." if field else ""
    name = validate_name(msg.name, f"{prefix}name")
    try:
        return name, parse_service(msg, field)
    except ValidationError as exc:
        # The shared model names some fields without the prefix (e.g. "algorithm: ...").
        if prefix and not str(exc).startswith(prefix):
            raise ValidationError(f"{prefix}{exc}") from None
        raise


def validate_services(
    msgs: Sequence[Any], field: str = "services"
) -> list[tuple[str, ServiceSpec]]:
    """Validate a batch: every service (errors name ``services[i]``), then uniqueness of
    names and of (vip, port, protocol) within the batch. Returns (name, spec) in order."""
    items: list[tuple[str, ServiceSpec]] = []
    names: dict[str, int] = {}
    keys: dict[tuple[str, int, int], int] = {}  # cheaper to build than a ServiceKey
    for i, msg in enumerate(msgs):
        where = f"{field}[{i}]"
        name, spec = validate_service(msg, where)
        first = names.setdefault(name, i)
        if first != i:
            raise ValidationError(f"{where}.name: {name!r} is also {field}[{first}]")
        first = keys.setdefault((spec.vip, spec.port, spec.proto), i)
        if first != i:
            raise ValidationError(
                f"{where}: {spec.key} is also used by {field}[{first}] ({items[first][0]!r})"
            )
        items.append((name, spec))
    return items


def validate_names(values: Sequence[str], field: str = "names") -> list[str]:
    """A batch of service names: each valid, none listed twice."""
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        validate_name(value, f"{field}[{i}]")
        first = seen.setdefault(value, i)
        if first != i:
            raise ValidationError(f"{field}[{i}]: {value!r} is also {field}[{first}]")
    return list(values)
