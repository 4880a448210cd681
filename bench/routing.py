"""Routing: ns/packet of the forwarding step with bpf_fib_lookup against an LPM map, at
10 and 10,000 routes, with 1, 2 and 8 next hops (ECMP); and the change latency of a route
through dpd's API (PutRoutes -> the FIB -> what bpf_fib_lookup returns).

The decision it informs (docs/routing.md): does the datapath forward with bpf_fib_lookup
on the kernel FIB (where dpd installs routes), or does dpd mirror routes into LPM maps
(`rt_v4_map` + `nh_map`) that the datapath reads?

Three small TC programs, each parsing Ethernet/IPv4/UDP the same way and ending with the
MACs written and `bpf_redirect` (no TTL change, so BPF_PROG_TEST_RUN can repeat a packet):
- parse:  no lookup, a fixed egress (the floor);
- fib:    bpf_fib_lookup (the kernel FIB: route, multipath hash over the 5-tuple with
          fib_multipath_hash_policy=1, neighbour MACs), as dpd/bpf/fwd.h does;
- lpm:    an LPM trie lookup (prefix -> next-hop group), a 5-tuple hash to pick a member,
          an array lookup for the next hop's ifindex and MACs: what mirrored maps cost.

Everything runs in a network namespace of its own (created and removed here): a veth
with 8 neighbours (permanent entries) as next hops, 10 or 10,000 /30 routes installed
through dpd.routes.KernelRoutes (proto 200), the measured destination in the last one.

Run: python -m bench.routing [--repeat N] [--changes N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

NS = f"rtbench{os.getpid()}"
INGRESS, EGRESS = "rtbin", "rtbout"
LOCAL = "198.18.100.1"
GATEWAYS = [f"198.18.100.{i}" for i in range(2, 10)]  # 8 next hops
CLIENT = "198.18.101.2"
ROUTE_BASE = (198 << 24) | (19 << 16)  # /30s in 198.19.0.0/16
SIZES = (10, 10_000)
PATHS = (1, 2, 8)

PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

struct lpm_key { u32 prefixlen; u32 addr; };
struct nh_group { u32 n; u32 nh[8]; };
struct nh { u32 ifindex; u8 smac[6]; u8 dmac[6]; };
BPF_LPM_TRIE(rt_v4_map, struct lpm_key, struct nh_group, 16384);
BPF_ARRAY(nh_map, struct nh, 64);

#define PARSE                                                                   \
    void *data = (void *)(long)skb->data;                                       \
    void *end = (void *)(long)skb->data_end;                                    \
    struct ethhdr *eth = data;                                                  \
    struct iphdr *ip = (void *)(eth + 1);                                       \
    struct udphdr *udp = (void *)(ip + 1);                                      \
    if ((void *)(udp + 1) > end)                                                \
        return TC_ACT_OK;                                                       \
    if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)                    \
        return TC_ACT_OK;

int fwd_parse(struct __sk_buff *skb)
{
    PARSE
    __u8 mac[6] = {2, 0, 0, 0, 0, 1};
    __builtin_memcpy(eth->h_dest, mac, 6);
    __builtin_memcpy(eth->h_source, mac, 6);
    return bpf_redirect(EGRESS_IFINDEX, 0);
}

int fwd_fib(struct __sk_buff *skb)
{
    PARSE
    struct bpf_fib_lookup fib = {};
    fib.family = 2;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    fib.sport = udp->source;
    fib.dport = udp->dest;
    fib.tot_len = bpf_ntohs(ip->tot_len);
    fib.ipv4_src = ip->saddr;
    fib.ipv4_dst = ip->daddr;
    fib.ifindex = INGRESS_IFINDEX;
    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS)
        return TC_ACT_SHOT;
    __builtin_memcpy(eth->h_dest, fib.dmac, 6);
    __builtin_memcpy(eth->h_source, fib.smac, 6);
    return bpf_redirect(fib.ifindex, 0);
}

int fwd_lpm(struct __sk_buff *skb)
{
    PARSE
    struct lpm_key k = {32, ip->daddr};
    struct nh_group *g = rt_v4_map.lookup(&k);
    if (!g)
        return TC_ACT_SHOT;
    u32 idx = 0;
    if (g->n > 1) {
        u32 h = ip->saddr ^ ip->daddr ^ ip->protocol ^
                (((u32)udp->source << 16) | udp->dest);
        h ^= h >> 16;
        h *= 0x7feb352d;
        h ^= h >> 15;
        idx = h % g->n;
    }
    u32 id = g->nh[idx & 7];
    struct nh *nh = nh_map.lookup(&id);
    if (!nh)
        return TC_ACT_SHOT;
    __builtin_memcpy(eth->h_dest, nh->dmac, 6);
    __builtin_memcpy(eth->h_source, nh->smac, 6);
    return bpf_redirect(nh->ifindex, 0);
}
"""

