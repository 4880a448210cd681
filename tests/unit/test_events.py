"""The event hub (dpd/events.py): fan-out to every subscriber, kind filters, bounded
queues whose overflow becomes one DROPPED event, the watcher limit, header decoding,
the reader's rate limit, and WatchEvents over a memory node (health events)."""

from __future__ import annotations

import threading
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from dpd.events import EventHub, EventReader, Names, TooManyWatchers, decode_headers
from policyd import cli_events
from xlb.types.v1 import types_pb2 as tpb

TRAP, HEALTH, DROPPED = tpb.EVENT_KIND_TRAP, tpb.EVENT_KIND_HEALTH, tpb.EVENT_KIND_DROPPED


def trap(i: int) -> tpb.Event:
    return tpb.Event(kind=TRAP, reason=f"r{i}")


def test_fan_out_and_filters():
    hub = EventHub()
    every, traps, health = hub.subscribe(), hub.subscribe([TRAP]), hub.subscribe([HEALTH])
    hub.publish(trap(1))
    hub.publish(tpb.Event(kind=HEALTH, state="DOWN"))
    assert [hub.next(every, 0).kind, hub.next(every, 0).kind] == [TRAP, HEALTH]  # type: ignore[union-attr]
    assert hub.next(traps, 0).reason == "r1"  # type: ignore[union-attr]
    assert hub.next(traps, 0) is None
    assert hub.next(health, 0).state == "DOWN"  # type: ignore[union-attr]


def test_a_full_queue_drops_for_that_subscriber_only_and_says_how_many():
    hub = EventHub(queue=4)
    slow, fast = hub.subscribe(), hub.subscribe()
    got_fast = []
    for i in range(10):
        hub.publish(trap(i))
        got_fast.append(hub.next(fast, 0))
    assert [e.reason for e in got_fast] == [f"r{i}" for i in range(10)]  # type: ignore[union-attr]
    first = hub.next(slow, 0)
    assert first is not None and first.kind == DROPPED and first.count == 6
    assert first.reason == "dropped 6"
    assert [hub.next(slow, 0).reason for _ in range(4)] == ["r0", "r1", "r2", "r3"]  # type: ignore[union-attr]
    assert hub.next(slow, 0) is None
    assert len(slow.queue) == 0  # memory: never more than the queue's bound


def test_watcher_limit_and_unsubscribe():
    hub = EventHub(max_watchers=2)
    a = hub.subscribe()
    hub.subscribe()
    with pytest.raises(TooManyWatchers):
        hub.subscribe()
    hub.unsubscribe(a)
    hub.subscribe()
    assert hub.watchers() == 2


def test_follow_ends_when_the_client_goes():
    hub = EventHub()
    sub = hub.subscribe()
    alive = threading.Event()
    alive.set()
    out = []

    def run() -> None:
        out.extend(hub.follow(sub, alive.is_set, poll=0.05))

    t = threading.Thread(target=run)
    t.start()
    hub.publish(trap(1))
    time.sleep(0.1)
    alive.clear()
    t.join(2)
    assert not t.is_alive() and [e.reason for e in out] == ["r1"]
    assert hub.watchers() == 0


def test_decode_headers():
    h = tpb.PacketHeaders()
    decode_headers(bytes(Ether() / Dot1Q(vlan=5) / IP(src="198.18.0.2", dst="198.18.1.2")
                         / TCP(sport=1234, dport=80, flags="SA")), h)
    assert (h.src, h.dst, h.ip_protocol, h.src_port, h.dst_port, list(h.tcp_flags)) == (
        "198.18.0.2", "198.18.1.2", 6, 1234, 80, ["SYN", "ACK"])
    h = tpb.PacketHeaders()
    decode_headers(bytes(Ether() / IPv6(src="2001:db8::1", dst="2001:db8::2")
                         / UDP(sport=5, dport=53)), h)
    assert (h.src, h.dst, h.ip_protocol, h.dst_port) == ("2001:db8::1", "2001:db8::2", 17, 53)
    sctp_init = bytes.fromhex("1388960c 00000000 00000000 01000014 1234abcd 00010000 000a000a"
                              "00000001")
    h = tpb.PacketHeaders()
    decode_headers(bytes(Ether() / IP(src="198.18.0.2", dst="198.18.1.2", proto=132)
                         / sctp_init), h)
    assert (h.ip_protocol, h.src_port, h.dst_port, list(h.tcp_flags)) == (132, 5000, 38412, [])
    h = tpb.PacketHeaders()
    decode_headers(bytes(Ether() / IPv6(src="2001:db8::1", dst="2001:db8::2", nh=132)
                         / sctp_init), h)
    assert (h.ip_protocol, h.src_port, h.dst_port) == (132, 5000, 38412)
    e = tpb.Event(kind=tpb.EVENT_KIND_TRAP, node="n1", interface="eth0", reason="trap-ngap",
                  packet=h, packet_length=82)
    assert cli_events.line(e).endswith(
        " n1 TRAP eth0 trap-ngap SCTP [2001:db8::1]:5000 -> [2001:db8::2]:38412 len 82")
    h = tpb.PacketHeaders()
    decode_headers(bytes(Ether() / IP(src="198.18.0.2", dst="198.18.1.2"))[:20], h)  # cut
    assert h.src == ""


