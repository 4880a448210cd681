"""Datapath cost per packet with BPF_PROG_TEST_RUN, in ns, against the number of services.

Cases (each through tc_packet_func, the attached entry program):
- floor:       a parse-only program (same parser, returns TC_ACT_OK): the cost of any TC
               program that looks at the headers;
- pass:        a packet to no VIP (conntrack miss, tail call, service miss);
- established: a packet of an established flow (conntrack hit, NAT rewrite, counters);
- new_flow:    a flow's first packet (tail call, service lookup, endpoint selection,
               conntrack create for both directions, DNAT);
- fullnat_established, fullnat_new: the same for a full-NAT service (both ends
               rewritten; a new flow also allocates its source port: docs/modes.md);
- maglev_established, maglev_new: the same for a service with Maglev selection (a new
               flow reads the service's lookup table in maglev_v4_map: docs/maglev.md);
- pass_established: a data packet of a pass flow: a TCP flow to an address no service
               has, opened while a firewall ALLOW rule was in place (judged once, then
               tracked: the fast path's conntrack hit, no rewrite). The rule is removed
               before the next row, so the other cases run with the firewall off.

The programs rewrite packets, so a repeat count > 1 would feed a rewritten packet back
in; like Katran's tester, each measurement is a run with repeat=1 on a fresh copy, and
the figure is the mean of the kernel-measured durations. Forwarding is set to hand
packets to the stack (no FIB lookup), so the numbers are the datapath's own work.

Run: python -m bench.datapath_ns [--runs N] [--services 1,1000,10000,100000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from dpd import bpfsys
from dpd.abi import BPF_DIR
from dpd.loader import Settings
from xlbcore.firewall import Action, RuleMatch, RuleProto, RuleSpec
from xlbcore.service import Algorithm, EndpointSpec, Mode, Proto, ServiceSpec

CLIENT = "198.18.0.2"
FNAT_VIP = "198.18.250.1"  # the full-NAT service (outside the DNAT services' VIPs, which
# run from 198.19.0.1 up, past 198.19.255.255 at 100,000 services)
MAGLEV_VIP = "198.18.250.2"  # the Maglev service
PASS_DST = "198.18.7.2"  # no service there: the pass flow's destination
EXTRA_SERVICES = 2  # the full-NAT and Maglev services beside the measured ones
SNAT = "198.18.9.1"
VIP_BASE = (198 << 24) | (19 << 16)  # 198.19.0.0/16, one VIP per service


def vip(i: int) -> str:
    n = VIP_BASE + i + 1
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def pkt(dst: str, sport: int, flags: str = "S", payload: bytes = b"") -> bytes:
    """From the client: a SYN with ISN 0, or a packet after the handshake (seq 1, ack 1)."""
    n = 0 if flags == "S" else 1
    return bytes(Ether(src="02:00:00:00:00:01", dst="00:00:00:00:00:00")
                 / IP(src=CLIENT, dst=dst) / TCP(sport=sport, dport=80, flags=flags, seq=n, ack=n)
                 / payload)


def mean_ns(fd: int, packets: list[bytes], runs: int) -> float:
    total = 0
    n = len(packets)
    for i in range(runs):
        total += bpfsys.prog_test_run(fd, packets[i % n]).duration_ns
    return total / runs


def floor_fd() -> tuple[object, int]:
    from bcc import BPF

    text = "\n".join([
        "#include <uapi/linux/bpf.h>", "#include <uapi/linux/pkt_cls.h>",
        "#include <uapi/linux/if_ether.h>", "#include <uapi/linux/ip.h>",
        "#include <uapi/linux/in.h>", "#include <uapi/linux/tcp.h>",
        "#include <uapi/linux/udp.h>",
        (BPF_DIR / "parse.h").read_text(),
        "int parse_only(struct __sk_buff *skb) { struct xlb_pkt p;"
        " if (xlb_parse(skb, &p) != XLB_P_OK) return TC_ACT_OK;"
        " return p.proto == 255 ? TC_ACT_SHOT : TC_ACT_OK; }",
    ])
    b = BPF(text=text.encode())
    return b, b.load_func(b"parse_only", BPF.SCHED_CLS).fd


@dataclass
class Row:
    services: int
    floor: float
    pass_: float
    established: float
    new_flow: float
    fullnat_established: float = 0.0
    fullnat_new: float = 0.0
    maglev_established: float = 0.0
    maglev_new: float = 0.0
    pass_established: float = 0.0


@contextlib.contextmanager
def loaded_node(prefix: str, **settings: Any) -> Iterator[Any]:
    """dpd's datapath (dpd.node.Node) loaded with Settings(`settings`) under a temporary
    bpffs root (its name starting with `prefix`); closed, its pins and mount removed and
    the root deleted afterwards, also when loading failed part-way."""
    from dpd.node import Node, cleanup

    root = tempfile.mkdtemp(prefix=prefix)
    config = Settings(bpf_root=root, **settings)
    node = None
    try:
        node = Node.load(config, ct_aging_interval=0)
        yield node
    finally:
        if node is not None:
            node.close()
        cleanup(config)
        os.rmdir(root)


def measure(services_counts: list[int], runs: int) -> list[Row]:
    top = max(services_counts)
    bcc_floor = None
    rows = []
    with loaded_node("xlb-bench-", name="bench", max_services=max(top + EXTRA_SERVICES, 16),
                     max_backends=max(4 * (top + EXTRA_SERVICES), 64), ct_size=1 << 20,
                     redirect=False) as node:
        try:
            bcc_floor, ffd = floor_fd()
            fd = node.dp.fast_fd
            have = 0
            eps = tuple(EndpointSpec(f"198.18.{1 + j}.2", 8080) for j in range(4))
            node.put_services([ServiceSpec(FNAT_VIP, 80, Proto.TCP, mode=Mode.FULLNAT,
                                           endpoints=eps, snat_addr=SNAT),
                               ServiceSpec(MAGLEV_VIP, 80, Proto.TCP, Algorithm.MAGLEV,
                                           endpoints=eps)])
            for count in sorted(services_counts):
                batch = [ServiceSpec(vip(i), 80, Proto.TCP, endpoints=eps)
                         for i in range(have, count)]
                for k in range(0, len(batch), 5000):
                    node.put_services(batch[k:k + 5000])
                have = count
                node.flush_conntrack()
                target = vip(count - 1)  # the last service programmed
                miss = [pkt("198.19.255.254", 1000 + i % 50000) for i in range(64)]
                new = [pkt(target, 1024 + i) for i in range(min(runs, 60000))]
                t_floor = mean_ns(ffd, miss, runs)
                t_pass = mean_ns(fd, miss, runs)
                t_new = mean_ns(fd, new, min(runs, len(new)))
                t_est = _established_ns(node, fd, target, runs)
                fnew = [pkt(FNAT_VIP, 1024 + i) for i in range(min(runs, 60000))]
                t_fnew = mean_ns(fd, fnew, min(runs, len(fnew)))
                t_fest = _established_ns(node, fd, FNAT_VIP, runs)
                mnew = [pkt(MAGLEV_VIP, 1024 + i) for i in range(min(runs, 60000))]
                t_mnew = mean_ns(fd, mnew, min(runs, len(mnew)))
                t_mest = _established_ns(node, fd, MAGLEV_VIP, runs)
                t_pest = _pass_flow_ns(node, fd, runs)
                rows.append(Row(count, t_floor, t_pass, t_est, t_new, t_fest, t_fnew,
                                t_mest, t_mnew, t_pest))
        finally:
            if bcc_floor is not None:
                bcc_floor.cleanup()  # type: ignore[attr-defined]
    return rows


def _established_ns(node: object, fd: int, target: str, runs: int, sport: int = 65000) -> float:
    """Make one flow established (SYN, SYN-ACK, ACK), then time its data packets."""
    bpfsys.prog_test_run(fd, pkt(target, sport, "S"))
    ct = node.conntrack  # type: ignore[attr-defined]
    raw = ct.map.get(ct.key.pack(saddr=socket.inet_aton(CLIENT), daddr=socket.inet_aton(target),
                                 sport=sport, dport=80, proto=6))
    orig = ct.val.unpack(raw)
    fnat = orig["flags"] & ct.fnat  # full-NAT: replies go to the SNAT address and port
    reply = bytes(Ether(dst="00:00:00:00:00:00") / IP(src=socket.inet_ntoa(orig["nat_addr"]),
                               dst=socket.inet_ntoa(orig["nat2_addr"]) if fnat else CLIENT)
                  / TCP(sport=orig["nat_port"], dport=orig["nat2_port"] if fnat else sport,
                        flags="SA", seq=0, ack=1))
    bpfsys.prog_test_run(fd, reply)
    bpfsys.prog_test_run(fd, pkt(target, sport, "A"))
    raw = ct.map.get(ct.key.pack(saddr=socket.inet_aton(CLIENT), daddr=socket.inet_aton(target),
                                 sport=sport, dport=80, proto=6))
    if raw is None or ct.val.unpack(raw)["state"] != ct.states.est:
        raise RuntimeError("the benchmark's flow did not become established")
    return mean_ns(fd, [pkt(target, sport, "PA", b"x" * 64)], runs)


def _pass_flow_ns(node: object, fd: int, runs: int, sport: int = 64000) -> float:
    """With an ALLOW rule for the client in place, open a TCP flow to PASS_DST (SYN judged
    and tracked as a pass flow, SYN-ACK, ACK), time its data packets, remove the rule."""
    fw = node.firewall  # type: ignore[attr-defined]
    match = RuleMatch(src=f"{CLIENT}/32", protocol=RuleProto.TCP)
    fw.put([("bench-allow", RuleSpec(100, match, Action.ALLOW))])
    try:
        bpfsys.prog_test_run(fd, pkt(PASS_DST, sport, "S"))
        bpfsys.prog_test_run(fd, bytes(Ether(dst="00:00:00:00:00:00")
                                       / IP(src=PASS_DST, dst=CLIENT)
                                       / TCP(sport=80, dport=sport, flags="SA", seq=0, ack=1)))
        bpfsys.prog_test_run(fd, pkt(PASS_DST, sport, "A"))
        ct = node.conntrack  # type: ignore[attr-defined]
        raw = ct.map.get(ct.key.pack(saddr=socket.inet_aton(CLIENT),
                                     daddr=socket.inet_aton(PASS_DST), sport=sport, dport=80,
                                     proto=6))
        if raw is None or ct.val.unpack(raw)["state"] != ct.states.est:
            raise RuntimeError("the benchmark's pass flow did not become established")
        return mean_ns(fd, [pkt(PASS_DST, sport, "PA", b"x" * 64)], runs)
    finally:
        fw.delete(["bench-allow"])


def conntrack_scale(counts: list[int], runs: int) -> list[dict[str, float]]:
    """Fast-path ns and conntrack map memory with `count` entries present."""
    out = []
    for count in counts:
        with loaded_node("xlb-bench-ct-", name="benchct", max_services=16, max_backends=64,
                         ct_size=count + 1024, redirect=False) as node:
            eps = tuple(EndpointSpec(f"198.18.{1 + j}.2", 8080) for j in range(4))
            node.put_services([ServiceSpec(vip(0), 80, Proto.TCP, endpoints=eps)])
            fill_conntrack(node, count)
            est = _established_ns(node, node.dp.fast_fd, vip(0), runs)
            path = node.dp.pin("ct_v4_map")
            mem = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned", path],
                                            capture_output=True, text=True,
                                            check=True).stdout)["bytes_memlock"]
            out.append({"entries": count, "established_ns": est, "ct_map_mb": mem / 2**20})
    return out


def fill_conntrack(node: object, count: int) -> None:
    """`count` established ORIG entries from distinct clients (198.18.128.0/17 x ports),
    written with one batched update."""
    ct = node.conntrack  # type: ignore[attr-defined]
    vip0, ep = socket.inet_aton(vip(0)), socket.inet_aton("198.18.1.2")
    base = (198 << 24) | (18 << 16) | (128 << 8)
    value = ct.val.pack(nat_addr=ep, nat_port=8080, dir=ct.states.orig, state=ct.states.est,
                        svc={"vip": vip0, "port": 80, "proto": 6})
    for k in range(0, count, 65536):
        keys = [ct.key.pack(saddr=(base + i // 50000).to_bytes(4, "big"), daddr=vip0,
                            sport=1024 + i % 50000, dport=80, proto=6)
                for i in range(k, min(count, k + 65536))]
        ct.map.put_batch(keys, [value] * len(keys))


def table(rows: list[Row]) -> str:
    lines = ["| services | floor (parse only) | pass (no VIP) | established | new flow | "
             "established / floor | full-NAT established | full-NAT new flow | "
             "Maglev established | Maglev new flow | pass flow established |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ns(x: float) -> str:  # 0: not measured (a result recorded before the column)
        return f"{x:.0f}" if x else "-"

    for r in rows:
        lines.append(f"| {r.services:,} | {r.floor:.0f} | {r.pass_:.0f} | {r.established:.0f} "
                     f"| {r.new_flow:.0f} | {r.established / r.floor:.2f} "
                     f"| {ns(r.fullnat_established)} | {ns(r.fullnat_new)} "
                     f"| {ns(r.maglev_established)} | {ns(r.maglev_new)} "
                     f"| {ns(r.pass_established)} |")
    return "\n".join(lines)


def ct_table(rows: list[dict[str, float]]) -> str:
    lines = ["| conntrack entries | established ns/packet | ct_v4_map memory |",
             "|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {int(r['entries']):,} | {r['established_ns']:.0f} | "
                     f"{r['ct_map_mb']:.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.datapath_ns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--services", default="1,1000,10000,100000")
    p.add_argument("--conntrack", default="100000,1000000",
                   help="conntrack fill levels for the scale table ('' to skip)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = measure([int(s) for s in args.services.split(",")], args.runs)
    sys.stdout.write(f"ns per packet (BPF_PROG_TEST_RUN, mean of {args.runs:,} runs, "
                     f"kernel {os.uname().release})\n{table(rows)}\n")
    ct_rows = []
    if args.conntrack:
        ct_rows = conntrack_scale([int(c) for c in args.conntrack.split(",")], args.runs)
        sys.stdout.write(ct_table(ct_rows) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_packet": [r.__dict__ for r in rows], "conntrack": ct_rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
