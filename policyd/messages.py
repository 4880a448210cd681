"""Conversions between policyd's domain objects and the API messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from dpd.model import ServiceSpec, fill_service
from policyd.status import NodeStatus
from policyd.store import NodeRecord, StoredService
from xlb.dpd.v1 import datapath_pb2
from xlb.policy.v1 import policy_pb2


def timestamp(ns: int | None) -> Timestamp | None:
    if not ns:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def service_to_proto(stored: StoredService) -> policy_pb2.Service:
    msg = policy_pb2.Service(name=stored.name, generation=stored.generation)
    fill_service(msg, stored.spec)
    msg.update_time.FromNanoseconds(stored.update_time_ns)
    return msg


def node_to_proto(node: NodeRecord) -> policy_pb2.Node:
    msg = policy_pb2.Node(name=node.name, address=node.address)
    msg.register_time.FromNanoseconds(node.register_time_ns)
    return msg


def spec_to_dpd(spec: ServiceSpec) -> datapath_pb2.Service:
    result: datapath_pb2.Service = fill_service(datapath_pb2.Service(), spec)
    return result


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
