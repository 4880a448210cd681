"""policyd end to end at the unit layer: a real gRPC server in-process, fake dpd nodes."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from policyd.client import PolicyClient, make_service
from tests.unit.conftest import MemoryDatapathServicer
from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2
from xlbcore.service import EndpointSpec, Proto, ServiceSpec

WEB = dict(
    name="web",
    vip="198.19.0.10",
    port=80,
    protocol="tcp",
    endpoints=["198.18.1.3:8080@2", "198.18.1.2:8080"],
)

# What the node must hold for WEB: endpoints sorted, absent weight written as 1.
WEB_ON_NODE = datapath_pb2.Service(
    vip="198.19.0.10",
    port=80,
    protocol=types_pb2.PROTOCOL_TCP,
    algorithm=types_pb2.ALGORITHM_ROUND_ROBIN,
    mode=types_pb2.MODE_DNAT,
    endpoints=[
        types_pb2.Endpoint(address="198.18.1.2", port=8080, weight=1),
        types_pb2.Endpoint(address="198.18.1.3", port=8080, weight=2),
    ],
)


def node_status(client: PolicyClient, name: str) -> policy_pb2.NodeSyncStatus:
    (status,) = client.sync_status(name).nodes
    return status


def synced_at(client: PolicyClient, name: str, generation: int) -> bool:
    status = node_status(client, name)
    return (
        status.state == policy_pb2.SYNC_STATE_SYNCED
        and status.observed_generation == generation
        and status.desired_generation == generation
    )


def rpc_error(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


def test_apply_converges_to_synced(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    stored = client.apply_service(**WEB)

    # the store's revision moves with objects only (not with node registration)
    assert stored.revision == client.sync_status().generation == 1
    assert stored.generation == 1  # the service's own generation
    assert stored.update_time.seconds > 0
    assert [(e.address, e.port, e.weight) for e in stored.endpoints] == [
        ("198.18.1.2", 8080, 1),
        ("198.18.1.3", 8080, 2),
    ]
    wait_for(lambda: synced_at(client, "node-a", stored.revision), what="node-a SYNCED")
    assert node.datapath.snapshot() == {("198.19.0.10", 80, 1): WEB_ON_NODE}
    status = node_status(client, "node-a")
    assert status.services == 1
    assert status.message == ""
    assert status.last_sync_time.seconds > 0


def test_apply_same_service_twice_keeps_generation(policyd, client_for):
    client = client_for(policyd())
    first = client.apply_service(**WEB)
    again = client.apply_service(**{**WEB, "endpoints": list(reversed(WEB["endpoints"]))})
    assert again.generation == first.generation
    changed = client.apply_service(**{**WEB, "endpoints": ["198.18.1.9:80"]})
    assert changed.generation == first.generation + 1


def test_delete_propagates(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    client.apply_service(**WEB)
    dns = client.apply_service("dns", "198.19.0.53", 53, "udp", ["198.18.1.53:53"])
    wait_for(lambda: synced_at(client, "node-a", dns.revision))
    assert len(node.datapath.snapshot()) == 2

    client.delete_service("web")
    generation = client.sync_status().generation
    assert generation == dns.revision + 1
    wait_for(lambda: synced_at(client, "node-a", generation), what="delete synced")
    assert list(node.datapath.snapshot()) == [("198.19.0.53", 53, 2)]
    assert [s.name for s in client.list_services()] == ["dns"]
    assert rpc_error(client.get_service, "web").code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("service", "words"),
    [
        (make_service("Web", "198.19.0.10", 80, "tcp", ["198.18.1.2:80"]), "service.name"),
        (make_service("", "198.19.0.10", 80, "tcp", ["198.18.1.2:80"]), "service.name"),
        (make_service("w" * 64, "198.19.0.10", 80, "tcp", ["198.18.1.2:80"]), "service.name"),
        (make_service("web", "198.19.0.300", 80, "tcp", ["198.18.1.2:80"]), "service.vip"),
        (make_service("web", "198.19.0.10", 70000, "tcp", ["198.18.1.2:80"]), "service.port"),
        (make_service("web", "198.19.0.10", 80, "tcp", []), "service.endpoints"),
        (make_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:0"]), "endpoints[0].port"),
        (make_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:80@1001"]), "weight"),
        (
            make_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:80", "198.18.1.2:80"]),
            "listed twice",
        ),
        (policy_pb2.Service(name="web", vip="198.19.0.10", port=80, protocol=7), "protocol"),
        (policy_pb2.Service(name="web", vip="198.19.0.10", port=80), "protocol"),
    ],
)
def test_invalid_service_is_rejected_and_changes_nothing(policyd, client_for, service, words):
    client = client_for(policyd())
    client.apply_service("keep", "198.19.0.1", 443, "tcp", ["198.18.1.1:443"])
    before = (client.sync_status().generation, client.list_services())

    err = rpc_error(client.apply, service)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.details()
    assert (client.sync_status().generation, client.list_services()) == before


def test_invalid_node_is_rejected(policyd, client_for):
    client = client_for(policyd())
    for name, address, words in [
        ("Node", "127.0.0.1:5000", "node.name"),
        ("n1", "127.0.0.1", "no port"),
        ("n1", "127.0.0.1:70000", "out of range"),
        ("n1", "unix:", "socket path"),
        ("n1", "::1:5000", "IPv6"),
    ]:
        err = rpc_error(client.register_node, name, address)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, address)
        assert words in err.details()
    assert client.list_nodes() == []
    assert client.sync_status().generation == 0


def test_conflicting_key_is_already_exists(policyd, client_for):
    client = client_for(policyd())
    web = client.apply_service(**WEB)
    err = rpc_error(client.apply_service, "other", "198.19.0.10", 80, "tcp", ["198.18.1.7:80"])
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'web'" in err.details()
    assert [s.name for s in client.list_services()] == ["web"]
    assert client.get_service("web") == web
    # Same vip and port over UDP is a different key.
    client.apply_service("other", "198.19.0.10", 80, "udp", ["198.18.1.7:80"])


def test_unknown_names_are_not_found(policyd, client_for):
    client = client_for(policyd())
    assert rpc_error(client.delete_service, "nope").code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(client.get_service, "nope").code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(client.deregister_node, "nope").code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(client.sync_status, "nope").code() == grpc.StatusCode.NOT_FOUND
    assert client.sync_status().generation == 0


def test_node_down_then_up_converges_without_api_calls(wait_for, policyd, fake_node, client_for):
    node = fake_node("late")  # not started: nothing listens on its socket
    client = client_for(policyd())
    client.register_node("node-late", node.address)
    stored = client.apply_service(**WEB)

    down = wait_for(
        lambda: (s := node_status(client, "node-late")).state == policy_pb2.SYNC_STATE_ERROR and s,
        what="ERROR",
    )
    assert "UNAVAILABLE" in down.message
    assert down.observed_generation == 0
    assert down.desired_generation == stored.revision
    assert down.last_attempt_time.seconds > 0

    node.start()  # no call to policyd's API from here on except reading the status
    wait_for(lambda: synced_at(client, "node-late", stored.revision), what="recovery")
    assert node.datapath.snapshot() == {("198.19.0.10", 80, 1): WEB_ON_NODE}
    assert node_status(client, "node-late").message == ""


def test_node_restarted_empty_is_refilled(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    stored = client.apply_service(**WEB)
    wait_for(lambda: synced_at(client, "node-a", stored.revision))

    node.stop()
    node.start(empty=True)
    wait_for(
        lambda: node.datapath.snapshot() == {("198.19.0.10", 80, 1): WEB_ON_NODE},
        what="refill after restart",
    )


def test_changes_are_pushed_without_waiting_for_resync(
    fast, wait_for, policyd, fake_node, client_for
):
    node = fake_node("a").start()
    client = client_for(policyd(settings=replace(fast, resync_interval=120)))
    client.register_node("node-a", node.address)
    wait_for(lambda: synced_at(client, "node-a", 0), what="first pass")
    stored = client.apply_service(**WEB)
    wait_for(lambda: synced_at(client, "node-a", stored.revision), timeout=5, what="wake-up")
    assert node.datapath.snapshot() == {("198.19.0.10", 80, 1): WEB_ON_NODE}
    client.delete_service("web")
    wait_for(lambda: node.datapath.snapshot() == {}, timeout=5, what="delete wake-up")


class PutGatedDatapath(MemoryDatapathServicer):
    """A node whose PutServices hangs while `put_gate` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.put_gate = threading.Event()
        self.put_gate.set()
        self.puts_started = 0

    def PutServices(self, request: Any, context: Any) -> datapath_pb2.PutServicesResponse:  # noqa: N802
        with self.lock:
            self.puts_started += 1
        self.put_gate.wait(30)
        return super().PutServices(request, context)  # type: ignore[no-any-return]


