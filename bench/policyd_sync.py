"""Time programming N services through policyd until the node reports SYNCED.

policyd runs in this process (a real gRPC server on a unix socket, its SQLite store on
disk); the node is dpd on in-memory maps (its real API and tables, no kernel) in a child
process by default, so that, like a real dpd, it does not share policyd's GIL.
``--dpd ADDRESS`` points policyd at a running dpd instead: every service it holds is
deleted before each run.

    .venv/bin/python -m bench.policyd_sync                  # ApplyServices(10k) -> SYNCED
    .venv/bin/python -m bench.policyd_sync --mode single    # 10k x ApplyService (old way)
    .venv/bin/python -m bench.policyd_sync --services 1000 --repeat 5 --dpd inproc

Prints the phases of each run: the client's call(s), policyd's validation and store write
(inside the call), then each reconciler pass that ran (snapshot, ListServices, diff,
building the requests, the PutServices/DeleteServices calls), and when the client saw
SYNCED. Needs no root and no network namespaces.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.services import Endpoint, service_set
from policyd.client import PolicyClient
from policyd.server import PolicydConfig, PolicyServer
from policyd.store import Store
from policyd.validation import validate_services
from policyd.worker import PassReport, ReconcilerSettings
from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2
from xlbcore.logs import configure_logging

NODE = "bench"


# -- the node -----------------------------------------------------------------------------


def serve_memory_dpd(address: str) -> grpc.Server:
    """dpd's real servicer and tables over in-memory maps (no kernel)."""
    from dpd.loader import Settings
    from dpd.memory import MemoryDatapath
    from dpd.node import Node
    from dpd.servicer import DatapathServicer

    node = Node(MemoryDatapath(Settings(name=NODE, max_services=131072, max_backends=1 << 20,
                                        ct_size=64)), ct_aging_interval=0)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    datapath_pb2_grpc.add_DatapathServicer_to_server(DatapathServicer(node), server)
    server.add_insecure_port(address)
    server.start()
    return server


class FakeNode:
    """A dpd on in-memory maps (``xlb-dpd --datapath memory``) in a child process
    (``subprocess``, so that it does not share policyd's GIL, as a real dpd does not) or
    in a thread pool here (``inproc``)."""

    def __init__(self, workdir: Path, where: str) -> None:
        self.address = f"unix:{workdir}/dpd.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._server: grpc.Server | None = None
        if where == "inproc":
            self._server = serve_memory_dpd(self.address)
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dpd.main", "--name", NODE, "--datapath", "memory",
             "--max-services", "131072", "--max-backends", str(1 << 20),
             "--listen", self.address, "--log-level", "warning"],
            cwd=Path(__file__).resolve().parent.parent,
        )
        with grpc.insecure_channel(self.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)


# -- instrumentation ----------------------------------------------------------------------


@dataclass
class Probe:
    """Observes policyd's reconcile passes through the reconciler's ``on_pass`` hook
    (no patching of policyd's code)."""

    passes: list[PassReport] = field(default_factory=list)

    def on_pass(self, node: str, report: PassReport) -> None:
        """ReconcilerSettings.on_pass: called in the node's worker thread."""
        if node == NODE:
            self.passes.append(report)


def validate_and_store_s(services: list[policy_pb2.Service], workdir: Path) -> tuple[float, float]:
    """What validation and the store write of `services` cost, measured by doing the same
    work directly (validate_services, then one Store.apply_services into a scratch
    store), so that the API call's time can be split without instrumenting policyd."""
    began = time.perf_counter()
    items = validate_services(services)
    validated = time.perf_counter()
    scratch = Store(str(workdir / "scratch.db"))
    try:
        stored_from = time.perf_counter()
        scratch.apply_services(items)
        stored = time.perf_counter()
    finally:
        scratch.close()
    return validated - began, stored - stored_from


# -- one run ------------------------------------------------------------------------------


def policy_services(count: int, endpoints: int) -> list[policy_pb2.Service]:
    backends = [Endpoint(f"198.18.1.{2 + i}", 8080) for i in range(endpoints)]
    specs = service_set(count, "198.19.0.10", 80, backends, endpoints_per=endpoints)
    return [
        policy_pb2.Service(
            name=f"svc-{i}",
            vip=s.vip,
            port=s.port,
            protocol=types_pb2.PROTOCOL_TCP if s.proto == "tcp" else types_pb2.PROTOCOL_UDP,
            endpoints=[types_pb2.Endpoint(address=e.ip, port=e.port) for e in s.endpoints],
        )
        for i, s in enumerate(specs)
    ]


@dataclass
class Run:
    services: int
    call_s: float  # the client's ApplyServices (or all its ApplyService calls)
    synced_s: float  # from the first call to SYNCED seen by the client
    validate_s: float
    store_s: float
    passes: list[PassReport]
    began: float  # perf_counter at the first call, the origin of the times below

    def at(self, t: float) -> float:
        return t - self.began


