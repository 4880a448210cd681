"""Events through policyd from two real dpd nodes: a TRAP rule applied once through
policyd traps packets on both nodes, and policyd's WatchEvents brings each trapped packet
once, tagged with the node it crossed; a stream asking for one node gets only that
node's events, and streams asking for one kind get only that kind (trapped packets on
one, a policer's drops on the other)."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

from lab import netns
from lab.demo_events import Events
from tests.cluster.conftest import wait_until
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

SYNCED = ppb.SYNC_STATE_SYNCED
TRAP, POLICER_DROP = tpb.EVENT_KIND_TRAP, tpb.EVENT_KIND_POLICER_DROP
CLIENT, BE1 = "198.18.0.2", "198.18.1.2"  # each topology's client and first backend
PORT = 5353  # trapped; nothing listens there

# datagrams "<tag> <i>" to dst:port, each from its own source port (first, first + 1,
# ...): each a new flow, judged (and trapped) by the firewall. A trap rule traps a flow's
# opening packet only, so a datagram from a source port an earlier one used (its pass
# flow still tracked) would not be trapped: the ports are never reused in a test run.
SEND = """
import socket, sys
dst, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n, size, first = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
for i in range(n):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", first + i))
        s.sendto(("%s %d " % (tag, i)).encode().ljust(size, b"."), (dst, port))
"""
_next_sport = [20000]  # the next unused source port (below the ephemeral range)


def send(cluster, node: int, tag: str, count: int, port: int = PORT, size: int = 0) -> None:
    topo = cluster.topos[node - 1]
    first = _next_sport[0]
    _next_sport[0] += count
    assert _next_sport[0] < 32768, "source ports would meet the ephemeral range"
    topo.run(topo.client_ns, [sys.executable, "-c", SEND, BE1, str(port), tag, str(count),
                              str(size), str(first)], env=netns.python_env())


def payload(ev: tpb.Event) -> str:
    return ev.raw[14 + 28:].decode(errors="replace")  # after Ethernet, IPv4 and UDP


def tagged(events: Events, prefix: str) -> list[tpb.Event]:
    return [e for e in events.seen() if e.kind == TRAP and payload(e).startswith(prefix)]


def put_policer(cluster, rate: int, burst: int) -> None:
    """A Policer object on c0 through policyd, SYNCED on every node."""
    p = cluster.policy.ApplyPolicer(ppb.ApplyPolicerRequest(policer=ppb.Policer(
        name="c0-in", spec=ppb.PolicerSpec(rate_bps=rate, burst_bytes=burst,
                                           interfaces=["c0"]))), timeout=5)
    for name in cluster.nodes:
        st = cluster.wait_state(name, SYNCED, generation=p.revision)
        assert st.policers == 1


def test_trapped_packets_come_through_policyd_tagged_by_node_and_filtered(cluster):
    rule = cluster.policy.ApplyFirewallRule(ppb.ApplyFirewallRuleRequest(rule=ppb.FirewallRule(
        name="trap-udp", spec=tpb.FirewallRuleSpec(
            priority=100, action=tpb.FIREWALL_ACTION_TRAP, match=tpb.FirewallMatch(
                protocol=tpb.PROTOCOL_UDP, dst_ports=tpb.PortRange(first=PORT, last=PORT),
                in_interface="c0")))), timeout=5)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=rule.revision)

    def watch(**kw: Any) -> Events:
        return Events(cluster.policy.WatchEvents(ppb.WatchEventsRequest(**kw)))

    every = watch()
    traps = watch(kinds=[TRAP])
    drops = watch(kinds=[POLICER_DROP])
    only2 = watch(nodes=["node2"])
    streams = [every, traps, drops, only2]
    try:
        # policyd dials the nodes for each stream as it opens: a datagram through each
        # node until every stream that asked for that node's traps has one of them
        def warm() -> bool:
            want = [(every, {"node1", "node2"}), (traps, {"node1", "node2"}),
                    (only2, {"node2"})]
            return all({e.node for e in w.seen() if e.kind == TRAP} >= nodes
                       for w, nodes in want)

        end = time.monotonic() + 30
        i = 0
        while not warm():
            assert time.monotonic() < end, [[(e.node, payload(e)) for e in w.seen()]
                                            for w in streams]
            for node in (1, 2):
                send(cluster, node, f"warm{node}.{i}", 1)
            i += 1
            time.sleep(0.3)

        # 20 datagrams through each node: each arrives once, tagged with its node
        for node in (1, 2):
            send(cluster, node, f"node{node}-", 20)
        want = {f"node{n}-{i}" for n in (1, 2) for i in range(20)}

        def keys(events: list[tpb.Event]) -> list[str]:
            return [payload(e).split(" ", 2)[0] + payload(e).split(" ", 2)[1]
                    for e in events]

        wait_until(lambda: set(keys(tagged(every, "node"))) >= want
                   and set(keys(tagged(traps, "node"))) >= want, 15, "40 trapped datagrams")
        wait_until(lambda: len(tagged(only2, "node2-")) >= 20, 15, "node2's 20 on its stream")
        for w in (every, traps):
            got = tagged(w, "node")
            assert sorted(keys(got)) == sorted(want)  # each once
            for e in got:
                assert e.node == payload(e)[:5], (e.node, payload(e))
                assert (e.reason, e.interface) == ("trap-udp", "c0")
                assert (e.packet.src, e.packet.dst, e.packet.ip_protocol,
                        e.packet.dst_port) == (CLIENT, BE1, 17, PORT)
        assert all(e.kind == TRAP for e in traps.seen())
        # the node filter: node2's datagrams, none of node1's (nor its warm-up ones)
        assert sorted(keys(tagged(only2, "node2-"))) == sorted(k for k in want
                                                               if k.startswith("node2"))
        assert {e.node for e in only2.seen()} == {"node2"}
        # the kind filter: no trapped packet on the policer-drops stream
        assert drops.seen() == []

        # a policer on each node's client side, and a burst far over it through node1:
        # its drop events reach the streams that asked for them, not the traps-only one
        # (the burst goes to another port: no trap)
        put_policer(cluster, rate=1_000_000, burst=3000)
        end = time.monotonic() + 20
        while not drops.seen():
            assert time.monotonic() < end, "no POLICER_DROP event on the drops stream"
            send(cluster, 1, "burst", 100, port=PORT + 1, size=1000)
            time.sleep(0.5)
        wait_until(lambda: any(e.kind == POLICER_DROP for e in every.seen()), 10,
                   "the policer drop on the every-kind stream")
        for e in drops.seen():
            assert e.kind == POLICER_DROP and e.node == "node1", e
            assert (e.policer, e.interface) == ("c0-in", "c0") and e.count > 0, e
        assert all(e.kind == TRAP for e in traps.seen())
        assert {e.node for e in only2.seen()} == {"node2"}
    finally:
        for w in streams:
            w.close()