def test_change_during_a_pass_leaves_node_pending(fast, wait_for, policyd, fake_node, client_for):
    node = fake_node("a")
    datapath = node.datapath = PutGatedDatapath()
    node.start()
    server = policyd(settings=replace(fast, resync_interval=120))
    client = client_for(server)
    client.register_node("node-a", node.address)
    wait_for(lambda: synced_at(client, "node-a", 0), what="first pass")

    datapath.put_gate.clear()  # the next PutServices hangs
    try:
        web = client.apply_service(**WEB)
        wait_for(lambda: datapath.puts_started >= 1, what="pass started")
        status = node_status(client, "node-a")
        assert status.state == policy_pb2.SYNC_STATE_PENDING
        assert (status.observed_generation, status.desired_generation) == (0, web.revision)

        # A change lands while the pass is in flight, written to the store directly (no
        # wake-up).
        assert server.store is not None and server.reconciler is not None
        dns = ServiceSpec(
            "198.19.0.53", 53, Proto.UDP, endpoints=(EndpointSpec("198.18.1.53", 53),)
        )
        server.store.apply_service("dns", dns)
    finally:
        datapath.put_gate.set()
    # The worker looks at the store's generation after every pass: the change that
    # landed during the pass (without a wake-up) is applied right after it.
    wait_for(lambda: synced_at(client, "node-a", web.revision + 1), what="second pass")
    assert len(node.datapath.snapshot()) == 2