TC_ACT_REDIRECT = 7


def route_prefix(i: int) -> str:
    n = ROUTE_BASE + 4 * i
    return f"{socket.inet_ntoa(n.to_bytes(4, 'big'))}/30"


def target_address(i: int) -> str:
    return socket.inet_ntoa((ROUTE_BASE + 4 * i + 1).to_bytes(4, "big"))


def neighbour_mac(i: int) -> str:
    return f"02:00:5e:00:01:{i:02x}"


@dataclass
class RealRow:
    routes: int
    paths: int
    to_stack: float  # xlb's fast path, redirect off (the kernel forwards)
    redirect: float  # xlb's fast path, redirect on (bpf_fib_lookup + bpf_redirect)


@dataclass
class Row:
    routes: int
    paths: int
    parse: float
    fib: float
    lpm: float


def _sh(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, text=True)


def _setup_links() -> tuple[int, int, str]:
    _sh("ip", "link", "set", "lo", "up")
    _sh("ip", "link", "add", INGRESS, "type", "veth", "peer", "name", EGRESS)
    for dev in (INGRESS, EGRESS):
        _sh("ip", "link", "set", dev, "up")
    _sh("ip", "addr", "add", f"{LOCAL}/24", "dev", EGRESS)
    _sh("ip", "addr", "add", "198.18.101.1/24", "dev", INGRESS)
    for i, gw in enumerate(GATEWAYS):
        _sh("ip", "neigh", "replace", gw, "lladdr", neighbour_mac(i), "dev", EGRESS,
            "nud", "permanent")
    _sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    with open(f"/sys/class/net/{INGRESS}/ifindex") as f:
        ingress = int(f.read())
    with open(f"/sys/class/net/{EGRESS}/ifindex") as f:
        egress = int(f.read())
    with open(f"/sys/class/net/{EGRESS}/address") as f:
        smac = f.read().strip()
    return ingress, egress, smac


def _packet(dst: str, sport: int = 40000) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(Ether(src="02:00:00:00:00:aa", dst="00:00:00:00:00:00")
                 / IP(src=CLIENT, dst=dst) / UDP(sport=sport, dport=53) / (b"x" * 64))


def _ns(fd: int, packet: bytes, repeat: int, runs: int = 5) -> float:
    from dpd import bpfsys

    out = []
    for _ in range(runs):
        res = bpfsys.prog_test_run(fd, packet, repeat=repeat)
        if res.retval != TC_ACT_REDIRECT:
            raise RuntimeError(f"the program did not forward the packet (verdict {res.retval})")
        out.append(res.duration_ns)
    return statistics.median(out)


def _route(prefix: str, paths: int) -> Any:
    from xlbcore.route import NextHopSpec, RouteSpec

    return RouteSpec(prefix, tuple(NextHopSpec(g, "", 1) for g in GATEWAYS[:paths]))


def measure(repeat: int, changes: int, runs: int) -> dict[str, Any]:
    import ctypes

    from bcc import BPF

    from dpd.routes import KernelRoutes

    ingress, egress, smac = _setup_links()
    b = BPF(text=PROGRAM.encode(), cflags=[f"-DINGRESS_IFINDEX={ingress}",
                                           f"-DEGRESS_IFINDEX={egress}"])
    fds = {name: b.load_func(f"fwd_{name}".encode(), BPF.SCHED_CLS).fd
           for name in ("parse", "fib", "lpm")}
    rt, nhm = b["rt_v4_map"], b["nh_map"]
    smac_b = bytes.fromhex(smac.replace(":", ""))
    for i in range(len(GATEWAYS)):
        v = nhm.Leaf(egress, (ctypes.c_ubyte * 6)(*smac_b),
                     (ctypes.c_ubyte * 6)(*bytes.fromhex(neighbour_mac(i).replace(":", ""))))
        nhm[nhm.Key(i)] = v

    def lpm_put(i: int, paths: int) -> None:
        addr = int.from_bytes(socket.inet_aton(route_prefix(i).split("/")[0]), "little")
        rt[rt.Key(30, addr)] = rt.Leaf(paths, (ctypes.c_uint * 8)(*range(paths)))

    table = KernelRoutes()
    rows: list[Row] = []
    real_rows: list[RealRow] = []
    xlb = _XlbPath(ingress)
    bulk: dict[int, float] = {}
    latency: dict[int, dict[str, float]] = {}
    have = 0
    try:
        for size in SIZES:
            t0 = time.perf_counter()
            batch = [_route(route_prefix(i), 1) for i in range(have, size)]
            for k in range(0, len(batch), 1000):
                table.put(batch[k:k + 1000])
            bulk[size] = (time.perf_counter() - t0) / max(1, len(batch)) * 1e6
            for i in range(have, size):
                lpm_put(i, 1)
            have = size
            target = size - 1
            pkt = _packet(target_address(target))
            for paths in PATHS:
                table.put([_route(route_prefix(target), paths)])
                lpm_put(target, paths)
                rows.append(Row(size, paths, _ns(fds["parse"], pkt, repeat),
                                _ns(fds["fib"], pkt, repeat), _ns(fds["lpm"], pkt, repeat)))
                real_rows.append(xlb.measure(size, paths, target_address(target), runs))
            latency[size] = _change_latency(table, fds["fib"], target, changes)
    finally:
        table.close()
        b.cleanup()
        xlb.close()
    return {"rows": [r.__dict__ for r in rows], "real": [r.__dict__ for r in real_rows],
            "bulk_put_us_per_route": bulk, "change_latency_ms": latency}


