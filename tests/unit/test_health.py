"""Endpoint health without root: the state machine (rise, fall, damping), the monitor
with a fake clock and no probes, the table's selection without a down endpoint (the
configured weights kept, fail open, restart), the model's validation and the API."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from dpd.health import HealthMonitor, State, Tracker
from dpd.loader import Settings
from dpd.memory import MemoryDatapath
from dpd.node import Node
from dpd.servicer import DatapathServicer
from dpd.services import ServiceTable
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import ValidationError
from xlbcore.service import (
    Algorithm,
    EndpointSpec,
    HealthKind,
    HealthSpec,
    Proto,
    ServiceSpec,
    parse_health,
    parse_service,
)

HC = HealthSpec(HealthKind.TCP, interval_ms=100, timeout_ms=50, rise=2, fall=3)
EPS = (EndpointSpec("198.18.1.2", 8080, 2), EndpointSpec("198.18.2.2", 8080, 1))


def spec(health: HealthSpec | None = HC, algorithm: Algorithm = Algorithm.ROUND_ROBIN,
         eps: tuple[EndpointSpec, ...] = EPS) -> ServiceSpec:
    return ServiceSpec("198.19.0.10", 80, Proto.TCP, algorithm, endpoints=eps, health=health)


# -- the state machine ------------------------------------------------------------------

def run(t: Tracker, results: str) -> list[State]:
    """Feed '+' (success) and '-' (failure); the state after each."""
    out = []
    for r in results:
        t.record(r == "+", "refused")
        out.append(t.state)
    return out


def test_unknown_is_up_after_one_success_and_down_after_fall_failures():
    assert run(Tracker(2, 3), "+")[-1] == State.UP
    assert run(Tracker(2, 3), "--") == [State.UNKNOWN, State.UNKNOWN]
    assert run(Tracker(2, 3), "---")[-1] == State.DOWN


def test_down_after_fall_consecutive_failures_up_after_rise_consecutive_successes():
    t = Tracker(rise=2, fall=3)
    states = run(t, "+" + "---" + "+" + "+")
    assert states == [State.UP, State.UP, State.UP, State.DOWN, State.DOWN, State.UP]
    assert t.reason == ""


def test_flapping_is_damped_by_consecutive_counts():
    t = Tracker(rise=2, fall=3)
    # never three failures in a row: stays UP however many failures in total
    assert set(run(t, "+" + "--+" * 20)) == {State.UP}
    t = Tracker(rise=2, fall=3)
    run(t, "+---")
    # never two successes in a row: stays DOWN
    assert set(run(t, "+-" * 20)) == {State.DOWN}


def test_record_returns_the_previous_state_on_a_change_only():
    t = Tracker(rise=1, fall=1)
    assert t.record(True, "", 5) == State.UNKNOWN and t.since_ns == 5
    assert t.record(True, "", 6) is None
    assert t.record(False, "timeout", 7) == State.UP and t.reason == "timeout"


# -- the monitor: fake clock, probes fed by hand ------------------------------------------

class Applied:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, changes):
        self.calls.append(dict(changes))
        return len(changes)


def target_of(m: HealthMonitor, address: str):
    return next(t for k, t in m._targets.items() if k[0] == address)


def test_monitor_takes_a_failed_endpoint_out_after_fall_and_back_after_rise():
    applied = Applied()
    events = []
    m = HealthMonitor(applied, clock=lambda: 0.0, wall=lambda: 0, on_event=events.append)
    s = spec()
    m.update([s])
    assert [h.state for h in m.status(s.key)] == [State.UNKNOWN, State.UNKNOWN]
    t = target_of(m, "198.18.2.2")
    for _ in range(HC.fall - 1):
        m.record(t, False, "Connection refused")
    m._flush()
    assert all(not c[s.key] for c in applied.calls)  # not yet: fall - 1 failures
    m.record(t, False, "Connection refused")
    m._flush()
    assert applied.calls[-1] == {s.key: frozenset({("198.18.2.2", 8080)})}
    assert m.summary() == (1, 1)
    assert events[-1]["state"] == "DOWN" and events[-1]["endpoint"] == "198.18.2.2:8080"
    m.record(t, True, "")
    m._flush()
    assert applied.calls[-1][s.key]  # one success is not rise
    m.record(t, True, "")
    m._flush()
    assert applied.calls[-1] == {s.key: frozenset()}
    assert m.counters.went_down == 1 and m.counters.went_up == 1
    assert [h.state for h in m.status(s.key)] == [State.UNKNOWN, State.UP]


def test_services_sharing_an_endpoint_and_check_share_its_target():
    m = HealthMonitor(Applied(), clock=lambda: 0.0)
    a = spec()
    b = ServiceSpec("198.19.0.11", 80, Proto.TCP, endpoints=EPS, health=HC)
    m.update([a, b])
    assert m.targets() == 2
    m.remove([a.key])
    assert m.targets() == 2 and m.checked() == [b.key]
    m.update([ServiceSpec(b.vip, b.port, b.proto, endpoints=EPS)])  # health off
    assert m.targets() == 0 and m.checked() == []


def test_a_put_of_services_without_checks_costs_the_monitor_nothing():
    m = HealthMonitor(Applied(), clock=lambda: 0.0)
    m.update([spec(None)] * 1000)
    assert m.checked() == [] and m._due == []


def test_the_monitor_stops_within_its_bounded_stop():
    # other monitors may be running in this process (a kernel node of the datapath
    # tests' session fixture probes too): only this one's thread must be gone
    others = {t for t in threading.enumerate() if t.name == "health"}
    m = HealthMonitor(Applied())
    m.start()
    m.update([spec()])
    t0 = time.monotonic()
    m.stop()
    assert time.monotonic() - t0 < 1.0
    assert {t for t in threading.enumerate() if t.name == "health"} <= others


def test_probes_against_a_closed_port_fail_and_a_listener_succeeds():
    """Real sockets on the loopback (no root): a TCP probe of a listening port is UP,
    one of a closed port goes DOWN after `fall` probes, within about fall x interval."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    open_port = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]  # bound, not listening: refused
    applied = Applied()
    m = HealthMonitor(applied)
    s = ServiceSpec("198.19.0.10", 80, Proto.TCP, endpoints=(
        EndpointSpec("127.0.0.1", open_port), EndpointSpec("127.0.0.2", closed_port)),
        health=HealthSpec(HealthKind.TCP, interval_ms=50, timeout_ms=50, rise=2, fall=3))
    try:
        m.start()
        m.update([s])
        end = time.monotonic() + 5
        while time.monotonic() < end:
            states = [h.state for h in m.status(s.key)]
            if states == [State.UP, State.DOWN]:
                break
            time.sleep(0.02)
        assert states == [State.UP, State.DOWN]
        assert m.status(s.key)[1].reason
        assert applied.calls[-1] == {s.key: frozenset({("127.0.0.2", closed_port)})}
    finally:
        m.stop()
        listener.close()
        closed.close()


