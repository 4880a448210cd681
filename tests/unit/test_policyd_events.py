"""policyd's WatchEvents (policyd/events.py) over two in-memory dpd nodes: events of
every node in one stream tagged by node, the node and kind filters, unknown nodes and
kinds refused naming the field, and xlbctl events printing them line by line."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2 as tpb


def _health(state: str) -> dict[str, str]:
    return {"service": "198.19.0.10:80/tcp", "endpoint": "198.18.1.2:8080", "state": state,
            "previous": "UP", "reason": ""}


def _wait_watchers(node, count: int = 1) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while node.datapath.node.events.hub.watchers() < count:
        assert time.monotonic() < deadline, "no WatchEvents stream reached the node"
        time.sleep(0.02)


def test_events_of_every_node_tagged_and_filtered(policyd, client_for, fake_node):
    server = policyd()
    client = client_for(server)
    nodes = {n: fake_node(n).start() for n in ("n1", "n2")}
    for name, node in nodes.items():
        client.register_node(name, node.address)
    with pytest.raises(grpc.RpcError) as err:
        next(iter(client.stub.WatchEvents(policy_pb2.WatchEventsRequest(nodes=["nope"]),
                                          timeout=5)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nodes[0]" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        next(iter(client.stub.WatchEvents(policy_pb2.WatchEventsRequest(
            kinds=[tpb.EVENT_KIND_DROPPED]), timeout=5)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    every = client.stub.WatchEvents(policy_pb2.WatchEventsRequest(), timeout=20)
    only_n2 = client.stub.WatchEvents(policy_pb2.WatchEventsRequest(
        nodes=["n2"], kinds=[tpb.EVENT_KIND_HEALTH]), timeout=20)
    got_every: list[tpb.Event] = []
    got_n2: list[tpb.Event] = []
    threads = [threading.Thread(target=lambda s=s, out=out, n=n: out.extend(
        e for _, e in zip(range(n), s, strict=False)), daemon=True)
        for s, out, n in ((every, got_every, 3), (only_n2, got_n2, 1))]
    for t in threads:
        t.start()
    _wait_watchers(nodes["n1"], 1)
    _wait_watchers(nodes["n2"], 2)
    nodes["n1"].datapath.node.health.on_event(_health("DOWN"))
    nodes["n2"].datapath.node.events.hub.publish(tpb.Event(kind=tpb.EVENT_KIND_TRAP,
                                                           reason="r"))
    nodes["n2"].datapath.node.health.on_event(_health("UP"))
    for t in threads:
        t.join(10)
    every.cancel()
    only_n2.cancel()
    assert sorted((e.node, e.kind) for e in got_every) == [
        ("n1", tpb.EVENT_KIND_HEALTH), ("n2", tpb.EVENT_KIND_TRAP), ("n2", tpb.EVENT_KIND_HEALTH)]
    assert [(e.node, e.state) for e in got_n2] == [("n2", "UP")]


def test_xlbctl_events_prints_a_line_per_event(policyd, client_for, fake_node, capsys):
    from policyd import cli_events

    e = tpb.Event(kind=tpb.EVENT_KIND_TRAP, node="n1", interface="c0", reason="trap-udp",
                  time_unix_ns=1_764_000_000_123_000_000, packet_length=51)
    e.packet.src, e.packet.dst, e.packet.ip_protocol = "198.18.0.2", "198.18.1.2", 6
    e.packet.src_port, e.packet.dst_port = 40000, 5353
    e.packet.tcp_flags.append("SYN")
    assert cli_events.line(e) == ("2025-11-24T16:00:00.123Z n1 TRAP c0 trap-udp TCP "
                                  "198.18.0.2:40000 -> 198.18.1.2:5353 [SYN] len 51")
    d = tpb.Event(kind=tpb.EVENT_KIND_DROPPED, count=7, reason="dropped 7", time_unix_ns=0)
    assert cli_events.line(d).endswith(" - DROPPED dropped 7")


def test_xlbctl_trap_rule_and_events_follow_as_the_docs_say(policyd, client_for, fake_node,
                                                            wait_for):
    import subprocess
    import sys

    from policyd import cli

    server = policyd()
    client = client_for(server)
    node = fake_node("node1").start()
    client.register_node("node1", node.address)
    # docs/events.md: xlbctl firewall apply ... --action trap
    assert cli.main(["--server", server.address, "firewall", "apply", "--name", "trap-dns",
                     "--priority", "300", "--action", "trap", "--protocol", "udp",
                     "--dst-ports", "53"]) == 0
    wait_for(lambda: [r.name for r in node.datapath.node.firewall.rules()] == ["trap-dns"],
             what="the trap rule on the node")
    proc = subprocess.Popen([sys.executable, "-m", "policyd.cli", "--server", server.address,
                             "events", "--node", "node1", "--kind", "health"],
                            stdout=subprocess.PIPE, text=True)
    try:
        _wait_watchers(node)
        node.datapath.node.health.on_event(_health("DOWN"))
        assert proc.stdout is not None
        first = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(10)
    assert " node1 HEALTH 198.19.0.10:80/tcp 198.18.1.2:8080 UP -> DOWN" in first, first
