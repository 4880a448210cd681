"""Reconcile at scale: one policyd, N dpd nodes, 10,000 services x 4 endpoints.

    .venv/bin/python -m bench.cluster --nodes 20 50 100 200           # simulated nodes
    .venv/bin/python -m bench.cluster --nodes 1 20 --per-process 1    # one dpd process each

With ``--datapath kernel`` every node is a real xlb-dpd (eBPF maps in the kernel) in
its own network namespace (198.18.0.0/15 is never touched: nothing is attached). Else
nodes are simulated dpd (``xlb-dpd --datapath memory``: dpd's real API, tables and
validation over in-memory maps, no kernel): ``--per-process`` nodes share one process
(each with its own gRPC server on its own unix socket), so hundreds fit on a 2-core
machine. policyd runs as its own process with its defaults (resync 10 s, rpc timeout
10 s), so its CPU and memory are measured alone (/proc).

For each node count it measures: 10k services applied (one ApplyServices) -> every node
SYNCED; one change (an endpoint weight) -> every node SYNCED, ``--changes`` times (p50 /
p99); policyd CPU (% of one core) and RSS over ``--rest`` seconds with nothing changing;
and with ``--kill K``: K node processes killed, a change -> the others SYNCED, and each
killed node from its own first health answer after the restart to SYNCED (a simulated
node comes back empty and is refilled; a kernel node keeps its pinned maps and is read
back, then gets the change it missed).
Results go to stdout and, with ``--out``, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.services import filler_services
from bench.xlb_phases import rss_mb
from policyd.client import PolicyClient
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2

PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")


def say(text: str = "", flush: bool = True) -> None:
    sys.stdout.write(text + "\n")
    if flush:
        sys.stdout.flush()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def policy_services(count: int, endpoints: int) -> list[policy_pb2.Service]:
    out = []
    for s in filler_services(count, endpoints):
        out.append(policy_pb2.Service(
            name=s.name.replace("/", "-"), vip=s.vip, port=s.port,
            protocol=types_pb2.PROTOCOL_TCP,
            endpoints=[types_pb2.Endpoint(address=e.ip, port=e.port, weight=1)
                       for e in s.endpoints]))
    return out


@dataclass
class Row:
    nodes: int
    services: int
    per_process: int
    apply_s: float = 0.0
    change_p50_ms: float = 0.0
    change_p99_ms: float = 0.0
    changes: int = 0
    rest_cpu_pct: float = 0.0
    rest_rss_mib: float = 0.0
    apply_cpu_s: float = 0.0
    apply_dpd_cpu_s_per_node: float = 0.0  # dpd processes' CPU during the 10k apply / nodes
    dpd_rss_mib_per_node: float = 0.0
    killed: int = 0
    healthy_change_ms: float = 0.0
    back_synced_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    datapath: str = "memory"


class Cluster:
    def __init__(self, workdir: Path, nodes: int, per_process: int, dpd_args: list[str],
                 kernel: bool = False) -> None:
        self.workdir = workdir
        self.kernel = kernel
        self.bpf_root = str(workdir / "bpf")
        self.namespaces: list[str] = []
        if kernel:
            per_process = 1
        self.per_process = per_process
        self.groups: list[tuple[int, list[str]]] = []  # (first node index, names)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.dpd_args = dpd_args
        self.addresses: dict[str, str] = {}
        for first in range(0, nodes, per_process):
            names = [f"n{i}" for i in range(first, min(nodes, first + per_process))]
            self.groups.append((first, names))
            for i, name in enumerate(names):
                self.addresses[name] = f"unix:{workdir}/g{first}-{i}.sock"

    def _kernel_argv(self, g: int) -> list[str]:
        first, _ = self.groups[g]
        ns = f"xlbbc{os.getpid() % 10000}-{first}"
        return [PY, "-m", "dpd.main", "--name", f"g{first}", "--netns", ns,
                "--bpf-root", self.bpf_root, "--ct-aging-interval", "0"]

    def start_group(self, g: int) -> None:
        first, names = self.groups[g]
        log = open(self.workdir / f"dpd-g{first}.log", "ab")  # noqa: SIM115
        if self.kernel:
            from lab import netns

            argv = self._kernel_argv(g)
            ns = argv[argv.index("--netns") + 1]
            if not netns.exists(ns):
                netns.create(ns)
                self.namespaces.append(ns)
            self.procs[g] = subprocess.Popen(
                [*argv, "--listen", f"unix:{self.workdir}/g{first}-0.sock",
                 "--log-level", "warning", *self.dpd_args],
                stdout=log, stderr=log, env=netns.python_env())
            return
        self.procs[g] = subprocess.Popen(
            [PY, "-m", "dpd.main", "--datapath", "memory", "--name", f"g{first}",
             "--simulate", str(len(names)), "--listen", f"unix:{self.workdir}/g{first}-{{i}}.sock",
             "--log-level", "warning", *self.dpd_args],
            stdout=log, stderr=log)

    def wait_serving(self, names: list[str], timeout: float = 120.0,
                     seen: dict[str, float] | None = None) -> dict[str, float]:
        """When (time.monotonic()) each of `names` first answered a health check; each
        is recorded in `seen` as soon as it answers."""
        end = time.monotonic() + timeout
        seen = {} if seen is None else seen
        # grpc waits its reconnect backoff (1 s at first) between tries on a channel that
        # failed to connect: keep it short, or a node is seen serving up to 1 s late
        fast = [("grpc.initial_reconnect_backoff_ms", 5), ("grpc.min_reconnect_backoff_ms", 5),
                ("grpc.max_reconnect_backoff_ms", 10)]
        channels = {n: grpc.insecure_channel(self.addresses[n], options=fast) for n in names}
        try:
            while len(seen) < len(names):
                for n, ch in channels.items():
                    if n in seen:
                        continue
                    try:
                        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=0.2)
                        seen[n] = time.monotonic()
                    except grpc.RpcError:
                        pass
                if time.monotonic() > end:
                    raise TimeoutError(f"nodes not serving: {sorted(set(names) - set(seen))}")
                time.sleep(0.005)
        finally:
            for ch in channels.values():
                ch.close()
        return seen

    def kill_group(self, g: int) -> None:
        p = self.procs.pop(g)
        p.kill()
        p.wait()

    def stop(self) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self.kernel:
            from lab import netns

            for g in range(len(self.groups)):
                subprocess.run([*self._kernel_argv(g), "--cleanup"], capture_output=True,
                               env=netns.python_env(), timeout=60, check=False)
            for ns in self.namespaces:
                netns.delete(ns)
            if os.path.ismount(self.bpf_root):
                subprocess.run(["umount", self.bpf_root], check=False)

    def dpd_rss(self) -> float:
        return sum(rss_mb(p.pid) for p in self.procs.values())

    def dpd_cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs.values())


def wait_all(client: PolicyClient, names: list[str], generation: int, timeout: float,
             poll: float = 0.002) -> float:
    """Seconds until every one of `names` is SYNCED at `generation` or later."""
    start = time.monotonic()
    end = start + timeout
    want = set(names)
    while True:
        st = client.sync_status()
        ok = {n.node for n in st.nodes if n.state == policy_pb2.SYNC_STATE_SYNCED
              and n.observed_generation >= generation}
        if want <= ok:
            return time.monotonic() - start
        if time.monotonic() > end:
            raise TimeoutError(f"{len(want - ok)} of {len(want)} nodes not SYNCED after "
                               f"{timeout:g}s")
        time.sleep(poll)


def run(n: int, args: argparse.Namespace, services: list[policy_pb2.Service]) -> Row:
    per = max(1, args.per_process if args.per_process else (1 if n <= 20 else 25))
    row = Row(n, len(services), per, datapath=args.datapath)
    workdir = Path(tempfile.mkdtemp(prefix="xlb-bc-", dir="/tmp"))
    kernel = args.datapath == "kernel"
    if kernel:
        per = row.per_process = 1
    cluster = Cluster(workdir, n, per, ["--max-services", "16384", "--max-backends", "65536",
                                        "--ct-size", "1024"], kernel=kernel)
    policyd = None
    client = None
    try:
        for g in range(len(cluster.groups)):
            cluster.start_group(g)
        cluster.wait_serving(list(cluster.addresses), timeout=600)
        plog = open(workdir / "policyd.log", "ab")  # noqa: SIM115
        policyd = subprocess.Popen(
            [PY, "-m", "policyd.main", "--listen", f"unix:{workdir}/policyd.sock",
             "--db", str(workdir / "policyd.db"), "--log-level", args.policyd_log_level],
            stdout=plog, stderr=plog)
        client = PolicyClient(f"unix:{workdir}/policyd.sock", timeout=60)
        client.wait_ready(30)
        for name, address in cluster.addresses.items():
            client.register_node(name, address)
        names = list(cluster.addresses)
        wait_all(client, names, client.sync_status().generation, 120)

        # 10k applied -> all SYNCED
        cpu0 = cpu_seconds(policyd.pid)
        dpd0 = cluster.dpd_cpu()
        t0 = time.monotonic()
        reply = client.apply_services(services)
        gen = reply.generation  # the store's revision after the batch
        wait_all(client, names, gen, 600, poll=0.02)
        row.apply_s = round(time.monotonic() - t0, 3)
        row.apply_cpu_s = round(cpu_seconds(policyd.pid) - cpu0, 2)
        row.apply_dpd_cpu_s_per_node = round((cluster.dpd_cpu() - dpd0) / n, 3)
        say(f"  {n} nodes: 10k applied -> all SYNCED in {row.apply_s:.2f} s "
              f"(policyd CPU {row.apply_cpu_s:.1f} s, dpd CPU "
              f"{row.apply_dpd_cpu_s_per_node:.2f} s per node)", flush=True)
        time.sleep(1.0)

        # one change -> all SYNCED
        lat = []
        base = services[len(services) // 2]
        for i in range(args.changes):
            svc = policy_pb2.Service()
            svc.CopyFrom(base)
            svc.endpoints[0].weight = 2 + i % 50
            t0 = time.monotonic()
            stored = client.apply(svc)
            wait_all(client, names, stored.revision, 60)
            lat.append((time.monotonic() - t0) * 1000)
            time.sleep(args.change_gap)
        row.changes = len(lat)
        row.change_p50_ms = round(statistics.median(lat), 1)
        row.change_p99_ms = round(pct(lat, 0.99), 1)
        say(f"  {n} nodes: one change -> all SYNCED p50 {row.change_p50_ms} ms, "
              f"p99 {row.change_p99_ms} ms", flush=True)

        # at rest
        cpu0, t0 = cpu_seconds(policyd.pid), time.monotonic()
        time.sleep(args.rest)
        row.rest_cpu_pct = round(100 * (cpu_seconds(policyd.pid) - cpu0)
                                 / (time.monotonic() - t0), 2)
        row.rest_rss_mib = round(rss_mb(policyd.pid), 1)
        row.dpd_rss_mib_per_node = round(cluster.dpd_rss() / n, 1)
        say(f"  {n} nodes at rest: policyd CPU {row.rest_cpu_pct} % of a core, "
              f"RSS {row.rest_rss_mib} MiB; dpd {row.dpd_rss_mib_per_node} MiB/node",
              flush=True)

        if args.kill and len(cluster.groups) > args.kill:
            killed_groups = list(range(len(cluster.groups)))[-args.kill:]
            killed = [nm for g in killed_groups for nm in cluster.groups[g][1]]
            for g in killed_groups:
                cluster.kill_group(g)
            row.killed = len(killed)
            healthy = [nm for nm in names if nm not in killed]
            time.sleep(0.5)
            svc = policy_pb2.Service()
            svc.CopyFrom(base)
            svc.endpoints[0].weight = 99
            t0 = time.monotonic()
            stored = client.apply(svc)
            wait_all(client, healthy, stored.revision, 60)
            row.healthy_change_ms = round((time.monotonic() - t0) * 1000, 1)
            say(f"  {len(killed)} of {n} killed: healthy {len(healthy)} SYNCED after a "
                  f"change in {row.healthy_change_ms} ms", flush=True)
            time.sleep(2.0)
            gen = client.sync_status().generation  # the change made while they were down
            # Each node is timed from its own first health answer to its SYNCED, both
            # watched at once (a node that serves first is not timed from the last one).
            serving: dict[str, float] = {}
            failed: list[BaseException] = []

            def watch() -> None:
                try:
                    cluster.wait_serving(killed, seen=serving)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failed.append(exc)

            watcher = threading.Thread(target=watch, daemon=True)
            for g in killed_groups:
                cluster.start_group(g)
            watcher.start()
            done: dict[str, float] = {}
            end = time.monotonic() + 120
            while len(done) < len(killed) and time.monotonic() < end and not failed:
                st = client.sync_status()
                now = time.monotonic()
                for s in st.nodes:
                    if (s.node in killed and s.node not in done
                            and s.state == policy_pb2.SYNC_STATE_SYNCED
                            and s.observed_generation >= gen):
                        done[s.node] = now
                time.sleep(0.002)
            watcher.join()
            if failed:
                raise failed[0]
            row.back_synced_s = sorted(round(max(0.0, t - serving[nm]), 3)
                                       for nm, t in done.items())
            say("  killed nodes serving again -> SYNCED: "
                + ", ".join(f"{v:.2f}" for v in row.back_synced_s) + " s", flush=True)
    except Exception as exc:  # a row that failed says why
        row.notes.append(f"{type(exc).__name__}: {exc}")
        say(f"  {n} nodes: FAILED: {exc}", flush=True)
    finally:
        if client is not None:
            client.close()
        if policyd is not None:
            policyd.send_signal(signal.SIGTERM)
            try:
                policyd.wait(10)
            except subprocess.TimeoutExpired:
                policyd.kill()
                policyd.wait()
        cluster.stop()
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            for f in workdir.glob("*.log"):
                shutil.copy(f, Path(args.logs) / f"{n}-{f.name}")
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[20, 50, 100, 200])
    p.add_argument("--datapath", choices=("memory", "kernel"), default="memory",
                   help="memory: simulated nodes; kernel: one xlb-dpd per node, each in its "
                        "own network namespace, on the kernel datapath (root)")
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--endpoints", type=int, default=4)
    p.add_argument("--per-process", type=int, default=0,
                   help="simulated nodes per dpd process (default: 1 up to 20 nodes, else 25)")
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--change-gap", type=float, default=0.05)
    p.add_argument("--rest", type=float, default=20.0)
    p.add_argument("--kill", type=int, default=0, help="dpd processes to kill (0: skip)")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--logs", default="", help="keep the daemons' logs in this directory")
    p.add_argument("--policyd-log-level", default="warning")
    args = p.parse_args(argv)
    services = policy_services(args.services, args.endpoints)
    rows = []
    for n in args.nodes:
        say(f"== {n} nodes x {args.services} services", flush=True)
        rows.append(run(n, args, services))
    say()
    say("| nodes | per proc | 10k -> all SYNCED | change p50 / p99 | policyd CPU at rest "
          "| policyd RSS | killed: healthy change | back -> SYNCED (max) |")
    say("|---|---|---|---|---|---|---|---|")
    for r in rows:
        back = f"{max(r.back_synced_s):.2f} s" if r.back_synced_s else "-"
        kill = f"{r.killed}: {r.healthy_change_ms} ms" if r.killed else "-"
        say(f"| {r.nodes} | {r.per_process} | {r.apply_s:.2f} s | {r.change_p50_ms} / "
              f"{r.change_p99_ms} ms | {r.rest_cpu_pct} % | {r.rest_rss_mib} MiB | {kill} "
              f"| {back} |" + (f" {r.notes}" if r.notes else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {"argv": sys.argv[1:], "cpus": os.cpu_count(),
                                "rows": [asdict(r) for r in rows],
                                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