# -- the table: selection without the endpoint, configured weights kept --------------------

@pytest.fixture
def dp():
    return MemoryDatapath(Settings(name="hc", max_services=8, max_backends=16, ct_size=64))


def slots_of(table: ServiceTable, s: ServiceSpec) -> set[int]:
    held = table.held_selection(s.key)
    assert held is not None
    slots, live = held
    assert set(slots) == {i for i, up in enumerate(live) if up}  # LIVE: holds slots
    return set(slots)


def test_set_down_rewrites_the_slots_keeps_weights_and_generation(dp):
    table = ServiceTable(dp)
    s = spec()
    table.put([s])
    gen = table.generation
    assert slots_of(table, s) == {0, 1}
    assert table.set_down({s.key: frozenset({("198.18.1.2", 8080)})}) == 1
    assert slots_of(table, s) == {1}
    assert table.specs() == [s] and table.generation == gen  # configured weights stay
    assert table.set_down({s.key: frozenset({("198.18.1.2", 8080)})}) == 0  # no change
    # every endpoint down: fail open, the configured weights select
    table.set_down({s.key: frozenset({("198.18.1.2", 8080), ("198.18.2.2", 8080)})})
    assert slots_of(table, s) == {0, 1}
    table.set_down({s.key: frozenset()})
    assert slots_of(table, s) == {0, 1}


def test_a_put_keeps_an_endpoint_that_is_down_out_and_a_restart_reads_the_config(dp):
    table = ServiceTable(dp)
    s = spec()
    table.put([s])
    table.set_down({s.key: frozenset({("198.18.2.2", 8080)})})
    s2 = spec(eps=EPS + (EndpointSpec("198.18.3.2", 8080),))
    table.put([s2])
    assert slots_of(table, s2) == {0, 2}  # the new endpoint in, the down one still out
    again = ServiceTable(dp)  # a restarted dpd
    assert again.specs() == [s2]  # health check read back, configured weights
    table.delete([s2.key])
    assert list(dp.maps["svc_cfg_map"].items()) == []


def test_maglev_table_leaves_out_a_down_endpoint(dp):
    table = ServiceTable(dp)
    s = spec(algorithm=Algorithm.MAGLEV)
    table.put([s])
    table.set_down({s.key: frozenset({("198.18.1.2", 8080)})})
    (_, raw), = dp.maps["maglev_v4_map"].items()  # the old table went
    m = table._maglev.unpack(raw)
    assert set(m["ep"][:m["size"]]) == {1}


