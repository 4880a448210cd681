"""policyd's objects for the XDP stage: ``Blocklist`` (a named set of source prefixes)
and ``Mirror`` (an interface copied to a mirror interface); their specs, validation,
messages and the node calls the reconcile makes (docs/xdp.md#through-policyd).

How they map onto dpd, whose API is keyed by prefix and by mirrored interface:

- A node's blocklist is the **union** of the prefixes of the Blocklist objects that
  select it. The node key is the prefix and its spec the prefix itself: policyd puts
  the prefixes some object wants and deletes those no object wants any more. Two
  objects may share a prefix; deleting one leaves the prefix blocked while the other
  wants it. A refused prefix is reported as an ObjectError of one object holding it
  (the first by name).
- A Mirror's node key is its ``interface`` (unique among mirrors, as a route's prefix
  is among routes), its spec the pair. A node without one of the interfaces refuses
  the object (dpd: ``mirrors[i].interface: no interface ...``): an ObjectError on that
  node, while its other objects apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from policyd.validation import validate_batch, validate_named
from xlb.dpd.v1 import datapath_pb2
from xlbcore.errors import ValidationError, quote
from xlbcore.firewall import parse_ifname, parse_prefix

PREFIXES_MAX = 65536  # prefixes in one Blocklist object


@dataclass(frozen=True)
class BlocklistSpec:
    prefixes: tuple[str, ...]  # canonical, sorted (v4 before v6), each once


@dataclass(frozen=True)
class MirrorSpec:
    interface: str  # the mirrored interface (the node key)
    mirror_interface: str  # copies leave by it


def _order(prefix: str) -> tuple[int, str]:
    return (6 if ":" in prefix else 4, prefix)


def parse_blocklist(msg: Any, field: str = "spec") -> BlocklistSpec:
    """An xlb.policy.v1.BlocklistSpec: 1..PREFIXES_MAX prefixes, each once."""
    values = list(msg.prefixes)
    if not values:
        raise ValidationError(f"{field}.prefixes: at least one prefix is required")
    if len(values) > PREFIXES_MAX:
        raise ValidationError(
            f"{field}.prefixes: {len(values)} prefixes, at most {PREFIXES_MAX} per object")
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        prefix = parse_prefix(value, f"{field}.prefixes[{i}]")
        first = seen.setdefault(prefix, i)
        if first != i:
            raise ValidationError(
                f"{field}.prefixes[{i}]: {prefix} is also {field}.prefixes[{first}]")
    return BlocklistSpec(tuple(sorted(seen, key=_order)))


def fill_blocklist(msg: Any, spec: BlocklistSpec) -> Any:
    msg.prefixes.extend(spec.prefixes)
    return msg


def parse_mirror(msg: Any, field: str = "spec") -> MirrorSpec:
    """An xlb.policy.v1.MirrorSpec: two interface names (syntax only: whether a node has
    them is that node's business), not the same."""
    if not msg.interface:
        raise ValidationError(f"{field}.interface: an interface is required")
    if not msg.mirror_interface:
        raise ValidationError(f"{field}.mirror_interface: an interface is required")
    a = parse_ifname(msg.interface, f"{field}.interface")
    b = parse_ifname(msg.mirror_interface, f"{field}.mirror_interface")
    if a == b:
        raise ValidationError(
            f"{field}.mirror_interface: {quote(b)} is the mirrored interface itself")
    return MirrorSpec(a, b)


def fill_mirror(msg: Any, spec: MirrorSpec) -> Any:
    msg.interface = spec.interface
    msg.mirror_interface = spec.mirror_interface
    return msg


def blocklist_keys(name: str, spec: BlocklistSpec) -> tuple[str, ...]:
    return spec.prefixes


def mirror_key(name: str, spec: MirrorSpec) -> str:
    return spec.interface


# -- validation of the API's messages --------------------------------------------------

def validate_blocklist(msg: Any, field: str = "blocklist") -> tuple[str, BlocklistSpec]:
    """(name, spec) of an xlb.policy.v1.Blocklist; output-only fields are ignored."""
    return validate_named(msg, field, parse_blocklist)


def validate_mirror(msg: Any, field: str = "mirror") -> tuple[str, MirrorSpec]:
    """(name, spec) of an xlb.policy.v1.Mirror."""
    return validate_named(msg, field, parse_mirror)


def validate_blocklists(msgs: Sequence[Any], field: str = "blocklists"
                        ) -> list[tuple[str, BlocklistSpec]]:
    """A batch: each valid (errors name ``blocklists[i]``), no name twice (prefixes may
    be shared)."""
    return validate_batch(msgs, field, validate_blocklist)


def validate_mirrors(msgs: Sequence[Any], field: str = "mirrors"
                     ) -> list[tuple[str, MirrorSpec]]:
    """A batch: each valid, no name and no mirrored interface twice."""
    return validate_batch(
        msgs, field, validate_mirror, key=lambda spec: spec.interface,
        clash=lambda spec: f"spec.interface: {quote(spec.interface)} is also mirrored by")


# -- the node's calls (policyd.objects.Kind) ---------------------------------------------

def put_blocklist(node: Any, items: list[tuple[str, str]], _flush: bool) -> Any:
    request = datapath_pb2.PutBlocklistRequest(prefixes=[prefix for prefix, _ in items])
    return node.stub.PutBlocklist(request, timeout=node.timeout)


def delete_blocklist(node: Any, prefixes: list[str]) -> Any:
    return node.stub.DeleteBlocklist(datapath_pb2.DeleteBlocklistRequest(prefixes=prefixes),
                                     timeout=node.timeout)


def list_blocklist(node: Any) -> dict[str, str | None]:
    """The node's blocked prefixes (canonical, as dpd lists them), each its own spec."""
    return {msg.prefix: msg.prefix for msg in node.stub.ListBlocklist(
        datapath_pb2.ListBlocklistRequest(), timeout=node.timeout)}


def put_mirrors(node: Any, items: list[tuple[str, MirrorSpec]], _flush: bool) -> Any:
    request = datapath_pb2.PutMirrorsRequest()
    for _interface, spec in items:
        request.mirrors.add(interface=spec.interface, mirror_interface=spec.mirror_interface)
    return node.stub.PutMirrors(request, timeout=node.timeout)


def delete_mirrors(node: Any, interfaces: list[str]) -> Any:
    return node.stub.DeleteMirrors(datapath_pb2.DeleteMirrorsRequest(interfaces=interfaces),
                                   timeout=node.timeout)


def list_mirrors(node: Any) -> dict[str, MirrorSpec | None]:
    return {msg.interface: MirrorSpec(msg.interface, msg.mirror_interface)
            for msg in node.stub.ListMirrors(datapath_pb2.ListMirrorsRequest(),
                                             timeout=node.timeout)}
