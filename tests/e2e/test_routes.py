"""Routes through dpd on real packets (namespaces, real sockets).

::

    rtXXXX-cl  eth0 198.18.0.2 --- c0 198.18.0.1   rtXXXX-lb (xlb-dpd --attach auto)
                                   b1 198.18.1.1 --- eth0 198.18.1.2  rtXXXX-b1 "router A"
                                   b2 198.18.2.1 --- eth0 198.18.2.2  rtXXXX-b2 "router B"

Both routers hold DEST (198.19.5.1) on their loopback and answer UDP datagrams with their
name, so the answer says which path a datagram took. The lb namespace has no route to
DEST until dpd puts one. Traffic to DEST is forwarded by the kernel stack (no service);
traffic to the VIP is NATed to DEST by the datapath and forwarded with bpf_fib_lookup.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.e2e.conftest import VIP, open_lab, wait_until

pytestmark = pytest.mark.root

DEST = "198.19.5.1"
PREFIX = "198.19.5.0/24"
PORT = 9000
A, B = "198.18.1.2", "198.18.2.2"  # the routers' addresses: the next hops

PROBE = r"""
import json, socket, sys
dst, port, sports, wait = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])
out = {}
for sport in sports:
    who = "none"
    for _ in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.settimeout(wait)
        try:
            s.sendto(b"x", (dst, port))
            who = s.recv(100).split()[0].decode()
            break
        except OSError:
            pass
        finally:
            s.close()
    out[sport] = who
