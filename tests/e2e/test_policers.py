"""Policers on a real node: client, lb and one backend namespace (named pe*), dpd
attached to the lb's interfaces, a policer on the client side interface (c0). A UDP
stream at twice the rate delivers the rate within 10 %; a TCP transfer to a VIP settles
near it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from tests.e2e.conftest import VIP, Lab, doc_grpcurl_commands, open_lab
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

RATE = 8_000_000  # bits/s


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(prefix="pe", backends=1, servers=False) as lab:
        yield lab


SINK = """
import json, socket, sys, time
kind, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
if kind == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
else:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(1)
print("ready", flush=True)
if kind == "tcp":
    s, _ = ls.accept()
s.settimeout(0.2)
marks = []  # (time, bytes so far, datagrams so far)
total = count = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    try:
        data = s.recv(65536)
    except socket.timeout:
        continue
    if not data and kind == "tcp":
        break
    total += len(data)
    count += 1
    marks.append((time.monotonic(), total, count))
print(json.dumps(marks[::max(1, len(marks) // 2000)] + marks[-1:]), flush=True)
"""

UDP_SEND = """
import socket, sys, time
dst, port = sys.argv[1], int(sys.argv[2])
rate, seconds, size = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * size
frame_bits = (size + 42) * 8  # Ethernet, IPv4 and UDP headers
start = time.monotonic()
sent = 0
while True:
    now = time.monotonic() - start
    if now >= seconds:
        break
    due = int(now * rate / frame_bits)
    while sent < due:
        s.sendto(payload, (dst, port))
        sent += 1
    time.sleep(0.002)
print(sent, flush=True)
"""

TCP_SEND = """
import socket, sys, time
dst, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cc = sys.argv[4].encode()
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc)
s.settimeout(5)
s.connect((dst, port))
buf = b"y" * 65536
end = time.monotonic() + seconds
while time.monotonic() < end:
    s.sendall(buf)
s.close()
"""


def _sink(lab: Lab, kind: str, port: int, seconds: float):  # type: ignore[no-untyped-def]
    from lab import netns

    topo = lab.topo
    argv = [sys.executable, "-c", SINK, kind, str(port), str(seconds)]
    proc = topo.popen(topo.backend_ns[0], argv,  # type: ignore[attr-defined]
                      stdout=subprocess.PIPE, text=True, env=netns.python_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _policer(lab: Lab) -> pb.Policer:
    [p] = list(lab.stub.ListPolicers(pb.ListPolicersRequest(), timeout=10))  # type: ignore[attr-defined]
    return p


def test_a_udp_stream_at_twice_the_rate_delivers_the_rate(lab):
    from lab import netns

    topo = lab.topo
    r = lab.stub.PutPolicers(pb.PutPolicersRequest(policers=[pb.Policer(
        name="c0-in", rate_bps=RATE, burst_bytes=15_000, interfaces=["c0"])]), timeout=10)
    assert r.written == 1
    seconds, size = 3.0, 1000
    sink = _sink(lab, "udp", 9000, seconds + 2)
    topo.run(topo.client_ns, [sys.executable, "-c", UDP_SEND, topo.backend_ips[0], "9000",
                              str(2 * RATE), str(seconds), str(size)], env=netns.python_env())
    out, _ = sink.communicate(timeout=30)
    marks = json.loads(out.strip().splitlines()[-1])
    got = marks[-1][2]  # datagrams delivered
    delivered = got * (size + 42 + 14) * 8 / seconds  # as the policer counts: the frame
    assert abs(delivered - RATE) <= 0.10 * RATE, (delivered, got)
    p = _policer(lab)
    assert p.dropped.packets > 0.35 * (p.passed.packets + p.dropped.packets)
    assert p.passed.packets >= got
    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters
    assert stats["drop_policer"] == p.dropped.packets


def test_a_tcp_transfer_through_a_policed_vip_settles_near_the_rate(lab):
    from lab import netns

    topo = lab.topo
    # the client's veth hands the lb whole GSO packets (up to 64 KiB) otherwise: each
    # would be one charge bigger than the burst (see docs/policers.md)
    topo.run(topo.client_ns, ["ip", "link", "set", "dev", topo.client_iface,
                              "gso_max_size", "1500"])
    lab.stub.PutServices(pb.PutServicesRequest(services=[pb.Service(
        vip=VIP, port=5001, protocol=tpb.PROTOCOL_TCP,
        endpoints=[tpb.Endpoint(address=topo.backend_ips[0], port=5001)])]), timeout=10)
    lab.stub.PutPolicers(pb.PutPolicersRequest(policers=[pb.Policer(
        name="c0-in", rate_bps=RATE, burst_bytes=30_000, interfaces=["c0"])]), timeout=10)
    seconds = 5.0
    sink = _sink(lab, "tcp", 5001, seconds + 3)
    topo.run(topo.client_ns, [sys.executable, "-c", TCP_SEND, VIP, "5001", str(seconds),
                              "cubic"],
             env=netns.python_env(), timeout=seconds + 20)
    out, _ = sink.communicate(timeout=30)
    marks = json.loads(out.strip().splitlines()[-1])
    t0 = marks[0][0]
    window = [(t, b) for t, b, _ in marks if 2.0 <= t - t0 <= seconds]
    (ta, ba), (tb, bb) = window[0], window[-1]
    goodput = (bb - ba) * 8 / (tb - ta)
    # payload only, the policer charges the frames (about 4 % more): near the rate.
    # cubic, which backs off on loss (this machine's default, BBR, probes through a
    # policer's drops: a veth's microsecond round trip gives it nothing to pace by)
    assert 0.75 * RATE <= goodput <= 1.05 * RATE, goodput
    assert _policer(lab).dropped.packets > 0  # TCP found the rate by losing packets


def test_the_grpcurl_examples_of_the_docs_work_as_written(lab):
    from tests.unit.test_policyd_grpcurl import GRPCURL

    if GRPCURL is None:
        pytest.skip("grpcurl is missing")
    commands = doc_grpcurl_commands("policers.md")
    assert len(commands) == 3
    for argv in commands:
        argv = [GRPCURL if a == "grpcurl" else lab.dpd.socket if a == "/run/xlb/dpd.sock"
                else a.replace('"eth0"', '"c0"') for a in argv]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{argv}: {res.stderr}"
        if argv[-1].endswith("/PutPolicers"):
            assert '"written": 1' in res.stdout
        if argv[-1].endswith("/ListPolicers"):
            assert '"rate_bps": "8000000"' in res.stdout and '"c0"' in res.stdout
        if argv[-1].endswith("/DeletePolicers"):
            assert '"deleted": 1' in res.stdout
    filters = subprocess.run(["tc", "-n", lab.topo.lb_ns, "filter", "show", "dev", "c0",
                              "ingress"], capture_output=True, text=True).stdout
    assert "xlb_tc_police_func" not in filters and "xlb_tc_packet_func" in filters


def test_bad_policers_are_refused_naming_the_field(lab):
    def put(**kw: object) -> grpc.RpcError:
        base = {"name": "p", "rate_bps": RATE, "burst_bytes": 3000}
        base.update(kw)
        with pytest.raises(grpc.RpcError) as e:
            lab.stub.PutPolicers(pb.PutPolicersRequest(policers=[pb.Policer(**base)]),
                                 timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return e.value

    assert "policers[0].name" in put(name="a b").details()
    assert "policers[0].rate_bps" in put(rate_bps=10).details()
    assert "policers[0].burst_bytes" in put(burst_bytes=100).details()
    assert "policers[0].interfaces[0]" in put(interfaces=["nope0"]).details()
    lab.stub.PutPolicers(pb.PutPolicersRequest(policers=[pb.Policer(
        name="a", rate_bps=RATE, burst_bytes=3000, interfaces=["c0"])]), timeout=10)
    err = put(name="b", interfaces=["c0"])
    assert "'c0' is policed by 'a'" in err.details()