class FakeRing:
    def __init__(self, records: list[bytes]) -> None:
        self.records = records

    def drain(self, handle, limit: int = 4096) -> int:  # type: ignore[no-untyped-def]
        n = 0
        while self.records and n < limit:
            handle(memoryview(self.records.pop(0)))
            n += 1
        return n


def test_the_reader_sheds_over_its_rate_and_reports_it():
    from dpd import abi as abi_mod

    abi = abi_mod.load()
    layout = abi.structs["xlb_event"]
    rec = layout.codec.pack(kind=abi.const("XLB_EV_TRAP"), cap_len=0, ifindex=0, pkt_len=60,
                            id=1, time_ns=0)
    hub = EventHub(queue=10_000)
    sub = hub.subscribe()
    names = Names(interface=lambda i: None, rule=lambda i: "r", policer=lambda i: None,
                  policer_dropped=lambda i: 0, stat=lambda i: None)
    reader = EventReader(FakeRing([rec] * 500), hub, layout, abi.constants, names,  # type: ignore[arg-type]
                         rate=100)
    reader._shed_reported = 0.0
    reader.poll_once()
    assert reader.read == 500 and reader.shed == 400
    events = []
    while (e := hub.next(sub, 0)) is not None:
        events.append(e)
    assert events[0].kind == DROPPED and events[0].count == 400
    assert len(events) == 101 and all(e.reason == "r" for e in events[1:])


def test_watch_events_over_the_api_gets_health_changes(sockdir):
    import grpc

    from dpd.loader import Settings
    from dpd.memory import MemoryDatapath
    from dpd.node import Node
    from dpd.servicer import DatapathServicer
    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.dpd.v1 import datapath_pb2_grpc
    from xlbcore.server import start_server

    node = Node(MemoryDatapath(Settings(name="unit", max_services=16, max_backends=64,
                                        ct_size=64)), ct_aging_interval=0)
    server = start_server(f"unix:{sockdir}/dpd.sock", "xlb.dpd.v1.Datapath",
                          lambda s: datapath_pb2_grpc.add_DatapathServicer_to_server(
                              DatapathServicer(node), s))
    channel = grpc.insecure_channel(server.address)
    try:
        stub = datapath_pb2_grpc.DatapathStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.WatchEvents(pb.WatchEventsRequest(kinds=[DROPPED]), timeout=5)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "kinds[0]" in err.value.details()
        stream = stub.WatchEvents(pb.WatchEventsRequest(kinds=[HEALTH]), timeout=10)
        deadline = time.monotonic() + 5
        while node.events.hub.watchers() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        node.events.hub.publish(trap(1))  # filtered out
        assert node.health.on_event is not None
        node.health.on_event({"service": "198.19.0.10:80/tcp", "endpoint": "198.18.1.2:8080",
                              "state": "DOWN", "previous": "UP", "reason": "refused"})
        e = next(iter(stream))
        assert (e.kind, e.service, e.endpoint, e.state) == (
            HEALTH, "198.19.0.10:80/tcp", "198.18.1.2:8080", "DOWN")
        assert e.reason == "UP -> DOWN: refused"
        stream.cancel()
    finally:
        channel.close()
        server.stop(0)
        node.close()
