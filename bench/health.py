"""What dpd's prober costs: N services x E endpoints, each its own target, TCP checks on
the loopback (a listening port: UP; every other endpoint a closed port: refused, DOWN),
run for a while by one HealthMonitor (dpd/health.py) with the service writes stubbed.

    .venv/bin/python -m bench.health                         # 10,000 x 4 at 1 s and 10 s
    .venv/bin/python -m bench.health --services 1000 --interval-ms 200 --seconds 5

Reports probes per second done against asked for, CPU of the process per probe and in
cores, deferred starts (probes started more than a tenth of their interval late) and
the memory the targets hold.
No root needed.
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import time
import tracemalloc

from dpd.health import HealthMonitor
from xlbcore.logs import configure_logging
from xlbcore.service import EndpointSpec, HealthKind, HealthSpec, Proto, ServiceSpec


def _services(n: int, eps: int, port_open: int, port_closed: int,
              interval_ms: int) -> list[ServiceSpec]:
    check = HealthSpec(HealthKind.TCP, interval_ms=interval_ms,
                       timeout_ms=min(interval_ms, 1000), rise=2, fall=3)
    out = []
    for i in range(n):
        endpoints = tuple(EndpointSpec(f"127.{1 + (i * eps + j) // 65536 % 250}."
                                       f"{(i * eps + j) // 256 % 256}.{(i * eps + j) % 256 or 1}",
                                       port_open if j == 0 else port_closed)
                          for j in range(eps))
        out.append(ServiceSpec(f"198.19.{i // 250}.{1 + i % 250}", 80, Proto.TCP,
                               endpoints=endpoints, health=check))
    return out


def run(services: int, endpoints: int, interval_ms: int, seconds: float) -> dict[str, float]:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(4096)
    listener.setblocking(False)
    port_open = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port_closed = closed.getsockname()[1]
    specs = _services(services, endpoints, port_open, port_closed, interval_ms)
    tracemalloc.start()
    m = HealthMonitor(lambda changes: len(changes))
    m.update(specs)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    m.start()
    t0, c0 = time.monotonic(), time.process_time()
    end = t0 + seconds
    try:
        while time.monotonic() < end:
            try:  # accept and drop the connections of the UP endpoints
                while True:
                    conn, _ = listener.accept()
                    conn.close()
            except BlockingIOError:
                time.sleep(0.005)
    finally:
        m.stop()
        listener.close()
        closed.close()
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    c = m.counters
    return {"targets": m.targets(), "asked_per_s": m.targets() / (interval_ms / 1000),
            "done_per_s": c.probes / wall, "cpu_cores": cpu / wall,
            "cpu_us_per_probe": cpu / max(c.probes, 1) * 1e6, "deferred": c.deferred,
            "targets_mib": held / 2**20,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.health", description=__doc__)
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--endpoints", type=int, default=4)
    p.add_argument("--interval-ms", type=int, nargs="+", default=[10_000, 1_000])
    p.add_argument("--seconds", type=float, default=12.0)
    args = p.parse_args()
    configure_logging("kv", "warning", stream=sys.stderr)  # not an event per endpoint
    out = sys.stdout.write
    out(f"prober: {args.services:,} services x {args.endpoints} endpoints, TCP checks on "
        "the loopback (one endpoint per service listening, the others refused)\n")
    out("| interval | targets | probes/s asked | probes/s done | CPU (cores) | "
        "CPU us/probe | deferred | targets MiB | max RSS MiB |\n")
    out("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for interval in args.interval_ms:
        r = run(args.services, args.endpoints, interval, args.seconds)
        out(f"| {interval} ms | {r['targets']:,.0f} | {r['asked_per_s']:,.0f} | "
            f"{r['done_per_s']:,.0f} | {r['cpu_cores']:.2f} | {r['cpu_us_per_probe']:.0f} | "
            f"{r['deferred']:,.0f} | {r['targets_mib']:.1f} | {r['max_rss_mib']:.0f} |\n")


if __name__ == "__main__":
    main()
