"""`make run`'s events step: a policed stream and a trapped packet, followed through
policyd's WatchEvents.

A Policer object (8 Mbit/s) on the lb's client-side interface (c0) goes through
policyd. A UDP stream at twice the rate crosses it for two seconds; the offered and the
delivered rate (counted by a receiver on be1) and the policer's counters are printed
with the POLICER_DROP events the node sent. Then a firewall rule with action TRAP (UDP
to port 53 arriving on c0) goes through policyd, one datagram is sent to the VIP's DNS
service, and the TRAP event that policyd's WatchEvents brings (tagged with the node) is
printed decoded, with its first bytes. Both are removed at the end.

The stream's two ends run in the namespaces as ``python -m lab.demo_events udp-sink``
and ``udp-stream``.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from lab import netns
from lab.client import run_udp_who
from lab.topology import Topology
from policyd.cli_events import PROTOCOLS
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.dpd.v1 import datapath_pb2_grpc as dgrpc
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.policy.v1 import policy_pb2_grpc as pgrpc
from xlb.types.v1 import types_pb2 as tpb

RATE = 8_000_000  # bits/s
BURST = 15_000  # bytes
SIZE = 1000  # UDP payload bytes
FRAME = SIZE + 8 + 20 + 14  # what the policer charges: the frame from the Ethernet header
SECONDS = 2.0
SINK_PORT = 9000
POLICER = "demo-c0-in"
TRAP_RULE = "demo-trap-dns"
END = b"END"


class Events:
    """A WatchEvents stream (policyd's or dpd's call) read on a thread into a list."""

    def __init__(self, call: Any) -> None:
        self.events: list[tpb.Event] = []
        self._cond = threading.Condition()
        self._call = call
        self._thread = threading.Thread(target=self._read, daemon=True, name="demo-events")
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._call:
                with self._cond:
                    self.events.append(ev)
                    self._cond.notify_all()
        except grpc.RpcError:
            pass  # cancelled by close(), or policyd went away

    def wait(self, pred: Callable[[tpb.Event], bool], timeout: float) -> tpb.Event | None:
        """The first event `pred` accepts, waiting at most `timeout` seconds for it."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def seen(self) -> list[tpb.Event]:
        with self._cond:
            return list(self.events)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5)


def _mbps(bits: float) -> str:
    return f"{bits / 1e6:.1f} Mbit/s"


