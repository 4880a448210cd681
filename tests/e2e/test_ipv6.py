"""IPv6 services on a real node (docs/ipv6.md): real TCP connections and UDP datagrams
from the client namespace to an IPv6 VIP through xlb-dpd in DNAT, full-NAT, one-arm
full-NAT and DSR (L2 and ip6ip6), each checking which backend answered, the peer the
backend saw and that the client's peer was the VIP; path MTU discovery through the VIP
(a router with a smaller MTU behind the node: its packet too big is translated); ping6
of the VIP answered by the datapath; the page's grpcurl examples as written."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from lab import netns
from tests.e2e.conftest import Lab, doc_grpcurl_commands, open_lab
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

TCP, UDP = tpb.PROTOCOL_TCP, tpb.PROTOCOL_UDP
VIP6 = "2001:db8:ff::10"
C6, LB6_C = "2001:db8:10::2", "2001:db8:10::1"


def lb6_b(i: int) -> str:
    """The lb's address on its link to backend i (1-based)."""
    return f"2001:db8:1{i}::1"


def be6(i: int) -> str:
    return f"2001:db8:1{i}::2"


ONE_ARM_BE6 = ("2001:db8:10::11", "2001:db8:10::12")


def _addr(ns: str, dev: str, cidr: str) -> None:
    netns.run(ns, ["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"], timeout=15)


def _route(ns: str, *route: str) -> None:
    netns.run(ns, ["ip", "-6", "route", "add", *route], timeout=15)


def ipv6_links(topo: Any) -> None:
    """IPv6 on the topology's links, as its IPv4 (lab/topology.py) is: client
    2001:db8:10::2/64 via the lb's 2001:db8:10::1; backend i 2001:db8:1i::2/64 on the lb's
    2001:db8:1i::1/64, its default route by the topology's choice (via the lb, none, or
    the direct link to the client: 2001:db8:3i::2 <-> 2001:db8:3i::1); one-arm: every
    address in 2001:db8:10::/64 (backends ::11, ::12)."""
    netns.sysctl(topo.lb_ns, {"net.ipv6.conf.all.forwarding": 1})
    _addr(topo.client_ns, topo.client_iface, f"{C6}/64")
    _addr(topo.lb_ns, "c0", f"{LB6_C}/64")
    _route(topo.client_ns, "default", "via", LB6_C)
    if topo.one_arm:
        for ns, a in zip(topo.backend_ns, ONE_ARM_BE6, strict=False):
            _addr(ns, topo.backend_iface, f"{a}/64")
        return
    for i, ns in enumerate(topo.backend_ns, start=1):
        _addr(topo.lb_ns, f"b{i}", f"{lb6_b(i)}/64")
        _addr(ns, topo.backend_iface, f"{be6(i)}/64")
        if topo.backend_routes == "lb":
            _route(ns, "default", "via", lb6_b(i))
        elif topo.backend_routes == "direct":
            _addr(ns, "eth1", f"2001:db8:3{i}::2/64")
            _addr(topo.client_ns, f"d{i}", f"2001:db8:3{i}::1/64")
            _route(ns, "default", "via", f"2001:db8:3{i}::1")


