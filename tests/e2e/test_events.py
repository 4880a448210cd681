"""Events on a real node (namespaces named pe*): a TRAP rule's packets reach a WatchEvents
client decoded, with their bytes; a flood of trapped datagrams is shed by dpd (bounded
memory, a DROPPED event in the stream) while the node keeps answering its API."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from tests.e2e.conftest import Lab, doc_grpcurl_commands, open_lab, wait_until
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(prefix="pe", backends=1, servers=False) as lab:
        yield lab


def trap_rule(lab: Lab, port: int) -> None:
    lab.stub.PutFirewallRules(pb.PutFirewallRulesRequest(rules=[pb.FirewallRule(  # type: ignore[attr-defined]
        name="trap-udp", spec=tpb.FirewallRuleSpec(
            priority=100, action=tpb.FIREWALL_ACTION_TRAP,
            match=tpb.FirewallMatch(protocol=tpb.PROTOCOL_UDP,
                                    dst_ports=tpb.PortRange(first=port, last=port),
                                    in_interface="c0")))]), timeout=10)


class Watch:
    """A WatchEvents stream read on a thread into a list."""

    def __init__(self, lab: Lab, kinds: list[int], slow: float = 0.0) -> None:
        self.events: list[tpb.Event] = []
        self.call = lab.stub.WatchEvents(pb.WatchEventsRequest(kinds=kinds))  # type: ignore[attr-defined]
        self.slow = slow
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for e in self.call:
                self.events.append(e)
                if self.slow:
                    time.sleep(self.slow)
        except grpc.RpcError:
            pass

    def wait(self, pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
        return wait_until(lambda: pred(self.events), timeout)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)


SEND = """
import socket, sys, time
dst, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
n = 0
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
while True:
    for s in socks:  # 64 source ports: 64 flows, each judged (trapped) once
        s.sendto(b"trap me %d" % n, (dst, port))
        n += 1
        s.close()
    if time.monotonic() >= end:
        break
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
print(n)
"""


FLOOD = """
import socket, struct, sys, time
ifname, src_mac, dst_mac, src, dst, port, seconds = sys.argv[1:8]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
mac = lambda m: bytes.fromhex(m.replace(":", ""))
eth = mac(dst_mac) + mac(src_mac) + b"\\x08\\x00"
payload = b"flood"
ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 1, 0, 64, 17, 0,
                           socket.inet_aton(src), socket.inet_aton(dst)))
c = sum(struct.unpack("!10H", bytes(ip)))
c = (c & 0xFFFF) + (c >> 16)
c = (c & 0xFFFF) + (c >> 16)
ip[10:12] = struct.pack("!H", ~c & 0xFFFF)
head = eth + bytes(ip)
tail = struct.pack("!HH", int(port), 8 + len(payload)) + b"\\x00\\x00" + payload
frames = [head + struct.pack("!H", sport) + tail for sport in range(1024, 65535)]
end = time.monotonic() + float(seconds)
n = 0
while time.monotonic() < end:  # every source port a new flow: each judged, trapped
    for f in frames[:4096]:
        s.send(f)
    frames = frames[4096:] + frames[:4096]
    n += 4096
print(n)
"""


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_trapped_packet_reaches_a_watch_client_decoded(lab):
    from lab import netns

    topo = lab.topo
    trap_rule(lab, 5353)
    watches = [Watch(lab, [tpb.EVENT_KIND_TRAP]), Watch(lab, [])]
    try:
        assert not watches[1].wait(lambda ev: len(ev) > 0, 0.5), watches[1].events
        topo.run(topo.client_ns, [sys.executable, "-c", SEND, topo.backend_ips[0], "5353",
                                  "0"], env=netns.python_env())
        for w in watches:  # both clients get every trapped packet
            assert w.wait(lambda ev: len(ev) >= 64), (len(w.events), dict(
                lab.stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters))
        e = watches[0].events[0]
        assert e.kind == tpb.EVENT_KIND_TRAP and e.reason == "trap-udp"
        assert e.interface == "c0" and e.time_unix_ns > 0
        h = e.packet
        assert (h.src, h.dst, h.ip_protocol, h.dst_port) == (
            topo.client_ip, topo.backend_ips[0], 17, 5353)
        assert e.raw[14 + 28:].startswith(b"trap me ")  # Ethernet, IPv4, UDP, payload
        assert e.packet_length == len(e.raw)  # a short packet: whole
        assert {x.raw[14 + 28:] for x in watches[0].events} == {
            b"trap me %d" % i for i in range(64)}
        stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters
        assert stats["trap"] == 64
    finally:
        for w in watches:
            w.close()


def test_a_trap_flood_is_shed_with_bounded_memory_and_reported(lab):
    from lab import netns

    topo = lab.topo
    trap_rule(lab, 5353)
    pid = lab.dpd.proc.pid
    slow = Watch(lab, [], slow=0.002)  # a client that reads 500 events a second
    try:
        time.sleep(0.5)
        before = _rss_kib(pid)
        mac_c, mac_l = topo.mac(topo.client_ns, topo.client_iface), topo.mac(topo.lb_ns, "c0")
        sender = topo.popen(topo.client_ns, [sys.executable, "-c", FLOOD, topo.client_iface,
                                             mac_c, mac_l, topo.client_ip, topo.backend_ips[0],
                                             "5353", "4"], stdout=subprocess.PIPE, text=True,
                            env=netns.python_env())
        peak = before
        t0 = time.monotonic()
        while sender.poll() is None and time.monotonic() - t0 < 30:
            peak = max(peak, _rss_kib(pid))
            # dpd keeps serving its API during the flood
            lab.stub.GetNode(pb.GetNodeRequest(), timeout=5)
            time.sleep(0.2)
        out, _ = sender.communicate(timeout=30)
        sent = int(out.strip())
        assert sent > 40_000, sent  # a flood for the reader's 2000 a second
        assert slow.wait(lambda ev: any(e.kind == tpb.EVENT_KIND_DROPPED for e in ev), 30), \
            [e.kind for e in slow.events[:5]]
        dropped = [e for e in slow.events if e.kind == tpb.EVENT_KIND_DROPPED]
        assert dropped[0].count > 0 and dropped[0].reason.startswith("dropped ")
        assert peak - before < 64 * 1024, (before, peak)  # KiB: bounded, not per event
    finally:
        slow.close()
    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters
    assert stats["trap"] > 0


def test_the_grpcurl_examples_of_the_docs_work_as_written(lab):
    from lab import netns
    from tests.unit.test_policyd_grpcurl import GRPCURL

    if GRPCURL is None:
        pytest.skip("grpcurl is missing")
    commands = doc_grpcurl_commands("events.md")
    assert len(commands) == 2
    put, watch = ([GRPCURL if a == "grpcurl" else lab.dpd.socket if a == "/run/xlb/dpd.sock"
                   else a for a in argv] for argv in commands)
    res = subprocess.run(put, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    proc = subprocess.Popen(watch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # grpcurl dials and opens the stream
        topo = lab.topo
        topo.run(topo.client_ns, [sys.executable, "-c", SEND, topo.backend_ips[0], "53", "0"],
                 env=netns.python_env())
        time.sleep(1.5)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert '"kind": "EVENT_KIND_TRAP"' in out, (out[:500], err[:500])
    assert '"reason": "trap-dns"' in out and '"dst_port": 53' in out