print(json.dumps(out))
"""


@dataclass
class Lab:
    topo: Any
    dpd: Any
    stub: Any

    def probe(self, sports: list[int], dst: str = DEST, wait: float = 1.0) -> dict[int, str]:
        """Which router answered a datagram from each source port."""
        res = self.topo.run(self.topo.client_ns, [sys.executable, "-c", PROBE, dst, str(PORT),
                                                  json.dumps(sports), str(wait)], timeout=120)
        return {int(k): v for k, v in json.loads(res.stdout).items()}

    def ip(self, *args: str) -> str:
        return str(self.topo.run(self.topo.lb_ns, ["ip", *args]).stdout)

    def put(self, *routes: Any) -> Any:
        from xlb.dpd.v1 import datapath_pb2 as pb

        return self.stub.PutRoutes(pb.PutRoutesRequest(routes=list(routes)), timeout=10)


def spec(prefix: str, *hops: tuple[str, int]) -> Any:
    from xlb.types.v1 import types_pb2 as tpb

    return tpb.RouteSpec(prefix=prefix, next_hops=[tpb.NextHop(gateway=g, weight=w)
                                                   for g, w in hops])


def _routers(topo: Any) -> None:
    """Each backend namespace a router: DEST on its loopback, an IPv6 link to the lb, a
    UDP server on PORT answering with its name (A, B)."""
    from lab import netns
    from lab.servers import wait_listening

    for i, ns in enumerate(topo.backend_ns):
        topo.run(ns, ["ip", "addr", "add", f"{DEST}/32", "dev", "lo"])
        topo.run(ns, ["ip", "addr", "add", f"2001:db8:{i + 1}::2/64", "dev", "eth0",
                      "nodad"])
        topo.run(topo.lb_ns, ["ip", "addr", "add", f"2001:db8:{i + 1}::1/64", "dev",
                              f"b{i + 1}", "nodad"])
        logf = open(topo.workdir / f"router{i}.log", "w")
        try:
            proc = topo.popen(ns, [sys.executable, "-m", "lab.servers", "--name", "AB"[i],
                                   "--tcp-port", "0", "--udp-port", str(PORT),
                                   "--bind", "0.0.0.0"], stderr=logf,
                              env=netns.python_env())
        finally:
            logf.close()
        wait_listening(topo, ns, PORT, "udp", proc, 15.0, f"router {'AB'[i]}")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(prefix="rt", before_dpd=_routers, servers=False, name="rtlb",
                  attach=["auto"], disable_ipv6=False) as lab:
        yield Lab(lab.topo, lab.dpd, lab.stub)


def _nat_service(lab: Lab) -> None:
    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.types.v1 import types_pb2 as tpb

    lab.stub.PutServices(pb.PutServicesRequest(services=[pb.Service(
        vip=VIP, port=PORT, protocol=tpb.PROTOCOL_UDP,
        endpoints=[tpb.Endpoint(address=DEST, port=PORT)])]), timeout=10)


def test_attach_auto_takes_the_veths_and_follows_new_ones(lab: Lab) -> None:
    from xlb.dpd.v1 import datapath_pb2 as pb

    def names() -> set[str]:
        return {i.name for i in lab.stub.ListInterfaces(pb.ListInterfacesRequest(), timeout=5)}

    assert names() == {"c0", "b1", "b2"}  # not lo
    # two veth pairs at once: four links whose events arrive together
    lab.ip("link", "add", "rtnew0", "type", "veth", "peer", "name", "rtnew1")
    lab.ip("link", "add", "rtnew2", "type", "veth", "peer", "name", "rtnew3")
    want = {"c0", "b1", "b2", "rtnew0", "rtnew1", "rtnew2", "rtnew3"}
    wait_until(lambda: names() == want, 5)
    assert names() == want
    lab.ip("link", "add", "rtbr0", "type", "bridge")  # not physical-like: left alone
    lab.ip("link", "del", "rtnew0")
    lab.ip("link", "del", "rtnew2")
    wait_until(lambda: names() == {"c0", "b1", "b2"}, 5)
    assert names() == {"c0", "b1", "b2"}
    assert "interface_gone" in lab.dpd.log_text()


def test_a_put_route_steers_traffic_to_another_path(lab: Lab) -> None:
    from xlb.dpd.v1 import datapath_pb2 as pb

    sports = list(range(20000, 20008))
    assert set(lab.probe(sports, wait=0.3).values()) == {"none"}  # no route yet
    resp = lab.put(spec(PREFIX, (A, 1)))
    assert resp.written == 1
    assert set(lab.probe(sports).values()) == {"A"}
    _nat_service(lab)  # the datapath's bpf_fib_lookup follows the same FIB
    assert set(lab.probe(sports, dst=VIP).values()) == {"A"}
    resp2 = lab.put(spec(PREFIX, (B, 1)))
    assert resp2.generation == resp.generation + 1
    assert set(lab.probe(list(range(21000, 21008))).values()) == {"B"}
    assert set(lab.probe(list(range(21100, 21108)), dst=VIP).values()) == {"B"}
    assert f"{PREFIX} via {B} dev b2 proto 200" in lab.ip("route")
    listed = list(lab.stub.ListRoutes(pb.ListRoutesRequest(), timeout=5))
    assert [(r.prefix, [(h.gateway, h.interface) for h in r.next_hops]) for r in listed] == [
        (PREFIX, [(B, "")])]


def test_ecmp_spreads_flows_and_keeps_each_on_one_path(lab: Lab) -> None:
    from xlb.dpd.v1 import datapath_pb2 as pb

    lab.put(spec(PREFIX, (A, 1), (B, 1)))
    routes = lab.ip("route", "show", PREFIX)
    assert "nexthop via 198.18.1.2 dev b1 weight 1" in routes and "dev b2" in routes
    assert lab.topo.run(lab.topo.lb_ns, ["sysctl", "-n", "net.ipv4.fib_multipath_hash_policy"]
                        ).stdout.strip() == "1"
    sports = list(range(30000, 30064))
    first = lab.probe(sports)
    counts = {w: list(first.values()).count(w) for w in set(first.values())}
    assert set(counts) == {"A", "B"} and min(counts.values()) >= 12, counts
    assert lab.probe(sports) == first  # the same flow takes the same path
    # through the datapath (NAT, then bpf_fib_lookup): spread too, and sticky
    _nat_service(lab)
    nat_sports = list(range(31000, 31064))
    nat = lab.probe(nat_sports, dst=VIP)
    nat_counts = {w: list(nat.values()).count(w) for w in set(nat.values())}
    assert set(nat_counts) == {"A", "B"} and min(nat_counts.values()) >= 12, nat_counts
    assert lab.probe(nat_sports, dst=VIP) == nat
    # and the datapath picks for a flow the path the kernel picks for it: the same FIB,
    # the same 5-tuple hash (DNAT keeps the client's port: the flows differ only by the
    # destination the client addressed, the VIP or DEST, and NAT makes them one tuple)
    lab.stub.FlushConntrack(pb.FlushConntrackRequest(), timeout=5)
    assert lab.probe(nat_sports) == nat


def test_weights_shift_the_share(lab: Lab) -> None:
    lab.put(spec(PREFIX, (A, 7), (B, 1)))
    assert "weight 7" in lab.ip("route", "show", PREFIX)
    got = lab.probe(list(range(32000, 32064)))
    a = list(got.values()).count("A")
    assert a >= 44, got  # expected 56 of 64


def test_a_next_hop_that_changes_mac_is_followed(lab: Lab) -> None:
    from xlb.dpd.v1 import datapath_pb2 as pb

    lab.put(spec(PREFIX, (B, 1)))
    _nat_service(lab)
    assert set(lab.probe([33000, 33001], dst=VIP).values()) == {"B"}
    assert set(lab.probe([33100]).values()) == {"B"}

    def mac_of_b() -> str:
        for n in lab.stub.ListNeighbors(pb.ListNeighborsRequest(), timeout=5):
            if n.address == B:
                assert n.interface == "b2"
                return str(n.mac)
        return ""

    old = lab.topo.mac(lab.topo.backend_ns[1], "eth0")
    assert mac_of_b() == old
    new = "02:00:5e:10:00:42"
    router_b = lab.topo.backend_ns[1]
    # the router announces its new address (gratuitous ARP), as hosts configured with
    # arp_notify do; the node's kernel updates its neighbour entry
    lab.topo.run(router_b, ["sysctl", "-q", "-w", "net.ipv4.conf.eth0.arp_notify=1"])
    lab.topo.run(router_b, ["ip", "link", "set", "eth0", "address", new])
    wait_until(lambda: mac_of_b() == new, 10, 0.1)
    assert mac_of_b() == new
    # the same NATed flows and new ones keep flowing: the datapath reads the kernel's MAC
    assert set(lab.probe([33000, 33001, 33002], dst=VIP).values()) == {"B"}
    assert set(lab.probe([33100, 33101]).values()) == {"B"}


def test_foreign_routes_are_never_touched_and_cleanup_removes_xlbs(lab: Lab) -> None:
    from lab import netns
    from xlb.dpd.v1 import datapath_pb2 as pb

    lab.ip("route", "add", "198.19.7.0/24", "via", A)  # proto boot: the operator's
    lab.ip("route", "add", "198.19.8.0/24", "via", B, "proto", "static")
    with pytest.raises(grpc.RpcError) as err:
        lab.put(spec("198.19.7.0/24", (B, 1)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "198.19.7.0/24 is routed on this node by protocol boot, not by xlb" in (
        err.value.details())
    gone = lab.stub.DeleteRoutes(pb.DeleteRoutesRequest(prefixes=["198.19.7.0/24",
                                                                   "198.19.8.0/24"]), timeout=5)
    assert gone.deleted == 0
    lab.put(spec(PREFIX, (A, 1), (B, 1)),
            spec("2001:db8:5::/48", ("2001:db8:1::2", 1), ("2001:db8:2::2", 2)))
    lab.put(spec("198.19.9.0/24", (A, 1)))
    assert len(list(lab.stub.ListRoutes(pb.ListRoutesRequest(), timeout=5))) == 3
    assert "nexthop via 2001:db8:2::2 dev b2 weight 2" in lab.ip("-6", "route")
    lab.dpd.stop()
    res = subprocess.run([*lab.dpd.base, "--cleanup"], capture_output=True, text=True,
                         env=netns.python_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    assert lab.ip("route", "show", "proto", "200") == ""
    assert lab.ip("-6", "route", "show", "proto", "200") == ""
    routes = lab.ip("route")
    assert "198.19.7.0/24 via 198.18.1.2 dev b1" in routes
    assert "198.19.8.0/24 via 198.18.2.2 dev b2 proto static" in routes


def test_bad_input_is_invalid_argument_and_unreachable_is_reported(lab: Lab) -> None:
    from xlb.dpd.v1 import datapath_pb2 as pb

    with pytest.raises(grpc.RpcError) as err:
        lab.put(spec(PREFIX, (A, 1)), spec("198.19.6.1/24", (A, 1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("routes[1].prefix: '198.19.6.1/24' has host bits")
    lab.put(spec(PREFIX, (A, 1)))
    before = lab.ip("route")
    with pytest.raises(grpc.RpcError) as err:
        # the first would move PREFIX to B, the second cannot be installed
        lab.put(spec(PREFIX, (B, 1)), spec("198.19.6.0/24", (A, 1)),
                spec("198.19.10.0/24", ("198.18.9.1", 1)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == ("routes[2]: next hop 198.18.9.1 is unreachable on this node"
                                   " (no connected network holds it)")
    assert lab.ip("route") == before  # nothing half-written: PREFIX still via A
    assert set(lab.probe([34000, 34001]).values()) == {"A"}
    listed = list(lab.stub.ListRoutes(pb.ListRoutesRequest(), timeout=5))
    assert [r.prefix for r in listed] == [PREFIX]
    # IPv6: the same
    with pytest.raises(grpc.RpcError) as err:
        lab.put(spec("2001:db8:5::/48", ("2001:db8:99::1", 1)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "next hop 2001:db8:99::1 is unreachable" in err.value.details()