def test_node_put_and_delete_drive_the_monitor(dp):
    node = Node(dp, ct_aging_interval=0)
    try:
        s = spec()
        node.put_services([s])
        assert node.health.checked() == [s.key]
        t = target_of(node.health, "198.18.1.2")
        for _ in range(3):
            node.health.record(t, False, "timeout")
        node.health._flush()
        assert node.services.down(s.key) == {("198.18.1.2", 8080)}
        node.delete_services([s.key])
        assert node.health.checked() == []
    finally:
        node.close()


# -- validation and the API ------------------------------------------------------------------

def test_health_check_defaults_and_refusals():
    h = parse_health(tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_HTTP))
    assert (h.interval_ms, h.timeout_ms, h.rise, h.fall, h.http_path, h.http_status) == (
        1000, 1000, 2, 3, "/", 200)
    assert parse_health(tpb.HealthCheck()) is None
    for bad, field in [
        (tpb.HealthCheck(port=80), "health.kind"),
        (tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP, interval_ms=10), "interval_ms"),
        (tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP, interval_ms=100, timeout_ms=200),
         "timeout_ms"),
        (tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP, fall=101), "fall"),
        (tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_ICMP, port=80), "port"),
        (tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP, udp_request=b"x"), "udp_request"),
        (tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_UDP, udp_expect=b"x" * 65), "udp_expect"),
        (tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_HTTP, http_path="x"), "http_path"),
        (tpb.HealthCheck(kind=9), "kind"),
    ]:
        with pytest.raises(ValidationError, match=field):
            parse_health(bad, "health")


def test_a_service_reads_back_canonical_and_equal():
    msg = pb.Service(vip="198.19.0.10", port=80, protocol=tpb.PROTOCOL_UDP,
                     endpoints=[tpb.Endpoint(address="198.18.1.2", port=53)],
                     health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_UDP, udp_expect=b"ok"),
                     conntrack_timeouts=tpb.ConntrackTimeouts(udp_established=20))
    s = parse_service(msg)
    assert s.health.udp_request == b"\0" and s.ct_timeouts.udp_established == 20
    from xlbcore.service import fill_service
    assert parse_service(fill_service(pb.Service(), s)) == s


class Ctx:
    def abort(self, code, details):
        raise grpc.RpcError(code, details)

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_list_services_and_list_endpoint_health_show_each_endpoint(dp):
    node = Node(dp, ct_aging_interval=0)
    try:
        api = DatapathServicer(node)
        req = pb.PutServicesRequest(services=[pb.Service(
            vip="198.19.0.10", port=80, protocol=tpb.PROTOCOL_TCP,
            endpoints=[tpb.Endpoint(address="198.18.1.2", port=8080)],
            health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_TCP, interval_ms=200))])
        api.PutServices(req, Ctx())
        t = target_of(node.health, "198.18.1.2")
        for _ in range(3):
            node.health.record(t, False, "Connection refused")
        node.health._flush()
        (listed,) = api.ListServices(pb.ListServicesRequest(), Ctx())
        assert listed.health.interval_ms == 200
        assert [(e.address, e.health, e.reason) for e in listed.endpoint_status] == [
            ("198.18.1.2", tpb.HEALTH_STATE_DOWN, "Connection refused")]
        assert listed.endpoints[0].weight == 1  # configured, not the effective 0
        health = api.ListEndpointHealth(pb.ListEndpointHealthRequest(), Ctx())
        assert health.generation == 1 and len(health.services) == 1
        tables = {t.table: t for t in api.GetSummary(pb.GetSummaryRequest(), Ctx()).tables}
        assert (tables["health"].generation, tables["health"].count) == (1, 1)
        stats = api.GetStats(pb.GetStatsRequest(), Ctx())
        assert stats.health.went_down == 1 and stats.health.targets == 1
    finally:
        node.close()


