"""Prometheus metrics of dpd (over in-memory maps) and of an in-process policyd: scraped
over HTTP, parsed with prometheus_client's parser, and moved by counters, services,
conntrack entries, RPCs and reconcile passes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dpd.loader import Settings
from dpd.main import serve
from dpd.memory import MemoryDatapath
from dpd.metrics import Exporter, ServiceFamilies, read_counters, register_node, service_label
from dpd.node import Node
from policyd import metrics as pmetrics
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.dpd.v1 import datapath_pb2_grpc
from xlbcore.metrics import labels_text, scrape, start_metrics
from xlbcore.service import Algorithm, EndpointSpec, Proto, ServiceSpec

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def svc(i: int, n_eps: int = 2, proto: Proto = Proto.TCP) -> ServiceSpec:
    eps = tuple(EndpointSpec(f"198.18.{1 + j}.{1 + i}", 8080) for j in range(n_eps))
    return ServiceSpec(f"198.19.0.{1 + i}", 80, proto, Algorithm.ROUND_ROBIN, endpoints=eps)


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node(MemoryDatapath(Settings(name="mem", max_services=8, max_backends=32,
                                     ct_size=64)), ct_aging_interval=0)
    yield n
    n.close()


@pytest.fixture
def exporter(node: Node) -> Iterator[Exporter]:
    e = Exporter("127.0.0.1:0")
    e.start([node])
    yield e
    e.stop()


def put_counter(node: Node, map_name: str, index: int, per_cpu: list[tuple[int, int]]) -> None:
    m = node.dp.maps[map_name]
    codec = node.dp.abi.structs["xlb_counter"].codec
    raw = bytearray(m.value_bytes)
    stride = m.value_bytes // m.ncpus
    for cpu, (packets, nbytes) in enumerate(per_cpu):
        codec.pack_into(raw, cpu * stride, packets=packets, bytes=nbytes)
    m.put(index.to_bytes(4, "little"), bytes(raw))


def slots(node: Node, spec: ServiceSpec) -> tuple[int, list[int]]:
    e = dict(node.services.entries())[spec.key]
    return e.svc_id, [e.stat_ids[(ep.address, ep.port)] for ep in spec.endpoints]


def get(exporter: Exporter) -> Samples:
    assert exporter.server is not None
    return parse(scrape(exporter.server.address))


def test_per_service_and_per_endpoint_counters_are_summed_over_cpus(node, exporter):
    a, b = svc(0), svc(1, n_eps=3, proto=Proto.UDP)
    node.put_services([a, b])
    svc_id, ep_ids = slots(node, a)
    put_counter(node, "svc_stats_map", svc_id, [(3, 300), (4, 400)])
    put_counter(node, "ep_stats_map", ep_ids[1], [(1, 10), (2, 20)])
    s = get(exporter)
    labels = {"node": "mem", "service": "198.19.0.1:80/tcp"}
    assert value(s, "xlb_dpd_service_packets_total", **labels) == 7
    assert value(s, "xlb_dpd_service_bytes_total", **labels) == 700
    ep = {**labels, "endpoint": "198.18.2.1:8080"}
    assert value(s, "xlb_dpd_endpoint_packets_total", **ep) == 3
    assert value(s, "xlb_dpd_endpoint_bytes_total", **ep) == 30
    assert value(s, "xlb_dpd_endpoint_packets_total", **{**ep, "endpoint": "198.18.1.1:8080"}) == 0
    udp = {"node": "mem", "service": "198.19.0.2:80/udp", "endpoint": "198.18.3.2:8080"}
    assert value(s, "xlb_dpd_endpoint_packets_total", **udp) == 0
    assert value(s, "xlb_dpd_services", node="mem") == 2

    # counters move between scrapes; a deleted service's series go away
    put_counter(node, "svc_stats_map", svc_id, [(10, 1000), (4, 400)])
    node.delete_services([b.key])
    s = get(exporter)
    assert value(s, "xlb_dpd_service_packets_total", **labels) == 14
    assert not [k for k in s if ("service", "198.19.0.2:80/udp") in k[1]]
    assert value(s, "xlb_dpd_services", node="mem") == 1
    assert value(s, "xlb_dpd_services_generation", node="mem") == node.services.generation


def test_a_changed_service_gets_its_new_endpoints_labels(node, exporter):
    node.put_services([svc(0, n_eps=1)])
    assert ("endpoint", "198.18.2.1:8080") not in {lbl for _, ls in get(exporter) for lbl in ls}
    node.put_services([svc(0, n_eps=2)])
    s = get(exporter)
    assert value(s, "xlb_dpd_endpoint_packets_total", node="mem",
                 service="198.19.0.1:80/tcp", endpoint="198.18.2.1:8080") == 0


def test_bulk_read_matches_the_tables_own_stats(node):
    node.put_services([svc(i, n_eps=1 + i % 3) for i in range(5)])
    for i in range(8):
        put_counter(node, "svc_stats_map", i, [(i, 10 * i), (1, 1)])
    for i in range(32):
        put_counter(node, "ep_stats_map", i, [(i + 1, i), (2, 2)])
    bulk = {r.svc_packets: (total, eps) for r, total, eps in ServiceFamilies(node).stats()}
    own = {f'xlb_dpd_service_packets_total{{node="mem",service="{service_label(spec)}"}} ':
           ((t.packets, t.bytes), [(c.packets, c.bytes) for _, c in eps])
           for spec, t, eps in node.services.stats()}
    assert bulk == own


def test_read_counters_sums_cpus_and_reads_missing_slots_as_zero(node):
    put_counter(node, "ep_stats_map", 5, [(1, 2), (3, 4)])
    assert read_counters(node.dp.maps["ep_stats_map"], [5, 6, 999]) == [(4, 6), (0, 0), (0, 0)]


def test_global_counters_by_drop_reason_and_event(node, exporter):
    abi = node.dp.abi
    put_counter(node, "stats_map", abi.const("XLB_STAT_DROP_NO_ENDPOINT"), [(2, 0), (5, 0)])
    put_counter(node, "stats_map", abi.const("XLB_STAT_NEW_FLOW"), [(1, 0), (1, 0)])
    s = get(exporter)
    assert value(s, "xlb_dpd_drops_total", node="mem", reason="no_endpoint") == 7
    assert value(s, "xlb_dpd_drops_total", node="mem", reason="ct_insert") == 0
    assert value(s, "xlb_dpd_datapath_events_total", node="mem", event="new_flow") == 2
    assert ("xlb_dpd_datapath_events_total",
            frozenset({("node", "mem"), ("event", "drop_no_endpoint")})) not in s


def test_firewall_rules_and_interface_drops(node, exporter):
    from dpd.firewall import Policy
    from xlbcore.firewall import Action, RuleMatch, RuleSpec

    abi = node.dp.abi
    node.firewall.put([("no-telnet", RuleSpec(100, RuleMatch(dst="198.19.0.0/16"),
                                              Action.DROP))])
    rule_id = node.firewall.rules()[0].rule_id
    put_counter(node, "acl_stats_map", rule_id, [(3, 300), (4, 400)])
    slot = node.firewall.set_interface("eth0", "", Policy.DROP).slot
    put_counter(node, "intf_stats_map",
                slot * abi.const("XLB_STAT_MAX") + abi.const("XLB_STAT_DROP_DEFAULT_POLICY"),
                [(5, 0), (0, 0)])
    s = get(exporter)
    assert value(s, "xlb_dpd_rule_packets_total", node="mem", rule="no-telnet") == 7
    assert value(s, "xlb_dpd_rule_bytes_total", node="mem", rule="no-telnet") == 700
    assert value(s, "xlb_dpd_firewall_rules", node="mem") == 1
    assert value(s, "xlb_dpd_interface_drops_total", node="mem", interface="eth0",
                 reason="default_policy") == 5


def test_map_fill_and_conntrack_by_state(node, exporter):
    node.put_services([svc(0)])
    abi = node.dp.abi
    key, val = abi.structs["xlb_ct_key"].codec, abi.structs["xlb_ct_val"].codec
    ct = node.dp.maps["ct_v4_map"]
    for i, state in enumerate(("XLB_CT_EST", "XLB_CT_EST", "XLB_CT_NEW")):
        k = key.pack(saddr=socket.inet_aton("198.18.0.2"), daddr=socket.inet_aton("198.19.0.1"),
                     sport=1000 + i, dport=80, proto=int(Proto.TCP))
        ct.put(k, val.pack(state=abi.const(state), dir=abi.const("XLB_DIR_ORIG")))
    s = get(exporter)
    assert value(s, "xlb_dpd_conntrack_entries", node="mem", protocol="tcp",
                 state="established") == 2
    assert value(s, "xlb_dpd_conntrack_entries", node="mem", protocol="tcp", state="new") == 1
    assert value(s, "xlb_dpd_conntrack_entries", node="mem", protocol="udp", state="new") == 0
    assert value(s, "xlb_dpd_map_entries", node="mem", map="ct_v4_map", type="lru_hash") == 3
    assert value(s, "xlb_dpd_map_max_entries", node="mem", map="ct_v4_map",
                 type="lru_hash") == 64
    assert value(s, "xlb_dpd_map_entries", node="mem", map="nat_v4_map", type="hash") == 1


def test_sctp_flows_are_counted_under_their_protocol(node, exporter):
    abi = node.dp.abi
    key, val = abi.structs["xlb_ct_key"].codec, abi.structs["xlb_ct_val"].codec
    k = key.pack(saddr=socket.inet_aton("198.18.0.2"), daddr=socket.inet_aton("198.19.0.1"),
                 sport=5000, dport=38412, proto=int(Proto.SCTP))
    node.dp.maps["ct_v4_map"].put(k, val.pack(state=abi.const("XLB_CT_CLOSED"),
                                              dir=abi.const("XLB_DIR_ORIG")))
    s = get(exporter)
    assert value(s, "xlb_dpd_conntrack_entries", node="mem", protocol="sctp",
                 state="closed") == 1
    assert value(s, "xlb_dpd_conntrack_entries", node="mem", protocol="sctp", state="new") == 0


def test_rpc_counts_and_latencies_by_method_and_code(node, sockdir):
    e = Exporter("unix:" + str(sockdir / "metrics.sock"))
    server = serve(node, f"unix:{sockdir}/dpd.sock", exporter=e)
    e.start([node])
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = datapath_pb2_grpc.DatapathStub(ch)
            stub.GetNode(pb.GetNodeRequest(), timeout=5)
            stub.GetNode(pb.GetNodeRequest(), timeout=5)
            list(stub.ListServices(pb.ListServicesRequest(), timeout=5))
            with pytest.raises(grpc.RpcError):
                stub.DetachInterface(pb.DetachInterfaceRequest(name=""), timeout=5)
        s = parse(scrape(f"unix:{sockdir}/metrics.sock"))
    finally:
        e.stop()
        server.stop(0)
    dp = {"service": "xlb.dpd.v1.Datapath"}
    assert value(s, "xlb_dpd_rpc_requests_total", **dp, method="GetNode", code="OK") == 2
    assert value(s, "xlb_dpd_rpc_requests_total", **dp, method="ListServices", code="OK") == 1
    assert value(s, "xlb_dpd_rpc_requests_total", **dp, method="DetachInterface",
                 code="INVALID_ARGUMENT") == 1
    assert value(s, "xlb_dpd_rpc_duration_seconds_count", **dp, method="GetNode",
                 code="OK") == 2
    assert value(s, "xlb_dpd_rpc_duration_seconds_bucket", **dp, method="GetNode", code="OK",
                 le="+Inf") == 2
    assert not (sockdir / "metrics.sock").exists()  # removed on stop


def test_exporter_answers_only_metrics_and_stops(sockdir):
    registry = CollectorRegistry()
    server = start_metrics("127.0.0.1:0", registry)
    host, port = server.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"GET /other HTTP/1.0\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.0 404")
    server.stop()
    server.stop()  # again: nothing
    with pytest.raises(OSError):
        scrape(server.address, timeout=1)


def test_label_values_are_escaped():
    assert labels_text(a='x"y\\z\nw') == 'a="x\\"y\\\\z\\nw"'


def test_several_nodes_in_one_exporter_are_told_apart_by_the_node_label():
    nodes = [Node(MemoryDatapath(Settings(name=f"sim-{i}", max_services=4, max_backends=8,
                                          ct_size=16)), ct_aging_interval=0) for i in range(2)]
    e = Exporter("127.0.0.1:0")
    try:
        e.start(nodes)
        nodes[1].put_services([svc(0)])
        s = get(e)
        assert value(s, "xlb_dpd_services", node="sim-0") == 0
        assert value(s, "xlb_dpd_services", node="sim-1") == 1
    finally:
        e.stop()
        for n in nodes:
            n.close()


def test_register_node_text_parses_with_the_registry(node):
    registry = CollectorRegistry()
    fam = register_node(registry, node)
    node.put_services([svc(0)])
    text = "".join(fam.render())
    assert {f.name for f in text_string_to_metric_families(text)} == {
        "xlb_dpd_service_packets", "xlb_dpd_service_bytes", "xlb_dpd_endpoint_packets",
        "xlb_dpd_endpoint_bytes"}


# -- policyd -------------------------------------------------------------------------------


def test_policyd_node_state_passes_and_rpcs(policyd, client_for, fake_node, fast, wait_for,
                                            sockdir: Path):
    e = pmetrics.Exporter(f"unix:{sockdir}/pmetrics.sock")
    seen: list[str] = []
    settings = e.settings(replace(fast, on_pass=lambda n, r: seen.append(n)))
    try:
        srv = policyd(settings=settings, interceptors=(e.rpc,))
        assert srv.reconciler is not None
        e.start(srv.reconciler)
        node = fake_node("n1").start()
        client = client_for(srv)
        client.register_node("n1", node.address)
        client.apply_service("web", "198.19.0.10", 80, endpoints=["198.18.1.2:8080"])
        client.wait_synced(timeout=10)

        def synced() -> Samples | None:
            s = parse(scrape(f"unix:{sockdir}/pmetrics.sock"))
            key = ("xlb_policyd_node_sync_state",
                   frozenset({("node", "n1"), ("state", "synced")}))
            return s if s.get(key) == 1 else None

        s = wait_for(synced, what="n1 synced in the metrics")
        assert value(s, "xlb_policyd_node_sync_state", node="n1", state="error") == 0
        assert value(s, "xlb_policyd_node_observed_generation", node="n1") == value(
            s, "xlb_policyd_desired_generation")
        assert value(s, "xlb_policyd_node_services", node="n1") == 1
        assert value(s, "xlb_policyd_node_firewall_rules", node="n1") == 0
        assert value(s, "xlb_policyd_node_refused_objects", node="n1", kind="route") == 0
        assert value(s, "xlb_policyd_nodes") == 1
        assert value(s, "xlb_policyd_node_drift_repaired_total", node="n1") == 0
        assert value(s, "xlb_policyd_node_epoch", node="n1") == 1
        assert value(s, "xlb_policyd_pass_duration_seconds_count", node="n1", result="ok") >= 1
        assert value(s, "xlb_policyd_pass_services_written_total", node="n1", op="put") >= 1
        assert seen  # the observer that was there still sees every pass
        pol = {"service": "xlb.policy.v1.Policy"}
        assert value(s, "xlb_policyd_rpc_requests_total", **pol, method="RegisterNode",
                     code="OK") == 1
        assert value(s, "xlb_policyd_rpc_requests_total", **pol, method="ApplyService",
                     code="OK") == 1

        node.stop()  # the node goes away: passes fail, the state is error
        client.apply_service("web", "198.19.0.10", 81, endpoints=["198.18.1.2:8080"])

        def failing() -> Samples | None:
            s = parse(scrape(f"unix:{sockdir}/pmetrics.sock"))
            err = s.get(("xlb_policyd_pass_errors_total", frozenset({("node", "n1")})), 0)
            state = s.get(("xlb_policyd_node_sync_state",
                           frozenset({("node", "n1"), ("state", "error")})))
            return s if err >= 1 and state == 1 else None

        s = wait_for(failing, what="n1 failing in the metrics")
        assert value(s, "xlb_policyd_node_sync_state", node="n1", state="synced") == 0
    finally:
        e.stop()




def test_policer_counters_by_name_and_result(node, exporter):
    from dpd.policers import PolicerSpec

    abi = node.dp.abi
    node.policers.put([PolicerSpec("eth0-in", 8_000_000, 30_000, ("eth0",)),
                       PolicerSpec("idle", 8_000, 1_500)])
    pid = 1  # the first id handed out
    assert node.policers.name_of(pid) == "eth0-in"
    put_counter(node, "polx_stats_map", pid * 2 + abi.const("XLB_POLX_PASS"),
                [(3, 4500), (4, 6000)])
    put_counter(node, "polx_stats_map", pid * 2 + abi.const("XLB_POLX_DROP"), [(0, 0), (2, 3000)])
    s = get(exporter)
    for metric, result, want in (("packets", "passed", 7), ("bytes", "passed", 10_500),
                                 ("packets", "dropped", 2), ("bytes", "dropped", 3_000)):
        assert value(s, f"xlb_dpd_policer_{metric}_total", node="mem", policer="eth0-in",
                     result=result) == want
        assert value(s, f"xlb_dpd_policer_{metric}_total", node="mem", policer="idle",
                     result=result) == 0
    assert value(s, "xlb_dpd_policers", node="mem") == 2
    node.policers.delete(["eth0-in"])
    s = get(exporter)
    assert ("xlb_dpd_policer_packets_total", frozenset(
        {("node", "mem"), ("policer", "eth0-in"), ("result", "passed")})) not in s
    assert value(s, "xlb_dpd_policers", node="mem") == 1
