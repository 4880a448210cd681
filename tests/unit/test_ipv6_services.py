"""IPv6 services without root: validation (every mode, one family per service, refusals
naming the field with a short prefix of the bad value), the table's encoding into
nat_v6_map, ep_map and ep6_map against the ABI codecs, restart and a full ep_map over
in-memory maps, dpd's API and metrics, policyd and xlbctl onto a node, and health probes
of IPv6 endpoints over the loopback (::1)."""

from __future__ import annotations

import contextlib
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dpd.health import HealthMonitor, State
from dpd.loader import Settings
from dpd.memory import MemoryDatapath
from dpd.metrics import Exporter
from dpd.node import Node
from dpd.services import ServiceTable
from tests.unit.conftest import MemoryDatapathServicer, serve_datapath
from tests.unit.test_health import Applied, wait_states
from tests.unit.test_metrics import get, put_counter, value
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import Exhausted, ValidationError
from xlbcore.service import (
    Algorithm,
    EndpointSpec,
    HealthKind,
    HealthSpec,
    Mode,
    Proto,
    ServiceSpec,
    fold6,
    parse_service,
    parse_services,
)

VIP = "2001:db8:ff::10"
EPA, EPB = "2001:db8:1::2", "2001:db8:2::2"
SNAT = "2001:db8:9::1"


def msg(*eps: tuple[str, int], vip: str = VIP, port: int = 80, **fields: Any) -> pb.Service:
    return pb.Service(vip=vip, port=port, protocol=fields.pop("protocol", tpb.PROTOCOL_TCP),
                      endpoints=[tpb.Endpoint(address=a, port=p) for a, p in eps], **fields)


# -- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,snat,port", [
    (tpb.MODE_DNAT, "", 8080), (tpb.MODE_FULLNAT, "", 8080), (tpb.MODE_FULLNAT, SNAT, 8080),
    (tpb.MODE_DSR, "", 80), (tpb.MODE_DSR_IPIP, "", 80), (tpb.MODE_DSR_IPIP, SNAT, 80)])
def test_every_mode_takes_an_ipv6_service_in_canonical_form(mode, snat, port):
    (s,) = parse_services([msg(("2001:DB8:2:0::2", port), ("2001:db8:1::2", port),
                               vip="2001:0db8:00ff::0010", mode=mode,
                               snat_address=snat.upper())])
    assert (s.vip, [e.address for e in s.endpoints], s.snat_addr) == (VIP, [EPA, EPB], snat)
    assert s.mode == Mode(mode)
    assert str(s.key) == "tcp://[2001:db8:ff::10]:80"


@pytest.mark.parametrize("service,field,shown", [
    (msg((EPA, 8080), ("198.18.1.2", 8080)), "services[0].endpoints[1].address",
     "'198.18.1.2' is IPv4 but the vip '2001:db8:ff::10' is IPv6"),
    (msg((EPA, 8080), vip="198.19.0.10"), "services[0].endpoints[0].address",
     "'2001:db8:1::2' is IPv6 but the vip '198.19.0.10' is IPv4"),
    (msg((EPA, 8080), mode=tpb.MODE_FULLNAT, snat_address="198.18.9.1"),
     "services[0].snat_address", "is IPv4 but the vip"),
    (msg((EPA, 8080), port=8000, port_last=8099), "services[0].port_last",
     "an IPv6 service has one port"),
    (msg((EPA, 0), port=0), "services[0].port", "an IPv6 service has one port"),
    (msg((EPA, 8080), protocol=tpb.PROTOCOL_SCTP), "services[0].protocol",
     "PROTOCOL_SCTP services are IPv4 only"),
    (msg((EPA, 8080), vip="::1"), "services[0].vip", "not a usable unicast address"),
    (msg((EPA, 8080), vip="ff02::1"), "services[0].vip", "not a usable unicast address"),
    (msg(("::ffff:198.18.1.2", 8080)), "services[0].endpoints[0].address", "IPv4-mapped"),
    (msg((EPA, 8080), vip="2001:db8::" + "f" * 500), "services[0].vip",
     "is not an IPv6 address"),
])
def test_refusals_name_the_field_and_quote_a_short_prefix(service, field, shown):
    with pytest.raises(ValidationError) as err:
        parse_services([service])
    text = str(err.value)
    assert text.startswith(field + ":") and shown in text
    assert len(text) < 200  # the 500-character value is not echoed whole


