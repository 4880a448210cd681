"""xlb-only measurements of issue 3: one change's latency from the API call to the first
packet forwarded by it, and resident memory of dpd and policyd holding many services;
and the time of one Prometheus scrape of a dpd holding many services."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc

from bench.services import Endpoint, ServiceSpec, filler_services
from bench.target_xlb import BIG, dpd_service, policy_service, start_dpd, wait_synced
from lab import netns
from lab.daemons import Dpd, Policyd
from lab.topology import Topology
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.dpd.v1 import datapath_pb2_grpc as dgrpc
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.policy.v1 import policy_pb2_grpc as pgrpc
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.metrics import scrape

CHANGE_VIP = "198.19.200.1"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def map_mb(path: str) -> float:
    out = subprocess.run(["bpftool", "-j", "map", "show", "pinned", path],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out).get("bytes_memlock", 0)) / 2**20


def apply_all(policy: pgrpc.PolicyStub, specs: list[ServiceSpec]) -> int:
    """ApplyServices in chunks of 20,000; returns the last generation."""
    gen = 0
    for k in range(0, len(specs), 20_000):
        reply = policy.ApplyServices(ppb.ApplyServicesRequest(
            services=[policy_service(k + i, s) for i, s in enumerate(specs[k:k + 20_000])]),
            timeout=600)
        gen = reply.generation
    return gen


def _one_change(topo: Topology, port: int, apply: Callable[[int], None]) -> float:
    """Latency (ms) from calling `apply(port)` to the first connect through CHANGE_VIP:port."""
    probe = topo.popen(topo.client_ns, [sys.executable, "-m", "bench.probe", CHANGE_VIP,
                                        str(port), "10"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=netns.python_env())
    assert probe.stdin is not None and probe.stdout is not None
    try:
        if probe.stdout.readline().strip() != "ready":
            raise RuntimeError("probe did not start")
        probe.stdin.write("go\n")
        probe.stdin.flush()
        t0 = time.monotonic_ns()
        apply(port)
        line = probe.stdout.readline().strip()
        probe.wait(timeout=15)
    finally:
        topo.stop(probe)
    if not line.isdigit():
        raise RuntimeError(f"change on port {port} never carried traffic ({line!r})")
    return (int(line) - t0) / 1e6


def change_latency(topo: Topology, backends: list[Endpoint], changes: int,
                   fillers: int) -> dict[str, list[float]]:
    """`changes` new services, each measured alone, on a node already holding `fillers`."""
    specs = filler_services(fillers)
    out: dict[str, list[float]] = {"dpd": [], "policyd": []}
    # Until a change lands the lb node answers each probe SYN with an ICMP unreachable;
    # without the rate limit every probe fails at once, so the first success is timely.
    netns.sysctl(topo.lb_ns, {"net.ipv4.icmp_ratelimit": 0,
                              "net.ipv4.icmp_msgs_per_sec": 1_000_000,
                              "net.ipv4.icmp_msgs_burst": 1_000_000})
    dpd = start_dpd(topo, fillers + 2 * changes + 16)
    policyd = None
    try:
        with grpc.insecure_channel(dpd.address) as dch:
            dstub = dgrpc.DatapathStub(dch)
            for k in range(0, len(specs), 5000):
                dstub.PutServices(dpb.PutServicesRequest(
                    services=[dpd_service(s) for s in specs[k:k + 5000]]), timeout=300)

            def put(port: int) -> None:
                dstub.PutServices(dpb.PutServicesRequest(services=[dpb.Service(
                    vip=CHANGE_VIP, port=port, protocol=tpb.PROTOCOL_TCP,
                    endpoints=[tpb.Endpoint(address=b.ip, port=b.port) for b in backends])]),
                    timeout=10)

            for i in range(changes):
                out["dpd"].append(_one_change(topo, 20000 + i, put))

            # through policyd: it first takes over the node's fillers, then applies changes
            policyd = Policyd(topo.workdir, db=topo.workdir / "latency-policyd.db",
                              resync_interval=30.0).start()
            with grpc.insecure_channel(policyd.address, options=BIG) as pch:
                policy = pgrpc.PolicyStub(pch)
                apply_all(policy, specs)
                policy.RegisterNode(ppb.RegisterNodeRequest(
                    node=ppb.Node(name="bench", address=dpd.address)), timeout=10)
                wait_synced(policy, 1, 600)

                def apply(port: int) -> None:
                    policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
                        name=f"change-{port}", vip=CHANGE_VIP, port=port,
                        protocol=tpb.PROTOCOL_TCP,
                        endpoints=[tpb.Endpoint(address=b.ip, port=b.port)
                                   for b in backends])), timeout=10)

                for i in range(changes):
                    out["policyd"].append(_one_change(topo, 30000 + i, apply))
    finally:
        if policyd is not None:
            policyd.stop()
            (topo.workdir / "latency-policyd.db").unlink(missing_ok=True)
        dpd.cleanup()
    return out


def memory(topo: Topology, counts: list[int]) -> list[dict[str, Any]]:
    """RSS of dpd and policyd, and kernel memory of nat_v4_map, holding `counts` services
    (4 endpoints each) programmed through policyd; and how long dpd takes from its start
    to serving: the first start (compiles) and a restart holding the services (reuses
    the pinned programs)."""
    rows = []
    for count in counts:
        specs = filler_services(count)
        t0 = time.monotonic()
        dpd = start_dpd(topo, count)
        first_start = time.monotonic() - t0
        policyd = Policyd(topo.workdir, db=topo.workdir / "mem-policyd.db",
                          resync_interval=30.0).start()
        try:
            with grpc.insecure_channel(policyd.address, options=BIG) as pch:
                policy = pgrpc.PolicyStub(pch)
                policy.RegisterNode(ppb.RegisterNodeRequest(
                    node=ppb.Node(name="bench", address=dpd.address)), timeout=10)
                wait_synced(policy, apply_all(policy, specs), 1800)
            assert dpd.proc is not None and policyd.proc is not None
            row = {
                "services": count,
                "dpd_rss_mb": rss_mb(dpd.proc.pid),
                "policyd_rss_mb": rss_mb(policyd.proc.pid),
                "nat_map_mb": map_mb(f"{dpd.bpf_root}/bench/nat_v4_map"),
                "dpd_first_start_s": first_start,
            }
            dpd.stop()
            t0 = time.monotonic()
            dpd.start()
            row["dpd_restart_s"] = time.monotonic() - t0
            rows.append(row)
        finally:
            policyd.stop()
            (topo.workdir / "mem-policyd.db").unlink(missing_ok=True)
            dpd.cleanup()
    return rows


def scrape_time(topo: Topology, count: int, scrapes: int = 10) -> dict[str, Any]:
    """GET /metrics of a kernel dpd holding `count` services x 4 endpoints (--metrics on a
    unix socket): the first scrape (renders every label set) and the following ones, in
    ms from the request to the last byte, with the exposition's size."""
    specs = filler_services(count)
    sock = topo.workdir / "dpd-metrics.sock"
    size = max(16, count)
    dpd = Dpd("bench", topo.lb_ns, topo.lb_ifaces, topo.workdir,
              extra=["--max-services", str(size), "--max-backends", str(8 * size),
                     "--log-level", "warning", "--metrics", f"unix:{sock}"]).start()
    try:
        with grpc.insecure_channel(dpd.address, options=BIG) as dch:
            dstub = dgrpc.DatapathStub(dch)
            for k in range(0, len(specs), 5000):
                dstub.PutServices(dpb.PutServicesRequest(
                    services=[dpd_service(s) for s in specs[k:k + 5000]]), timeout=300)
        times = []
        text = ""
        for _ in range(scrapes + 1):
            t0 = time.perf_counter()
            text = scrape(f"unix:{sock}", timeout=60)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        dpd.cleanup()
    steady = sorted(times[1:])
    return {"services": count, "endpoints_per_service": 4, "first_ms": times[0],
            "p50_ms": steady[len(steady) // 2], "max_ms": steady[-1], "scrapes": len(steady),
            "series": sum(1 for line in text.splitlines() if line and line[0] != "#"),
            "bytes": len(text.encode())}
