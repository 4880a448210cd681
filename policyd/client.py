"""A small client of xlb.policy.v1.Policy, for xlbctl, demos and tests.

    with PolicyClient("unix:/run/xlb/policyd.sock") as pc:
        pc.wait_ready()
        pc.register_node("node-a", "127.0.0.1:50051")
        pc.apply_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:8080", "198.18.1.3:8080@2"])
        pc.wait_synced(timeout=30)      # every node SYNCED at the current generation

        # many services at once: one call, one transaction, one generation
        reply = pc.apply_services([make_service(f"s{i}", ...) for i in range(10_000)])
        pc.wait_synced(generation=reply.generation)

Errors are the server's: grpc.RpcError with code() and details().
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from xlb.policy.v1 import policy_pb2, policy_pb2_grpc
from xlb.types.v1 import types_pb2
from xlbcore.errors import quote
from xlbcore.server import MESSAGE_OPTIONS

# Replies of ApplyServices / ListServices for many services exceed grpc's default 4 MiB.
CHANNEL_OPTIONS = MESSAGE_OPTIONS

PROTOCOLS = {"tcp": types_pb2.PROTOCOL_TCP, "udp": types_pb2.PROTOCOL_UDP}
ALGORITHMS = {
    "round-robin": types_pb2.ALGORITHM_ROUND_ROBIN,
    "rr": types_pb2.ALGORITHM_ROUND_ROBIN,
    "hash": types_pb2.ALGORITHM_HASH,
    "maglev": types_pb2.ALGORITHM_MAGLEV,
}


def parse_endpoint(text: str) -> types_pb2.Endpoint:
    """``ADDRESS:PORT[@WEIGHT]`` -> Endpoint (the server validates the values)."""
    where, _, weight = text.partition("@")
    address, sep, port = where.rpartition(":")
    if not sep or not address or not port.isdigit():
        raise ValueError(f"endpoint {quote(text)}: use ADDRESS:PORT or ADDRESS:PORT@WEIGHT")
    ep = types_pb2.Endpoint(address=address, port=int(port))
    if weight:
        if not weight.isdigit():
            raise ValueError(f"endpoint {quote(text)}: weight {quote(weight)} is not a number")
        ep.weight = int(weight)
    return ep


def make_service(
    name: str,
    vip: str,
    port: int,
    protocol: str = "tcp",
    endpoints: Iterable[str | types_pb2.Endpoint] = (),
    algorithm: str = "round-robin",
) -> policy_pb2.Service:
    if protocol.lower() not in PROTOCOLS:
        raise ValueError(f"protocol {quote(protocol)}: use {' or '.join(PROTOCOLS)}")
    if algorithm.lower() not in ALGORITHMS:
        raise ValueError(f"algorithm {quote(algorithm)}: use one of {', '.join(ALGORITHMS)}")
    return policy_pb2.Service(
        name=name,
        vip=vip,
        port=port,
        protocol=PROTOCOLS[protocol.lower()],
        algorithm=ALGORITHMS[algorithm.lower()],
        endpoints=[parse_endpoint(e) if isinstance(e, str) else e for e in endpoints],
    )


class PolicyClient:
    def __init__(self, target: str, timeout: float = 10.0) -> None:
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = policy_pb2_grpc.PolicyStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects; grpc.FutureTimeoutError otherwise."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # -- services ----------------------------------------------------------------------

    def apply(self, service: policy_pb2.Service) -> policy_pb2.Service:
        result: policy_pb2.Service = self.stub.ApplyService(
            policy_pb2.ApplyServiceRequest(service=service), timeout=self.timeout
        )
        return result

    def apply_service(
        self,
        name: str,
        vip: str,
        port: int,
        protocol: str = "tcp",
        endpoints: Iterable[str | types_pb2.Endpoint] = (),
        algorithm: str = "round-robin",
    ) -> policy_pb2.Service:
        return self.apply(make_service(name, vip, port, protocol, endpoints, algorithm))

    def apply_services(
        self, services: Iterable[policy_pb2.Service]
    ) -> policy_pb2.ApplyServicesResponse:
        """Create or replace all `services` atomically; the reply holds them as stored
        and the generation to wait for."""
        result: policy_pb2.ApplyServicesResponse = self.stub.ApplyServices(
            policy_pb2.ApplyServicesRequest(services=services), timeout=self.timeout
        )
        return result

    def delete_service(self, name: str) -> None:
        self.stub.DeleteService(policy_pb2.DeleteServiceRequest(name=name), timeout=self.timeout)

    def delete_services(self, names: Iterable[str]) -> int:
        """Delete all `names` atomically; returns the new generation."""
        result: policy_pb2.DeleteServicesResponse = self.stub.DeleteServices(
            policy_pb2.DeleteServicesRequest(names=names), timeout=self.timeout
        )
        return result.generation

    def get_service(self, name: str) -> policy_pb2.Service:
        result: policy_pb2.Service = self.stub.GetService(
            policy_pb2.GetServiceRequest(name=name), timeout=self.timeout
        )
        return result

    def list_services(self) -> list[policy_pb2.Service]:
        return list(self.stub.ListServices(policy_pb2.ListServicesRequest(), timeout=self.timeout))

    # -- nodes -------------------------------------------------------------------------

    def register_node(self, name: str, address: str) -> policy_pb2.Node:
        result: policy_pb2.Node = self.stub.RegisterNode(
            policy_pb2.RegisterNodeRequest(node=policy_pb2.Node(name=name, address=address)),
            timeout=self.timeout,
        )
        return result

    def deregister_node(self, name: str) -> None:
        self.stub.DeregisterNode(policy_pb2.DeregisterNodeRequest(name=name), timeout=self.timeout)

    def list_nodes(self) -> list[policy_pb2.Node]:
        return list(self.stub.ListNodes(policy_pb2.ListNodesRequest(), timeout=self.timeout))

    # -- status ------------------------------------------------------------------------

    def sync_status(self, node: str = "") -> policy_pb2.GetSyncStatusResponse:
        result: policy_pb2.GetSyncStatusResponse = self.stub.GetSyncStatus(
            policy_pb2.GetSyncStatusRequest(node=node), timeout=self.timeout
        )
        return result

    def wait_synced(
        self,
        nodes: Sequence[str] | None = None,
        timeout: float = 30.0,
        generation: int | None = None,
        poll: float = 0.05,
    ) -> policy_pb2.GetSyncStatusResponse:
        """Poll until the nodes (default: every registered node, at least one) are
        SYNCED with observed_generation >= `generation` (default: the generation the
        server reports). TimeoutError, with the last status, when `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.sync_status()
            if is_synced(status, nodes, generation):
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not synced after {timeout:g}s: {describe_status(status)}")
            time.sleep(poll)


def is_synced(
    status: policy_pb2.GetSyncStatusResponse,
    nodes: Sequence[str] | None = None,
    generation: int | None = None,
) -> bool:
    target = status.generation if generation is None else generation
    by_name = {n.node: n for n in status.nodes}
    names = list(nodes) if nodes is not None else list(by_name)
    if not names:
        return False
    for name in names:
        node = by_name.get(name)
        if node is None or node.state != policy_pb2.SYNC_STATE_SYNCED:
            return False
        if node.observed_generation < target:
            return False
    return True


def describe_status(status: Any) -> str:
    parts = [
        f"{n.node}={policy_pb2.SyncState.Name(n.state).removeprefix('SYNC_STATE_')}"
        f"@{n.observed_generation}/{n.desired_generation}"
        + (f" ({n.message})" if n.message else "")
        for n in status.nodes
    ]
    return f"generation {status.generation}: " + (", ".join(parts) or "no nodes")
