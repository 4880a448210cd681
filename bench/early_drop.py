"""What early drop buys: packets per second dropped by xlb's XDP stage (native and
generic), by xlb's TC firewall and by nftables (netdev ingress and prerouting), in one run
on one topology.

Traffic comes as a NIC would bring it: as frames with no skb. An in-kernel generator in
the client namespace (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on a four
instruction XDP program that redirects every frame out of the client's veth) sends
64-byte UDP frames from a blocked source (198.18.66.7); the router's veth receives them
through its NAPI poll (GRO on, so that it takes redirected frames without an XDP program
of its own): native XDP sees the frame before any skb exists, everything later (generic
XDP, TC, nftables) after the veth built an skb for it, as a driver does. The receive side
runs in the generator's own system call (in the softirq that the end of each batch
runs), so wall ns per frame is what one core spends to generate and drop a frame there,
and 1e9 / that is the frames per second one core sustains.

Each drop point is checked to have dropped every frame (xlb's counters, the nftables
rule's counter). Run: python -m bench.early_drop [--packets N] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from xlbcore.logs import configure_logging

log = structlog.get_logger("bench.early_drop")

BLOCKED = "198.18.66.7"
BLOCKED_NET = "198.18.66.0/24"

GENERATOR = """
import ctypes, ctypes.util, socket, struct, sys, time
lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
class Opts(ctypes.Structure):  # struct bpf_test_run_opts
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]
ifname, n, frame = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
def insn(code, dst, imm):
    return struct.pack("<BBhi", code, dst, 0, imm)
# r1 = ifindex; r2 = 0; r0 = bpf_redirect(r1, r2); exit
prog = (insn(0xb7, 1, socket.if_nametoindex(ifname)) + insn(0xb7, 2, 0)
        + insn(0x85, 0, 23) + insn(0x95, 0, 0))
lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
fd = lib.bpf_prog_load(6, b"xd_gen", b"GPL", prog, 4, None)  # BPF_PROG_TYPE_XDP
if fd < 0:
    sys.exit(f"loading the generator: errno {ctypes.get_errno()}")
buf = ctypes.create_string_buffer(frame, len(frame))
def run(k):
    o = Opts(sz=ctypes.sizeof(Opts), data_in=ctypes.cast(buf, ctypes.c_void_p),
             data_size_in=len(frame), repeat=k, flags=2)  # BPF_F_TEST_XDP_LIVE_FRAMES
    t = time.perf_counter_ns()
    if lib.bpf_prog_test_run_opts(fd, ctypes.byref(o)) != 0:
        sys.exit(f"live frames run: errno {ctypes.get_errno()}")
    return (time.perf_counter_ns() - t) / k
