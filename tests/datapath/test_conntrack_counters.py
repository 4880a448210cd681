"""Conntrack on the kernel map (BPF_PROG_TEST_RUN): a table that fills evicts the least
recently used flows (the stated policy: docs/conntrack.md), the newest flows stay, and
GetStats' counters account for it; per-service timeouts and filters on real entries."""

from __future__ import annotations

import pytest

from dpd.conntrack import SECOND, CtFilter
from tests.datapath.packets import CLIENT, EP1, FORWARDED, VIP, run, tcp
from xlbcore.service import Algorithm, CtTimeoutsSpec, EndpointSpec, Proto, ServiceSpec

pytestmark = pytest.mark.root


def web(port: int = 80, ct: CtTimeoutsSpec | None = None) -> ServiceSpec:
    return ServiceSpec(VIP, port, Proto.TCP, Algorithm.ROUND_ROBIN,
                       endpoints=(EndpointSpec(EP1, 8080),), ct_timeouts=ct)


def client_ports(node, **match) -> set[int]:
    return {e.src_port for e in node.list_conntrack(CtFilter(**match))
            if e.direction == node.conntrack.states.orig}


def test_a_full_table_evicts_the_oldest_flows_and_the_counters_say_so(node):
    node.put_services([web()])
    capacity = node.conntrack.map.spec.max_entries // 2  # flows (two entries each)
    n = capacity + capacity // 2
    for port in range(10000, 10000 + n):
        verdict, _ = run(node, tcp(CLIENT, VIP, port, 80, "S"))
        assert verdict in FORWARDED
    c = node.conntrack_counters(node.global_stats())
    assert (c["created"], c["refused"], c["expired"], c["flushed"]) == (n, 0, 0, 0)
    assert capacity // 2 <= c["live"] <= capacity
    assert c["evicted"] == n - c["live"] >= n - capacity
    held = client_ports(node, client=CLIENT)
    assert 10000 + n - 1 in held  # the newest flow is there, the oldest went
    assert 10000 not in held


def test_per_service_timeouts_and_filters_on_kernel_entries(node):
    node.put_services([web(80), web(81, CtTimeoutsSpec(tcp_handshake=1))])
    for port in range(20000, 20010):
        run(node, tcp(CLIENT, VIP, port, 80 if port % 2 else 81, "S"))
    assert len(client_ports(node, service=web(81).key)) == 5
    ct = node.conntrack
    real = ct.clock
    ct.clock = lambda: real() + 2 * SECOND  # 2 s later: past 81's handshake timeout only
    try:
        assert ct.age_once() == 10  # five flows, two entries each
    finally:
        ct.clock = real
    assert client_ports(node, service=web(80).key) == set(range(20001, 20010, 2))
    assert client_ports(node, service=web(81).key) == set()
    assert node.flush_conntrack(CtFilter(endpoint=EP1, endpoint_port=8080)) == 10
    c = node.conntrack_counters(node.global_stats())
    assert (c["expired"], c["flushed"], c["live"], c["evicted"]) == (5, 5, 0, 0)
