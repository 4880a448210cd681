"""What to change on a node so that it holds exactly the desired services (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from xlbcore.service import ServiceKey, ServiceSpec


def _order(key: ServiceKey) -> tuple[str, int, int, int]:
    return (key.vip, key.port, int(key.proto), key.port_last)


def _spec_order(spec: ServiceSpec) -> tuple[str, int, int, int]:
    return (spec.vip, spec.port, int(spec.proto), spec.port_last)


class ServiceDiff(NamedTuple):
    to_put: list[ServiceSpec]  # missing on the node, or different there
    to_delete: list[ServiceKey]  # on the node but not desired

    @property
    def empty(self) -> bool:
        return not self.to_put and not self.to_delete


def diff_services(
    desired: Mapping[ServiceKey, ServiceSpec],
    actual: Mapping[ServiceKey, ServiceSpec | None],
) -> ServiceDiff:
    """Compare by value; `actual` may map a key to None for an entry the node reported
    but that could not be read back as a valid service (it is replaced or deleted).

    One dict lookup per desired and per actual entry; only what changes is sorted, by
    (vip, port, protocol, port_last), so a plan is deterministic.
    """
    if desired is actual:  # an incremental pass with nothing new
        return ServiceDiff([], [])
    to_put = [
        spec
        for key, spec in desired.items()
        if (held := actual.get(key)) is not spec and held != spec
    ]
    to_put.sort(key=_spec_order)
    to_delete = [key for key in actual if key not in desired]
    to_delete.sort(key=_order)
    return ServiceDiff(to_put, to_delete)
