"""Real TCP (and UDP) through each mode on namespace topologies run by xlb-dpd
(docs/modes.md): full-NAT where the lb is not on the backends' return path (DNAT fails
there), one-arm (everything behind one interface), DSR on L2 and through IP-in-IP with
the backends answering the client directly."""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from lab import netns
from lab.client import run_tcp_who, run_udp_who, start_tcp_long
from tests.e2e.conftest import VIP, Lab, open_lab
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

TCP, UDP = tpb.PROTOCOL_TCP, tpb.PROTOCOL_UDP
PORT_MIN, PORT_END = 1024, 1024 + 31744  # XLB_SNAT_PORT_MIN, + XLB_SNAT_PORT_COUNT


def lab_of(**topo: object) -> contextlib.AbstractContextManager[Lab]:
    return open_lab(prefix="md", **topo)


def service(lab: Lab, mode: int, port: int = 80, proto: int = TCP, snat: str = "") -> pb.Service:
    return pb.Service(vip=VIP, port=port, protocol=proto, mode=mode, snat_address=snat,
                      endpoints=[tpb.Endpoint(address=ip, port=8080)
                                 for ip in lab.topo.backend_ips])


def put(lab: Lab, *services: pb.Service) -> None:
    lab.stub.PutServices(pb.PutServicesRequest(services=list(services)), timeout=10)


def counters(lab: Lab) -> dict[str, int]:
    return dict(lab.stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters)


def peers(lab: Lab, ns: str) -> list[tuple[str, int]]:
    """The remote ends of the established connections to port 8080 in `ns`."""
    out = netns.run(ns, ["ss", "-Htn", "state", "established", "( sport = :8080 )"],
                    timeout=10).stdout
    got = []
    for line in out.splitlines():
        addr, port = line.split()[-1].rsplit(":", 1)
        got.append((addr, int(port)))
    return got


def rx_packets(ns: str, ifname: str) -> int:
    out = netns.run(ns, ["ip", "-s", "-j", "link", "show", "dev", ifname], timeout=10).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def check_long(lab: Lab, port: int, snat: str | None, own: bool = False) -> None:
    """A long connection (50 ms round trips for 2 s); with `snat`, the backend sees it
    come from that address and a port of the node address's SNAT range (1024..32767:
    the client's ephemeral port lies above it), or with `own` (the service's own SNAT
    address, the whole range) the client's own port."""
    conn = start_tcp_long(lab.topo, VIP, port, duration=2.0, interval_ms=50)
    time.sleep(1.0)
    seen = [p for ns in lab.topo.backend_ns for p in peers(lab, ns)]
    res = conn.result()
    assert res["errors"] == 0 and not res["broken"] and res["received"] == res["sent"] > 10, res
    assert len(seen) == 1, seen
    if snat is not None:
        addr, sport = seen[0]
        assert addr == snat, seen
        if own:
            assert sport == int(res["local"].rsplit(":", 1)[1]), (seen, res)
        else:
            assert PORT_MIN <= sport < PORT_END, seen