run(20000)
print(run(n))
"""

GRO_ON = """
from pyroute2.ethtool import Ethtool
e = Ethtool()
f = e.get_features("c0")
f.features["rx-gro"].enable = True
e.set_features("c0", f)
"""


@dataclass
class Row:
    point: str
    ns: float  # wall ns per frame, generator included
    checked: str  # what says every frame was dropped there

    @property
    def pps(self) -> float:
        return 1e9 / self.ns


def _frame(topo: Any) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(Ether(src=topo.mac(topo.client_ns, topo.client_iface),
                       dst=topo.mac(topo.lb_ns, "c0"))
                 / IP(src=BLOCKED, dst=topo.backend_ips[0], ttl=64)
                 / UDP(sport=40000, dport=9) / (b"x" * 18))  # 64-byte frame


def _send(topo: Any, frame: bytes, packets: int) -> float:
    from lab import netns

    out = topo.run(topo.client_ns, [sys.executable, "-c", GENERATOR, topo.client_iface,
                                    str(packets), frame.hex()],
                   timeout=300, env=netns.python_env())
    return float(out.stdout.strip())


def _median(topo: Any, frame: bytes, packets: int, rounds: int) -> float:
    return statistics.median(_send(topo, frame, packets) for _ in range(rounds))


NFT_NETDEV = f"""table netdev xdbench {{
 chain ingress {{ type filter hook ingress device c0 priority 0; policy accept;
  ip saddr {BLOCKED_NET} counter drop
 }}
}}
"""
NFT_PREROUTING = f"""table ip xdbench {{
 chain pre {{ type filter hook prerouting priority -300; policy accept;
  ip saddr {BLOCKED_NET} counter drop
 }}
}}
"""


def _nft_checked(topo: Any, family: str, total: int) -> str:
    out = topo.run(topo.lb_ns, ["nft", "list", "table", family, "xdbench"]).stdout
    words = out.split()
    dropped = int(words[words.index("packets") + 1])
    if dropped < total:
        raise RuntimeError(f"nftables {family}: the rule dropped {dropped}, sent {total}")
    return f"rule counter {dropped:,}"


def measure(packets: int = 200_000, rounds: int = 3) -> list[Row]:
    """Every drop point on one topology; rows in the order measured."""
    from lab.daemons import Dpd
    from lab.topology import Topology

    rows: list[Row] = []
    with Topology(backends=1, prefix="xd" + os.urandom(2).hex()) as topo:
        frame = _frame(topo)
        total = rounds * (packets + 20000)
        from lab import netns

        topo.run(topo.lb_ns, [sys.executable, "-c", GRO_ON], env=netns.python_env())

        def point(name: str, checked: Callable[[], str]) -> None:
            ns = _median(topo, frame, packets, rounds)
            rows.append(Row(name, ns, checked()))
            log.info("bench.early_drop", point=name, ns=round(ns))

        for family, text, name in (("netdev", NFT_NETDEV, "nftables netdev ingress"),
                                   ("ip", NFT_PREROUTING, "nftables prerouting (-300)")):
            topo.run(topo.lb_ns, ["nft", "-f", "-"], input=text)
            point(name, lambda: _nft_checked(topo, family, total))  # noqa: B023
            topo.run(topo.lb_ns, ["nft", "delete", "table", family, "xdbench"])

        dpd = Dpd("xdb", topo.lb_ns, ["c0"], topo.workdir,
                  extra=["--max-services", "16", "--max-backends", "64", "--ct-size", "4096"])
        try:
            dpd.start()
            rows += _xlb_points(topo, dpd, frame, packets, rounds, total)
        finally:
            dpd.cleanup()
    return rows


def _xlb_points(topo: Any, dpd: Any, frame: bytes, packets: int, rounds: int,
                total: int) -> list[Row]:
    import grpc

    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.dpd.v1 import datapath_pb2_grpc
    from xlb.types.v1 import types_pb2 as tpb

    rows = []
    with grpc.insecure_channel(dpd.address) as channel:
        stub = datapath_pb2_grpc.DatapathStub(channel)

        def counters() -> dict[str, int]:
            return dict(stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters)

        def point(name: str, counter: str) -> None:
            before = counters()[counter]
            ns = _median(topo, frame, packets, rounds)
            dropped = counters()[counter] - before
            if dropped < total:
                raise RuntimeError(f"{name}: {counter} moved by {dropped}, sent {total}")
            rows.append(Row(name, ns, f"{counter} {dropped:,}"))
            log.info("bench.early_drop", point=name, ns=round(ns))

        stub.PutFirewallRules(pb.PutFirewallRulesRequest(rules=[pb.FirewallRule(
            name="drop-blocked", spec=tpb.FirewallRuleSpec(
                priority=100, action=tpb.FIREWALL_ACTION_DROP,
                match=tpb.FirewallMatch(src=BLOCKED_NET))),
        ]), timeout=10)
        point("xlb TC firewall (drop rule)", "drop_firewall")
        stub.DeleteFirewallRules(pb.DeleteFirewallRulesRequest(names=["drop-blocked"]),
                                 timeout=10)
        stub.PutBlocklist(pb.PutBlocklistRequest(prefixes=[BLOCKED_NET]), timeout=10)
        for mode, name in ((pb.XDP_MODE_GENERIC, "xlb XDP blocklist, generic"),
                           (pb.XDP_MODE_NATIVE, "xlb XDP blocklist, native")):
            stub.AttachInterface(pb.AttachInterfaceRequest(name="c0", xdp_mode=mode),
                                 timeout=10)
            point(name, "drop_blocklist")
    return rows


def xdp_cost(runs: int = 200_000, prefixes: int = 10_000) -> dict[str, float]:
    """The XDP stage's own ns per packet (BPF_PROG_TEST_RUN, mean of `runs`): a packet
    passed with the blocklist empty, passed with `prefixes` v4 and as many v6 prefixes
    that do not hold its source, and dropped."""
    import ipaddress

    from bench.datapath_ns import loaded_node, mean_ns, pkt

    out: dict[str, float] = {}
    with loaded_node("xd-bench-", name="xdbench", max_services=16, max_backends=64,
                     ct_size=4096, blocklist_size=2 * prefixes + 16) as node:
        fd = node.dp.xdp_fd
        packets = [pkt("198.19.0.10", 1024 + i) for i in range(64)]  # from 198.18.0.2
        floor = _xdp_pass_only()
        try:
            out["floor: a program that only returns XDP_PASS"] = mean_ns(floor, packets, runs)
        finally:
            os.close(floor)
        out["pass, blocklist empty"] = mean_ns(fd, packets, runs)
        base4 = int(ipaddress.ip_address("10.0.0.0"))
        base6 = int(ipaddress.ip_address("2001:db8:100::"))
        node.blocklist.put([f"{ipaddress.ip_address(base4 + i * 256)}/24"
                            for i in range(prefixes)]
                           + [f"{ipaddress.ip_address(base6 + (i << 80))}/48"
                              for i in range(prefixes)])
        out[f"pass, {prefixes:,} v4 + {prefixes:,} v6 prefixes"] = mean_ns(fd, packets, runs)
        node.blocklist.put(["198.18.0.0/24"])
        out["dropped (a /24 among them)"] = mean_ns(fd, packets, runs)
    return out


def _xdp_pass_only() -> int:
    """An XDP program of two instructions (r0 = XDP_PASS; exit): the test run's floor."""
    import ctypes
    import ctypes.util
    import struct

    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                  ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
    prog = struct.pack("<BBhi", 0xB7, 0, 0, 2) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    fd = lib.bpf_prog_load(6, b"xd_floor", b"GPL", prog, 2, None)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "loading the XDP floor program")
    return int(fd)


def cost_table(cost: dict[str, float]) -> str:
    lines = ["| XDP stage (BPF_PROG_TEST_RUN) | ns/packet |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in cost.items()]
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    native = next((r.ns for r in rows if r.point.endswith("native")), 0.0)
    lines = ["| drop point | ns/frame (generator incl.) | frames/s, one core | "
             "+ns vs XDP native | checked |", "|---|---:|---:|---:|---|"]
    for r in rows:
        extra = f"{r.ns - native:+,.0f}" if native else "-"
        lines.append(f"| {r.point} | {r.ns:,.0f} | {r.pps / 1e6:.2f} M | {extra} | "
                     f"{r.checked} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--packets", type=int, default=1_000_000, help="frames per run")
    p.add_argument("--rounds", type=int, default=3, help="runs per drop point (median)")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    configure_logging("kv", args.log_level)
    rows = measure(args.packets, args.rounds)
    sys.stdout.write(f"{args.packets:,} 64-byte UDP frames per run (XDP live frames into "
                     f"a veth), median of {args.rounds} runs, kernel {os.uname().release}\n")
    sys.stdout.write(table(rows) + "\n\n")
    sys.stdout.write(cost_table(xdp_cost()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
