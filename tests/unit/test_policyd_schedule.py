"""The reconcile schedule (no root, no timing assertions): jitter, the read-back gate,
changes ahead of read-backs, waking on READY, paged read-backs that resume, O(1) drift
checks, requests built once."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import grpc

from policyd.nodeclient import key_field, service_field
from policyd.worker import ReadGate, jittered, plan_changes
from tests.unit.conftest import MemoryDatapathServicer
from xlb.dpd.v1 import datapath_pb2
from xlb.policy.v1 import policy_pb2
from xlbcore.service import EndpointSpec, Proto, ServiceSpec


def spec(i: int, weight: int = 1) -> ServiceSpec:
    return ServiceSpec(f"198.19.1.{i}", 80, Proto.TCP,
                       endpoints=(EndpointSpec("198.18.1.2", 8080, weight),))


def synced_at(client: Any, node: str, generation: int) -> bool:
    st = client.sync_status(node).nodes[0]
    return bool(st.state == policy_pb2.SYNC_STATE_SYNCED and st.observed_generation >= generation)


def apply(client: Any, i: int, weight: int = 1) -> Any:
    return client.apply_service(f"s{i}", f"198.19.1.{i}", 80, "tcp", [f"198.18.1.2:8080@{weight}"])


# -- pure parts -------------------------------------------------------------------------


def test_jitter_stays_within_its_fraction():
    assert jittered(10.0, 0.25, rand=lambda: 0.0) == 7.5
    assert jittered(10.0, 0.25, rand=lambda: 1.0) == 12.5
    assert jittered(10.0, 0.0) == 10.0
    values = {jittered(10.0, 0.25) for _ in range(200)}
    assert all(7.5 <= v <= 12.5 for v in values) and len(values) > 1


def test_read_gate_limits_slots_and_wakes_the_first_waiter():
    gate = ReadGate(1)
    a, b, c = threading.Event(), threading.Event(), threading.Event()
    assert gate.try_acquire(a)
    assert not gate.try_acquire(b) and not gate.try_acquire(c)
    assert gate.in_use == 1
    gate.release()
    assert b.is_set() and not c.is_set()  # the longest waiter first
    assert gate.try_acquire(b)
    gate.forget(c)
    gate.release()
    assert not c.is_set() and gate.in_use == 0


def test_a_change_plan_looks_at_the_changed_keys_only():
    a, b, c = spec(1), spec(2), spec(3)
    desired = {a.key: a, b.key: replace(b, endpoints=(EndpointSpec("198.18.1.3", 1),))}
    known = {a.key: a, b.key: b, c.key: c}
    puts, deletes = plan_changes([b.key, c.key], desired, known)
    assert puts == [desired[b.key]] and deletes == [c.key]
    assert plan_changes([a.key], desired, known) == ([], [])
    # nothing known about the node: write every changed key
    assert plan_changes([a.key, c.key], desired, None) == ([a], [c.key])


def test_identical_requests_are_built_once():
    assert service_field(spec(1)) is service_field(spec(1))
    assert key_field(spec(1).key) is key_field(spec(1).key)
    both = service_field(spec(1)) + service_field(spec(2))
    one = datapath_pb2.PutServicesRequest.FromString(both)
    assert [s.vip for s in one.services] == ["198.19.1.1", "198.19.1.2"]


# -- nodes ------------------------------------------------------------------------------


class PagedDatapath(MemoryDatapathServicer):
    """Records the order of calls and the read-back pages' cursors; can hold a given
    page (by its number) until released, fail one page once, and tracks how many pages
    are in flight at once across every node sharing `shared`."""

    def __init__(self, shared: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.order: list[str] = []
        self.cursors: list[bool] = []  # has_after of every page request
        self.hold_page = 0
        self.held = threading.Event()
        self.release = threading.Event()
        self.fail_page = 0
        self.shared = shared if shared is not None else {"now": 0, "max": 0}
        self.shared.setdefault("lock", threading.Lock())

    def ListServicesPage(self, request: Any, context: Any) -> Any:  # noqa: N802
        with self.lock:
            self.order.append("page")
            self.cursors.append(request.has_after)
            number = len(self.cursors)
        with self.shared["lock"]:
            self.shared["now"] += 1
            self.shared["max"] = max(self.shared["max"], self.shared["now"])
        try:
            if number == self.hold_page:
                self.held.set()
                self.release.wait(30)
            if number == self.fail_page:
                context.abort(grpc.StatusCode.UNAVAILABLE, "page lost")
            return super().ListServicesPage(request, context)
        finally:
            with self.shared["lock"]:
                self.shared["now"] -= 1

    def PutServices(self, request: Any, context: Any) -> Any:  # noqa: N802
        with self.lock:
            self.order.append("put")
        return super().PutServices(request, context)


def test_a_change_goes_between_the_pages_of_a_read_back(fast, wait_for, policyd, fake_node,
                                                        client_for):
    node = fake_node("a")
    node.datapath = datapath = PagedDatapath()
    node.start()
    for i in range(1, 6):  # already on the node: the first read-back has 5 pages
        datapath.node.put_services([spec(i)])
    datapath.hold_page = 2
    client = client_for(policyd(settings=replace(fast, page_size=1, resync_interval=60)))
    client.register_node("node-a", node.address)
    assert datapath.held.wait(10)
    changed = apply(client, 9)  # arrives while page 2 is in flight
    datapath.release.set()
    wait_for(lambda: synced_at(client, "node-a", changed.generation), what="synced")
    order = datapath.order
    first_put = order.index("put")
    assert order[:2] == ["page", "page"] and first_put == 2  # right after page 2
    assert order.count("page") >= 5
    assert spec(9).key.vip in {vip for vip, _, _ in datapath.snapshot()}


def test_a_failed_page_resumes_from_its_cursor(fast, wait_for, policyd, fake_node, client_for):
    node = fake_node("a")
    node.datapath = datapath = PagedDatapath()
    node.start()
    for i in range(1, 6):
        datapath.node.put_services([spec(i)])
    datapath.fail_page = 3
    client = client_for(policyd(settings=replace(fast, page_size=2, resync_interval=60)))
    client.register_node("node-a", node.address)
    stored = apply(client, 1)
    wait_for(lambda: synced_at(client, "node-a", stored.generation), what="synced")
    # pages 1, 2, 3 (failed), 3 again: only the very first request starts from the top
    assert datapath.cursors[:4] == [False, True, True, True]
    assert sorted(datapath.snapshot()) == [("198.19.1.1", 80, 1)]  # the others deleted


def test_read_backs_share_a_limited_number_of_slots(fast, wait_for, policyd, fake_node,
                                                    client_for):
    shared: dict[str, Any] = {"now": 0, "max": 0}
    nodes = []
    for name in ("a", "b", "c"):
        node = fake_node(name)
        node.datapath = PagedDatapath(shared)
        node.start()
        for i in range(1, 7):
            node.datapath.node.put_services([spec(i)])
        nodes.append(node)
    client = client_for(policyd(settings=replace(fast, page_size=1, readback_concurrency=1)))
    for name, node in zip("abc", nodes, strict=True):
        client.register_node(f"node-{name}", node.address)
    stored = apply(client, 1)
    for name in "abc":
        wait_for(lambda n=name: synced_at(client, f"node-{n}", stored.generation))
    assert shared["max"] == 1
    assert all(n.datapath.order.count("page") >= 6 for n in nodes)


def test_a_change_reaches_a_node_while_another_node_reads_back(fast, wait_for, policyd,
                                                              fake_node, client_for):
    slow = fake_node("slow")
    slow.datapath = PagedDatapath()
    slow.start()
    fast_node = fake_node("fast").start()
    client = client_for(policyd(settings=replace(fast, resync_interval=60)))
    client.register_node("node-fast", fast_node.address)
    first = apply(client, 1)
    wait_for(lambda: synced_at(client, "node-fast", first.generation))
    slow.datapath.hold_page = 1  # the slow node's read-back hangs in its first page
    client.register_node("node-slow", slow.address)
    assert slow.datapath.held.wait(10)
    changed = apply(client, 1, weight=5)
    wait_for(lambda: synced_at(client, "node-fast", changed.generation), what="fast synced")
    assert client.sync_status("node-slow").nodes[0].state != policy_pb2.SYNC_STATE_SYNCED
    slow.datapath.release.set()
    wait_for(lambda: synced_at(client, "node-slow", changed.generation), what="slow synced")


def test_nothing_changing_costs_a_summary_per_check_not_a_read_back(fast, wait_for, policyd,
                                                                   fake_node, client_for):
    node = fake_node("a").start()
    client = client_for(policyd())  # resync every 0.2 s
    client.register_node("node-a", node.address)
    stored = apply(client, 1)
    wait_for(lambda: synced_at(client, "node-a", stored.generation))
    reads = node.datapath.calls["ListServices"]
    summaries = node.datapath.calls["GetSummary"]  # every table's summary in one call
    wait_for(lambda: node.datapath.calls["GetSummary"] >= summaries + 5,
             what="five drift checks")
    assert node.datapath.calls["ListServices"] == reads

    # a hand edit through dpd's API moves the generation: read back and repaired
    node.datapath.node.put_services([spec(1, weight=7), spec(50)])
    wait_for(lambda: sorted(node.datapath.snapshot()) == [("198.19.1.1", 80, 1)]
             and node.datapath.snapshot()[("198.19.1.1", 80, 1)].endpoints[0].weight == 1,
             what="repair")
    assert node.datapath.calls["ListServices"] > reads


def test_a_node_serving_again_is_reconciled_before_its_backoff_ends(fast, wait_for, policyd,
                                                                   fake_node, client_for):
    node = fake_node("a").start()
    slow_retry = replace(fast, backoff_initial=120.0, backoff_max=120.0)
    client = client_for(policyd(settings=slow_retry))
    client.register_node("node-a", node.address)
    first = apply(client, 1)
    wait_for(lambda: synced_at(client, "node-a", first.generation))
    node.stop()
    second = apply(client, 2)
    wait_for(lambda: client.sync_status("node-a").nodes[0].state == policy_pb2.SYNC_STATE_ERROR,
             what="ERROR")
    node.start(empty=True)  # a two-minute backoff is running; READY cuts it short
    wait_for(lambda: synced_at(client, "node-a", second.generation), timeout=30,
             what="synced after the node came back")
    assert sorted(node.datapath.snapshot()) == [("198.19.1.1", 80, 1), ("198.19.1.2", 80, 1)]
