"""ApplyServices / DeleteServices: all or nothing, one generation bump per batch."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
import pytest

from policyd.client import PolicyClient, make_service
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2


def svc(i: int, port: int = 80, endpoint: str = "") -> policy_pb2.Service:
    return make_service(
        f"s{i}", f"198.19.1.{i + 1}", port, "tcp", [endpoint or f"198.18.2.{i + 1}:80"]
    )


def replace_name(msg: policy_pb2.Service, name: str) -> policy_pb2.Service:
    copy = policy_pb2.Service()
    copy.CopyFrom(msg)
    copy.name = name
    return copy


def with_algorithm(msg: policy_pb2.Service, value: int) -> policy_pb2.Service:
    msg.algorithm = types_pb2.Algorithm.ValueType(value)
    return msg


def state(client: PolicyClient) -> tuple[int, list[policy_pb2.Service]]:
    return client.sync_status().generation, client.list_services()


def rpc_error(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


def synced_at(client: PolicyClient, node: str, generation: int) -> bool:
    (status,) = client.sync_status(node).nodes
    return status.state == policy_pb2.SYNC_STATE_SYNCED and status.observed_generation == generation


def test_batch_is_one_generation_and_nodes_converge(wait_for, policyd, fake_node, client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    client = client_for(policyd())
    client.register_node("node-a", a.address)
    client.register_node("node-b", b.address)
    before = client.sync_status().generation

    reply = client.apply_services([svc(2), svc(0), svc(1)])
    assert reply.generation == before + 1 == client.sync_status().generation
    assert [s.name for s in reply.services] == ["s2", "s0", "s1"]  # the request's order
    assert {s.generation for s in reply.services} == {reply.generation}
    assert all(s.update_time.seconds > 0 for s in reply.services)
    assert reply.services[0] == client.get_service("s2")

    for name, node in (("node-a", a), ("node-b", b)):
        wait_for(lambda name=name: synced_at(client, name, reply.generation), what=name)
        assert sorted(node.datapath.snapshot()) == [(f"198.19.1.{i}", 80, 1) for i in (1, 2, 3)]


def test_unchanged_services_keep_their_generation(policyd, client_for):
    client = client_for(policyd())
    first = client.apply_services([svc(0), svc(1)])

    again = client.apply_services([svc(1), svc(0)])  # same services: nothing changes
    assert again.generation == first.generation
    assert [s.revision for s in again.services] == [first.generation] * 2
    assert [s.generation for s in again.services] == [1, 1]  # each object's own

    mixed = client.apply_services([svc(0), svc(1, endpoint="198.18.7.7:80"), svc(2)])
    assert mixed.generation == first.generation + 1
    by_name = {s.name: s.revision for s in mixed.services}
    assert by_name == {"s0": first.generation, "s1": mixed.generation, "s2": mixed.generation}
    assert {s.name: s.generation for s in mixed.services} == {"s0": 1, "s1": 2, "s2": 1}
    assert client.get_service("s0").update_time == first.services[0].update_time

    endpoints = ["198.18.9.9:80", "198.18.2.1:80"]
    two = client.apply_services([make_service("s0", "198.19.1.1", 80, "tcp", endpoints)])
    assert two.generation == mixed.generation + 1
    # the same endpoints in another order are the same service
    same = make_service("s0", "198.19.1.1", 80, "tcp", list(reversed(endpoints)))
    assert client.apply_services([same]).generation == two.generation


def test_empty_batch_changes_nothing(policyd, client_for):
    client = client_for(policyd())
    client.apply_service("keep", "198.19.0.1", 443, "tcp", ["198.18.1.1:443"])
    before = state(client)
    reply = client.apply_services([])
    assert (reply.generation, list(reply.services)) == (before[0], [])
    assert client.delete_services([]) == before[0]
    assert state(client) == before


@pytest.mark.parametrize(
    ("batch", "words"),
    [
        ([svc(0), svc(1), make_service("s2", "198.19.0.300", 80, "tcp", ["198.18.1.2:80"])],
         "services[2].vip: "),
        ([svc(0), make_service("S1", "198.19.0.9", 80, "tcp", ["198.18.1.2:80"])],
         "services[1].name: "),
        ([svc(0), make_service("s1", "198.19.0.9", 70000, "tcp", ["198.18.1.2:80"])],
         "services[1].port: "),
        ([make_service("s0", "198.19.0.9", 80, "tcp", [])], "services[0].endpoints: "),
        ([svc(0), make_service("s1", "198.19.0.9", 80, "tcp", ["198.18.1.2:80@2000"])],
         "services[1].endpoints[0].weight: "),
        ([svc(0), with_algorithm(svc(1), 9)], "services[1].algorithm: "),
        ([svc(0), svc(1), replace_name(svc(2), "s0")],
         "services[2].name: 's0' is also services[0]"),
        ([svc(0), svc(1), replace_name(svc(0), "other")],
         "services[2]: tcp://198.19.1.1:80 is also used by services[0] ('s0')"),
    ],
)  # fmt: skip
def test_invalid_batch_is_rejected_and_changes_nothing(
    wait_for, policyd, fake_node, client_for, batch, words
):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    client.apply_service("keep", "198.19.0.1", 443, "tcp", ["198.18.1.1:443"])
    before = state(client)
    wait_for(lambda: synced_at(client, "node-a", before[0]))
    on_node = node.datapath.snapshot()

    err = rpc_error(client.apply_services, batch)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.details()
    assert state(client) == before
    assert node.datapath.snapshot() == on_node


def test_conflict_with_a_stored_service_writes_nothing(policyd, client_for):
    client = client_for(policyd())
    client.apply_service("web", "198.19.1.2", 80, "tcp", ["198.18.1.7:80"])
    before = state(client)

    # svc(1) is 198.19.1.2:80/tcp, which 'web' holds and keeps
    err = rpc_error(client.apply_services, [svc(0), svc(1), svc(2)])
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "services[1]: service 'web' already uses tcp://198.19.1.2:80" in err.details()
    assert state(client) == before


def test_keys_may_move_between_services_of_a_batch(policyd, client_for):
    client = client_for(policyd())
    client.apply_services([svc(0), svc(1)])
    # s0 takes s1's key and s1 takes s0's, in one batch
    swapped = client.apply_services([replace_name(svc(1), "s0"), replace_name(svc(0), "s1")])
    assert {s.name: s.vip for s in swapped.services} == {"s0": "198.19.1.2", "s1": "198.19.1.1"}
    # a key freed by a service of the batch can go to a new service of the same batch
    s1_moves = make_service("s1", "198.19.1.6", 80, "tcp", ["198.18.2.6:80"])
    moved = client.apply_services([s1_moves, replace_name(svc(0), "new")])
    assert {s.name: s.vip for s in client.list_services()} == {
        "new": "198.19.1.1",
        "s0": "198.19.1.2",
        "s1": "198.19.1.6",
    }
    assert moved.generation == swapped.generation + 1
    # ... but not a key that a service outside the batch keeps
    err = rpc_error(client.apply_services, [replace_name(svc(1), "newer")])
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'s0'" in err.details()


def test_delete_services_is_all_or_nothing(wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    applied = client.apply_services([svc(i) for i in range(4)])
    wait_for(lambda: synced_at(client, "node-a", applied.generation))
    before = state(client)

    err = rpc_error(client.delete_services, ["s0", "nope", "s1"])
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in err.details()
    for names, words in [
        (["s0", "s0"], "names[1]: 's0' is also names[0]"),
        (["s0", "Bad"], "names[1]: "),
    ]:
        err = rpc_error(client.delete_services, names)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in err.details()
    assert state(client) == before

    generation = client.delete_services(["s2", "s0"])
    assert generation == applied.generation + 1 == client.sync_status().generation
    assert [s.name for s in client.list_services()] == ["s1", "s3"]
    wait_for(lambda: synced_at(client, "node-a", generation))
    assert sorted(node.datapath.snapshot()) == [("198.19.1.2", 80, 1), ("198.19.1.4", 80, 1)]


def test_apply_service_still_works_beside_batches(policyd, client_for):
    client = client_for(policyd())
    batch = client.apply_services([svc(0)])
    one = client.apply(svc(1))
    assert one.revision == batch.generation + 1
    assert client.apply(svc(1)).revision == one.revision
    err = rpc_error(client.apply, replace_name(svc(0), "other"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "service 's0' already uses" in err.details()
    assert not err.details().startswith("services[")


def test_big_change_to_a_full_node_does_not_read_it_back(
    fast, wait_for, policyd, fake_node, client_for
):
    node = fake_node("a").start()
    client = client_for(policyd(settings=replace(fast, resync_interval=120)))
    client.register_node("node-a", node.address)
    first = client.apply_services([svc(i) for i in range(50)])
    wait_for(lambda: synced_at(client, "node-a", first.generation))
    lists = node.datapath.calls["ListServices"]

    second = client.apply_services([svc(i, endpoint="198.18.9.9:80") for i in range(50)])
    wait_for(lambda: synced_at(client, "node-a", second.generation))
    assert node.datapath.calls["ListServices"] == lists  # the pass knew what the node held
    assert {s.endpoints[0].address for s in node.datapath.snapshot().values()} == {"198.18.9.9"}


def test_after_a_failed_pass_the_node_is_read_back(fast, wait_for, policyd, fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd(settings=replace(fast, resync_interval=120)))
    client.register_node("node-a", node.address)
    first = client.apply_services([svc(0), svc(1)])
    wait_for(lambda: synced_at(client, "node-a", first.generation))

    node.stop()  # the node goes away and comes back empty; the pass in between fails
    second = client.apply_services([svc(2)])
    wait_for(
        lambda: client.sync_status("node-a").nodes[0].state == policy_pb2.SYNC_STATE_ERROR,
        what="ERROR",
    )
    node.start(empty=True)
    wait_for(lambda: synced_at(client, "node-a", second.generation), what="recovery")
    assert sorted(node.datapath.snapshot()) == [(f"198.19.1.{i}", 80, 1) for i in (1, 2, 3)]
    assert node.datapath.calls["ListServices"] >= 1
