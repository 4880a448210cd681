"""xlb's firewall per packet with BPF_PROG_TEST_RUN (the xlb column of bench.firewall).

The node is loaded as dpd loads it, the rule set of bench.firewall.rule_set is put
through FirewallTable (what PutFirewallRules calls), and three packets are timed through
tc_packet_func, each run on a fresh copy (repeat=1, as bench.datapath_ns does):

- new flow:    a UDP datagram from a new source port to an address no service has: the
               classifier judges it (no rule matches: every tuple is searched), then the
               pair of conntrack entries that keeps the verdict is written;
- established: a datagram of such a flow after its reply: the fast path's conntrack hit,
               never judged again;
- dropped:     a datagram the lowest-ranked rule drops (judged, counted, dropped).

With 0 rules the firewall is off: the new flow is passed untouched without conntrack.
"""

from __future__ import annotations

from collections.abc import Sequence

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bench.datapath_ns import loaded_node
from bench.firewall import TARGET_PORT, Rule, XlbRow, rule_set
from dpd import bpfsys
from xlbcore.firewall import Action, PortRange, RuleMatch, RuleProto, RuleSpec

CLIENT = "198.18.0.2"
SERVER = "198.18.1.2"  # no service: a plain forwarded flow


def _spec(r: Rule) -> RuleSpec:
    return RuleSpec(priority=100, action=Action.DROP, match=RuleMatch(
        src=r.src, dst=r.dst, protocol=RuleProto.UDP if r.proto == "udp" else RuleProto.TCP,
        dst_ports=PortRange(r.first, r.last)))


def _udp(src: str, sport: int, dport: int) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="00:00:00:00:00:00")
                 / IP(src=src, dst=SERVER) / UDP(sport=sport, dport=dport) / (b"x" * 64))


def _mean(fd: int, packets: Sequence[bytes], runs: int) -> float:
    total = 0
    for i in range(runs):
        total += bpfsys.prog_test_run(fd, packets[i % len(packets)]).duration_ns
    return total / runs


def measure(counts: Sequence[int], runs: int) -> list[XlbRow]:
    rows = []
    with loaded_node("xlb-bench-fw-", name="benchfw", max_services=16, max_backends=64,
                     ct_size=1 << 20, redirect=False) as node:
        fd = node.dp.fast_fd
        for n in sorted(counts):
            rules = rule_set(n)
            node.firewall.put([(r.name, _spec(r)) for r in rules])
            # dropped by the lowest-ranked UDP rule to any destination (equal
            # priorities rank by name)
            last = max((r for r in rules if r.proto == "udp" and not r.dst),
                       key=lambda r: r.name, default=None)
            drop_pkt = _udp(last.src.split("/")[0], 4000, last.first) if last else b""
            node.flush_conntrack()
            fresh = min(runs, 60000)
            new = [_udp(CLIENT, 1024 + i, TARGET_PORT) for i in range(fresh)]
            t_new = _mean(fd, new, fresh)
            # the flow's reply makes it established (with the firewall off nothing is
            # tracked and this is the untouched pass again)
            bpfsys.prog_test_run(fd, bytes(
                Ether() / IP(src=SERVER, dst=CLIENT) / UDP(sport=TARGET_PORT, dport=1024)))
            t_est = _mean(fd, [new[0]], runs)
            t_drop = _mean(fd, [drop_pkt], runs) if drop_pkt else 0.0
            rows.append(XlbRow(n, t_new, t_est, t_drop))
            node.firewall.delete([r.name for r in rules])
    return rows