def wait_states(m: HealthMonitor, key, want, deadline: float = 5.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = [h.state for h in m.status(key)]
        if got == want:
            return got
        time.sleep(0.02)
    return [h.state for h in m.status(key)]


def test_http_probe_wants_the_status_and_udp_probe_the_reply():
    """HTTP: 200 on /ok is UP, 503 on /bad DOWN (a service per path: one endpoint each);
    UDP: a server that answers 'pong ...' is UP for udp_expect 'pong', a port that answers
    nothing (an ICMP port unreachable) DOWN."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))

    def answer():
        while True:
            try:
                data, peer = udp.recvfrom(100)
            except OSError:
                return
            udp.sendto(b"pong " + data, peer)

    threading.Thread(target=answer, daemon=True).start()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent_port = silent.getsockname()[1]
    silent.close()  # closed: the kernel answers with a port unreachable

    def svc(port: int, h: HealthSpec, eps) -> ServiceSpec:
        return ServiceSpec("198.19.0.10", port, Proto.TCP, endpoints=eps, health=h)

    fast = {"interval_ms": 50, "timeout_ms": 50, "rise": 1, "fall": 2}
    hp = httpd.server_address[1]
    ok = svc(1, HealthSpec(HealthKind.HTTP, http_path="/ok", http_status=200, **fast),
             (EndpointSpec("127.0.0.1", hp),))
    bad = svc(2, HealthSpec(HealthKind.HTTP, http_path="/bad", http_status=200, **fast),
              (EndpointSpec("127.0.0.1", hp),))
    u = svc(3, HealthSpec(HealthKind.UDP, udp_request=b"ping", udp_expect=b"pong", **fast),
            (EndpointSpec("127.0.0.1", udp.getsockname()[1]),
             EndpointSpec("127.0.0.1", silent_port)))
    m = HealthMonitor(Applied())
    try:
        m.start()
        m.update([ok, bad, u])
        assert wait_states(m, ok.key, [State.UP]) == [State.UP]
        assert wait_states(m, bad.key, [State.DOWN]) == [State.DOWN]
        assert m.status(bad.key)[0].reason == "HTTP status 503"
        assert wait_states(m, u.key, [State.UP, State.DOWN]) == [State.UP, State.DOWN]
        assert "refused" in m.status(u.key)[1].reason.lower()
    finally:
        m.stop()
        httpd.shutdown()
        httpd.server_close()
        udp.close()


def test_a_restarted_dpd_keeps_a_down_endpoint_out_until_rise_successes(dp):
    node = Node(dp, ct_aging_interval=0)
    s = spec()
    try:
        node.put_services([s])
        t = target_of(node.health, "198.18.2.2")
        for _ in range(3):
            node.health.record(t, False, "timeout")
        node.health._flush()
        assert slots_of(node.services, s) == {0}
    finally:
        node.close()
    again = Node(dp, ct_aging_interval=0)  # the map still leaves it out
    try:
        assert again.services.down(s.key) == {("198.18.2.2", 8080)}
        states = {h.address: h.state for h in again.health.status(s.key)}
        assert states == {"198.18.1.2": State.UNKNOWN, "198.18.2.2": State.DOWN}
        t = target_of(again.health, "198.18.2.2")
        again.health.record(t, True, "")
        again.health._flush()
        assert slots_of(again.services, s) == {0}  # one success is not rise
        again.health.record(t, True, "")
        again.health._flush()
        assert slots_of(again.services, s) == {0, 1}
    finally:
        again.close()


def test_a_service_changed_around_a_down_endpoint_keeps_it_down():
    applied = Applied()
    m = HealthMonitor(applied, clock=lambda: 0.0)
    s = spec()
    m.update([s])
    t = target_of(m, "198.18.2.2")
    for _ in range(3):
        m.record(t, False, "timeout")
    m._flush()
    more = spec(eps=EPS + (EndpointSpec("198.18.3.2", 8080),))
    m.update([more])  # an endpoint added: the others' targets and states stay
    assert target_of(m, "198.18.2.2") is t
    assert [h.state for h in m.status(more.key)] == [State.UNKNOWN, State.DOWN, State.UNKNOWN]
    assert applied.calls[-1] == {more.key: frozenset({("198.18.2.2", 8080)})}
    m.update([spec(health=HealthSpec(HealthKind.TCP, interval_ms=500), eps=EPS)])
    assert target_of(m, "198.18.2.2") is not t  # another check: new targets, UNKNOWN
    assert m.targets() == 2 and applied.calls[-1] == {more.key: frozenset()}


def test_health_and_conntrack_removals_as_prometheus_metrics(dp):
    from dpd.metrics import Exporter
    from tests.unit.test_metrics import get, value

    node = Node(dp, ct_aging_interval=0)
    e = Exporter("127.0.0.1:0")
    e.start([node])
    try:
        s = spec()
        node.put_services([s])
        t = target_of(node.health, "198.18.2.2")
        node.health.record(target_of(node.health, "198.18.1.2"), True, "")
        for _ in range(3):
            node.health.record(t, False, "timeout")
        node.conntrack.counters.expired = 5
        got = get(e)
        assert value(got, "xlb_dpd_endpoints_health", node="hc", state="up") == 1
        assert value(got, "xlb_dpd_endpoints_health", node="hc", state="down") == 1
        assert value(got, "xlb_dpd_endpoints_health", node="hc", state="unknown") == 0
        assert value(got, "xlb_dpd_health_probes_total", node="hc", result="failed") == 3
        assert value(got, "xlb_dpd_health_changes_total", node="hc", to="down") == 1
        assert value(got, "xlb_dpd_conntrack_removed_flows_total", node="hc",
                     why="expired") == 5
    finally:
        e.stop()
        node.close()
