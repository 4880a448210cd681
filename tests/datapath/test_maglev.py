"""Maglev through the loaded TC programs (BPF_PROG_TEST_RUN): the datapath picks
table[flow hash % M]; two separately loaded datapaths pick the same endpoint for the
same flows; removing one of N endpoints moves its flows and few others; established
flows stay on their endpoint (the fast path never reads the table)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP

from dpd import abi, maglev
from tests.datapath.packets import CLIENT, FORWARDED, TC_ACT_OK, VIP, run, tcp
from xlbcore.service import Algorithm, EndpointSpec, Proto, ServiceSpec

pytestmark = pytest.mark.root

ABI = abi.load()
FLOWS = 1500  # conntrack of the test datapath holds 4096 entries: 2 per flow


def maglev_svc(eps: list[EndpointSpec], port: int = 80,
               algo: Algorithm = Algorithm.MAGLEV) -> ServiceSpec:
    return ServiceSpec(VIP, port, Proto.TCP, algo, endpoints=tuple(sorted(eps)))


def endpoints(n: int, weights: list[int] | None = None) -> list[EndpointSpec]:
    return [EndpointSpec(f"198.18.{1 + i // 200}.{10 + i % 200}", 8080,
                         weights[i] if weights else 1) for i in range(n)]


def flow(i: int) -> tuple[str, int]:
    return f"198.18.{100 + i % 50}.{1 + (i // 50) % 250}", 1024 + (i * 7919) % 60000


def picks(node, n: int = FLOWS, port: int = 80) -> list[tuple[str, int]]:
    """The endpoint each of n flows' SYN is sent to; conntrack flushed afterwards."""
    out = []
    for i in range(n):
        src, sport = flow(i)
        verdict, pkt = run(node, tcp(src, VIP, sport, port, "S"))
        assert verdict in FORWARDED
        out.append((pkt[IP].dst, pkt[TCP].dport))
    node.flush_conntrack()
    return out


def _mix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def flow_hash(src: str, dst: str, sport: int, dport: int, proto: int) -> int:
    """lb.h's xlb_flow_hash (network-order fields read as little-endian integers)."""
    le32 = lambda a: int.from_bytes(socket.inet_aton(a), "little")  # noqa: E731
    le16 = lambda p: int.from_bytes(p.to_bytes(2, "big"), "little")  # noqa: E731
    h = _mix(le32(src) ^ 0x9E3779B9)
    h = _mix(h ^ le32(dst))
    h = _mix(h ^ ((le16(sport) << 16) | le16(dport)))
    return _mix(h ^ proto)


def test_datapath_picks_the_table_entry_of_the_flow_hash(node):
    eps = endpoints(3, [2, 1, 1])
    spec = maglev_svc(eps)
    node.put_services([spec])
    table = maglev.build([(e.address, e.port, e.weight) for e in spec.endpoints])
    got = picks(node, 600)
    for i, ep in enumerate(got):
        src, sport = flow(i)
        want = spec.endpoints[table[flow_hash(src, VIP, sport, 80, 6) % len(table)]]
        assert ep == (want.address, want.port)
    shares = Counter(got)
    assert shares[(eps[0].address, 8080)] > shares[(eps[1].address, 8080)] * 1.5


def test_weight_zero_gets_no_flow_and_all_zero_drops(node):
    eps = endpoints(3, [1, 0, 1])
    node.put_services([maglev_svc(eps)])
    got = Counter(picks(node, 300))
    assert (eps[1].address, 8080) not in got and len(got) == 2
    node.put_services([maglev_svc(endpoints(2, [0, 0]))])
    verdict, _ = run(node, tcp(CLIENT, VIP, 41000, 80, "S"))
    assert verdict != TC_ACT_OK or node.list_conntrack() == []
    assert node.global_stats()["drop_no_endpoint"].packets == 1


def test_removing_one_of_n_moves_its_flows_and_few_others(node):
    n = 10
    eps = endpoints(n)
    node.put_services([maglev_svc(eps)])
    before = picks(node)
    gone = eps[4]
    node.put_services([maglev_svc([e for e in eps if e != gone])])
    after = picks(node)
    lost = {(gone.address, gone.port)}
    assert all(a not in lost for a in after)
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    others_moved = sum(a != b for a, b in zip(before, after, strict=True) if a not in lost)
    assert moved / FLOWS < 2 / n
    assert others_moved / FLOWS < 0.5 / n
    # the removed endpoint had flows (so "none lands on it" above was not vacuous)
    assert sum(b in lost for b in before) > 0


def test_established_flow_keeps_its_endpoint_when_the_table_changes(node):
    eps = endpoints(4)
    node.put_services([maglev_svc(eps)])
    _, syn = run(node, tcp(CLIENT, VIP, 42000, 80, "S"))
    ep = syn[IP].dst
    # every other endpoint goes; then this one's weight changes: a new table each time
    node.put_services([maglev_svc([e for e in eps if e.address == ep]
                                  + [EndpointSpec("198.18.9.9", 8080)])])
    run(node, tcp(ep, CLIENT, 8080, 42000, "SA"))
    verdict, out = run(node, tcp(CLIENT, VIP, 42000, 80, "A"))
    assert verdict in FORWARDED and out[IP].dst == ep


def test_one_table_per_maglev_service_freed_on_delete(node):
    mg = node.services.maglev
    spec = maglev_svc(endpoints(3))
    rr = maglev_svc(endpoints(3), port=81, algo=Algorithm.ROUND_ROBIN)
    node.put_services([spec, rr])
    first = [k for k, _ in mg.items()]
    assert len(first) == 1
    node.put_services([maglev_svc(endpoints(2))])
    second = [k for k, _ in mg.items()]
    assert len(second) == 1 and second != first
    node.delete_services([spec.key])
    assert list(mg.items()) == []


@pytest.fixture
def other_node() -> Iterator[object]:
    """A second datapath: another node name under another bpffs root."""
    from dpd.loader import Settings
    from dpd.node import Node, cleanup

    root = tempfile.mkdtemp(prefix="xlb-dp2-")
    settings = Settings(name="dptest2", bpf_root=root, max_services=64, max_backends=256,
                        ct_size=4096, redirect=False)
    n = None
    try:
        n = Node.load(settings, ct_aging_interval=0)
        yield n
    finally:
        if n is not None:
            n.close()
        cleanup(settings)
        os.rmdir(root)


def test_two_datapaths_pick_the_same_endpoint_for_the_same_flows(node, other_node):
    eps = endpoints(7, [1, 2, 3, 1, 1, 2, 1])
    node.put_services([maglev_svc(eps)])
    # the other node: services in another order (other svc_ids, stat ids), endpoints
    # given in another order
    other_node.put_services([maglev_svc(endpoints(2), port=443),
                             ServiceSpec(VIP, 80, Proto.TCP, Algorithm.MAGLEV,
                                         endpoints=tuple(reversed(eps)))])
    assert picks(node) == picks(other_node)
