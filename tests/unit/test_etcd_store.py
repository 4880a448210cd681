"""The etcd store (policyd.etcd_store) against a real etcd on loopback: replicas see the
same state at the same revisions, a write is in etcd when it returns, two replicas can
never both commit on the same state, a fenced-off replica writes nothing."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from policyd.etcd import Etcd, EtcdError, compare_created, prefix_end
from policyd.etcd_store import EtcdStore, NotLeaderError, decode_entry, encode_entry
from policyd.store import GenerationConflict
from tests.etcd_server import run_etcd
from xlb.types.v1 import types_pb2
from xlbcore.errors import ConflictError, UnavailableError, ValidationError
from xlbcore.firewall import parse_rule
from xlbcore.service import EndpointSpec, Proto, ServiceSpec


def spec(port: int = 80, weight: int = 1) -> ServiceSpec:
    return ServiceSpec("198.19.0.10", port, Proto.TCP,
                       endpoints=(EndpointSpec("198.18.1.2", 8080, weight),))


@pytest.fixture(scope="module")
def etcd_url():
    with run_etcd() as url:
        yield url


_prefixes = iter(range(10_000))


@pytest.fixture
def prefix() -> bytes:
    return b"/xlbtest/%d/" % next(_prefixes)  # each test its own log in the shared etcd


def open_store(url: str, prefix: bytes) -> EtcdStore:
    return EtcdStore(Etcd(url), prefix)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_replica_opened_later_reads_the_same_state(etcd_url, prefix):
    with open_store(etcd_url, prefix) as a:
        web, _ = a.apply_service("web", spec())
        a.apply_service("web", spec(weight=3))
        a.register_node("n1", "127.0.0.1:1", (("zone", "east"),))
        a.apply_service("dns", spec(port=53))
        a.delete_service("dns")
        with open_store(etcd_url, prefix) as b:
            assert b.generation == a.generation == 4
            assert b.list_services() == a.list_services()
            got = b.get_service("web")
            assert (got.generation, got.revision, got.spec.endpoints[0].weight) == (2, 2, 3)
            assert got.update_time_ns == a.get_service("web").update_time_ns  # writer's time
            assert b.list_nodes() == a.list_nodes()


def test_every_write_stamps_the_time_its_log_entry_carries(etcd_url, prefix):
    """The Store's clock seam (Store._now): the writer stamps objects, deletions and
    nodes with the time in the entry, and a replica replaying it stores that time."""
    with open_store(etcd_url, prefix) as a:
        a.apply_service("web", spec())
        a.register_node("n1", "127.0.0.1:1")
        a.apply_service("web", spec(weight=2))
        kvs, _ = Etcd(etcd_url).range(prefix + b"log/", prefix_end(prefix + b"log/"))
        times = [decode_entry(kv.value)[3] for kv in kvs]
        assert len(times) == 3 and times[0] < times[1] < times[2]
        assert a.get_service("web").update_time_ns == times[2]
        assert a.get_node("n1").register_time_ns == times[1]
        with open_store(etcd_url, prefix) as b:
            assert b.get_service("web").update_time_ns == times[2]
            assert b.get_node("n1").register_time_ns == times[1]


def test_a_follower_sees_writes_as_they_commit_and_its_listeners_fire(etcd_url, prefix):
    with open_store(etcd_url, prefix) as a, open_store(etcd_url, prefix) as b:
        b.follow()
        seen: list[tuple[int, str, bool]] = []
        b.add_listener(lambda rev, changes: seen.extend((rev, c.name, c.deleted)
                                                        for c in changes))
        a.apply_service("web", spec())
        a.apply_service("dns", spec(port=53))
        a.delete_service("web")
        wait_until(lambda: b.generation == 3)
        assert seen == [(1, "web", False), (2, "dns", False), (3, "web", True)]
        assert [s.name for s in b.list_services()] == ["dns"]


def test_acknowledged_means_in_etcd(etcd_url, prefix):
    with open_store(etcd_url, prefix) as a:
        a.apply_service("web", spec())
        kvs, _ = Etcd(etcd_url).range(prefix + b"log/", prefix + b"log0")
        assert len(kvs) == 1
        op, args, kwargs, _ = decode_entry(kvs[0].value)
        assert op == "apply_service" and args[0] == "web" and args[1] == spec()


def test_two_replicas_never_both_commit_on_the_same_state(etcd_url, prefix):
    """a and b both hold generation 1 of web; both write with expected=1. The log's CAS
    makes the second one catch up and run its check again: ABORTED, nothing written."""
    with open_store(etcd_url, prefix) as a, open_store(etcd_url, prefix) as b:
        a.apply_service("web", spec())
        b.catch_up()
        a.apply_service("web", spec(weight=2), expected=1)
        with pytest.raises(GenerationConflict):
            b.apply_service("web", spec(weight=5), expected=1)  # b had not seen a's write
        assert b.get_service("web").spec.endpoints[0].weight == 2
        with open_store(etcd_url, prefix) as c:
            assert c.get_service("web").generation == 2
            assert c.get_service("web").spec.endpoints[0].weight == 2


def test_concurrent_writers_get_one_total_order(etcd_url, prefix):
    with open_store(etcd_url, prefix) as a, open_store(etcd_url, prefix) as b:
        errors: list[Exception] = []

        def churn(store: EtcdStore, base: int) -> None:
            for i in range(15):
                try:
                    store.apply_service(f"s{base + i}", spec(port=base + i))
                except Exception as exc:  # noqa: BLE001 (collected, asserted below)
                    errors.append(exc)

        threads = [threading.Thread(target=churn, args=(a, 1000)),
                   threading.Thread(target=churn, args=(b, 2000))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(e, UnavailableError) for e in errors)
        a.catch_up()
        b.catch_up()
        with open_store(etcd_url, prefix) as c:
            assert c.generation == a.generation == b.generation == 30 - len(errors)
            assert c.list_services() == a.list_services() == b.list_services()


def test_a_conflict_is_refused_on_the_leader_state_and_writes_nothing(etcd_url, prefix):
    with open_store(etcd_url, prefix) as a:
        a.apply_service("web", spec())
        with pytest.raises(ConflictError):
            a.apply_service("other", spec())  # same vip, port, protocol
        assert a.applied == 1
        rule = parse_rule(types_pb2.FirewallRuleSpec(priority=10,
                                                     action=types_pb2.FIREWALL_ACTION_DROP))
        a.apply_rules([("r1", rule)])
        with open_store(etcd_url, prefix) as b:
            assert [r.name for r in b.list_rules()] == ["r1"]
            assert b.get_rule("r1").spec == rule


def test_a_fenced_off_replica_writes_nothing(etcd_url, prefix):
    etcd = Etcd(etcd_url)
    fence_key = prefix + b"leader"
    with open_store(etcd_url, prefix) as a:
        revision = etcd.put(fence_key, b"a")
        a.set_fence([compare_created(fence_key, revision)])
        a.apply_service("web", spec())
        etcd.delete(fence_key)  # a's leadership ends (its lease expired)
        with pytest.raises(NotLeaderError):
            a.apply_service("dns", spec(port=53))
        assert [s.name for s in a.list_services()] == ["web"]
        assert a.generation == 1


def test_etcd_down_is_unavailable_and_changes_nothing(etcd_url, prefix):
    with open_store(etcd_url, prefix) as a:
        a.apply_service("web", spec())
        a.etcd.port = 1  # nothing listens there
        a.etcd.close()
        with pytest.raises(EtcdError):
            a.apply_service("dns", spec(port=53))
        assert [s.name for s in a.list_services()] == ["web"] and a.generation == 1


def test_log_entries_are_data_and_read_back_as_written():
    rule = parse_rule(types_pb2.FirewallRuleSpec(priority=10,
                                                 action=types_pb2.FIREWALL_ACTION_DROP))
    args = ([("r1", rule), ("r2", rule)],)
    kwargs = {"field": "rules", "flush": frozenset({"r1"}),
              "selectors": {"r1": (("zone", "east"),)}, "expected": {"r1": 0, "r2": 4}}
    raw = encode_entry("apply_rules", args, kwargs, 5)
    assert b"pickle" not in raw and json.loads(raw)["op"] == "apply_rules"  # JSON
    op, got_args, got_kwargs, now = decode_entry(raw)
    assert (op, got_args, got_kwargs, now) == ("apply_rules", args, kwargs, 5)
    assert decode_entry(encode_entry("apply_service", ("web", spec()), {}, 6))[1] == \
        ("web", spec())
    with pytest.raises(TypeError, match="Thread cannot be written"):
        encode_entry("apply_service", (threading.Thread(),), {}, 5)


@pytest.mark.parametrize("entry, error", [
    ({"op": "close", "time_ns": 5, "args": [], "kwargs": {}}, "unknown operation 'close'"),
    ({"op": "apply_service", "time_ns": 5, "args": "gASVAAAA", "kwargs": {}},
     "older policyd"),  # an entry of the pickling policyd
    ({"op": "apply_service", "time_ns": 5, "args": [{"class": "threading.Thread"}],
      "kwargs": {}}, "is not an argument"),
    ({"op": "apply_service", "time_ns": 5, "args": [{"spec": "thread", "message": ""}],
      "kwargs": {}}, "is not an argument"),
])
def test_log_entries_that_are_not_writes_are_refused(entry, error):
    with pytest.raises(ValueError, match=error):
        decode_entry(json.dumps(entry).encode())


def test_a_log_entry_spec_is_validated_again():
    bad = types_pb2.FirewallRuleSpec(priority=10, action=types_pb2.FIREWALL_ACTION_DROP)
    bad.match.src = "not-a-cidr"
    entry = {"op": "apply_rules", "time_ns": 5, "kwargs": {},
             "args": [[{"tuple": ["r1", {"spec": "firewall_rule", "message": base64.b64encode(
                 bad.SerializeToString()).decode()}]}]]}
    with pytest.raises(ValidationError):
        decode_entry(json.dumps(entry).encode())


def log_indexes(url: str, prefix: bytes) -> list[int]:
    kvs, _ = Etcd(url).range(prefix + b"log/", prefix_end(prefix + b"log/"))
    return [int(kv.key[len(prefix) + 4:]) for kv in kvs]


def test_snapshots_compact_the_log_and_a_new_replica_starts_from_the_latest(etcd_url,
                                                                             prefix):
    etcd = Etcd(etcd_url)
    fence_key = prefix + b"leader"
    rule = parse_rule(types_pb2.FirewallRuleSpec(priority=10,
                                                 action=types_pb2.FIREWALL_ACTION_DROP))
    with EtcdStore(Etcd(etcd_url), prefix, snapshot_every=5) as a:
        a.set_fence([compare_created(fence_key, etcd.put(fence_key, b"a"))])  # the leader
        a.register_node("n1", "198.18.0.1:50051", (("zone", "east"),))
        a.apply_rules([("r1", rule)])
        for i in range(10):
            a.apply_service(f"s{i % 4}", spec(port=1000 + i % 4, weight=1 + i))
        assert a.applied == 12 and a.snapshot_index == 10  # snapshots at 5 and 10
        # entries up to the previous snapshot (5) are gone; 6.. stay for replicas loading
        # snapshot 5 while 10 was written
        assert log_indexes(etcd_url, prefix) == list(range(6, 13))
        kvs, _ = etcd.range(prefix + b"snapshot/", prefix_end(prefix + b"snapshot/"))
        assert {kv.key.split(b"/")[-2] for kv in kvs} == {b"%020d" % 10}
        with open_store(etcd_url, prefix) as b:  # snapshot 10, then entries 11 and 12
            assert (b.applied, b.snapshot_index, b.generation) == (12, 10, a.generation)
            assert b.list_services() == a.list_services()
            assert b.list_nodes() == a.list_nodes()
            assert b.get_rule("r1") == a.get_rule("r1")
            a.apply_service("s9", spec(port=2000))  # b follows on from the log
            b.catch_up()
            assert b.get_service("s9") == a.get_service("s9")


def test_a_replica_behind_the_compacted_log_must_start_again(etcd_url, prefix):
    etcd = Etcd(etcd_url)
    fence_key = prefix + b"leader"
    with EtcdStore(Etcd(etcd_url), prefix, snapshot_every=3) as a, \
            open_store(etcd_url, prefix) as b:
        a.set_fence([compare_created(fence_key, etcd.put(fence_key, b"a"))])
        for i in range(7):  # snapshots at 3 and 6: entries 1..3 deleted
            a.apply_service(f"s{i}", spec(port=1000 + i))
        restarts: list[bool] = []
        b.on_compacted = lambda: restarts.append(True)
        b.follow()  # b applied nothing: its next entry (1) is gone
        wait_until(lambda: restarts == [True])
        assert b.applied == 0 and b.list_services() == []


def test_a_failed_snapshot_does_not_fail_the_committed_write(etcd_url, prefix):
    etcd = Etcd(etcd_url)
    fence_key = prefix + b"leader"
    with EtcdStore(Etcd(etcd_url), prefix, snapshot_every=2) as a:
        a.set_fence([compare_created(fence_key, etcd.put(fence_key, b"a"))])
        txn = a.etcd.txn

        def refuse_snapshots(compare, success, failure=None):
            if any(b"snapshot" in base64.b64decode(op.get("request_put", {}).get("key", ""))
                   for op in success):
                return False, {}  # as when the fence no longer holds
            return txn(compare, success, failure)

        a.etcd.txn = refuse_snapshots
        a.apply_service("s0", spec(port=1000))
        a.apply_service("s1", spec(port=1001))  # committed; its snapshot refused
        assert (a.applied, a.snapshot_index) == (2, 0)
        assert etcd.get(prefix + b"snapshot") is None
        a.etcd.txn = txn
        a.apply_service("s2", spec(port=1002))  # the next write snapshots
        assert a.snapshot_index == 3 and etcd.get(prefix + b"snapshot") is not None
