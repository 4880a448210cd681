"""Per-node sync status (pure): what a node last synced to, and the state that follows."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SyncState(enum.IntEnum):
    """Values match xlb.policy.v1.SyncState."""

    PENDING = 1  # not yet reconciled to the desired generation
    SYNCED = 2  # the node holds exactly the desired services
    ERROR = 3  # the last attempt failed; see message


@dataclass(frozen=True)
class NodeProgress:
    """What a node's reconciler has recorded; the state is derived from it."""

    observed_generation: int = 0  # desired generation the node last fully synced to
    error: str = ""  # the last attempt's error; empty when it succeeded (or none yet)
    last_sync_ns: int = 0
    last_attempt_ns: int = 0
    services: int = 0  # services the node held after the last successful sync


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


def sync_state(progress: NodeProgress, desired_generation: int) -> SyncState:
    """ERROR if the last attempt failed, else SYNCED when the node is at the desired
    generation, else PENDING (never synced, or the desired state changed since)."""
    if progress.error:
        return SyncState.ERROR
    if progress.last_sync_ns and progress.observed_generation >= desired_generation:
        return SyncState.SYNCED
    return SyncState.PENDING


def node_status(name: str, progress: NodeProgress, desired_generation: int) -> NodeStatus:
    return NodeStatus(
        node=name,
        state=sync_state(progress, desired_generation),
        desired_generation=desired_generation,
        observed_generation=progress.observed_generation,
        message=progress.error,
        last_sync_ns=progress.last_sync_ns,
        last_attempt_ns=progress.last_attempt_ns,
        services=progress.services,
    )
