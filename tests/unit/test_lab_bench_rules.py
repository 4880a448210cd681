"""Pure-Python parts of bench/: service sets, kube-proxy-style rule text, wrk parsing."""

from __future__ import annotations

import ipaddress

from bench.rulesets import iptables_restore_text, nft_text
from bench.services import Endpoint, filler_services, service_set
from bench.targets import TARGETS
from bench.wrk import parse

BENCH_NET = ipaddress.ip_network("198.18.0.0/15")
BACKENDS = [Endpoint("198.18.1.2", 80), Endpoint("198.18.2.2", 80)]


def test_service_set_measured_last_and_all_in_bench_range() -> None:
    svcs = service_set(20_001, "198.19.0.10", 80, BACKENDS)
    assert len(svcs) == 20_001
    assert svcs[-1].vip == "198.19.0.10" and svcs[-1].endpoints == tuple(BACKENDS)
    keys = {(s.vip, s.port, s.proto) for s in svcs}
    assert len(keys) == len(svcs)
    for s in svcs[::997] + svcs[-2:]:
        assert ipaddress.ip_address(s.vip) in BENCH_NET
        for ep in s.endpoints:
            assert ipaddress.ip_address(ep.ip) in BENCH_NET
    assert all(len(s.endpoints) == 4 for s in filler_services(10))


def test_iptables_text_kube_proxy_shape() -> None:
    text = iptables_restore_text(service_set(3, "198.19.0.10", 80, BACKENDS))
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    svc_rules = [x for x in lines if x.startswith("-A KUBE-SERVICES")]
    assert len(svc_rules) == 3 and "-d 198.19.0.10/32" in svc_rules[-1]
    probs = [x for x in lines if "--probability" in x]
    assert any("--probability 0.25000000000" in x for x in probs)  # 4 fake endpoints
    assert any("--probability 0.50000000000" in x for x in probs)
    assert sum("--to-destination 198.18.1.2:80" in x for x in lines) == 1
    assert sum(x.startswith(":KUBE-SEP-") for x in lines) == 2 * 4 + 2


def test_nft_text_kube_proxy_shape() -> None:
    text = nft_text(service_set(2, "198.19.0.10", 80, BACKENDS))
    assert "ip daddr . meta l4proto . th dport vmap @service-ips" in text
    assert "numgen random mod 2 vmap" in text and "numgen random mod 4 vmap" in text
    assert "198.19.0.10 . tcp . 80 : goto service-" in text
    assert "dnat to 198.18.2.2:80" in text


WRK_OUT = """Running 2s test @ http://198.19.0.10:80/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   219.80us  150.00us   5.00ms   90.00%
    Req/Sec    40.00k     1.00k   42.00k    70.00%
  Latency Distribution
     50%  180.00us
     75%  250.00us
     90%  350.00us
     99%    1.20ms
  80000 requests in 2.00s, 11.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  39990.50
Transfer/sec:      5.50MB
"""


def test_wrk_parse() -> None:
    r = parse(WRK_OUT)
    assert r.rps == 39990.50 and r.requests == 80000 and r.errors == 6
    assert r.p50_ms is not None and abs(r.p50_ms - 0.18) < 1e-9
    assert r.p99_ms is not None and abs(r.p99_ms - 1.2) < 1e-9


def test_baseline_targets_registered() -> None:
    assert {"plain", "iptables", "nftables"} <= set(TARGETS)
    assert not TARGETS["plain"].uses_vip and TARGETS["nftables"].control_plane
