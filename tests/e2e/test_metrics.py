"""dpd's Prometheus metrics on a real node: traffic through the VIP moves the per-service
and per-endpoint counters, conntrack entries show by state, maps show their fill.

dpd runs in the lb namespace (--netns), where 127.0.0.1 is that namespace's loopback; the
exporter listens on a unix socket instead (--metrics unix:PATH), which the test reaches
from the host like dpd's gRPC socket."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.client import run_tcp_who
from tests.e2e.conftest import VIP, Lab, open_lab
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.metrics import scrape

pytestmark = pytest.mark.root


@pytest.fixture
def metered() -> Iterator[tuple[Lab, str]]:
    """The e2e lab's node, its dpd started with --metrics on a unix socket."""
    def metrics(topo: Any) -> str:
        return f"unix:{topo.workdir}/dpd-metrics.sock"

    with open_lab(extra=lambda topo: ["--metrics", metrics(topo)]) as lab:
        yield lab, metrics(lab.topo)


def samples(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(scrape(address)) for s in f.samples}


def test_real_traffic_moves_service_and_endpoint_counters(metered):
    lab, metrics = metered
    service = pb.Service(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP,
                         endpoints=[tpb.Endpoint(address=ip, port=8080, weight=1)
                                    for ip in lab.topo.backend_ips])
    lab.stub.PutServices(pb.PutServicesRequest(services=[service]), timeout=10)
    before = samples(metrics)
    svc = {("node", "lb"), ("service", f"{VIP}:80/tcp")}
    assert before[("xlb_dpd_service_packets_total", frozenset(svc))] == 0

    tcp = run_tcp_who(lab.topo, VIP, 80, count=20)
    assert tcp.get("errors") == 0, tcp
    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10)
    s = samples(metrics)  # after the traffic: the counters stand still
    (st,) = stats.services
    assert s[("xlb_dpd_service_packets_total", frozenset(svc))] == st.counters.packets > 20 * 3
    assert s[("xlb_dpd_service_bytes_total", frozenset(svc))] == st.counters.bytes > 0
    for e in st.endpoints:
        ep = frozenset(svc | {("endpoint", f"{e.endpoint.address}:8080")})
        assert s[("xlb_dpd_endpoint_packets_total", ep)] == e.counters.packets > 0
        assert s[("xlb_dpd_endpoint_bytes_total", ep)] == e.counters.bytes > 0
    node = {("node", "lb")}
    assert s[("xlb_dpd_datapath_events_total", frozenset(node | {("event", "new_flow")}))] == (
        stats.global_counters["new_flow"]) >= 20
    assert s[("xlb_dpd_drops_total", frozenset(node | {("reason", "no_endpoint")}))] == 0

    ct = {lbls: v for (name, lbls), v in s.items() if name == "xlb_dpd_conntrack_entries"}
    assert sum(ct.values()) >= 20  # 20 flows, two entries each, unless aged meanwhile
    assert {dict(lbls)["protocol"] for lbls in ct} == {"tcp", "udp", "sctp"}  # not numbers
    assert sum(v for lbls, v in ct.items() if dict(lbls)["protocol"] == "tcp") >= 20
    fill = s[("xlb_dpd_map_entries",
              frozenset(node | {("map", "ct_v4_map"), ("type", "lru_hash")}))]
    assert fill == sum(ct.values())
    assert s[("xlb_dpd_map_entries",
              frozenset(node | {("map", "nat_v4_map"), ("type", "hash")}))] == 1
    assert s[("xlb_dpd_map_entries",
              frozenset(node | {("map", "vip_v4_map"), ("type", "hash")}))] == 1

    rpc = frozenset({("service", "xlb.dpd.v1.Datapath"), ("method", "PutServices"),
                     ("code", "OK")})
    assert s[("xlb_dpd_rpc_requests_total", rpc)] == 1
