"""Endpoint selection through the loaded TC programs (BPF_PROG_TEST_RUN): source-IP
hash keeps a client on one endpoint across source ports; session persistence keeps a
client on its endpoint across new flows until the timeout (and not on an endpoint that
left selection); priority groups fail over to the next group when the best one is down
and come back; least connections sends new flows to the least loaded endpoint, and
dpd's conntrack sweep recounts the active flows."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from scapy.layers.inet import IP

from tests.datapath.packets import FORWARDED, VIP, run, tcp
from xlbcore.service import Algorithm, EndpointSpec, HealthKind, HealthSpec, Proto, ServiceSpec

pytestmark = pytest.mark.root

A, B, C, D = "198.18.1.2", "198.18.1.3", "198.18.2.2", "198.18.2.3"
# probes that cannot take an endpoint down within a test (the test does, by set_down)
SLOW_CHECK = HealthSpec(HealthKind.TCP, interval_ms=3_600_000, timeout_ms=1000)
_sport = iter(range(10_000, 60_000))


def svc(algorithm: Algorithm, eps: list[tuple[str, int, int]], persistence_s: int = 0,
        health: HealthSpec | None = None) -> ServiceSpec:
    return ServiceSpec(VIP, 80, Proto.TCP, algorithm,
                       endpoints=tuple(sorted(EndpointSpec(a, 8080, w, g) for a, w, g in eps)),
                       persistence_s=persistence_s, health=health)


def pick(node, client: str = "198.18.0.2", sport: int | None = None) -> str:
    """The endpoint a new flow (a SYN from a fresh source port) is sent to."""
    verdict, pkt = run(node, tcp(client, VIP, sport or next(_sport), 80, "S"))
    assert verdict in FORWARDED
    return pkt[IP].dst


def test_source_hash_keeps_each_client_on_one_endpoint_across_ports(node):
    node.put_services([svc(Algorithm.SOURCE_HASH, [(A, 1, 0), (B, 1, 0), (C, 1, 0),
                                                    (D, 1, 0)])])
    chosen = {}
    for i in range(40):
        client = f"198.18.0.{10 + i}"
        got = {pick(node, client) for _ in range(8)}
        assert len(got) == 1, (client, got)
        chosen[client] = got.pop()
    assert set(chosen.values()) == {A, B, C, D}  # clients spread over every endpoint


def test_persistence_keeps_a_client_on_its_endpoint_until_the_timeout(node):
    node.put_services([svc(Algorithm.ROUND_ROBIN, [(A, 1, 0), (B, 1, 0), (C, 1, 0)],
                           persistence_s=1)])
    first = pick(node, "198.18.0.2")  # round-robin slot 0
    other = pick(node, "198.18.0.3")  # slot 1
    assert other != first
    # without persistence these would rotate; with it the client stays
    assert {pick(node, "198.18.0.2") for _ in range(6)} == {first}
    time.sleep(1.2)  # the timeout passes: the next flow is the algorithm's (slot 2)
    later = pick(node, "198.18.0.2")
    assert later not in (first, other)
    assert {pick(node, "198.18.0.2") for _ in range(4)} == {later}  # and sticks again


def test_persistence_never_keeps_a_client_on_an_endpoint_out_of_selection(node):
    s = svc(Algorithm.ROUND_ROBIN, [(A, 1, 0), (B, 1, 0)], persistence_s=300)
    node.put_services([s])
    first = pick(node)
    drained = tuple(EndpointSpec(ep.address, ep.port, 0 if ep.address == first else 1)
                    for ep in s.endpoints)
    node.put_services([ServiceSpec(VIP, 80, Proto.TCP, Algorithm.ROUND_ROBIN,
                                   endpoints=drained, persistence_s=300)])
    moved = pick(node)
    assert moved != first
    assert {pick(node) for _ in range(4)} == {moved}


def test_priority_groups_fail_over_and_come_back(node):
    s = svc(Algorithm.ROUND_ROBIN, [(A, 1, 0), (B, 1, 0), (C, 1, 1), (D, 1, 1)],
            health=SLOW_CHECK)
    node.put_services([s])
    assert {pick(node) for _ in range(20)} == {A, B}  # the best group serves alone
    node.services.set_down({s.key: frozenset({(A, 8080)})})
    assert {pick(node) for _ in range(20)} == {B}  # one left in the group: it serves
    node.services.set_down({s.key: frozenset({(A, 8080), (B, 8080)})})
    assert {pick(node) for _ in range(20)} == {C, D}  # the backup group takes over
    node.services.set_down({s.key: frozenset()})
    assert {pick(node) for _ in range(20)} == {A, B}  # and hands back


def conn(node, stat_ids: dict[str, int]) -> dict[str, int]:
    m = node.dp.maps["ep_conn_map"]
    return {a: int.from_bytes(m.get(i.to_bytes(4, "little")), "little")
            for a, i in stat_ids.items()}


def test_least_connections_picks_the_least_loaded_and_dpd_recounts(node):
    node.put_services([svc(Algorithm.LEAST_CONNECTIONS, [(A, 1, 0), (B, 1, 0), (C, 1, 0)])])
    (_, e), = node.services.entries()
    ids = {ep.address: i for ep, i in zip(e.spec.endpoints, e.ep_ids, strict=True)}
    m = node.dp.maps["ep_conn_map"]
    for a, n in ((A, 50), (B, 40)):  # A and B are loaded (flows of no test)
        m.put(ids[a].to_bytes(4, "little"), n.to_bytes(4, "little"))
    assert Counter(pick(node) for _ in range(30)) == {C: 30}
    assert conn(node, ids) == {A: 50, B: 40, C: 30}  # each new flow counted
    # C holds 30 more than... now B (40) and C are close: new flows even them out
    got = Counter(pick(node) for _ in range(30))
    assert got[A] == 0 and got[B] >= 10 and got[C] >= 5, got
    # the sweep sets the counts to the live flows: A's and B's 50 and 40 were never flows
    node.conntrack.age_once()
    live = conn(node, ids)
    assert live == {A: 0, B: got[B], C: 30 + got[C]}
    assert Counter(pick(node) for _ in range(20))[A] >= 15  # A is the least loaded now


def test_least_connections_spreads_evenly(node):
    node.put_services([svc(Algorithm.LEAST_CONNECTIONS, [(A, 1, 0), (B, 1, 0), (C, 2, 0)])])
    got = Counter(pick(node) for _ in range(200))
    # per unit of weight: C (weight 2) carries twice A's or B's active flows
    assert abs(got[A] - 50) <= 6 and abs(got[B] - 50) <= 6 and abs(got[C] - 100) <= 8, got