def test_endpoints_listed_twice_in_two_spellings_are_refused():
    with pytest.raises(ValidationError, match=r"\[2001:db8:1::2\]:8080 is listed twice"):
        parse_service(msg((EPA, 8080), ("2001:db8:1:0:0:0:0:2", 8080)))


# -- the table over in-memory maps -----------------------------------------------------------

def settings(max_backends: int = 64) -> Settings:
    return Settings(name="v6", max_services=16, max_backends=max_backends, ct_size=64)


def spec6(n: int, vip: str = VIP, port: int = 80, **kw: Any) -> ServiceSpec:
    eps = tuple(EndpointSpec(f"2001:db8:1::{i + 1:x}", 8080, i % 3 + 1) for i in range(n))
    return ServiceSpec(vip, port, Proto.TCP, endpoints=eps, **kw)


def test_the_table_writes_what_the_codecs_pack_and_a_restart_reads_it_back():
    dp = MemoryDatapath(settings())
    t = ServiceTable(dp)
    abi = dp.abi
    specs = [spec6(3, algorithm=Algorithm.MAGLEV, persistence_s=30),
             spec6(2, port=443, mode=Mode.FULLNAT, snat_addr=SNAT),
             ServiceSpec("198.19.0.10", 80, Proto.TCP,
                         endpoints=(EndpointSpec("198.18.1.2", 8080),))]
    t.put(specs)
    val6, ep, ep6 = (abi.structs[n].codec for n in ("xlb_nat6_val", "xlb_ep", "xlb_ep6"))
    key6 = abi.structs["xlb_nat6_key"].codec
    entries = dict(t.entries())
    for s in specs[:2]:
        e = entries[s.key]
        raw = dp.maps["nat_v6_map"].get(key6.pack(vip=socket.inet_pton(socket.AF_INET6, s.vip),
                                                  port=s.port, proto=int(s.proto)))
        assert raw is not None
        sel = {"svc_id": e.svc_id, "algo": int(s.algorithm), "mode": int(s.mode), "flags": 0,
               "n_eps": len(s.endpoints), "n_slots": e.n_slots,
               "persist_s": s.persistence_s, "snat_addr": bytes(4), "ep_base": e.ep_base,
               "slot_base": e.slot_base}
        snat = socket.inet_pton(socket.AF_INET6, s.snat_addr) if s.snat_addr else bytes(16)
        assert raw == val6.pack(sel=sel, snat_addr=snat)
        for i, (endpoint, sid) in enumerate(zip(s.endpoints, e.ep_ids, strict=True)):
            at = (e.ep_base + i).to_bytes(4, "little")
            packed = socket.inet_pton(socket.AF_INET6, endpoint.address)
            assert dp.maps["ep6_map"].get(at) == ep6.pack(addr=packed)
            assert dp.maps["ep_map"].get(at) == ep.pack(
                addr=fold6(packed), port=endpoint.port, weight=endpoint.weight, stat_id=sid,
                flags=1, prio=0)
    assert dp.maps["nat_v4_map"].count() == 1 and dp.maps["vip_v4_map"].count() == 1
    again = ServiceTable(dp)  # a restarted dpd: the maps read back
    assert sorted(again.specs(), key=str) == sorted(specs, key=str)
    assert again.delete([specs[0].key, specs[1].key]) == 2
    assert dp.maps["nat_v6_map"].count() == 0 and len(again.specs()) == 1