def start_servers(topo: Any, namespaces: list[str], port: int = 8080) -> None:
    """lab.peer6's server (TCP and UDP on [::]:port) in each namespace, named be1..."""
    from lab.servers import wait_listening

    for i, ns in enumerate(namespaces, start=1):
        proc = topo.popen(ns, [sys.executable, "-m", "lab.peer6", "serve", "--name", f"be{i}",
                               "--port", str(port)], env=netns.python_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(topo, ns, port, "tcp", proc, what=f"be{i}")
        wait_listening(topo, ns, port, "udp", proc, what=f"be{i}")


def lab6(**topo: Any) -> contextlib.AbstractContextManager[Lab]:
    def before(t: Any) -> None:
        ipv6_links(t)
        start_servers(t, t.backend_ns)

    return open_lab(prefix="v6", before_dpd=before, servers=False, disable_ipv6=False, **topo)


def client(lab: Lab, proto: str, port: int, count: int, size: int = 3,
           timeout: float = 2.0) -> dict[str, Any]:
    argv = [sys.executable, "-m", "lab.peer6", proto, "--vip", VIP6, "--port", str(port),
            "--count", str(count), "--size", str(size), "--timeout", str(timeout)]
    out = netns.run(lab.topo.client_ns, argv, env=netns.python_env(), cwd=netns.REPO_ROOT,
                    timeout=60 + count * timeout).stdout
    return dict(json.loads(out))


def service(mode: tpb.Mode, endpoints: list[str], port: int = 80,
            proto: tpb.Protocol = TCP, ep_port: int = 8080) -> pb.Service:
    return pb.Service(vip=VIP6, port=port, protocol=proto, mode=mode,
                      endpoints=[tpb.Endpoint(address=a, port=ep_port) for a in endpoints])


def put(lab: Lab, *services: pb.Service) -> None:
    lab.stub.PutServices(pb.PutServicesRequest(services=list(services)), timeout=10)


def counters(lab: Lab) -> dict[str, int]:
    return dict(lab.stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters)


def check(res: dict[str, Any], port: int, seen: dict[str, str], count: int) -> None:
    """`count` answers, split evenly over the backends (round-robin), each backend having
    seen the peer `seen` gives for it, the client's peer the VIP."""
    assert res["errors"] == 0, res
    names = Counter(a[0] for a in res["answers"])
    assert names == {name: count // len(seen) for name in seen}, names
    for name, peer_seen, _, peer in res["answers"]:
        assert peer_seen == seen[name], (name, peer_seen, seen)
        assert peer == f"[{VIP6}]:{port}", peer


def test_dnat_tcp_and_udp_through_an_ipv6_vip():
    with lab6() as lab:
        eps = [be6(1), be6(2)]
        put(lab, service(tpb.MODE_DNAT, eps), service(tpb.MODE_DNAT, eps, 53, UDP))
        both = {"be1": C6, "be2": C6}  # the client's own address reaches the backends
        check(client(lab, "tcp", 80, 20), 80, both, 20)
        check(client(lab, "udp", 53, 20), 53, both, 20)
        got = {(s.vip, s.port, s.protocol) for s in
               lab.stub.ListServices(pb.ListServicesRequest(), timeout=10)}
        assert got == {(VIP6, 80, TCP), (VIP6, 53, UDP)}
        c = counters(lab)
        assert c["new_flow"] >= 40 and c["drop_ct_clash"] == 0, c
        # ping6 of the VIP: answered by the datapath (no namespace holds the address),
        # while a service holds it
        before = counters(lab)["icmp_echo_reply"]
        assert ping6(lab, VIP6, 3) == 3
        assert counters(lab)["icmp_echo_reply"] - before == 3
        lab.stub.DeleteServices(pb.DeleteServicesRequest(keys=[
            tpb.ServiceKey(vip=VIP6, port=p, protocol=proto)
            for p, proto in ((80, TCP), (53, UDP))]), timeout=10)
        assert ping6(lab, VIP6, 2) == 0


def ping6(lab: Lab, dst: str, count: int) -> int:
    """Echo replies the client gets from `dst`."""
    res = netns.run(lab.topo.client_ns, ["ping", "-6", "-n", "-c", str(count), "-i", "0.2",
                                         "-W", "1", dst], check=False, timeout=30)
    got = [line for line in res.stdout.splitlines() if "received" in line]
    return int(got[0].split(",")[1].split()[0]) if got else 0


def test_fullnat_where_the_backends_have_no_route_to_the_client():
    with lab6(backend_routes="none") as lab:
        eps = [be6(1), be6(2)]
        put(lab, service(tpb.MODE_DNAT, eps))
        assert client(lab, "tcp", 80, 2, timeout=0.5)["errors"] == 2  # replies lost
        put(lab, service(tpb.MODE_FULLNAT, eps), service(tpb.MODE_FULLNAT, eps, 53, UDP))
        lab.stub.FlushConntrack(pb.FlushConntrackRequest(), timeout=10)
        nodes = {"be1": lb6_b(1), "be2": lb6_b(2)}  # the node's address toward each
        check(client(lab, "tcp", 80, 20), 80, nodes, 20)
        check(client(lab, "udp", 53, 20), 53, nodes, 20)


def test_one_arm_fullnat_on_one_interface():
    with lab6(one_arm=True) as lab:
        put(lab, service(tpb.MODE_FULLNAT, list(ONE_ARM_BE6)))
        check(client(lab, "tcp", 80, 20), 80, {"be1": LB6_C, "be2": LB6_C}, 20)
        assert counters(lab)["redirect"] > 0  # back out of c0 by the datapath


def _dsr_backends(topo: Any, tunnel: bool) -> None:
    """The VIP on each backend's lo; with `tunnel`, ip6ip6 to the backend's address
    decapsulated (an ip6tnl device, or lab.decap's TC program where the kernel has none)."""
    decap = []
    for i, ns in enumerate(topo.backend_ns, start=1):
        _addr(ns, "lo", f"{VIP6}/128")
        if not tunnel:
            continue
        res = netns.run(None, ["ip", "-n", ns, "link", "add", "md6tnl", "type", "ip6tnl",
                               "mode", "any", "local", be6(i)], check=False, timeout=15)
        if res.returncode != 0:
            decap.append(f"{ns}:{topo.backend_iface}:{be6(i)}")
            continue
        netns.run(None, ["ip", "-n", ns, "link", "set", "md6tnl", "up"], timeout=15)
    if decap:
        netns.run(None, [sys.executable, "-m", "lab.decap", *decap], env=netns.python_env(),
                  cwd=netns.REPO_ROOT, timeout=120)


def rx_packets(ns: str, ifname: str) -> int:
    out = netns.run(ns, ["ip", "-s", "-j", "link", "show", "dev", ifname], timeout=10).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


@pytest.mark.parametrize("mode", [tpb.MODE_DSR, tpb.MODE_DSR_IPIP])
def test_dsr_backends_answer_the_client_directly(mode):
    with lab6(backend_routes="direct") as lab:
        topo = lab.topo
        _dsr_backends(topo, tunnel=mode == tpb.MODE_DSR_IPIP)
        eps = [be6(1), be6(2)]
        # DSR: the endpoints' port is the service's
        put(lab, service(mode, eps, 8080), service(mode, eps, 8080, UDP))
        before = sum(rx_packets(topo.lb_ns, f"b{i}") for i in (1, 2))
        check(client(lab, "tcp", 8080, 20), 8080, {"be1": C6, "be2": C6}, 20)
        check(client(lab, "udp", 8080, 20), 8080, {"be1": C6, "be2": C6}, 20)
        after = sum(rx_packets(topo.lb_ns, f"b{i}") for i in (1, 2))
        assert after - before < 10, (before, after)  # the answers did not come through it
        c = counters(lab)
        assert c["dsr"] >= 40 * 2 and c["drop_no_route"] == 0, c


# -- path MTU discovery through the VIP -------------------------------------------------

R_S, S6 = "2001:db8:21::1", "2001:db8:21::2"


@contextlib.contextmanager
def pmtu_lab() -> Iterator[tuple[Lab, str]]:
    """One backend namespace made a router: behind it a server namespace on a link whose
    router side has MTU 1280 (the server's own side 1500, so it advertises an MSS that
    does not fit). The router sends packet too big for what the node forwards; the
    client learns the path MTU only if the node translates it. Yields the lab and the
    server's namespace."""
    server_ns: list[str] = []

    def before(topo: Any) -> None:
        ipv6_links(topo)
        rt = topo.backend_ns[0]
        srv = f"{topo.prefix}-s"
        netns.create(srv)
        server_ns.append(srv)
        netns.run(None, ["ip", "link", "add", "r6", "netns", rt, "type", "veth", "peer",
                         "name", "eth0", "netns", srv], timeout=15)
        netns.run(rt, ["ip", "link", "set", "r6", "mtu", "1280", "up"], timeout=15)
        netns.run(srv, ["ip", "link", "set", "eth0", "up"], timeout=15)
        netns.run(srv, ["ip", "link", "set", "lo", "up"], timeout=15)
        _addr(rt, "r6", f"{R_S}/64")
        _addr(srv, "eth0", f"{S6}/64")
        _route(srv, "default", "via", R_S)
        netns.sysctl(rt, {"net.ipv6.conf.all.forwarding": 1})
        _route(topo.lb_ns, "2001:db8:21::/64", "via", be6(1))
        start_servers(topo, [srv])

    try:
        with open_lab(prefix="v6", backends=1, before_dpd=before, servers=False,
                      disable_ipv6=False) as lab:
            yield lab, server_ns[0]
    finally:
        for ns in server_ns:
            netns.delete(ns)


@pytest.mark.parametrize("mode", [tpb.MODE_DNAT, tpb.MODE_FULLNAT])
def test_a_large_upload_completes_because_packet_too_big_is_translated(mode):
    with pmtu_lab() as (lab, _):
        put(lab, service(mode, [S6]))
        res = client(lab, "tcp", 80, 1, size=300_000, timeout=10.0)
        assert res["errors"] == 0, res
        ((name, seen, got, peer),) = res["answers"]
        assert (name, got, peer) == ("be1", 300_000, f"[{VIP6}]:80")
        assert seen == (C6 if mode == tpb.MODE_DNAT else lb6_b(1))
        assert counters(lab)["icmp_nat"] > 0
        # the client learnt the path's MTU for the VIP
        route = netns.run(lab.topo.client_ns, ["ip", "-6", "route", "get", VIP6],
                          timeout=10).stdout
        assert "mtu 1280" in route, route


# -- docs/ipv6.md ----------------------------------------------------------------------

def test_the_docs_grpcurl_examples_work_as_written():
    from tests.unit.test_policyd_grpcurl import GRPCURL

    if GRPCURL is None:
        pytest.skip("grpcurl not installed")
    cmds = doc_grpcurl_commands("ipv6.md")
    assert cmds, "docs/ipv6.md has no dpd grpcurl example"
    with lab6() as lab:
        for argv in cmds:
            argv = [GRPCURL if a == "grpcurl" else lab.dpd.socket if a == "/run/xlb/dpd.sock"
                    else a for a in argv]
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert res.returncode == 0, f"{argv}: {res.stderr}"
        # as the page says: 2001:db8:ff::10 port 80/tcp onto both backends' 8080
        check(client(lab, "tcp", 80, 20), 80, {"be1": C6, "be2": C6}, 20)