def police_step(topo: Topology, policy: pgrpc.PolicyStub, datapath: dgrpc.DatapathStub,
                wait_synced: Callable[[pgrpc.PolicyStub, str], Any],
                out: Callable[[str], None], events: Events) -> bool:
    pol = policy.ApplyPolicer(ppb.ApplyPolicerRequest(policer=ppb.Policer(
        name=POLICER, spec=ppb.PolicerSpec(rate_bps=RATE, burst_bytes=BURST,
                                           interfaces=["c0"]))), timeout=5)
    t0 = time.monotonic()
    st = wait_synced(policy, "node1")
    out(f"applied policer {POLICER} (c0: {_mbps(RATE)}, burst {BURST} bytes) at revision "
        f"{pol.revision}: node1 SYNCED in {1000 * (time.monotonic() - t0):.0f} ms, "
        f"{st.policers} policer(s)")
    be1 = topo.backend_ips[0]
    drops0 = datapath.GetStats(dpb.GetStatsRequest(), timeout=5).global_counters.get(
        "drop_policer", 0)
    sink = topo.popen(topo.backend_ns[0], [
        sys.executable, "-m", "lab.demo_events", "udp-sink", "--port", str(SINK_PORT),
        "--timeout", str(SECONDS + 10)], stdout=subprocess.PIPE, text=True,
        env=netns.python_env())
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the UDP receiver did not start")
        sent = int(topo.run(topo.client_ns, [
            sys.executable, "-m", "lab.demo_events", "udp-stream", "--dst", be1,
            "--port", str(SINK_PORT), "--rate", str(2 * RATE), "--seconds", str(SECONDS),
            "--size", str(SIZE)], env=netns.python_env(), timeout=SECONDS + 30).stdout.split()[-1])
        got = int(sink.stdout.readline().strip() or 0)
        sink.wait(timeout=10)
    finally:
        topo.stop(sink)
    offered, delivered = sent * FRAME * 8 / SECONDS, got * FRAME * 8 / SECONDS
    [counted] = [p for p in datapath.ListPolicers(dpb.ListPolicersRequest(), timeout=5)
                 if p.name == POLICER]
    drops = datapath.GetStats(dpb.GetStatsRequest(), timeout=5).global_counters.get(
        "drop_policer", 0) - drops0
    out(f"  UDP stream {topo.client_ip} -> {be1}:{SINK_PORT} for {SECONDS:.0f} s, "
        f"{SIZE}-byte datagrams: offered {_mbps(offered)} ({sent} datagrams), delivered "
        f"{_mbps(delivered)} ({got} received on be1)")
    out(f"  policer {POLICER} on node1: passed {counted.passed.packets} packets, dropped "
        f"{counted.dropped.packets}; datapath drop_policer +{drops}")
    def dropped(e: tpb.Event) -> bool:
        return e.kind == tpb.EVENT_KIND_POLICER_DROP and e.policer == POLICER

    ev = events.wait(dropped, 2.0)  # at most one a second: the last comes after the stream
    if ev is not None:
        ev = [e for e in events.seen() if dropped(e)][-1]
        out(f"  {len([e for e in events.seen() if dropped(e)])} POLICER_DROP events from "
            f"policyd's WatchEvents (at most one a second), the last: node {ev.node}, "
            f"interface {ev.interface}, policer {ev.policer}, dropped {ev.count} so far")
    else:
        out("  no POLICER_DROP event reached policyd's WatchEvents")
    policy.DeletePolicer(ppb.DeletePolicerRequest(name=POLICER), timeout=5)
    ok = abs(delivered - RATE) <= 0.10 * RATE and offered >= 1.8 * RATE
    return (ok and counted.dropped.packets > 0 and drops == counted.dropped.packets
            and ev is not None)


def trap_step(topo: Topology, policy: pgrpc.PolicyStub, datapath: dgrpc.DatapathStub,
              vip: str, wait_synced: Callable[[pgrpc.PolicyStub, str], Any],
              out: Callable[[str], None], events: Events) -> bool:
    rule = policy.ApplyFirewallRule(ppb.ApplyFirewallRuleRequest(rule=ppb.FirewallRule(
        name=TRAP_RULE, spec=tpb.FirewallRuleSpec(
            priority=300, action=tpb.FIREWALL_ACTION_TRAP, match=tpb.FirewallMatch(
                protocol=tpb.PROTOCOL_UDP, dst_ports=tpb.PortRange(first=53, last=53),
                in_interface="c0")))), timeout=5)
    t0 = time.monotonic()
    wait_synced(policy, "node1")
    out(f"applied firewall rule {TRAP_RULE} (TRAP: UDP to port 53 arriving on c0) at "
        f"revision {rule.revision}: node1 SYNCED in {1000 * (time.monotonic() - t0):.0f} ms")
    trap0 = datapath.GetStats(dpb.GetStatsRequest(), timeout=5).global_counters.get("trap", 0)

    def trapped(e: tpb.Event) -> bool:
        return e.kind == tpb.EVENT_KIND_TRAP and e.reason == TRAP_RULE

    # each datagram is a new flow (a new socket), so each is judged and trapped; one
    # more follows only if the event did not come (the stream still being opened)
    answers: dict[str, int] = {}
    ev = None
    sent = 0
    while ev is None and sent < 5:
        for k, v in run_udp_who(topo, vip, 53, count=1).items():
            answers[k] = answers.get(k, 0) + v
        sent += 1
        ev = events.wait(trapped, 2.0)
    answered = ", ".join(f"{k} {v}" for k, v in sorted(answers.items()) if k != "errors" and v)
    out(f"  {sent} UDP datagram(s) {topo.client_ip} -> {vip}:53: {sent - answers['errors']} "
        f"answered ({answered or 'none'}): a trap copies the packet, then lets it go on")
    ok = answers["errors"] == 0 and ev is not None
    if ev is not None:
        h = ev.packet
        proto = PROTOCOLS.get(h.ip_protocol, str(h.ip_protocol))
        out(f"  event from policyd's WatchEvents: node {ev.node}, "
            f"{tpb.EventKind.Name(ev.kind).removeprefix('EVENT_KIND_')}, reason {ev.reason}, "
            f"interface {ev.interface}")
        out(f"    {proto} {h.src}:{h.src_port} -> {h.dst}:{h.dst_port}, "
            f"{len(ev.raw)} of {ev.packet_length} bytes captured")
        payload = ev.raw[14 + 28:]  # Ethernet, IPv4, UDP
        out(f"    first bytes: {ev.raw[:28].hex(' ')} ... payload {payload!r}")
        ok = ok and ev.node == "node1" and ev.interface == "c0" and h.ip_protocol == 17
        ok = ok and (h.src, h.dst, h.dst_port) == (topo.client_ip, vip, 53)
        ok = ok and payload == b"WHO"
    else:
        out(f"  no TRAP event reached policyd's WatchEvents after {sent} datagram(s)")
    trap = datapath.GetStats(dpb.GetStatsRequest(), timeout=5).global_counters.get("trap", 0)
    out(f"  datapath trap counter +{trap - trap0}")
    policy.DeleteFirewallRule(ppb.DeleteFirewallRuleRequest(name=TRAP_RULE), timeout=5)
    return ok and trap - trap0 == sent