def test_fullnat_works_where_dnat_cannot_because_replies_bypass_the_lb():
    with lab_of(backend_routes="none") as lab:
        topo = lab.topo
        put(lab, service(lab, tpb.MODE_DNAT))
        dnat = run_tcp_who(topo, VIP, 80, count=2, timeout=0.5)
        assert dnat.get("errors") == 2, dnat  # the backends cannot route to the client
        # the same service in full-NAT, the node's address toward each backend
        put(lab, service(lab, tpb.MODE_FULLNAT), service(lab, tpb.MODE_FULLNAT, 53, UDP))
        lab.stub.FlushConntrack(pb.FlushConntrackRequest(), timeout=10)
        tcp = run_tcp_who(topo, VIP, 80, count=40)
        assert tcp.get("errors") == 0 and tcp["be1"] == 20 and tcp["be2"] == 20, tcp
        udp = run_udp_who(topo, VIP, 53, count=20)
        assert udp.get("errors") == 0 and udp["be1"] > 0 and udp["be2"] > 0, udp
        got = [s for s in lab.stub.ListServices(pb.ListServicesRequest(), timeout=10)]
        assert {(s.port, s.mode, s.snat_address) for s in got} == {
            (80, tpb.MODE_FULLNAT, ""), (53, tpb.MODE_FULLNAT, "")}
        # the backend sees the lb's address on its link, a port of the SNAT range
        conn = start_tcp_long(topo, VIP, 80, duration=2.0, interval_ms=50)
        time.sleep(1.0)
        seen = {ns: peers(lab, ns) for ns in topo.backend_ns}
        res = conn.result()
        assert res["errors"] == 0 and res["received"] == res["sent"] > 10, res
        (ns, [(addr, sport)]), = [(n, p) for n, p in seen.items() if p]
        assert addr == topo.backend_gws[topo.backend_ns.index(ns)], seen
        assert PORT_MIN <= sport < PORT_END
        c = counters(lab)
        assert c["drop_snat_ports"] == 0 and c["drop_no_route"] == 0 and c["drop_ct_clash"] == 0


def test_fullnat_with_a_service_snat_address():
    snat = "198.18.99.1"
    with lab_of(backend_routes="none") as lab:
        topo = lab.topo
        for ns, gw in zip(topo.backend_ns, topo.backend_gws, strict=True):
            netns.run(ns, ["ip", "route", "add", f"{snat}/32", "via", gw], timeout=10)
        put(lab, service(lab, tpb.MODE_FULLNAT, snat=snat))
        tcp = run_tcp_who(topo, VIP, 80, count=20)
        assert tcp.get("errors") == 0 and tcp["be1"] == 10 and tcp["be2"] == 10, tcp
        check_long(lab, 80, snat, own=True)
        entries = list(lab.stub.ListConntrack(pb.ListConntrackRequest(), timeout=10))
        orig = [e for e in entries if e.direction == pb.DIRECTION_ORIGINAL]
        assert orig and all(e.nat2_address == snat and e.nat2_port for e in orig)


def test_one_arm_fullnat_on_one_interface():
    with lab_of(one_arm=True) as lab:
        topo = lab.topo
        assert topo.lb_ifaces == ["c0"]
        put(lab, service(lab, tpb.MODE_FULLNAT))
        tcp = run_tcp_who(topo, VIP, 80, count=40)
        assert tcp.get("errors") == 0 and tcp["be1"] == 20 and tcp["be2"] == 20, tcp
        check_long(lab, 80, topo.client_gw)  # the lb's one address
        assert counters(lab)["redirect"] > 0  # forwarded back out of c0 by the datapath


@pytest.mark.parametrize("mode", [tpb.MODE_DSR, tpb.MODE_DSR_IPIP])
def test_dsr_backends_answer_the_client_directly(mode):
    with lab_of(backend_routes="direct") as lab:
        topo = lab.topo
        topo.dsr_backends(ipip=mode == tpb.MODE_DSR_IPIP)
        before = sum(rx_packets(topo.lb_ns, f"b{i}") for i in (1, 2))
        put(lab, service(lab, mode, port=8080))  # DSR: the endpoints' port is the service's
        tcp = run_tcp_who(topo, VIP, 8080, count=40)
        assert tcp.get("errors") == 0 and tcp["be1"] == 20 and tcp["be2"] == 20, tcp
        check_long(lab, 8080, None)
        # the backends' answers did not come through the lb
        after = sum(rx_packets(topo.lb_ns, f"b{i}") for i in (1, 2))
        assert after - before < 10, (before, after)
        entries = list(lab.stub.ListConntrack(pb.ListConntrackRequest(), timeout=10))
        assert entries and all(e.direction == pb.DIRECTION_ORIGINAL for e in entries)
        c = counters(lab)
        assert c["dsr"] > 40 * 3 and c["drop_no_route"] == 0, c