class _XlbPath:
    """xlb's own fast path (tc_packet_func) on an established NATed UDP flow whose
    endpoint is in the measured route, with redirect off (handed to the stack) and on
    (bpf_fib_lookup, TTL, MACs, bpf_redirect). A NATed packet is rewritten, so each run
    is one BPF_PROG_TEST_RUN on a fresh copy (as bench.datapath_ns); the mean of the
    kernel-measured durations."""

    VIP = "198.19.255.10"

    def __init__(self, ingress: int) -> None:
        from dpd.loader import Settings
        from dpd.node import Node

        self.ingress = ingress
        self.root = tempfile.mkdtemp(prefix="rtbench-")
        self.settings = Settings(name="rtbench", bpf_root=self.root, max_services=16,
                                 max_backends=64, ct_size=4096, redirect=False)
        self.node = Node.load(self.settings, ct_aging_interval=0)
        self.endpoint = ""

    def _redirect(self, on: bool) -> None:
        dp = self.node.dp
        cfg, codec = dp.maps["cfg_map"], dp.abi.structs["xlb_cfg"].codec
        value = codec.unpack(cfg.get(bytes(4)))
        cfg.put(bytes(4), codec.pack(flags=dp.abi.const("XLB_CFG_REDIRECT") if on else 0,
                                     build_id=value["build_id"]))

    def _flow(self, endpoint: str) -> bytes:
        """An established flow client:50000 -> VIP:53 NATed to endpoint:53."""
        from scapy.layers.inet import IP, UDP
        from scapy.layers.l2 import Ether

        from dpd import bpfsys
        from xlbcore.service import EndpointSpec, Proto, ServiceSpec

        if endpoint != self.endpoint:
            self.node.put_services([ServiceSpec(self.VIP, 53, Proto.UDP, endpoints=(
                EndpointSpec(endpoint, 53),))])
            self.node.flush_conntrack()
            self.endpoint = endpoint
            self._redirect(False)
            bpfsys.prog_test_run(self.node.dp.fast_fd, _packet(self.VIP, 50000),
                                 ingress_ifindex=self.ingress)
            reply = bytes(Ether(dst="00:00:00:00:00:00") / IP(src=endpoint, dst=CLIENT)
                          / UDP(sport=53, dport=50000) / (b"x" * 64))
            bpfsys.prog_test_run(self.node.dp.fast_fd, reply, ingress_ifindex=self.ingress)
            est = self.node.conntrack.states.est
            if not any(e.state == est for e in self.node.list_conntrack()):
                raise RuntimeError("the benchmark's UDP flow did not become established")
        return _packet(self.VIP, 50000)

    def measure(self, size: int, paths: int, endpoint: str, runs: int) -> RealRow:
        from dpd import bpfsys

        pkt = self._flow(endpoint)
        fd = self.node.dp.fast_fd
        out = []
        for on, want in ((False, 0), (True, TC_ACT_REDIRECT)):
            self._redirect(on)
            total = 0
            for _ in range(runs):
                res = bpfsys.prog_test_run(fd, pkt, ingress_ifindex=self.ingress)
                if res.retval != want:
                    raise RuntimeError(f"xlb's verdict {res.retval}, expected {want}")
                total += res.duration_ns
            out.append(total / runs)
        return RealRow(size, paths, out[0], out[1])

    def close(self) -> None:
        from dpd.node import cleanup

        self.node.close()
        cleanup(self.settings)
        os.rmdir(self.root)