def events_step(topo: Topology, policy: pgrpc.PolicyStub, datapath: dgrpc.DatapathStub,
                vip: str, wait_synced: Callable[[pgrpc.PolicyStub, str], Any],
                out: Callable[[str], None]) -> bool:
    events = Events(policy.WatchEvents(ppb.WatchEventsRequest(
        kinds=[tpb.EVENT_KIND_TRAP, tpb.EVENT_KIND_POLICER_DROP])))
    try:
        ok = police_step(topo, policy, datapath, wait_synced, out, events)
        out("")
        ok = trap_step(topo, policy, datapath, vip, wait_synced, out, events) and ok
    finally:
        events.close()
    st = wait_synced(policy, "node1")
    left = [p.name for p in datapath.ListPolicers(dpb.ListPolicersRequest(), timeout=5)]
    out(f"removed the policer and the trap rule: node1 SYNCED at generation "
        f"{st.observed_generation}, {len(left)} policer(s) left")
    return ok and not left


# -- the stream's two ends, run in the namespaces -----------------------------------------

def udp_sink(port: int, timeout: float) -> int:
    """Count the datagrams arriving on `port` until END (or `timeout`); print the count."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    end = time.monotonic() + timeout
    got = 0
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except TimeoutError:
            break
        if data == END:
            break
        got += 1
    sys.stdout.write(f"{got}\n")
    return 0


def udp_stream(dst: str, port: int, rate: int, seconds: float, size: int) -> int:
    """Send `size`-byte datagrams to dst:port at `rate` bits/s (counted as the policer
    does: whole frames) for `seconds`, then END once the policer has refilled; print how
    many were sent."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"x" * size
    frame_bits = (size + 8 + 20 + 14) * 8
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic() - start) < seconds:
        due = int(now * rate / frame_bits)
        while sent < due:
            s.sendto(payload, (dst, port))
            sent += 1
        time.sleep(0.002)
    time.sleep(0.2)  # the bucket refills: END conforms
    for _ in range(3):
        s.sendto(END, (dst, port))
    sys.stdout.write(f"{sent}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.demo_events")
    sub = p.add_subparsers(dest="mode", required=True)
    sk = sub.add_parser("udp-sink")
    sk.add_argument("--port", type=int, required=True)
    sk.add_argument("--timeout", type=float, default=15.0)
    st = sub.add_parser("udp-stream")
    st.add_argument("--dst", required=True)
    st.add_argument("--port", type=int, required=True)
    st.add_argument("--rate", type=int, required=True)
    st.add_argument("--seconds", type=float, default=SECONDS)
    st.add_argument("--size", type=int, default=SIZE)
    args = p.parse_args(argv)
    if args.mode == "udp-sink":
        return udp_sink(args.port, args.timeout)
    return udp_stream(args.dst, args.port, args.rate, args.seconds, args.size)


if __name__ == "__main__":
    sys.exit(main())
