"""Firewall rules and routes through policyd onto simulated nodes: time to all SYNCED for a
bulk apply, one rule change and one route change to all SYNCED (p50 / p99), policyd's CPU
at rest (drift checks only).

    .venv/bin/python -m bench.policyd_objects --nodes 20 --rules 1000 --routes 100

Nodes are simulated dpd (``xlb-dpd --datapath memory --simulate N``: dpd's real API,
tables and validation over in-memory maps); policyd runs with its defaults except
--resync-interval.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog

from lab.daemons import Daemon, Policyd
from policyd.client import PolicyClient, is_synced, make_route, make_rule

log = structlog.get_logger()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_all(client: PolicyClient, generation: int, timeout: float = 120.0) -> float:
    """Seconds until every node is SYNCED at `generation` or later."""
    start = time.perf_counter()
    while not is_synced(client.sync_status(), generation=generation):
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"not synced at {generation} after {timeout}s")
        time.sleep(0.002)
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--rules", type=int, default=1000)
    p.add_argument("--routes", type=int, default=100)
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--rest", type=float, default=10.0, help="seconds measured at rest")
    p.add_argument("--resync-interval", type=float, default=10.0)
    p.add_argument("--per-process", type=int, default=0,
                   help="simulated nodes per dpd process (default: all in one; a process "
                        "serves its nodes' calls one after another, as one Python process)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xlb-bobj-"))
    per = args.per_process or args.nodes
    dpds = [Daemon([sys.executable, "-m", "dpd.main", "--name", f"sim{first}", "--datapath",
                    "memory", "--simulate", str(min(per, args.nodes - first)), "--listen",
                    f"unix:{work}/g{first}-{{i}}.sock", "--log-level", "warning"],
                   f"unix:{work}/g{first}-0.sock", work / f"dpd{first}.log")
            for first in range(0, args.nodes, per)]
    addresses = [f"unix:{work}/g{first}-{i}.sock" for first in range(0, args.nodes, per)
                 for i in range(min(per, args.nodes - first))]
    policyd = Policyd(work, resync_interval=args.resync_interval,
                      extra=["--log-level", "warning"])
    try:
        for dpd in dpds:
            dpd.start()
        policyd.start()
        assert policyd.proc is not None
        with PolicyClient(policyd.address, timeout=60) as client:
            for i, address in enumerate(addresses):
                client.register_node(f"n{i}", address)
            wait_all(client, client.sync_status().generation)
            rules = [make_rule(f"r{i}", "drop" if i % 2 else "allow", i % 1000,
                               src=f"198.18.{i // 250}.{i % 250}", protocol="tcp",
                               dst_ports=str(1000 + i % 5000)) for i in range(args.rules)]
            routes = [make_route(f"rt{i}", f"198.{20 + i // 65536}.{i // 256 % 256}.{i % 256}/32",
                                 ["198.18.1.1", "198.18.2.1,weight=2"])
                      for i in range(args.routes)]
            t0 = time.perf_counter()
            client.apply_rules(rules)
            generation = client.apply_routes(routes).generation
            wait_all(client, generation)
            bulk = time.perf_counter() - t0
            rule_s, route_s = [], []
            for i in range(args.changes):
                t = time.perf_counter()
                g = client.apply_rule(make_rule(f"r{i}", "drop", 5000 + i, protocol="udp")
                                      ).revision
                wait_all(client, g)
                rule_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                g = client.apply_route(make_route(f"rt{i % max(1, args.routes)}",
                                                  f"198.30.{i}.0/24", ["198.18.3.1"])).revision
                wait_all(client, g)
                route_s.append(time.perf_counter() - t)
            before = cpu_seconds(policyd.proc.pid)
            time.sleep(args.rest)
            rest = (cpu_seconds(policyd.proc.pid) - before) / args.rest
        print("| nodes | rules | routes | bulk apply -> all SYNCED | one rule change p50 / p99 "  # noqa: T201
              f"| one route change p50 / p99 | policyd CPU at rest (resync "
              f"{args.resync_interval:g} s) |")
        print("|---|---|---|---|---|---|---|")  # noqa: T201
        print(f"| {args.nodes} | {args.rules} | {args.routes} | {bulk:.2f} s "  # noqa: T201
              f"| {statistics.median(rule_s) * 1e3:.0f} / {pct(rule_s, 0.99) * 1e3:.0f} ms "
              f"| {statistics.median(route_s) * 1e3:.0f} / {pct(route_s, 0.99) * 1e3:.0f} ms "
              f"| {rest * 100:.1f} % of a core |")
    finally:
        policyd.stop()
        for dpd in dpds:
            dpd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