def empty_node(address: str) -> None:
    """Delete every service of the dpd at `address` (a benchmark's own node)."""
    with grpc.insecure_channel(address) as channel:
        stub = datapath_pb2_grpc.DatapathStub(channel)
        keys = [
            types_pb2.ServiceKey(vip=s.vip, port=s.port, protocol=s.protocol)
            for s in stub.ListServices(datapath_pb2.ListServicesRequest(), timeout=120)
        ]
        for k in range(0, len(keys), 5000):
            stub.DeleteServices(datapath_pb2.DeleteServicesRequest(keys=keys[k : k + 5000]))


def one_run(args: argparse.Namespace, services: list[policy_pb2.Service]) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix="xlbps-", dir="/tmp"))
    db_dir = Path(args.db_dir) if args.db_dir else workdir
    db = db_dir / f"policyd-{os.getpid()}-{time.monotonic_ns()}.db"
    node = None if args.dpd not in ("subprocess", "inproc") else FakeNode(workdir, args.dpd)
    address = node.address if node else args.dpd
    if node is None:
        empty_node(address)
    probe = Probe()
    validate_s, store_s = validate_and_store_s(services, workdir)
    settings = ReconcilerSettings(resync_interval=600.0, rpc_timeout=120.0, on_pass=probe.on_pass)
    server = PolicyServer(
        PolicydConfig(listen=f"unix:{workdir}/policyd.sock", db_path=str(db), reconciler=settings)
    ).start()
    try:
        with PolicyClient(server.address, timeout=300.0) as client:
            client.register_node(NODE, address)
            client.wait_synced([NODE], timeout=30)
            probe.passes.clear()
            began = time.perf_counter()
            if args.mode == "batch":
                generation = client.apply_services(services).generation
            else:
                generation = 0
                for svc in services:
                    generation = client.apply(svc).revision
            called = time.perf_counter()
            client.wait_synced([NODE], timeout=600, generation=generation, poll=0.005)
            synced = time.perf_counter()
        passes = [p for p in probe.passes if p.ended >= began]
        return Run(
            services=len(services),
            call_s=called - began,
            synced_s=synced - began,
            validate_s=validate_s,
            store_s=store_s,
            passes=passes,
            began=began,
        )
    finally:
        server.stop(grace=0)
        if node is not None:
            node.stop()
        db.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def report(run: Run) -> None:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:8.1f} ms"

    out = sys.stdout.write
    out(f"{run.services} services: SYNCED after {ms(run.synced_s).strip()} (client's view)\n")
    if run.passes:
        first, last = run.passes[0], run.passes[-1]
        out(
            f"  timeline: first pass +{ms(run.at(first.started)).strip()}, reply"
            f" +{ms(run.call_s).strip()}, node synced +{ms(run.at(last.ended)).strip()}\n"
        )
    out(f"  client call(s)          {ms(run.call_s)}\n")
    out(f"    validate              {ms(run.validate_s)}  (same work, measured apart)\n")
    out(f"    store write (1 tx)    {ms(run.store_s)}  (same work, measured apart)\n")
    rest = run.call_s - run.validate_s - run.store_s
    out(f"    transport + reply     {ms(rest)}\n")
    total = [0.0] * 6
    for p in run.passes:
        r = p.result
        if r is None:
            continue
        parts = (
            p.snapshot_s,
            r.list_s,
            r.diff_s,
            r.convert_s,
            r.rpc_s,
            p.ended - p.started,
        )
        total = [a + b for a, b in zip(total, parts, strict=True)]
    results = [p.result for p in run.passes if p.result is not None]
    put = sum(r.put for r in results)
    calls = sum(r.calls for r in results)
    out(f"  reconciler passes: {len(run.passes)} (services put {put}, calls {calls})\n")
    for label, value in zip(
        ("snapshot", "ListServices", "diff", "build requests", "Put/DeleteServices", "pass total"),
        total,
        strict=True,
    ):
        out(f"    {label:<22}{ms(value)}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.policyd_sync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--endpoints", type=int, default=4, help="per service (default 4)")
    p.add_argument(
        "--mode",
        choices=("batch", "single"),
        default="batch",
        help="one ApplyServices, or one ApplyService per service",
    )
    p.add_argument(
        "--dpd",
        default="subprocess",
        help="subprocess | inproc (dpd on in-memory maps) or a running dpd's ADDRESS",
    )
    p.add_argument("--db-dir", default="", help="where the store lives (default: /tmp)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    configure_logging("kv", "warning")
    services = policy_services(args.services, args.endpoints)
    runs = []
    for i in range(args.repeat):
        sys.stdout.write(f"-- run {i + 1}/{args.repeat} ({args.mode}, dpd {args.dpd})\n")
        run = one_run(args, services)
        report(run)
        runs.append(run)
    if len(runs) > 1:
        sys.stdout.write(
            f"median SYNCED after {statistics.median(r.synced_s for r in runs) * 1000:.1f} ms"
            f" (min {min(r.synced_s for r in runs) * 1000:.1f})\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
