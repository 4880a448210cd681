"""policyd as a cluster control plane: node labels and object selectors, per-object
generations and compare-and-swap, Watch, WatchSyncStatus, registering a node that holds
state, one address per node, drift counted. policyd in-process, dpd's real servicer
over in-memory maps (tests/unit/conftest.py)."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import grpc
import pytest

from policyd.client import make_route, make_rule, make_service
from policyd.selectors import matches, validate_labels
from policyd.status import NodeStatus, ObjectError, SyncState
from policyd.store import GenerationConflict, Store
from policyd.watch import ObjectWatch, StatusWatch, Watcher
from xlb.dpd.v1 import datapath_pb2
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2
from xlbcore.errors import ConflictError, Exhausted, ValidationError
from xlbcore.service import EndpointSpec, Proto, ServiceSpec


def spec(port: int = 80) -> ServiceSpec:
    return ServiceSpec("198.19.0.10", port, Proto.TCP, endpoints=(EndpointSpec("198.18.1.2", 80),))


def svc(name: str, port: int, selector: dict[str, str] | None = None) -> policy_pb2.Service:
    msg = make_service(name, "198.19.0.10", port, "tcp", ["198.18.1.2:8080"])
    msg.node_selector.update(selector or {})
    return msg


def ports(node: Any) -> set[int]:
    return {port for _vip, port, _proto in node.datapath.snapshot()}


def status_of(client: Any, name: str) -> policy_pb2.NodeSyncStatus:
    (status,) = client.sync_status(name).nodes
    return status


def synced(client: Any, names: list[str]) -> bool:
    reply = client.sync_status()
    by = {n.node: n for n in reply.nodes}
    return all(by[n].state == policy_pb2.SYNC_STATE_SYNCED
               and by[n].observed_generation == reply.generation for n in names)


# -- selectors (pure) --------------------------------------------------------------------


def test_selector_matches_label_equality():
    assert matches((), {})
    assert matches((("zone", "a"),), {"zone": "a", "role": "edge"})
    assert not matches((("zone", "a"),), {"zone": "b"})
    assert not matches((("zone", "a"), ("role", "edge")), {"zone": "a"})
    assert validate_labels({"b": "2", "a": "1"}, "x") == (("a", "1"), ("b", "2"))
    assert validate_labels({"xlb.io/zone": ""}, "x") == (("xlb.io/zone", ""),)
    with pytest.raises(ValidationError, match=r"^services\[1\]\.node_selector: key 'a b'"):
        validate_labels({"a b": "1"}, "services[1].node_selector")
    with pytest.raises(ValidationError, match=r"^node\.labels\[zone\]: value '-x'"):
        validate_labels({"zone": "-x"}, "node.labels")


# -- selectors through policyd -------------------------------------------------------------


def test_objects_reach_only_matching_nodes_and_relabeling_moves_them(
        wait_for, policyd, fake_node, client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    client = client_for(policyd())
    node = client.register_node("node-a", a.address, {"zone": "east", "role": "edge"})
    assert dict(node.labels) == {"zone": "east", "role": "edge"}
    client.register_node("node-b", b.address, {"zone": "west"})
    client.apply_services([svc("all", 80), svc("east", 81, {"zone": "east"}),
                           svc("edge-west", 82, {"zone": "west", "role": "edge"})])
    rule = make_rule("east-drop", "drop", 5, protocol="udp")
    rule.node_selector["zone"] = "east"
    client.apply_rule(rule)
    route = make_route("west-lab", "198.20.0.0/16", ["dev=lo"])
    route.node_selector["zone"] = "west"
    client.apply_route(route)
    wait_for(lambda: synced(client, ["node-a", "node-b"]), what="both SYNCED")
    assert ports(a) == {80, 81} and ports(b) == {80}
    assert status_of(client, "node-a").firewall_rules == 1
    assert status_of(client, "node-b").firewall_rules == 0
    assert [dict(n.labels) for n in client.list_nodes()] == [
        {"zone": "east", "role": "edge"}, {"zone": "west"}]

    # relabel b: it takes "east" and the rule; a loses "east" when it moves west
    client.register_node("node-b", b.address, {"zone": "east"})
    wait_for(lambda: ports(b) == {80, 81} and status_of(client, "node-b").firewall_rules == 1,
             what="b takes the east objects")
    client.register_node("node-a", a.address, {"zone": "west", "role": "edge"})
    wait_for(lambda: ports(a) == {80, 82} and status_of(client, "node-a").firewall_rules == 0,
             what="a moves west")
    wait_for(lambda: synced(client, ["node-a", "node-b"]), what="both SYNCED again")

    # changing an object's selector moves it, the others stay
    client.apply(svc("east", 81, {"zone": "west"}))
    wait_for(lambda: ports(a) == {80, 81, 82} and ports(b) == {80}, what="selector moved")
    client.apply(svc("east", 81))  # no selector: every node
    wait_for(lambda: ports(a) == {80, 81, 82} and ports(b) == {80, 81}, what="everywhere")


def test_a_relabel_writes_only_the_objects_with_a_selector(wait_for, policyd, fake_node,
                                                          client_for):
    a = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", a.address, {"zone": "east"})
    client.apply_services([svc(f"s{i}", 100 + i) for i in range(20)]
                          + [svc("east", 81, {"zone": "east"})])
    wait_for(lambda: synced(client, ["node-a"]) and len(ports(a)) == 21, what="SYNCED")
    puts = a.datapath.calls["PutServices"]
    deletes = a.datapath.calls["DeleteServices"]
    client.register_node("node-a", a.address, {"zone": "west"})
    wait_for(lambda: 81 not in ports(a), what="east removed")
    assert a.datapath.calls["DeleteServices"] == deletes + 1
    assert a.datapath.calls["PutServices"] == puts  # nothing else written


def test_bad_selector_names_the_field(policyd, client_for, fake_node):
    client = client_for(policyd())
    with pytest.raises(grpc.RpcError) as info:
        client.apply_services([svc("a", 80), svc("b", 81, {"bad key": "x"})])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("services[1].node_selector: key 'bad key'")
    with pytest.raises(grpc.RpcError) as info:
        client.register_node("n", fake_node("n").address, {"zone": "x" * 300})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("node.labels[zone]: value 'xxxx")
    assert len(info.value.details()) < 200


# -- generations and compare-and-swap -----------------------------------------------------


def test_generations_are_per_object_and_cas_conflicts_write_nothing(policyd, client_for):
    client = client_for(policyd())
    web = client.apply(svc("web", 80))
    dns = client.apply(svc("dns", 53))
    assert (web.generation, dns.generation) == (1, 1)
    assert (web.revision, dns.revision) == (1, 2)
    again = client.apply(svc("web", 80))
    assert (again.generation, again.revision) == (1, 1)  # unchanged: nothing moves

    request = policy_pb2.ApplyServiceRequest(service=svc("web", 80, {"zone": "a"}),
                                             expected_generation=1)
    changed = client.stub.ApplyService(request, timeout=5)
    assert (changed.generation, changed.revision) == (2, 3)
    with pytest.raises(grpc.RpcError) as info:  # a writer that read generation 1
        client.stub.ApplyService(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert "service 'web' is at generation 2, not 1" in info.value.details()
    assert client.get_service("web") == changed

    create = policy_pb2.ApplyServiceRequest(service=svc("new", 90), expected_generation=0)
    assert client.stub.ApplyService(create, timeout=5).generation == 1
    with pytest.raises(grpc.RpcError) as info:  # it exists now
        client.stub.ApplyService(create, timeout=5)
    assert info.value.code() == grpc.StatusCode.ABORTED

    # a batch: each object's generation is the expected one; one mismatch, nothing written
    batch = [svc("web", 80), svc("dns", 54)]
    batch[0].generation, batch[1].generation = 2, 7
    revision = client.sync_status().generation
    with pytest.raises(grpc.RpcError) as info:
        client.stub.ApplyServices(policy_pb2.ApplyServicesRequest(
            services=batch, check_generations=True), timeout=5)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert info.value.details().startswith("services[1]: service 'dns' is at generation 1")
    assert client.sync_status().generation == revision
    assert client.get_service("dns").port == 53
    batch[1].generation = 1
    reply = client.stub.ApplyServices(policy_pb2.ApplyServicesRequest(
        services=batch, check_generations=True), timeout=5)
    assert [s.generation for s in reply.services] == [3, 2]

    rule = make_rule("r", "drop", 5, protocol="udp")
    client.apply_rule(rule)
    with pytest.raises(grpc.RpcError) as info:
        client.stub.ApplyFirewallRule(policy_pb2.ApplyFirewallRuleRequest(
            rule=rule, expected_generation=5), timeout=5)
    assert info.value.code() == grpc.StatusCode.ABORTED


def test_store_cas_and_generations_survive_reopen(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as store:
        store.apply_service("web", spec(), selector=(("zone", "a"),))
        store.apply_service("web", spec(), selector=(("zone", "b"),))
        with pytest.raises(GenerationConflict):
            store.apply_service("web", spec(81), expected=1)
    with Store(path) as store:
        web = store.get_service("web")
        assert (web.generation, web.revision, web.selector) == (2, 2, (("zone", "b"),))
        assert store.apply_service("web", spec(81), expected=2)[0].generation == 3


def test_one_address_is_one_node(policyd, client_for, fake_node):
    client = client_for(policyd())
    node = fake_node("a")
    client.register_node("node-a", node.address)
    with pytest.raises(grpc.RpcError) as info:
        client.register_node("node-b", node.address)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "node 'node-a'" in info.value.details()
    assert [n.name for n in client.list_nodes()] == ["node-a"]
    client.register_node("node-a", node.address, {"zone": "a"})  # the same node: fine


def test_store_refuses_a_second_name_for_an_address(tmp_path):
    with Store(tmp_path / "s.db") as store:
        store.register_node("a", "unix:/run/a.sock")
        with pytest.raises(ConflictError, match="node.address"):
            store.register_node("b", "unix:/run/a.sock")


# -- Watch ----------------------------------------------------------------------------------


def events(stream: Any, count: int) -> list[policy_pb2.WatchEvent]:
    out = []
    for event in stream:
        out.append(event)
        if len(out) == count:
            break
    return out


def test_watch_sends_the_current_state_then_changes_and_deletions(policyd, client_for):
    client = client_for(policyd())
    client.apply(svc("web", 80))
    client.apply_rule(make_rule("r", "drop", 5, protocol="udp"))
    stream = client.watch(timeout=10)
    try:
        first = events(stream, 3)
        assert [(e.type, e.kind, e.name) for e in first] == [
            (policy_pb2.EVENT_TYPE_PUT, "service", "web"),
            (policy_pb2.EVENT_TYPE_PUT, "firewall_rule", "r"),
            (policy_pb2.EVENT_TYPE_CURRENT, "", "")]
        assert first[0].service.port == 80 and first[2].revision == 2
        changed = client.apply(svc("web", 81))
        client.delete_rule("r")
        later = events(stream, 2)
        assert (later[0].type, later[0].revision, later[0].service.port,
                later[0].service.generation) == (policy_pb2.EVENT_TYPE_PUT, 3, 81, 2)
        assert changed.revision == 3
        assert (later[1].type, later[1].kind, later[1].name, later[1].revision) == (
            policy_pb2.EVENT_TYPE_DELETE, "firewall_rule", "r", 4)
        assert later[1].firewall_rule.spec.priority == 5  # its last stored form
    finally:
        stream.cancel()

    # from a revision: the changes after it, from the history (deletions included)
    resumed = client.watch(from_revision=2, kinds=["firewall_rule"], timeout=10)
    try:
        (deleted,) = events(resumed, 1)
        assert (deleted.type, deleted.name) == (policy_pb2.EVENT_TYPE_DELETE, "r")
    finally:
        resumed.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(client.watch(from_revision=99, timeout=5))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(grpc.RpcError) as info:
        list(client.watch(kinds=["pod"], timeout=5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("kinds[0]: 'pod'")


def test_watch_from_before_the_history_is_out_of_range(tmp_path):
    with Store(tmp_path / "s.db") as store:
        store.apply_service("a", spec(1))
        store.apply_service("b", spec(2))
    with Store(tmp_path / "s.db") as store:  # reopened: the history starts now
        watch = ObjectWatch(store)
        with pytest.raises(Exception, match="older than policyd's history"):
            watch.subscribe(1, frozenset())
        watcher, initial, revision = watch.subscribe(2, frozenset())
        assert (initial, revision) == ([], 2)
        store.delete_service("a")
        ((rev, change),) = watcher.get(1.0)
        assert (rev, change.kind, change.name, change.deleted) == (3, "service", "a", True)


def test_a_slow_watcher_is_dropped_not_grown(tmp_path):
    with Store(tmp_path / "s.db") as store:
        watch = ObjectWatch(store, queue_limit=5)
        slow, _, _ = watch.subscribe(0, frozenset())
        fast, _, _ = watch.subscribe(0, frozenset())
        for i in range(4):
            store.apply_service(f"s{i}", spec(i + 1))
        assert len(fast.get(0.1)) == 4  # keeps up
        for i in range(4, 8):
            store.apply_service(f"s{i}", spec(i + 1))
        assert slow.overflowed and slow.queued == 0  # dropped, its queue freed
        with pytest.raises(Exhausted, match="fell more than 5 events behind"):
            slow.get(0.1)
        assert len(fast.get(0.1)) == 4
        watch.close()
        with pytest.raises(Exception, match="stopping"):
            fast.get(0.1)


def test_a_slow_watch_stream_ends_resource_exhausted(policyd, client_for):
    server = policyd()
    client = client_for(server)
    assert server._servicer is not None
    server._servicer.watch.fanout.queue_limit = 3
    gate = threading.Event()
    stream = client.watch(timeout=10)
    first = next(stream)  # CURRENT: nothing stored yet
    assert first.type == policy_pb2.EVENT_TYPE_CURRENT

    # the stream's handler is parked in get(); hold it so the queue fills meanwhile
    (watcher,) = server._servicer.watch.fanout._watchers
    original = watcher.get

    def held(timeout: float) -> list[Any]:
        gate.wait(5)
        return original(timeout)

    watcher.get = held  # type: ignore[method-assign]
    for i in range(6):
        client.apply(svc(f"s{i}", 100 + i))
    gate.set()
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "fell more than 3 events behind" in info.value.details()


def test_watchers_are_bounded_and_end_at_stop(policyd, client_for):
    server = policyd()
    client = client_for(server)
    assert server._servicer is not None
    server._servicer.watch.fanout.max_watchers = 1
    stream = client.watch(timeout=10)
    assert next(stream).type == policy_pb2.EVENT_TYPE_CURRENT
    with pytest.raises(grpc.RpcError) as info:
        next(client.watch(timeout=5))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    server.stop(grace=2)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopping" in info.value.details()


# -- WatchSyncStatus ----------------------------------------------------------------------


def test_status_watch_publishes_changes_only():
    hub = StatusWatch()
    base = NodeStatus("n", SyncState.SYNCED, 3, 3, "", 1, 1, 0)
    watcher, initial = hub.subscribe("", {"n": base})
    assert initial == [(3, base)]
    hub.update(replace(base, last_attempt_ns=99))  # timestamps alone: nothing
    assert watcher.get(0.01) == []
    refused = replace(base, state=SyncState.ERROR,
                      errors=(ObjectError("route", "r", "FAILED_PRECONDITION: no"),))
    hub.update(refused)
    got = watcher.get(0.1)
    assert got[0] == (3, refused)
    assert got[1][1].state is SyncState.ERROR and got[1][1].name == "r"
    hub.update(base)
    got = watcher.get(0.1)
    assert got[1][1].state is SyncState.SYNCED and got[1][1].name == "r"


def test_watch_sync_status_follows_a_node_into_error_and_back(wait_for, policyd, fake_node,
                                                             client_for, fast):
    node = fake_node("a").start()
    client = client_for(policyd(settings=replace(fast, backoff_max=0.3)))
    client.register_node("node-a", node.address)
    wait_for(lambda: synced(client, ["node-a"]), what="SYNCED")
    stream = client.watch_sync_status("node-a", timeout=30)
    seen: list[policy_pb2.SyncStatusEvent] = []
    done = threading.Event()

    def read() -> None:
        try:
            for event in stream:
                seen.append(event)
        except grpc.RpcError:
            pass
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(e.current for e in seen), what="the initial state")
        assert seen[0].node.state == policy_pb2.SYNC_STATE_SYNCED
        assert seen[0].node.epoch == 1
        node.stop()
        client.apply(svc("web", 80))
        wait_for(lambda: any(e.node.state == policy_pb2.SYNC_STATE_ERROR for e in seen),
                 what="ERROR")
        error = next(e for e in seen if e.node.state == policy_pb2.SYNC_STATE_ERROR)
        assert error.node.message.startswith("UNAVAILABLE")
        node.start()
        wait_for(lambda: seen[-1].node.state == policy_pb2.SYNC_STATE_SYNCED
                 and seen[-1].node.observed_generation == 1, what="SYNCED again")
        # a rule the node refuses: the object goes ERROR, then SYNCED once deleted
        client.apply_rule(make_rule("from-eth9", "drop", 300, in_interface="eth9"))
        wait_for(lambda: any(e.object.name == "from-eth9"
                             and e.object.state == policy_pb2.SYNC_STATE_ERROR for e in seen),
                 what="object ERROR")
        client.delete_rule("from-eth9")
        wait_for(lambda: any(e.object.name == "from-eth9"
                             and e.object.state == policy_pb2.SYNC_STATE_SYNCED for e in seen),
                 what="object SYNCED")
    finally:
        stream.cancel()
        done.wait(5)


# -- a node that holds state, drift ---------------------------------------------------------


def test_registering_a_node_with_state_reports_what_is_removed(wait_for, policyd, fake_node,
                                                              client_for, captured_log):
    node = fake_node("a").start()
    # state put on the node before policyd manages it
    put = datapath_pb2.PutServicesRequest(services=[datapath_pb2.Service(
        vip="198.19.9.9", port=9090, protocol=types_pb2.PROTOCOL_TCP,
        endpoints=[types_pb2.Endpoint(address="198.18.1.9", port=80)])])
    node.datapath.PutServices(put, None)
    client = client_for(policyd())
    client.apply(svc("web", 80))
    client.register_node("node-a", node.address)
    wait_for(lambda: synced(client, ["node-a"]), what="SYNCED")
    assert ports(node) == {80}
    status = status_of(client, "node-a")
    assert [(f.kind, f.key) for f in status.foreign] == [("service", "tcp://198.19.9.9:9090")]
    log = captured_log.getvalue()
    assert "event=node.foreign_object" in log and "198.19.9.9:9090" in log
    assert log.index("event=node.foreign_object") < log.index("event=node.synced")
    assert status.drift_found == 0 and status.drift_repaired_total == 0


def test_drift_repaired_is_counted(wait_for, policyd, fake_node, client_for, fast):
    node = fake_node("a").start()
    client = client_for(policyd(settings=replace(fast, resync_interval=0.2)))
    client.register_node("node-a", node.address)
    client.apply_services([svc("web", 80), svc("dns", 53)])
    wait_for(lambda: synced(client, ["node-a"]) and ports(node) == {80, 53}, what="SYNCED")
    # a hand edit through dpd's API: one service deleted behind policyd's back
    node.datapath.DeleteServices(datapath_pb2.DeleteServicesRequest(keys=[
        types_pb2.ServiceKey(vip="198.19.0.10", port=53, protocol=types_pb2.PROTOCOL_TCP)]),
        None)
    wait_for(lambda: ports(node) == {80, 53}, what="repaired")
    wait_for(lambda: status_of(client, "node-a").drift_repaired_total == 1, what="counted")
    status = status_of(client, "node-a")
    assert (status.drift_found, status.drift_repaired) == (1, 1)


def test_store_listeners_get_changes_in_order(tmp_path):
    seen: list[tuple[int, str, str, bool]] = []
    with Store(tmp_path / "s.db") as store:
        store.add_listener(lambda rev, changes: seen.extend(
            (rev, c.kind, c.name, c.deleted) for c in changes))
        store.apply_services([("a", spec(1)), ("b", spec(2))])
        store.apply_routes([])
        store.delete_services(["a"])
        assert seen == [(1, "service", "a", False), (1, "service", "b", False),
                        (2, "service", "a", True)]


def test_watcher_get_waits_then_returns_nothing():
    watcher: Watcher[int] = Watcher(2, lambda _i: True)
    assert watcher.get(0.01) == []
    watcher.push([1, 2])
    assert watcher.get(0.01) == [1, 2]


def test_a_schema_2_store_opens_with_generations_selectors_and_labels(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('generation', 7);
        CREATE TABLE services (name TEXT PRIMARY KEY, vip TEXT NOT NULL, port INTEGER NOT NULL,
            protocol INTEGER NOT NULL, spec BLOB NOT NULL, generation INTEGER NOT NULL,
            update_time_ns INTEGER NOT NULL, UNIQUE (vip, port, protocol));
        CREATE TABLE firewall_rules (name TEXT PRIMARY KEY, spec BLOB NOT NULL,
            generation INTEGER NOT NULL, update_time_ns INTEGER NOT NULL,
            flush INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE routes (name TEXT PRIMARY KEY, prefix TEXT NOT NULL UNIQUE,
            spec BLOB NOT NULL, generation INTEGER NOT NULL, update_time_ns INTEGER NOT NULL,
            flush INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE nodes (name TEXT PRIMARY KEY, address TEXT NOT NULL,
            register_time_ns INTEGER NOT NULL);
        INSERT INTO nodes VALUES ('n1', 'unix:/run/n1.sock', 1);
        PRAGMA user_version = 2;
    """)
    from policyd.store import encode_spec

    conn.execute("INSERT INTO services VALUES ('web', '198.19.0.10', 80, 1, ?, 5, 1)",
                 (encode_spec("web", spec()),))
    conn.commit()
    conn.close()
    with Store(path) as store:
        web = store.get_service("web")
        assert (web.generation, web.revision, web.selector) == (1, 5, ())
        assert store.get_node("n1").labels == ()
        stored, _ = store.apply_service("web", spec(), selector=(("zone", "a"),))
        assert (stored.generation, stored.revision) == (2, 8)
        store.register_node("n1", "unix:/run/n1.sock", (("zone", "a"),))
    with Store(path) as store:
        assert store.get_node("n1").labels == (("zone", "a"),)
        assert store.get_service("web").selector == (("zone", "a"),)
