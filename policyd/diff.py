"""What to change on a node so that it holds exactly the desired services (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from dpd.model import ServiceKey, ServiceSpec


def _order(key: ServiceKey) -> tuple[str, int, int]:
    return (key.vip, key.port, int(key.proto))


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

    Both lists come out sorted by (vip, port, protocol), so a plan is deterministic.
    """
    to_put = [desired[k] for k in sorted(desired, key=_order) if actual.get(k) != desired[k]]
    to_delete = sorted((k for k in actual if k not in desired), key=_order)
    return ServiceDiff(to_put, to_delete)