def test_vip_v6_map_counts_the_services_of_each_v6_vip():
    """vip_v6_map (the datapath answers ICMPv6 echo to its addresses) follows the IPv6
    services of each VIP as vip_v4_map follows the IPv4 ones, also in a mixed batch; a
    restarted dpd makes it match its services again (a stale entry goes)."""
    dp = MemoryDatapath(settings())
    t = ServiceTable(dp)
    v6, v4 = dp.maps["vip_v6_map"], dp.maps["vip_v4_map"]

    def counts() -> dict[str, int]:
        return {socket.inet_ntop(socket.AF_INET6, k): int.from_bytes(v, "little")
                for k, v in v6.items()}

    other = "2001:db8:ff::20"
    a, b, c = spec6(1), spec6(1, port=443), spec6(1, vip=other)
    four = ServiceSpec("198.19.0.10", 80, Proto.TCP, endpoints=(EndpointSpec("198.18.1.2", 80),))
    t.put([a, b, c, four])
    assert counts() == {VIP: 2, other: 1} and v4.count() == 1
    t.delete([a.key, c.key])
    assert counts() == {VIP: 1}
    v6.put(socket.inet_pton(socket.AF_INET6, other), (1).to_bytes(4, "little"))  # stale
    ServiceTable(dp)
    assert counts() == {VIP: 1} and v4.count() == 1
    t.delete([b.key])
    assert counts() == {}

def test_fold6_is_the_xor_of_the_four_words():
    packed = socket.inet_pton(socket.AF_INET6, "2001:db8:1:2:3:4:5:6")
    words = [int.from_bytes(packed[i:i + 4], "big") for i in range(0, 16, 4)]
    assert int.from_bytes(fold6(packed), "big") == words[0] ^ words[1] ^ words[2] ^ words[3]


def test_a_full_ep_map_refuses_the_batch_and_writes_nothing():
    dp = MemoryDatapath(settings(max_backends=8))
    t = ServiceTable(dp)
    t.put([spec6(3)])
    before = {m: dict(dp.maps[m].items()) for m in ("nat_v6_map", "ep_map", "ep6_map")}
    with pytest.raises(Exhausted, match="ep_map|endpoints"):
        t.put([spec6(4), spec6(3, port=443)])  # 3 + 4 + 3 > 8
    assert {m: dict(dp.maps[m].items()) for m in before} == before
    assert t.specs() == [spec6(3)]


def test_a_changed_service_moves_to_fresh_runs_then_frees_the_old():
    dp = MemoryDatapath(settings())
    t = ServiceTable(dp)
    t.put([spec6(2)])
    (_, first), = t.entries()
    t.put([spec6(3)])
    (_, second), = t.entries()
    assert second.ep_base != first.ep_base and second.svc_id == first.svc_id
    held = t.held_selection(spec6(3).key)
    assert held is not None and set(held[0]) == {0, 1, 2}
    t.set_down({spec6(3).key: frozenset({("2001:db8:1::1", 8080)})})
    # health's record: not without a check; with one, endpoint 0 leaves the slots
    assert set(t.held_selection(spec6(3).key)[0]) == {0, 1, 2}  # type: ignore[index]
    hc = HealthSpec(HealthKind.TCP)
    t.put([spec6(3, health=hc)])
    t.set_down({spec6(3).key: frozenset({("2001:db8:1::1", 8080)})})
    assert set(t.held_selection(spec6(3).key)[0]) == {1, 2}  # type: ignore[index]


# -- dpd's API and metrics ------------------------------------------------------------------

@pytest.fixture
def dpd(sockdir: Path) -> Iterator[tuple[MemoryDatapathServicer, Any]]:
    servicer = MemoryDatapathServicer()
    with contextlib.closing(servicer), serve_datapath(sockdir, servicer) as stub:
        yield servicer, stub


