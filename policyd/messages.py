"""Conversions between policyd's domain objects and the API messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from policyd.status import NodeStatus
from policyd.store import NodeRecord, StoredService
from xlb.policy.v1 import policy_pb2
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
    seconds, nanos = divmod(stored.update_time_ns, 1_000_000_000)
    msg.update_time.seconds = seconds
    msg.update_time.nanos = nanos
    return msg


def service_to_proto(stored: StoredService) -> policy_pb2.Service:
    return fill_service_proto(policy_pb2.Service(), stored)


def node_to_proto(node: NodeRecord) -> policy_pb2.Node:
    msg = policy_pb2.Node(name=node.name, address=node.address)
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
    )
