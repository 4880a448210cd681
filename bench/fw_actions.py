"""The established-flow fast path (tc_packet_func) with the firewall's flow actions, in ns
per packet (BPF_PROG_TEST_RUN, each run on a fresh copy, forwarding to the stack):

- nat:     a data packet of an established TCP flow to a service (no firewall);
- pass:    a datagram of an established UDP flow a firewall ALLOW rule opened;
- police:  the same flow opened by a POLICE rule whose policer (400 Gbit/s) passes
           everything: the fast path charges each datagram to the bucket.

Run: python -m bench.fw_actions [--runs N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bench.datapath_ns import _established_ns, loaded_node, mean_ns
from dpd import bpfsys
from xlbcore.firewall import Action, RuleMatch, RuleProto, RuleSpec
from xlbcore.service import EndpointSpec, Proto, ServiceSpec

CLIENT = "198.18.0.2"
SERVER = "198.18.1.2"
VIP = "198.19.0.1"


def _udp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="00:00:00:00:00:00")
                 / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / (b"x" * 64))


def _udp_flow_ns(fd: int, sport: int, runs: int) -> float:
    """Open a UDP flow to SERVER:9000 from `sport` (judged), answer it (established), then
    time its datagrams."""
    bpfsys.prog_test_run(fd, _udp(CLIENT, SERVER, sport, 9000))
    bpfsys.prog_test_run(fd, _udp(SERVER, CLIENT, 9000, sport))
    return mean_ns(fd, [_udp(CLIENT, SERVER, sport, 9000)], runs)


def measure(runs: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with loaded_node("xlb-bench-fwact-", name="benchfwact", max_services=16, max_backends=64,
                     ct_size=1 << 16, redirect=False) as node:
        fd = node.dp.fast_fd
        eps = (EndpointSpec("198.18.2.2", 8080),)
        node.put_services([ServiceSpec(VIP, 80, Proto.TCP, endpoints=eps)])
        out["nat"] = _established_ns(node, fd, VIP, runs)
        match = RuleMatch(protocol=RuleProto.UDP, src=f"{CLIENT}/32")
        node.firewall.put([("allow-udp", RuleSpec(100, match, Action.ALLOW))])
        out["pass"] = _udp_flow_ns(fd, 20000, runs)
        if hasattr(Action, "POLICE"):
            from dpd.policers import PolicerSpec

            node.policers.put([PolicerSpec("bench", 400_000_000_000, 1 << 30)])
            node.firewall.put([("allow-udp", RuleSpec(100, match, Action.POLICE,
                                                      policer="bench"))])
            out["police"] = _udp_flow_ns(fd, 20001, runs)
            node.firewall.delete(["allow-udp"])
            node.policers.delete(["bench"])
        else:
            node.firewall.delete(["allow-udp"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fw_actions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=300_000)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    res = measure(args.runs)
    sys.stdout.write(f"ns per packet, established (mean of {args.runs:,} runs, kernel "
                     f"{os.uname().release})\n| case | ns |\n|---|---:|\n")
    for k, v in res.items():
        sys.stdout.write(f"| {k} | {v:.0f} |\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
