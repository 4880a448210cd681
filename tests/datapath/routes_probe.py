"""Run inside a network namespace of its own (tests/datapath/test_routes.py starts it with
``ip netns exec``): load xlb's datapath with redirect on, install routes through
dpd.routes.KernelRoutes, and play NATed UDP packets through the real fast path with
BPF_PROG_TEST_RUN; print what each packet's forwarding chose (next-hop MAC) as JSON.

The namespace: a veth pair; packets "arrive" on rtin (198.18.101.1/24, the client
198.18.101.2 behind it); rtout (198.18.100.1/24) has eight next hops 198.18.100.2..9 with
permanent neighbour entries, so bpf_fib_lookup resolves every one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

CLIENT = "198.18.101.2"
GATEWAYS = [f"198.18.100.{i}" for i in range(2, 10)]
MACS = [f"02:00:5e:00:01:{i:02x}" for i in range(len(GATEWAYS))]
VIP_NEAR, VIP_FAR = "198.19.0.10", "198.19.0.11"  # -> 198.19.5.1, 198.19.6.1
TC_ACT_REDIRECT = 7


def _sh(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


def _links() -> int:
    _sh("ip", "link", "set", "lo", "up")
    _sh("ip", "link", "add", "rtin", "type", "veth", "peer", "name", "rtout")
    for dev in ("rtin", "rtout"):
        _sh("ip", "link", "set", dev, "up")
    _sh("ip", "addr", "add", "198.18.100.1/24", "dev", "rtout")
    _sh("ip", "addr", "add", "198.18.101.1/24", "dev", "rtin")
    for gw, mac in zip(GATEWAYS, MACS, strict=True):
        _sh("ip", "neigh", "replace", gw, "lladdr", mac, "dev", "rtout", "nud", "permanent")
    _sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    with open("/sys/class/net/rtin/ifindex") as f:
        return int(f.read())


def main() -> int:
    from dpd import bpfsys
    from dpd.loader import Settings
    from dpd.node import Node, cleanup
    from xlbcore.logs import configure_logging
    from xlbcore.route import NextHopSpec, RouteSpec
    from xlbcore.service import EndpointSpec, Proto, ServiceSpec

    configure_logging("kv", "warning")
    ingress = _links()
    root = tempfile.mkdtemp(prefix="rtdp-")
    settings = Settings(name="rtdp", bpf_root=root, max_services=16, max_backends=64,
                        ct_size=65536, redirect=True)
    node = None
    out: dict[str, Any] = {}
    try:
        node = Node.load(settings, ct_aging_interval=0)
        node.put_services([
            ServiceSpec(VIP_NEAR, 53, Proto.UDP, endpoints=(EndpointSpec("198.19.5.1", 53),)),
            ServiceSpec(VIP_FAR, 53, Proto.UDP, endpoints=(EndpointSpec("198.19.6.1", 53),))])

        def put(prefix: str, *hops: tuple[int, int]) -> None:
            node.routes.put([RouteSpec(prefix, tuple(
                NextHopSpec(GATEWAYS[g], "", w) for g, w in hops))])

        def send(vip: str, sport: int) -> str:
            pkt = bytes(Ether(src="02:00:00:00:00:aa", dst="00:00:00:00:00:00")
                        / IP(src=CLIENT, dst=vip, ttl=64) / UDP(sport=sport, dport=53)
                        / b"hello")
            res = bpfsys.prog_test_run(node.dp.fast_fd, pkt, ingress_ifindex=ingress)
            if res.retval != TC_ACT_REDIRECT:
                return f"verdict {res.retval}"
            eth = Ether(res.data)
            assert eth[IP].ttl == 63, eth[IP].ttl  # the datapath decremented it
            return str(eth.dst)

        def flows(vip: str, sports: range) -> dict[int, str]:
            return {s: send(vip, s) for s in sports}

        # longest prefix: the /24 via gateway 1 wins over the /16 via gateway 0
        put("198.19.0.0/16", (0, 1))
        put("198.19.5.0/24", (1, 1))
        out["lpm"] = {"near": send(VIP_NEAR, 40000), "far": send(VIP_FAR, 40001)}
        # ECMP over two next hops
        put("198.19.5.0/24", (0, 1), (1, 1))
        first = flows(VIP_NEAR, range(41000, 41128))
        again = flows(VIP_NEAR, range(41000, 41128))  # conntrack hits now
        node.flush_conntrack()
        fresh = flows(VIP_NEAR, range(41000, 41128))  # new flows, same tuples
        kernel = {}
        for s in range(41000, 41128):  # what the kernel's input route picks for the tuple
            got = json.loads(_sh("ip", "-j", "route", "get", "198.19.5.1", "from", CLIENT,
                                 "iif", "rtin", "ipproto", "udp", "sport", str(s),
                                 "dport", "53"))
            kernel[s] = MACS[GATEWAYS.index(got[0]["gateway"])]
        out["ecmp"] = {"first": first, "again": again, "fresh": fresh, "kernel": kernel}
        put("198.19.5.0/24", (0, 7), (1, 1))
        node.flush_conntrack()
        out["weighted"] = flows(VIP_NEAR, range(42000, 42256))
        put("198.19.5.0/24", *((g, 1) for g in range(8)))
        node.flush_conntrack()
        out["eight"] = flows(VIP_NEAR, range(43000, 43512))
    finally:
        if node is not None:
            node.close()
        cleanup(settings, remove_routes=True)
        os.rmdir(root)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
