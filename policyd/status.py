"""Per-node sync status (pure): what a node last synced to, and the state that follows."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SyncState(enum.IntEnum):
    """Values match xlb.policy.v1.SyncState."""

    PENDING = 1  # not yet reconciled to the desired generation
    SYNCED = 2  # the node holds exactly the desired services
    ERROR = 3  # the last attempt failed, or the node refused objects; see message


@dataclass(frozen=True)
class ObjectError:
    """An object a node refused (xlb.policy.v1.ObjectError)."""

    kind: str  # "service", "firewall_rule", "route", "blocklist", "mirror", "policer"
    name: str
    message: str


@dataclass(frozen=True)
class NodeProgress:
    """What a node's reconciler has recorded; the state is derived from it."""

    observed_generation: int = 0  # desired generation the node last fully synced to
    error: str = ""  # the last attempt's error; empty when it succeeded (or none yet)
    last_sync_ns: int = 0
    last_attempt_ns: int = 0
    services: int = 0  # services the node held after the last successful sync
    firewall_rules: int = 0  # rules it held after the last successful sync
    routes: int = 0
    blocklist_prefixes: int = 0  # blocked prefixes it held (the union of its blocklists)
    mirrors: int = 0
    policers: int = 0
    errors: tuple[ObjectError, ...] = ()  # objects the node refused (it is ERROR)
    drift_found: int = 0  # objects that differed at the last read-back (not the first)
    drift_repaired: int = 0  # writes that repaired them
    drift_repaired_total: int = 0  # every repair since the worker started
    epoch: int = 0  # datapaths (dpd instances, tables) seen on the node
    foreign: tuple[tuple[str, str], ...] = ()  # (kind, key) found at the first read, removed
    relabeling: bool = False  # its labels changed; objects are being moved (PENDING)


@dataclass(frozen=True)
class NodeStatus:
    node: str
    state: SyncState
    desired_generation: int
    observed_generation: int
    message: str
    last_sync_ns: int
    last_attempt_ns: int
    services: int
    firewall_rules: int = 0
    routes: int = 0
    errors: tuple[ObjectError, ...] = field(default=())
    drift_found: int = 0
    drift_repaired: int = 0
    drift_repaired_total: int = 0
    epoch: int = 0
    foreign: tuple[tuple[str, str], ...] = ()
    blocklist_prefixes: int = 0
    mirrors: int = 0
    policers: int = 0


def sync_state(progress: NodeProgress, desired_generation: int) -> SyncState:
    """ERROR if the last attempt failed or the node refused objects, else SYNCED when
    the node is at the desired generation, else PENDING (never synced, or the desired
    state changed since)."""
    if progress.error or progress.errors:
        return SyncState.ERROR
    if progress.relabeling:
        return SyncState.PENDING
    if progress.last_sync_ns and progress.observed_generation >= desired_generation:
        return SyncState.SYNCED
    return SyncState.PENDING


def node_status(name: str, progress: NodeProgress, desired_generation: int) -> NodeStatus:
    return NodeStatus(
        node=name,
        state=sync_state(progress, desired_generation),
        desired_generation=desired_generation,
        observed_generation=progress.observed_generation,
        message=progress.error or refused_message(progress.errors),
        last_sync_ns=progress.last_sync_ns,
        last_attempt_ns=progress.last_attempt_ns,
        services=progress.services,
        firewall_rules=progress.firewall_rules,
        routes=progress.routes,
        errors=progress.errors,
        drift_found=progress.drift_found,
        drift_repaired=progress.drift_repaired,
        drift_repaired_total=progress.drift_repaired_total,
        epoch=progress.epoch,
        foreign=progress.foreign,
        blocklist_prefixes=progress.blocklist_prefixes,
        mirrors=progress.mirrors,
        policers=progress.policers,
    )


def refused_message(errors: tuple[ObjectError, ...]) -> str:
    """The node's message when it refused objects: how many, and the first reason."""
    if not errors:
        return ""
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"the node refused {first.kind} {first.name!r}{more}: {first.message}"
