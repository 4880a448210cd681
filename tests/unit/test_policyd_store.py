"""The SQLite store: persistence, uniqueness, generations."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace

import pytest

from policyd.messages import service_to_proto
from policyd.store import Store
from xlbcore.errors import ConflictError, NotFoundError
from xlbcore.service import EndpointSpec, Proto, ServiceSpec


def spec(vip: str = "198.19.0.10", port: int = 80, proto: Proto = Proto.TCP, weight: int = 1):
    return ServiceSpec(vip, port, proto, endpoints=(EndpointSpec("198.18.1.2", 8080, weight),))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state.db") as s:
        yield s


def test_new_store_is_empty_at_generation_zero(store):
    assert store.generation == 0
    assert store.list_services() == []
    assert store.list_nodes() == []
    snap = store.snapshot()
    assert (snap.generation, snap.services) == (0, {})


def test_every_change_bumps_generation_once(store):
    web, changed = store.apply_service("web", spec())
    assert changed and web.revision == store.generation == 1 and web.generation == 1
    node, changed = store.register_node("n1", "127.0.0.1:1")
    assert changed and store.generation == 1  # nodes do not move the objects' revision
    dns, _ = store.apply_service("dns", spec(port=53, proto=Proto.UDP))
    assert (dns.revision, dns.generation) == (2, 1)
    web2, changed = store.apply_service("web", spec(weight=4))
    assert changed and (web2.revision, web2.generation) == (3, 2)  # web's own: 2nd version
    dns_now = store.get_service("dns")
    assert (dns_now.revision, dns_now.generation) == (2, 1)  # untouched keeps its own
    assert store.delete_service("dns") == 4
    assert store.deregister_node("n1") == 4
    assert store.generation == 4


def test_unchanged_apply_and_register_bump_nothing(store):
    first, _ = store.apply_service("web", spec())
    again, changed = store.apply_service("web", spec())
    assert not changed
    assert again == first
    node, _ = store.register_node("n1", "127.0.0.1:1")
    same, changed = store.register_node("n1", "127.0.0.1:1")
    assert not changed and same == node
    assert store.generation == 1


def test_reregister_updates_address(store):
    store.register_node("n1", "127.0.0.1:1")
    moved, changed = store.register_node("n1", "unix:/run/n1.sock")
    assert changed and moved.address == "unix:/run/n1.sock"
    assert [(n.name, n.address) for n in store.list_nodes()] == [("n1", "unix:/run/n1.sock")]


def test_key_conflict_raises_and_writes_nothing(store):
    store.apply_service("web", spec())
    with pytest.raises(ConflictError, match="'web' already uses tcp://198.19.0.10:80"):
        store.apply_service("other", spec(weight=9))
    assert store.generation == 1
    assert [s.name for s in store.list_services()] == ["web"]
    # different protocol or port: no conflict
    store.apply_service("other", spec(proto=Proto.UDP))
    store.apply_service("third", spec(port=81))


def test_renaming_key_of_a_service_frees_the_old_key(store):
    store.apply_service("web", spec())
    store.apply_service("web", spec(port=8080))
    store.apply_service("other", spec())  # port 80 is free again
    assert {s.name: s.spec.port for s in store.list_services()} == {"web": 8080, "other": 80}


def test_missing_objects_are_not_found(store):
    with pytest.raises(NotFoundError, match="service 'x' not found"):
        store.get_service("x")
    with pytest.raises(NotFoundError):
        store.delete_service("x")
    with pytest.raises(NotFoundError, match="node 'x' not found"):
        store.deregister_node("x")
    with pytest.raises(NotFoundError):
        store.get_node("x")
    assert store.generation == 0


def test_state_survives_reopen(tmp_path):
    path = tmp_path / "sub" / "state.db"
    with Store(path) as s:
        web, _ = s.apply_service("web", spec(weight=3))
        s.apply_service("dns", spec(port=53, proto=Proto.UDP))
        s.delete_service("dns")
        node, _ = s.register_node("n1", "127.0.0.1:9")
        generation = s.generation
    with Store(path) as s:
        assert s.generation == generation == 3
        assert s.list_services() == [web]
        assert s.get_node("n1") == node
        assert s.snapshot().services == {web.spec.key: web.spec}
        assert s.apply_service("x", spec(port=1))[0].revision == 4


def test_wal_mode_on_disk(tmp_path):
    Store(tmp_path / "s.db").close()
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path / "s.db").close()
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(tmp_path / "s.db")


def test_concurrent_applies_get_distinct_generations(store):
    generations: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(20):
            stored, _ = store.apply_service(f"s{i}-{j}", spec(vip=f"198.19.{i}.{j + 1}"))
            with lock:
                generations.append(stored.revision)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(generations) == list(range(1, 161))
    assert store.generation == 160
    assert len(store.snapshot().services) == 160


# -- batches ------------------------------------------------------------------------------


def test_apply_services_is_one_transaction_and_one_bump(store):
    result = store.apply_services([("a", spec(port=1)), ("b", spec(port=2)), ("c", spec(port=3))])
    assert (result.generation, result.changed) == (1, 3)
    assert [(s.name, s.generation) for s in result.services] == [("a", 1), ("b", 1), ("c", 1)]
    assert len({s.update_time_ns for s in result.services}) == 1

    again = store.apply_services([("c", spec(port=3)), ("a", spec(port=1))])
    assert (again.generation, again.changed) == (1, 0)
    assert again.services == [result.services[2], result.services[0]]

    mixed = store.apply_services([("a", spec(port=1)), ("b", spec(port=2, weight=5))])
    assert (mixed.generation, mixed.changed) == (2, 1)
    assert [s.generation for s in mixed.services] == [1, 2]
    assert store.get_service("c").generation == 1


def test_apply_services_conflict_writes_nothing(store):
    store.apply_service("web", spec(port=80))
    with pytest.raises(ConflictError, match=r"^services\[1\]: service 'web' already uses"):
        store.apply_services([("a", spec(port=1)), ("b", spec(port=80))])
    assert store.generation == 1
    assert [s.name for s in store.list_services()] == ["web"]


def test_apply_services_refuses_duplicates_within_the_batch(store):
    with pytest.raises(ValueError, match="unique"):
        store.apply_services([("a", spec(port=1)), ("a", spec(port=2))])
    with pytest.raises(ValueError, match="unique"):
        store.apply_services([("a", spec(port=1)), ("b", spec(port=1))])
    assert store.generation == 0 and store.list_services() == []


def test_keys_can_swap_within_a_batch_and_survive_reopen(tmp_path):
    path = tmp_path / "state.db"
    with Store(path) as s:
        s.apply_services([("a", spec(port=1)), ("b", spec(port=2))])
        swapped = s.apply_services([("a", spec(port=2)), ("b", spec(port=1))]).services
        s.apply_service("c", spec(port=3))
        s.delete_services(["c"])
        snapshot = s.snapshot()
    with Store(path) as s:
        assert s.list_services() == swapped
        assert [x.blob for x in s.list_services()] == [x.blob for x in swapped]
        assert s.snapshot() == snapshot
        with pytest.raises(ConflictError, match="'b' already uses"):
            s.apply_service("d", spec(port=1))


def test_delete_services_all_or_nothing(store):
    store.apply_services([("a", spec(port=1)), ("b", spec(port=2)), ("c", spec(port=3))])
    with pytest.raises(NotFoundError, match=r"service 'x' not found \(and 1 more\)"):
        store.delete_services(["a", "x", "y"])
    assert len(store.list_services()) == 3 and store.generation == 1
    result = store.delete_services(["c", "a"])
    assert (result.generation, result.changed) == (2, 2)
    assert [s.name for s in store.list_services()] == ["b"]
    store.apply_service("a2", spec(port=1))  # the deleted key is free again
    assert store.delete_services([]).generation == store.generation == 3


def test_snapshot_is_shared_until_services_change(store):
    store.apply_service("a", spec(port=1))
    first = store.snapshot()
    store.apply_rules([])  # no change: no bump
    store.register_node("n1", "127.0.0.1:1")  # nodes do not move the revision
    second = store.snapshot()
    assert second.generation == first.generation
    assert second.services is first.services
    with pytest.raises(TypeError):
        second.services[spec(port=9).key] = spec(port=9)  # type: ignore[index]
    store.apply_service("a", spec(port=1))  # unchanged
    assert store.snapshot().services is first.services
    store.apply_service("b", spec(port=2))
    assert store.snapshot().services is not first.services
    assert set(store.snapshot().services) == {spec(port=1).key, spec(port=2).key}


def test_reply_from_stored_bytes_equals_reply_from_fields(store):
    stored, _ = store.apply_service("web", spec(weight=3))
    assert stored.blob
    from_blob = service_to_proto(stored)
    assert from_blob == service_to_proto(replace(stored, blob=b""))
    assert (from_blob.name, from_blob.generation, from_blob.endpoints[0].weight) == ("web", 1, 3)
    assert from_blob.update_time.ToNanoseconds() == stored.update_time_ns


def test_change_log_names_the_keys_changed_after_a_generation(store, tmp_path):
    start = store.generation
    a = store.apply_services([("a", spec(port=1)), ("b", spec(port=2))]).generation
    moved = store.apply_service("b", spec(port=3))[0].revision  # b's key moves: 2 -> 3
    gone = store.delete_service("a")
    assert store.changes_since(start) == {spec(port=p).key for p in (1, 2, 3)}
    assert store.changes_since(a) == {spec(port=p).key for p in (1, 2, 3)}
    assert store.changes_since(moved) == {spec(port=1).key}
    assert store.changes_since(gone) == set()
    assert store.changes_since(start, upto=a) == {spec(port=1).key, spec(port=2).key}
    generation, specs, count = store.changed_specs(a)
    assert (generation, count) == (gone, 1)
    assert specs == {spec(port=1).key: None, spec(port=2).key: None,
                     spec(port=3).key: spec(port=3)}
    store.close()
    with Store(tmp_path / "state.db") as reopened:  # the log starts anew: older is unknown
        assert reopened.changes_since(start) is None
        assert reopened.changes_since(reopened.generation) == set()
