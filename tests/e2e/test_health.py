"""Endpoint health with real sockets: dpd probes two backends; one backend process is
killed while a client opens a connection every PERIOD; the killed backend leaves
selection within the detection window (fall x interval + timeout), so the client sees at
most the attempts of that window fail (measured and printed), and none once dpd says
DOWN; a dpd restarted meanwhile keeps it out; the backend restarted, it comes back after
`rise` successful probes and gets flows again."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import VIP, Lab, open_lab, wait_state
from tests.e2e.conftest import endpoint_states as states
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

INTERVAL_MS, TIMEOUT_MS, RISE, FALL = 200, 100, 2, 3
PERIOD = 0.02  # the client's spacing of connection attempts (s)
WINDOW = (FALL * INTERVAL_MS + TIMEOUT_MS) / 1000  # detection window (s)

# One connection every PERIOD s on a fixed schedule (never closer together): prints
# [[t, who], ...], t on CLOCK_MONOTONIC (shared with the test), who a backend or error.
CLIENT = r"""
import json, socket, sys, time
vip, port, period, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
out = []
i = 0
while True:
    at = start + i * period
    if at > start + duration:
        break
    i += 1
    wait = at - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    t = time.monotonic()
    s = socket.socket()
    s.settimeout(1.0)
    try:
        s.connect((vip, port))
        s.sendall(b"WHO\n")
        who = s.recv(100).decode().strip() or "error:empty"
    except OSError as e:
        who = "error:" + type(e).__name__
    finally:
        s.close()
    out.append([t, who])
print(json.dumps(out))
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(prefix="hc", name="hc") as lab:
        yield lab


def test_a_killed_backend_leaves_selection_within_the_window_and_comes_back(lab):
    from lab import netns
    from lab.client import run_tcp_who
    from lab.servers import wait_listening

    topo = lab.topo
    be1, be2 = topo.backend_ips
    lab.stub.PutServices(pb.PutServicesRequest(services=[pb.Service(
        vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP,
        endpoints=[tpb.Endpoint(address=ip, port=8080) for ip in (be1, be2)],
        health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP, interval_ms=INTERVAL_MS,
                               timeout_ms=TIMEOUT_MS, rise=RISE, fall=FALL))]), timeout=10)
    wait_state(lab, be1, tpb.HEALTH_STATE_UP)
    wait_state(lab, be2, tpb.HEALTH_STATE_UP)

    duration = WINDOW + 2.5
    client = topo.popen(topo.client_ns, [sys.executable, "-c", CLIENT, VIP, "80", str(PERIOD),
                                         str(duration)], env=netns.python_env(),
                        stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    killed_at = time.monotonic()
    lab.procs[1].send_signal(signal.SIGKILL)
    down_at = wait_state(lab, be2, tpb.HEALTH_STATE_DOWN)
    out, _ = client.communicate(timeout=duration + 30)
    attempts = json.loads(out)
    failures = [(t, who) for t, who in attempts if who.startswith("error")]
    served = {who for _, who in attempts if not who.startswith("error")}
    bound = math.ceil(WINDOW / PERIOD) + 1  # attempts the window can hold, all failing
    detected_ms = (down_at - killed_at) * 1000
    sys.stdout.write(
        f"\nhealth e2e: tcp check interval {INTERVAL_MS} ms, timeout {TIMEOUT_MS} ms, "
        f"fall {FALL}, rise {RISE}: killed backend DOWN after {detected_ms:.0f} ms "
        f"(window {WINDOW * 1000:.0f} ms); client attempts every {PERIOD * 1000:.0f} ms: "
        f"{len(failures)} failed of {len(attempts)} (bound {bound})\n")
    assert failures, "the kill cost no connection: the test measured nothing"
    assert len(failures) <= bound, failures
    # once dpd says DOWN, no new connection goes to the killed backend
    assert not [f for f in failures if f[0] > down_at + 0.05], (failures, down_at)
    assert served == {"be1", "be2"}

    # dpd restarted (the datapath keeps running): the check is read back, the killed
    # backend is still out of selection (DOWN from the map at once), no new flow fails
    stop_at = time.monotonic()
    lab.dpd.stop()
    lab.dpd.start()
    sys.stdout.write(f"health e2e: dpd restarted in {time.monotonic() - stop_at:.1f} s\n")
    (svc,) = lab.stub.ListServices(pb.ListServicesRequest(), timeout=5)
    assert svc.health.interval_ms == INTERVAL_MS and svc.health.fall == FALL
    assert states(lab)[be2] == tpb.HEALTH_STATE_DOWN
    who = run_tcp_who(topo, VIP, 80, count=20)
    assert who.get("errors") == 0 and who.get("be1") == 20, who

    # restarted: back after `rise` probes, and it gets new flows again
    argv = [sys.executable, "-m", "lab.servers", "--name", "be2", "--tcp-port", "8080",
            "--udp-port", "0", "--bind", "0.0.0.0"]
    proc = topo.popen(topo.backend_ns[1], argv, env=netns.python_env())
    wait_listening(topo, topo.backend_ns[1], 8080, "tcp", proc)
    listening_at = time.monotonic()
    up_at = wait_state(lab, be2, tpb.HEALTH_STATE_UP)
    sys.stdout.write(f"health e2e: restarted backend UP {(up_at - listening_at) * 1000:.0f} ms "
                     f"after it listened (rise {RISE} x interval {INTERVAL_MS} ms)\n")
    who = run_tcp_who(topo, VIP, 80, count=20)
    assert who.get("errors") == 0 and who.get("be2", 0) > 0, who
    stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert stats.health.went_up >= 1  # this dpd's: be1's first verdict and be2 back


def test_icmp_and_udp_checks_see_an_endpoint_stop_answering_and_come_back(lab):
    """ICMP echo (a raw socket: dpd is root) and UDP request/expected reply probes; the
    second backend's replies to the node are blackholed (probes time out), then let
    through again."""
    topo = lab.topo
    be1, be2 = topo.backend_ips
    check = {"interval_ms": 200, "timeout_ms": 100, "rise": 2, "fall": 2}
    eps = [tpb.Endpoint(address=ip, port=8080) for ip in (be1, be2)]
    lab.stub.PutServices(pb.PutServicesRequest(services=[
        pb.Service(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP, endpoints=eps,
                   health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_ICMP, **check)),
        pb.Service(vip=VIP, port=53, protocol=tpb.PROTOCOL_UDP, endpoints=eps,
                   health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_UDP, udp_request=b"WHO",
                                          udp_expect=b"be", **check))]), timeout=10)
    for port in (80, 53):
        for ip in (be1, be2):
            wait_state(lab, ip, tpb.HEALTH_STATE_UP, port=port)
    hole = ["ip", "route", "add", "blackhole", f"{topo.backend_gws[1]}/32"]
    topo.run(topo.backend_ns[1], hole)
    try:
        for port in (80, 53):
            wait_state(lab, be2, tpb.HEALTH_STATE_DOWN, port=port)
        (svc,) = [s for s in lab.stub.ListServices(pb.ListServicesRequest(), timeout=5)
                  if s.port == 53]
        assert svc.endpoint_status[1].reason == "timeout"
        assert states(lab, 80)[be1] == tpb.HEALTH_STATE_UP
    finally:
        topo.run(topo.backend_ns[1], ["ip", "route", "del", "blackhole",
                                      f"{topo.backend_gws[1]}/32"])
    for port in (80, 53):
        wait_state(lab, be2, tpb.HEALTH_STATE_UP, port=port)
