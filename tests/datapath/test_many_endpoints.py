"""1,024 endpoints per service through the loaded TC programs (BPF_PROG_TEST_RUN):
round-robin (weighted) reaches every endpoint in proportion, the 5-tuple hash and the
source hash spread over all of them, Maglev moves about 1/N of the flows when one of N
leaves, least connections spreads and persistence and priority groups hold, and a
changed endpoint set is written beside the old one (make-before-break) and the old runs
are freed. The node here has room for 8,192 endpoints (the session node has 256)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from dpd import bpfsys
from tests.conftest import require_root
from tests.datapath.packets import FORWARDED, VIP, tcp
from xlbcore.service import Algorithm, EndpointSpec, HealthKind, HealthSpec, Proto, ServiceSpec

pytestmark = pytest.mark.root

N = 1024
SLOW_CHECK = HealthSpec(HealthKind.TCP, interval_ms=3_600_000, timeout_ms=1000)


def ep_addr(i: int) -> str:
    """Endpoint i's address: 198.19.128.0 + i (inside 198.18.0.0/15)."""
    return f"198.19.{128 + i // 256}.{i % 256}"


def endpoints(n: int = N, weight=lambda i: 1, prio=lambda i: 0) -> tuple[EndpointSpec, ...]:
    return tuple(sorted(EndpointSpec(ep_addr(i), 8080, weight(i), prio(i)) for i in range(n)))


def svc(algorithm: Algorithm, eps: tuple[EndpointSpec, ...], **kw) -> ServiceSpec:
    return ServiceSpec(VIP, 80, Proto.TCP, algorithm, endpoints=eps, **kw)


@pytest.fixture(scope="module")
def big() -> Iterator[object]:
    require_root()
    from dpd.loader import Settings
    from dpd.node import Node, cleanup

    root = tempfile.mkdtemp(prefix="xlb-dpbig-")
    settings = Settings(name="dpbig", bpf_root=root, max_services=16, max_backends=8192,
                        ct_size=1 << 16, redirect=False)
    node = None
    try:
        node = Node.load(settings, ct_aging_interval=0)
        yield node
    finally:
        if node is not None:
            node.close()
        cleanup(settings)
        os.rmdir(root)


@pytest.fixture
def node(big: object) -> Iterator[object]:
    big.delete_services([s.key for s in big.list_services()])  # type: ignore[attr-defined]
    big.flush_conntrack()  # type: ignore[attr-defined]
    yield big


def dest(node: object, client: str, sport: int) -> str:
    """The endpoint address a new flow (a SYN) from client:sport is sent to."""
    res = bpfsys.prog_test_run(node.dp.fast_fd,  # type: ignore[attr-defined]
                               tcp(client, VIP, sport, 80, "S"))
    assert res.retval in FORWARDED
    return Ether(res.data)[IP].dst


_ports = iter(range(2000, 65_000, 100))