def test_deregister_does_not_wait_for_a_hung_node(fast, wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    node.datapath.gate.clear()  # every ListServices hangs
    client = client_for(policyd(settings=replace(fast, rpc_timeout=30)))
    client.register_node("node-a", node.address)
    wait_for(lambda: node.datapath.calls["ListServices"] >= 1, what="pass started")
    started = time.monotonic()
    client.deregister_node("node-a")  # closes the channel: the call in flight is cancelled
    assert time.monotonic() - started < 5
    assert client.list_nodes() == []


def test_drift_is_repaired_by_periodic_resync(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    stored = client.apply_service(**WEB)
    wait_for(lambda: synced_at(client, "node-a", stored.revision))

    # a hand edit behind policyd's back, through the node's own API
    edited = datapath_pb2.Service()
    edited.CopyFrom(WEB_ON_NODE)
    edited.endpoints[0].weight = 7
    stray = datapath_pb2.Service(
        vip="198.19.0.99",
        port=9,
        protocol=types_pb2.PROTOCOL_UDP,
        endpoints=[types_pb2.Endpoint(address="198.18.9.9", port=9, weight=1)],
    )
    with grpc.insecure_channel(node.address) as channel:
        datapath_pb2_grpc.DatapathStub(channel).PutServices(
            datapath_pb2.PutServicesRequest(services=[edited, stray]), timeout=5)
    assert node.datapath.snapshot() != {("198.19.0.10", 80, 1): WEB_ON_NODE}

    wait_for(
        lambda: node.datapath.snapshot() == {("198.19.0.10", 80, 1): WEB_ON_NODE},
        what="drift repaired",
    )
    assert client.sync_status().generation == stored.revision  # no API change happened


def test_several_nodes_and_deregister_leaves_datapath(wait_for, policyd, fake_node, client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    client = client_for(policyd())
    client.register_node("node-a", a.address)
    client.register_node("node-b", b.address)
    stored = client.apply_service(**WEB)
    client.wait_synced(timeout=10)
    assert [n.name for n in client.list_nodes()] == ["node-a", "node-b"]

    client.deregister_node("node-b")
    assert [n.node for n in client.sync_status().nodes] == ["node-a"]
    assert rpc_error(client.sync_status, "node-b").code() == grpc.StatusCode.NOT_FOUND
    client.delete_service("web")
    generation = client.sync_status().generation
    wait_for(lambda: synced_at(client, "node-a", generation))
    assert a.datapath.snapshot() == {}
    # node-b is no longer managed: it keeps what it had.
    assert b.datapath.snapshot() == {("198.19.0.10", 80, 1): WEB_ON_NODE}
    assert stored.revision < generation


def test_reregister_moves_node_to_new_address(wait_for, policyd, fake_node, client_for):
    old, new = fake_node("old").start(), fake_node("new").start()
    client = client_for(policyd())
    first = client.register_node("node-a", old.address)
    stored = client.apply_service(**WEB)
    wait_for(lambda: synced_at(client, "node-a", stored.revision))

    same = client.register_node("node-a", old.address)
    assert same.register_time == first.register_time
    assert client.sync_status().generation == stored.revision

    moved = client.register_node("node-a", new.address)
    assert moved.address == new.address
    generation = client.sync_status().generation
    assert generation == stored.revision  # moving a node is no object change
    wait_for(lambda: synced_at(client, "node-a", generation))
    assert new.datapath.snapshot() == {("198.19.0.10", 80, 1): WEB_ON_NODE}
    assert [n.address for n in client.list_nodes()] == [new.address]


def test_restart_keeps_desired_state(wait_for, policyd, fake_node, client_for, tmp_path):
    node = fake_node("a").start()
    first = policyd(db=tmp_path / "state.db")
    client = client_for(first)
    client.register_node("node-a", node.address)
    stored = client.apply_service(**WEB)
    client.wait_synced(timeout=10)
    client.close()
    first.stop(grace=0)

    node.stop()
    node.start(empty=True)  # the node lost its state while policyd was down
    second = policyd(db=tmp_path / "state.db")
    client = client_for(second)
    assert client.get_service("web") == stored
    assert [(n.name, n.address) for n in client.list_nodes()] == [("node-a", node.address)]
    assert client.sync_status().generation == stored.revision
    wait_for(lambda: synced_at(client, "node-a", stored.revision), what="resync after restart")
    assert node.datapath.snapshot() == {("198.19.0.10", 80, 1): WEB_ON_NODE}


def test_many_services_are_batched(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    for i in range(30):
        client.apply_service(f"s{i}", f"198.19.1.{i + 1}", 80, "tcp", [f"198.18.2.{i + 1}:80"])
    generation = client.sync_status().generation
    wait_for(lambda: synced_at(client, "node-a", generation))
    assert len(node.datapath.snapshot()) == 30
    assert node_status(client, "node-a").services == 30


def test_health_and_reflection(policyd):
    server = policyd()
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "xlb.policy.v1.Policy"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
    assert {"xlb.policy.v1.Policy", "grpc.health.v1.Health"} <= names


def test_internal_errors_are_internal_not_unknown(policyd, client_for, monkeypatch):
    server = policyd()
    client = client_for(server)

    def boom(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    assert server.store is not None
    monkeypatch.setattr(server.store, "list_nodes", boom)
    err = rpc_error(client.list_nodes)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "ListNodes" in err.details()
    assert "Traceback" not in err.details()


def test_stop_removes_socket(policyd, sockdir):
    server = policyd()
    assert (sockdir / "policyd.sock").exists()
    server.stop(grace=0)
    assert not (sockdir / "policyd.sock").exists()


def test_second_server_on_same_socket_is_refused(policyd, sockdir):
    from policyd.server import StartupError

    policyd()
    with pytest.raises(StartupError, match="another process"):
        policyd()