def _change_latency(table: Any, fib_fd: int, target: int, changes: int) -> dict[str, float]:
    """PutRoutes through dpd's servicer (gRPC on a unix socket) moving the target route
    between two next hops, timed until bpf_fib_lookup returns the new neighbour's MAC."""
    import grpc

    from dpd import bpfsys
    from dpd.loader import Settings
    from dpd.memory import MemoryDatapath
    from dpd.node import Node
    from dpd.servicer import DatapathServicer
    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.dpd.v1 import datapath_pb2_grpc
    from xlb.types.v1 import types_pb2 as tpb
    from xlbcore.server import start_server

    node = Node(MemoryDatapath(Settings(name="bench", max_services=16, max_backends=64,
                                        ct_size=64)), ct_aging_interval=0)
    node.routes = table  # the kernel FIB of this namespace behind the real servicer
    servicer = DatapathServicer(node)
    sockdir = tempfile.mkdtemp(prefix="rtb-")
    server = start_server(f"unix:{sockdir}/dpd.sock", "xlb.dpd.v1.Datapath",
                          lambda s: datapath_pb2_grpc.add_DatapathServicer_to_server(servicer,
                                                                                      s))
    channel = grpc.insecure_channel(server.address)
    stub = datapath_pb2_grpc.DatapathStub(channel)
    pkt = _packet(target_address(target))
    took = []
    try:
        for n in range(changes):
            gw = n % 2
            want = bytes.fromhex(neighbour_mac(gw).replace(":", ""))
            req = pb.PutRoutesRequest(routes=[tpb.RouteSpec(
                prefix=route_prefix(target), next_hops=[tpb.NextHop(gateway=GATEWAYS[gw])])])
            t0 = time.perf_counter()
            stub.PutRoutes(req, timeout=10)
            while bpfsys.prog_test_run(fib_fd, pkt).data[:6] != want:
                if time.perf_counter() - t0 > 5:
                    raise RuntimeError("the FIB did not follow PutRoutes within 5 s")
            took.append((time.perf_counter() - t0) * 1e3)
    finally:
        channel.close()
        server.stop(0)
        shutil.rmtree(sockdir, ignore_errors=True)
    took.sort()
    return {"p50": statistics.median(took), "p99": took[int(len(took) * 0.99) - 1],
            "max": took[-1]}


def table_text(result: dict[str, Any], repeat: int) -> str:
    lines = [f"forwarding step, ns/packet (BPF_PROG_TEST_RUN, median of 5 x {repeat:,} runs, "
             f"kernel {os.uname().release})",
             "| routes | next hops | parse only | bpf_fib_lookup | LPM map + nh array | "
             "fib - parse | lpm - parse |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['routes']:,} | {r['paths']} | {r['parse']:.0f} | {r['fib']:.0f} | "
                     f"{r['lpm']:.0f} | {r['fib'] - r['parse']:.0f} | "
                     f"{r['lpm'] - r['parse']:.0f} |")
    lines += ["", "xlb's fast path (tc_packet_func), an established NATed UDP flow, ns/packet "
              "(mean of single runs)", "| routes | next hops | redirect off (to the stack) | "
              "redirect on (bpf_fib_lookup) | difference |", "|---:|---:|---:|---:|---:|"]
    for r in result["real"]:
        lines.append(f"| {r['routes']:,} | {r['paths']} | {r['to_stack']:.0f} | "
                     f"{r['redirect']:.0f} | {r['redirect'] - r['to_stack']:.0f} |")
    lines += ["", "route change through dpd (PutRoutes over gRPC -> FIB -> bpf_fib_lookup sees "
              "the new next hop), ms", "| routes present | p50 | p99 | max | bulk put, us/route |",
              "|---:|---:|---:|---:|---:|"]
    for size, lat in result["change_latency_ms"].items():
        lines.append(f"| {int(size):,} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
                     f"{lat['max']:.2f} | {result['bulk_put_us_per_route'][size]:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=200_000)
    p.add_argument("--changes", type=int, default=200)
    p.add_argument("--runs", type=int, default=20_000,
                   help="single runs per figure of xlb's own fast path")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:  # inside the namespace: measure, print JSON
        from xlbcore.logs import configure_logging

        configure_logging("kv", "warning")
        sys.stdout.write(json.dumps(measure(args.repeat, args.changes, args.runs)) + "\n")
        return 0
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        res = subprocess.run(
            ["ip", "netns", "exec", NS, sys.executable, "-m", "bench.routing", "--inner",
             "--repeat", str(args.repeat), "--changes", str(args.changes),
             "--runs", str(args.runs)],
            capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            sys.stderr.write(res.stderr[-4000:])
            return 1
        result = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)
    sys.stdout.write(table_text(result, args.repeat) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