def test_dpd_api_puts_lists_counts_and_filters_ipv6(dpd):
    servicer, stub = dpd
    stub.PutServices(pb.PutServicesRequest(services=[msg((EPB, 8080), (EPA, 8080))]), timeout=5)
    (got,) = stub.ListServices(pb.ListServicesRequest(), timeout=5)
    assert (got.vip, [e.address for e in got.endpoints]) == (VIP, [EPA, EPB])
    key = tpb.ServiceKey(vip="2001:db8:ff:0::10", port=80, protocol=tpb.PROTOCOL_TCP)
    (s,) = stub.GetStats(pb.GetStatsRequest(services=[key]), timeout=5).services
    assert (s.service.vip, len(s.endpoints)) == (VIP, 2)
    assert list(stub.ListConntrack(pb.ListConntrackRequest(service=key, client_address=EPA),
                                   timeout=5)) == []
    with pytest.raises(grpc.RpcError) as err:
        stub.FlushConntrack(pb.FlushConntrackRequest(endpoint_address="2001:db8::g"),
                            timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "endpoint_address" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.PutServices(pb.PutServicesRequest(services=[
            msg((EPA, 8080), port=443), msg(("198.18.1.2", 8080), port=444)]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "services[1].endpoints[0].address" in err.value.details()
    assert len(list(stub.ListServices(pb.ListServicesRequest(), timeout=5))) == 1
    stub.DeleteServices(pb.DeleteServicesRequest(keys=[key]), timeout=5)
    assert list(stub.ListServices(pb.ListServicesRequest(), timeout=5)) == []


def test_metrics_label_ipv6_services_and_endpoints_in_brackets():
    node = Node(MemoryDatapath(settings()), ct_aging_interval=0)
    e = Exporter("127.0.0.1:0")
    try:
        e.start([node])
        node.put_services([spec6(1)])
        (_, entry), = node.services.entries()
        put_counter(node, "svc_stats_map", entry.svc_id, [(2, 200), (1, 100)])
        put_counter(node, "ep_stats_map", entry.ep_ids[0], [(3, 30)])
        s = get(e)
        labels = {"node": "v6", "service": "[2001:db8:ff::10]:80/tcp"}
        assert value(s, "xlb_dpd_service_packets_total", **labels) == 3
        assert value(s, "xlb_dpd_endpoint_packets_total",
                     endpoint="[2001:db8:1::1]:8080", **labels) == 3
        assert value(s, "xlb_dpd_map_entries", node="v6", map="nat_v6_map",
                     type="hash") == 1
        assert value(s, "xlb_dpd_map_entries", node="v6", map="nat_v4_map",
                     type="hash") == 0
    finally:
        e.stop()
        node.close()


# -- policyd and xlbctl ---------------------------------------------------------------------

def test_xlbctl_applies_an_ipv6_service_through_policyd_onto_a_node(capsys, policyd,
                                                                     fake_node, tmp_path):
    from policyd import cli

    node = fake_node("a").start()
    server = policyd()
    base = ["--server", server.address]
    assert cli.main([*base, "node", "register", "a", node.address]) == 0
    assert cli.main([*base, "service", "apply", "--name", "web6", "--vip", "2001:DB8:ff::10",
                     "--port", "80", "--endpoint", f"[{EPA}]:8080",
                     "--endpoint", f"[{EPB}]:8080@3"]) == 0
    doc = tmp_path / "dns6.yaml"
    doc.write_text(f"""kind: Service
metadata: {{name: dns6}}
spec:
  vip: "{VIP}"
  port: 53
  protocol: PROTOCOL_UDP
  mode: MODE_FULLNAT
  snat_address: "{SNAT}"
  endpoints: [{{address: "{EPA}", port: 5353}}]
""")
    assert cli.main([*base, "apply", "-f", str(doc)]) == 0
    assert cli.main([*base, "status", "a", "--wait", "--timeout", "10"]) == 0
    web, dns = sorted(node.datapath.ListServices(pb.ListServicesRequest(), None),
                      key=lambda s: -s.port)
    assert (web.vip, web.port, web.mode) == (VIP, 80, tpb.MODE_DNAT)
    assert [(e.address, e.weight) for e in web.endpoints] == [(EPA, 1), (EPB, 3)]
    assert (dns.port, dns.mode, dns.snat_address) == (53, tpb.MODE_FULLNAT, SNAT)
    # the same key spelled otherwise is the same service (store's uniqueness)
    assert cli.main([*base, "service", "apply", "--name", "other", "--vip",
                     "2001:db8:ff:0:0:0:0:10", "--port", "80",
                     "--endpoint", f"[{EPA}]:8080"]) != 0
    # a mixed-family service is refused by policyd, naming the field
    assert cli.main([*base, "service", "apply", "--name", "bad", "--vip", VIP, "--port",
                     "81", "--endpoint", "198.18.1.2:8080"]) != 0
    err = capsys.readouterr().err
    assert "endpoints[0].address" in err and "is IPv4 but the vip" in err
    assert cli.main([*base, "get", "services"]) == 0
    out = capsys.readouterr().out
    assert f"[{EPA}]:8080@1,[{EPB}]:8080@3" in out
    assert cli.main(["--dpd", node.address, "services"]) == 0
    out = capsys.readouterr().out
    assert "[2001:db8:ff::10]:80" in out
    # an address without brackets is ambiguous: xlbctl says how to write it
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "service", "apply", "--name", "x", "--vip", VIP, "--port", "82",
                  "--endpoint", f"{EPA}:8080"])
    assert exit_.value.code == 2
    assert "an IPv6 address goes in brackets" in capsys.readouterr().err


# -- health probes of IPv6 endpoints (::1) --------------------------------------------------

def test_tcp_http_udp_and_icmpv6_probes_of_ipv6_endpoints():
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen(16)
    closed = socket.socket(socket.AF_INET6)
    closed.bind(("::1", 0))  # bound, not listening: refused

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.headers["Host"] == "[::1]" else 400)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    httpd = Server6(("::1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))

    def answer() -> None:
        while True:
            try:
                data, peer = udp.recvfrom(100)
            except OSError:
                return
            udp.sendto(b"pong " + data, peer)

    threading.Thread(target=answer, daemon=True).start()
    fast = {"interval_ms": 50, "timeout_ms": 50, "rise": 1, "fall": 2}

    def svc(port: int, h: HealthSpec, *eps: int) -> ServiceSpec:
        return ServiceSpec(VIP, port, Proto.TCP, endpoints=tuple(
            EndpointSpec("::1", p) for p in eps), health=h)

    tcp = svc(1, HealthSpec(HealthKind.TCP, **fast), listener.getsockname()[1],
              closed.getsockname()[1])
    web = svc(2, HealthSpec(HealthKind.HTTP, http_path="/", http_status=200, **fast),
              httpd.server_address[1])
    dgram = svc(3, HealthSpec(HealthKind.UDP, udp_request=b"ping", udp_expect=b"pong",
                              **fast), udp.getsockname()[1])
    echo = svc(4, HealthSpec(HealthKind.ICMP, **fast), 80)
    m = HealthMonitor(Applied())
    try:
        m.start()
        m.update([tcp, web, dgram, echo])
        want = {tcp.key: [State.UP, State.DOWN] if tcp.endpoints[0].port ==
                listener.getsockname()[1] else [State.DOWN, State.UP],
                web.key: [State.UP], dgram.key: [State.UP], echo.key: [State.UP]}
        for key, states in want.items():
            assert wait_states(m, key, states) == states, (key, m.status(key))
        assert re.search("refused", "".join(h.reason for h in m.status(tcp.key)), re.I)
    finally:
        m.stop()
        httpd.shutdown()
        httpd.server_close()
        udp.close()
        listener.close()
        closed.close()
