"""Firewall cost per packet against the number of rules: xlb beside iptables and nftables.

One rule set, rendered three ways. Rules drop UDP/TCP from sources in 198.18.128.0/17 in
a few realistic shapes (a host or a /24; any destination or a /24; one port or a port
range), so no rule matches the measured traffic and every filter does all of its work
(the worst case for a first-match list).

- xlb (BPF_PROG_TEST_RUN on the loaded datapath, kernel-timed): a new flow judged by the
  rules (a UDP packet to no service: classifier, then the conntrack pair that keeps its
  verdict), an established packet of such a flow (conntrack hit: never judged again), and
  a packet dropped by the lowest-ranked rule. "0 rules" is the firewall switched off.
- iptables / nftables (real packets through a router namespace, wall-clock): the time a
  UDP packet takes from a sender in a client namespace through the router to a backend,
  with the rules in the router's FORWARD hook, minus the same with no rules (each the
  best of 3 runs: other work on the machine only ever adds): the cost the rules add to
  each packet they judge. iptables and nftables rules are evaluated in order;
  "nftables set" is the idiomatic form at scale (one interval set of
  saddr . daddr . dport, one rule).

Run: python -m bench.firewall [--rules 10,1000,10000] [--runs N] [--packets N]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from xlbcore.logs import configure_logging

log = structlog.get_logger("bench.firewall")

TARGET_PORT = 9  # the measured traffic: UDP client -> backend:9, matched by no rule


@dataclass(frozen=True)
class Rule:
    name: str
    src: str   # prefix
    dst: str   # prefix, "" for any
    proto: str  # "udp" or "tcp"
    first: int  # destination ports first..last
    last: int


def rule_set(n: int) -> list[Rule]:
    """n drop rules of mixed shapes, none matching the measured traffic and no two
    overlapping (each has its own destination ports: nftables' interval sets refuse
    overlapping elements)."""
    rules = []
    hosts = int(ipaddress.ip_address("198.18.128.0"))  # /32 sources: 198.18.128.0/18
    nets = int(ipaddress.ip_address("198.18.192.0"))   # /24 sources: 198.18.192.0/18
    for i in range(n):
        if i % 4:
            src = f"{ipaddress.ip_address(hosts + (i * 7) % 16384)}/32"
        else:
            src = f"{ipaddress.ip_address(nets + ((i // 4) % 64) * 256)}/24"
        dst = "" if i % 3 else f"198.19.{i % 250}.0/24"
        proto = "udp" if i % 2 else "tcp"
        if i % 5 == 0:
            first = 30000 + (i // 5) * 10
            last = first + 9
        else:
            first = last = 1000 + i
        rules.append(Rule(f"r{i}", src, dst, proto, first, last))
    return rules


# -- renderings ---------------------------------------------------------------------------

def iptables_text(rules: Sequence[Rule]) -> str:
    lines = ["*filter", ":FORWARD ACCEPT [0:0]"]
    for r in rules:
        dst = f" -d {r.dst}" if r.dst else ""
        ports = str(r.first) if r.first == r.last else f"{r.first}:{r.last}"
        lines.append(f"-A FORWARD -s {r.src}{dst} -p {r.proto} -m {r.proto} "
                     f"--dport {ports} -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _ports(r: Rule) -> str:
    return str(r.first) if r.first == r.last else f"{r.first}-{r.last}"


def nft_rules_text(rules: Sequence[Rule]) -> str:
    lines = ["table ip xlbbench {", " chain filter_fwd {",
             "  type filter hook forward priority 0; policy accept;"]
    for r in rules:
        dst = f" ip daddr {r.dst}" if r.dst else ""
        lines.append(f"  ip saddr {r.src}{dst} {r.proto} dport {_ports(r)} drop")
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def nft_set_text(rules: Sequence[Rule], chunk: int = 500) -> str:
    """One interval set per protocol; elements added in chunks (one netlink message
    for 10,000 interval elements overflows the socket buffer)."""
    lines = ["table ip xlbbench {"]
    for proto in ("tcp", "udp"):
        lines += [f" set {proto}_drop {{",
                  "  type ipv4_addr . ipv4_addr . inet_service; flags interval;", " }"]
    lines += [" chain filter_fwd {", "  type filter hook forward priority 0; policy accept;",
              "  ip saddr . ip daddr . tcp dport @tcp_drop drop",
              "  ip saddr . ip daddr . udp dport @udp_drop drop", " }", "}"]
    for proto in ("tcp", "udp"):
        elems = [f"{r.src} . {r.dst or '0.0.0.0/0'} . {_ports(r)}"
                 for r in rules if r.proto == proto]
        for k in range(0, len(elems), chunk):
            lines.append(f"add element ip xlbbench {proto}_drop {{ "
                         f"{', '.join(elems[k:k + chunk])} }}")
    return "\n".join(lines) + "\n"


# -- netfilter: real packets through a router namespace -----------------------------------

SENDER = f"""
import socket, sys, time
n, dst = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, {TARGET_PORT}))
send = s.send
payload = b"x" * 64
for _ in range(2000):
    send(payload)
