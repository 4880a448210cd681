"""Conversions between policyd's domain objects and the API messages."""

from __future__ import annotations

from typing import Any, cast

from google.protobuf.timestamp_pb2 import Timestamp

from policyd.policer_objects import fill_policer
from policyd.status import NodeStatus
from policyd.store import (
    Change,
    NodeRecord,
    StoredBlocklist,
    StoredMirror,
    StoredObject,
    StoredPolicer,
    StoredRoute,
    StoredRule,
    StoredService,
)
from policyd.watch import ObjectStatus, StatusEvent
from policyd.xdp_objects import fill_blocklist, fill_mirror
from xlb.policy.v1 import policy_pb2
from xlbcore.firewall import fill_rule
from xlbcore.route import fill_route
from xlbcore.service import fill_service


def timestamp(ns: int | None) -> Timestamp | None:
    if not ns:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def fill_service_proto(msg: policy_pb2.Service, stored: StoredService) -> policy_pb2.Service:
    """Write `stored` into an empty xlb.policy.v1.Service (e.g. ``response.services.add()``)."""
    if stored.blob:  # the stored canonical bytes: parsing them beats setting each field
        msg.MergeFromString(stored.blob)
    else:
        msg.name = stored.name
        fill_service(msg, stored.spec)
    msg.generation = stored.generation
    msg.revision = stored.revision
    seconds, nanos = divmod(stored.update_time_ns, 1_000_000_000)
    msg.update_time.seconds = seconds
    msg.update_time.nanos = nanos
    if stored.selector:
        msg.node_selector.update(stored.selector)
    return msg


def service_to_proto(stored: StoredService) -> policy_pb2.Service:
    return fill_service_proto(policy_pb2.Service(), stored)


def _fill_object(msg: Any, stored: StoredObject[Any], fill: Any) -> Any:
    msg.name = stored.name
    if stored.blob:
        msg.spec.MergeFromString(stored.blob)
    else:
        fill(msg.spec, stored.spec)
    msg.generation = stored.generation
    msg.revision = stored.revision
    msg.update_time.FromNanoseconds(stored.update_time_ns)
    if stored.selector:
        msg.node_selector.update(stored.selector)
    return msg


def fill_rule_proto(msg: policy_pb2.FirewallRule, stored: StoredRule) -> policy_pb2.FirewallRule:
    """Write `stored` into an empty xlb.policy.v1.FirewallRule."""
    msg.flush_existing = stored.flush
    return cast(policy_pb2.FirewallRule, _fill_object(msg, stored, fill_rule))


def rule_to_proto(stored: StoredRule) -> policy_pb2.FirewallRule:
    return fill_rule_proto(policy_pb2.FirewallRule(), stored)


def fill_route_proto(msg: policy_pb2.Route, stored: StoredRoute) -> policy_pb2.Route:
    return cast(policy_pb2.Route, _fill_object(msg, stored, fill_route))


def route_to_proto(stored: StoredRoute) -> policy_pb2.Route:
    return fill_route_proto(policy_pb2.Route(), stored)


def fill_blocklist_proto(msg: policy_pb2.Blocklist,
                         stored: StoredBlocklist) -> policy_pb2.Blocklist:
    return cast(policy_pb2.Blocklist, _fill_object(msg, stored, fill_blocklist))


def blocklist_to_proto(stored: StoredBlocklist) -> policy_pb2.Blocklist:
    return fill_blocklist_proto(policy_pb2.Blocklist(), stored)


def fill_mirror_proto(msg: policy_pb2.Mirror, stored: StoredMirror) -> policy_pb2.Mirror:
    return cast(policy_pb2.Mirror, _fill_object(msg, stored, fill_mirror))


def mirror_to_proto(stored: StoredMirror) -> policy_pb2.Mirror:
    return fill_mirror_proto(policy_pb2.Mirror(), stored)


def fill_policer_proto(msg: policy_pb2.Policer, stored: StoredPolicer) -> policy_pb2.Policer:
    return cast(policy_pb2.Policer, _fill_object(msg, stored, fill_policer))


def policer_to_proto(stored: StoredPolicer) -> policy_pb2.Policer:
    return fill_policer_proto(policy_pb2.Policer(), stored)


def node_to_proto(node: NodeRecord) -> policy_pb2.Node:
    msg = policy_pb2.Node(name=node.name, address=node.address, labels=dict(node.labels))
    msg.register_time.FromNanoseconds(node.register_time_ns)
    return msg


def status_to_proto(status: NodeStatus) -> policy_pb2.NodeSyncStatus:
    return policy_pb2.NodeSyncStatus(
        node=status.node,
        state=policy_pb2.SyncState.ValueType(int(status.state)),
        desired_generation=status.desired_generation,
        observed_generation=status.observed_generation,
        message=status.message,
        last_sync_time=timestamp(status.last_sync_ns),
        last_attempt_time=timestamp(status.last_attempt_ns),
        services=status.services,
        firewall_rules=status.firewall_rules,
        routes=status.routes,
        errors=[policy_pb2.ObjectError(kind=e.kind, name=e.name, message=e.message)
                for e in status.errors],
        drift_found=status.drift_found,
        drift_repaired=status.drift_repaired,
        drift_repaired_total=status.drift_repaired_total,
        epoch=status.epoch,
        foreign=[policy_pb2.ObjectRef(kind=kind, key=key) for kind, key in status.foreign],
        blocklist_prefixes=status.blocklist_prefixes,
        mirrors=status.mirrors,
        policers=status.policers,
    )


def change_to_event(revision: int, change: Change) -> policy_pb2.WatchEvent:
    """A committed change as Watch sends it."""
    event = policy_pb2.WatchEvent(
        type=policy_pb2.EVENT_TYPE_DELETE if change.deleted else policy_pb2.EVENT_TYPE_PUT,
        revision=revision, kind=change.kind, name=change.name)
    if change.kind == "service":
        fill_service_proto(event.service, change.obj)
    elif change.kind == "firewall_rule":
        fill_rule_proto(event.firewall_rule, change.obj)
    elif change.kind == "blocklist":
        fill_blocklist_proto(event.blocklist, change.obj)
    elif change.kind == "mirror":
        fill_mirror_proto(event.mirror, change.obj)
    elif change.kind == "policer":
        fill_policer_proto(event.policer, change.obj)
    else:
        fill_route_proto(event.route, change.obj)
    return event


def status_event(event: StatusEvent) -> policy_pb2.SyncStatusEvent:
    """One WatchSyncStatus event."""
    generation, what = event
    msg = policy_pb2.SyncStatusEvent(generation=generation)
    if isinstance(what, str):
        msg.node_removed = what
    elif isinstance(what, ObjectStatus):
        msg.object.CopyFrom(policy_pb2.ObjectSyncStatus(
            node=what.node, kind=what.kind, name=what.name,
            state=policy_pb2.SyncState.ValueType(int(what.state)), message=what.message))
    else:
        msg.node.CopyFrom(status_to_proto(what))
    return msg