def flows(node: object, count: int, clients: int = 1, port: int | None = None) -> list[str]:
    """The endpoints of `count` new flows from `clients` client addresses, from source
    ports `port` on (default: ports no earlier call used)."""
    if port is None:
        port = next(_ports)
        for _ in range(count // clients // 100):
            next(_ports)
    return [dest(node, f"198.18.{i % clients // 250}.{i % clients % 250 + 2}",
                 port + i // clients) for i in range(count)]


def test_round_robin_sends_one_flow_to_each_of_1024_endpoints_in_turn(node):
    node.put_services([svc(Algorithm.ROUND_ROBIN, endpoints())])
    got = Counter(flows(node, N))
    assert set(got) == {ep_addr(i) for i in range(N)} and set(got.values()) == {1}


def test_weighted_round_robin_over_1024_endpoints_follows_the_weights(node):
    # half the endpoints weigh 3: 2,048 slots, each flow one slot
    node.put_services([svc(Algorithm.ROUND_ROBIN, endpoints(weight=lambda i: 1 + 2 * (i % 2)))])
    got = Counter(flows(node, 2048))
    assert {a: got[a] for a in map(ep_addr, range(N))} == {
        ep_addr(i): 1 + 2 * (i % 2) for i in range(N)}


def test_hash_spreads_flows_over_every_one_of_1024_endpoints(node):
    node.put_services([svc(Algorithm.HASH, endpoints())])
    got = Counter(flows(node, 16 * N, clients=64))
    assert len(got) == N  # every endpoint receives flows (mean 16)
    assert max(got.values()) < 48  # none gets three times its share


def test_source_hash_spreads_clients_over_1024_endpoints_and_keeps_each(node):
    node.put_services([svc(Algorithm.SOURCE_HASH, endpoints())])
    clients = [f"198.18.{i // 250}.{i % 250 + 2}" for i in range(4000)]
    first = {c: dest(node, c, 20_000) for c in clients}
    assert len(set(first.values())) > 900  # 4,000 clients over 1,024 endpoints
    assert all(dest(node, c, 20_001) == first[c] for c in clients[:200])


def test_maglev_with_1024_endpoints_moves_about_1_in_n_when_one_leaves(node):
    eps = endpoints()
    node.put_services([svc(Algorithm.MAGLEV, eps)])
    before = flows(node, 8 * N, clients=64, port=1000)
    assert len(set(before)) > 1000
    gone = ep_addr(77)
    node.put_services([svc(Algorithm.MAGLEV, tuple(e for e in eps if e.address != gone))])
    node.flush_conntrack()
    after = flows(node, 8 * N, clients=64, port=1000)
    assert gone not in after
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    on_gone = before.count(gone)
    # the flows of the endpoint that left move, and few others (Maglev's table of
    # 16,381 entries holds ~16 per endpoint: a little more than 1/N moves)
    assert moved >= on_gone
    assert moved - on_gone <= 0.02 * len(before)


def test_least_connections_spreads_over_1024_endpoints(node):
    node.put_services([svc(Algorithm.LEAST_CONNECTIONS, endpoints())])
    got = Counter(flows(node, 2 * N))
    assert len(got) > 0.95 * N
    assert max(got.values()) <= 6  # two flows each on average: no endpoint piles up


def test_persistence_with_1024_endpoints_keeps_each_client_on_its_endpoint(node):
    node.put_services([svc(Algorithm.ROUND_ROBIN, endpoints(), persistence_s=300)])
    clients = [f"198.18.9.{i + 2}" for i in range(40)]
    first = {c: dest(node, c, 30_000) for c in clients}
    assert len(set(first.values())) == len(clients)  # round-robin: one each
    assert all(dest(node, c, 30_000 + k) == first[c] for c in clients for k in (1, 2))


def test_priority_groups_over_1024_endpoints_fail_over_and_back(node):
    s = svc(Algorithm.ROUND_ROBIN, endpoints(prio=lambda i: i % 2), health=SLOW_CHECK)
    node.put_services([s])
    group0 = {ep_addr(i) for i in range(0, N, 2)}
    group1 = {ep_addr(i) for i in range(1, N, 2)}
    assert Counter(flows(node, N)) == Counter({a: 2 for a in group0})
    node.services.set_down({s.key: frozenset((a, 8080) for a in group0)})
    assert Counter(flows(node, N // 2)) == Counter({a: 1 for a in group1})
    node.services.set_down({s.key: frozenset()})
    assert set(flows(node, N // 2)) == group0


def test_a_changed_set_goes_to_fresh_runs_and_the_old_are_freed(node):
    table = node.services
    free = table.ep_space.free_entries(), table.slot_space.free_entries()
    node.put_services([svc(Algorithm.ROUND_ROBIN, endpoints())])
    (_, e1), = table.entries()
    node.put_services([svc(Algorithm.ROUND_ROBIN, endpoints(N - 1))])  # one fewer
    (_, e2), = table.entries()
    # the new set was written beside the old one (which flows used until the flip)
    assert not (e1.ep_base <= e2.ep_base < e1.ep_base + N)
    assert set(flows(node, N - 1)) == {ep_addr(i) for i in range(N - 1)}
    node.delete_services([e2.spec.key])
    assert (table.ep_space.free_entries(), table.slot_space.free_entries()) == free