t = time.perf_counter_ns()
for _ in range(n):
    send(payload)
print((time.perf_counter_ns() - t) / n)
"""

SINK = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.bind(("0.0.0.0", {TARGET_PORT}))
time.sleep(1e9)
"""


def _send_ns(topo: object, packets: int) -> float:
    out = topo.run(topo.client_ns, [sys.executable, "-c", SENDER, str(packets),  # type: ignore[attr-defined]
                                    topo.backend_ips[0]], timeout=120)  # type: ignore[attr-defined]
    return float(out.stdout.strip())


def _settle() -> None:
    """Let the kernel finish freeing what the last rule change dropped (RCU callbacks
    run after a grace period) before a timed run."""
    time.sleep(0.3)


def _load(topo: object, kind: str, rules: Sequence[Rule]) -> None:
    ns = topo.lb_ns  # type: ignore[attr-defined]
    if kind == "iptables":
        topo.run(ns, ["iptables-restore"], input=iptables_text(rules), timeout=300)  # type: ignore[attr-defined]
    else:
        text = nft_rules_text(rules) if kind == "nftables" else nft_set_text(rules)
        topo.run(ns, ["nft", "-f", "-"], input=text, timeout=300)  # type: ignore[attr-defined]


def _unload(topo: object, kind: str) -> None:
    ns = topo.lb_ns  # type: ignore[attr-defined]
    if kind == "iptables":
        topo.run(ns, ["iptables-restore"], input="*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n")  # type: ignore[attr-defined]
    else:
        topo.run(ns, ["nft", "delete", "table", "ip", "xlbbench"], check=False)  # type: ignore[attr-defined]


def netfilter(counts: Sequence[int], packets: int, rounds: int) -> dict[str, dict[int, float]]:
    """kind -> rules -> ns each packet pays for the rules (median over rounds)."""
    from lab.topology import Topology

    out: dict[str, dict[int, float]] = {}
    with Topology(backends=1, prefix="xfwb" + os.urandom(2).hex()) as topo:
        topo.popen(topo.backend_ns[0], [sys.executable, "-c", SINK])
        _send_ns(topo, 2000)  # neighbours resolved, caches warm
        for kind in ("iptables", "nftables", "nftables set"):
            out[kind] = {}
            for n in counts:
                rules = rule_set(n)
                # a first-match list of 10,000 rules costs tens of µs a packet: fewer
                # packets keep each run near a second
                count = packets if n < 5000 or kind == "nftables set" else packets // 10
                deltas = []
                for _ in range(rounds):
                    # the best of 3 runs each: other work on the machine only ever adds;
                    # a settling run after each change of the rules (freeing or
                    # installing thousands of rules leaves the kernel busy for a while)
                    _settle()
                    base = min(_send_ns(topo, count) for _ in range(3))
                    _load(topo, kind, rules)
                    _settle()
                    _send_ns(topo, count)
                    with_rules = min(_send_ns(topo, count) for _ in range(3))
                    _unload(topo, kind)
                    deltas.append(with_rules - base)
                out[kind][n] = statistics.median(deltas)
                log.info("bench.firewall.netfilter", kind=kind, rules=n,
                         added_ns=round(out[kind][n]))
    return out


# -- xlb: BPF_PROG_TEST_RUN -------------------------------------------------------------

@dataclass
class XlbRow:
    rules: int
    new_flow: float
    established: float
    dropped: float


def xlb(counts: Sequence[int], runs: int) -> list[XlbRow]:
    from bench.firewall_xlb import measure

    return measure(counts, runs)


def table(rows: Sequence[XlbRow], nf: dict[str, dict[int, float]]) -> str:
    lines = ["| rules | xlb new flow | xlb established | xlb dropped | iptables +ns | "
             "nftables +ns | nftables set +ns |", "|---:|---:|---:|---:|---:|---:|---:|"]
    def cell(kind: str, rules: int) -> str:
        v = nf.get(kind, {}).get(rules)
        return "-" if v is None else f"{v:,.0f}"

    for r in rows:
        dropped = f"{r.dropped:.0f}" if r.dropped else "-"
        lines.append(f"| {r.rules:,} | {r.new_flow:.0f} | {r.established:.0f} | "
                     f"{dropped} | {cell('iptables', r.rules)} | "
                     f"{cell('nftables', r.rules)} | {cell('nftables set', r.rules)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", default="10,1000,10000")
    p.add_argument("--runs", type=int, default=100_000, help="TEST_RUN runs per xlb cell")
    p.add_argument("--packets", type=int, default=100_000, help="packets per netfilter run")
    p.add_argument("--rounds", type=int, default=3, help="netfilter rounds per cell")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    configure_logging("kv", args.log_level)
    counts = [int(x) for x in args.rules.split(",")]
    rows = xlb([0, *counts], args.runs)
    nf = netfilter(counts, args.packets, args.rounds)
    sys.stdout.write(table(rows, nf) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
