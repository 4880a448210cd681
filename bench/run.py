"""Real-traffic benchmark: xlb beside kube-proxy-style iptables and nftables, one run.

``python -m bench.run [--quick]`` builds a lab topology (client -> lb node -> nginx
backends), measures keep-alive request rate (RR) and new-connection rate (CRR) with wrk
through each target at 1 service and with N other services programmed ahead of the
measured one, in alternating rounds, then times programming 10,000 services x 4
endpoints. Prints one table and writes ``bench/results/<YYYY-MM-DD>.json`` (a quick run:
``bench/results/quick/``, not kept in git).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import pkgutil
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from bench import xlb_report
from bench.nginx import start_nginx
from bench.services import Endpoint
from bench.targets import TARGETS, Target
from bench.wrk import WrkResult, run_wrk_multi
from lab import netns
from lab.topology import DEFAULT_VIP, Topology
from xlbcore.logs import configure_logging

log = structlog.get_logger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METRICS = ("RR", "CRR")
DEFAULT_TARGETS = ("plain", "xlb", "xlb-maglev", "xlb-fullnat", "xlb-policyd", "iptables",
                   "nftables")
VIP_CLIENT_SRC = "198.18.0.3"  # client source address for VIP traffic (see prepare_client)
VIP_ROUTE = "198.19.0.0/16"
FAKE_CP_ENDPOINTS = [Endpoint(f"198.19.255.{i}", 80) for i in range(1, 5)]


@dataclass
class Config:
    quick: bool
    rounds: int
    duration: float
    others: int  # services programmed ahead of the measured one
    cp_services: int
    cp_endpoints: int
    cp_reps: int
    connections: int
    backends: int
    port: int
    targets: list[str]
    streams: int  # concurrent single-threaded wrk processes (default: one per backend)
    warmup: bool = True
    ns_runs: int = 1_000_000  # BPF_PROG_TEST_RUN runs per per-packet figure
    ns_services: list[int] = field(default_factory=lambda: [1, 1000, 10_000, 100_000])
    fw_rules: list[int] = field(default_factory=lambda: [10, 1000, 10_000])
    ct_counts: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    changes: int = 200  # service changes timed for the change latency
    mem_counts: list[int] = field(default_factory=lambda: [10_000, 100_000])
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Sample:
    round: int
    target: str
    services: int
    metric: str
    rps: float
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    ratio_to_plain: float | None = None


def _load_target_plugins() -> None:
    """Import every ``bench/target_*.py`` so that its @register runs."""
    pkg_dir = Path(__file__).resolve().parent
    for mod in pkgutil.iter_modules([str(pkg_dir)]):
        if mod.name.startswith("target_"):
            importlib.import_module(f"bench.{mod.name}")


def _version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (p.stdout + p.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def host_info() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "nft": _version(["nft", "--version"]),
        "iptables": _version(["iptables", "--version"]),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]),
    }


_PROBE = """
import sys, urllib.request
for url in sys.argv[1:]:
    for _ in range(3):
        with urllib.request.urlopen(url, timeout=2) as r:
            body = r.read()
            if r.status != 200 or body != b"ok\\n":
                sys.exit(f"{url}: {r.status} {body!r}")
"""


def probe(topo: Topology, urls: list[str]) -> None:
    """A few plain HTTP GETs from the client namespace: the target answers at all."""
    res = topo.run(topo.client_ns, [sys.executable, "-c", _PROBE, *sorted(set(urls))],
                   check=False, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"probe of {sorted(set(urls))} failed: {res.stderr.strip()[-500:]}")


def _measure(topo: Topology, target: Target, cfg: Config, rnd: int, services: int) -> list[Sample]:
    urls = [f"http://{host}:{port}/" for host, port in target.addresses(cfg.streams)]
    probe(topo, urls)
    if cfg.warmup:
        warm = run_wrk_multi(topo, urls, 1, connections=cfg.connections)
        if warm.requests == 0 or warm.errors:
            raise RuntimeError(f"{target.name}: warm-up through {urls} failed: {warm}")
    out = []
    for metric in METRICS if target.variant_of is None else ("CRR",):
        res: WrkResult = run_wrk_multi(topo, urls, cfg.duration, connections=cfg.connections,
                                       close=(metric == "CRR"))
        if res.errors:
            log.warning("bench.wrk_errors", target=target.name, metric=metric,
                        services=services, errors=res.errors)
        log.info("bench.sample", round=rnd, target=target.name, services=services,
                 metric=metric, rps=res.rps, errors=res.errors)
        out.append(Sample(rnd, target.name, services, metric, res.rps, res.errors,
                          res.p50_ms, res.p99_ms))
    return out


def traffic_phase(topo: Topology, cfg: Config, backends: list[Endpoint]) -> list[Sample]:
    samples: list[Sample] = []
    scales = [1, cfg.others + 1] if cfg.others > 0 else [1]
    names = [t for t in cfg.targets if t in TARGETS and TARGETS[t].traffic]
    for rnd in range(cfg.rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for services in scales:
            block: list[Sample] = []
            for name in order:
                if cfg.quick and TARGETS[name].variant_of and services != scales[-1]:
                    continue  # quick: a variant's row at the larger scale only
                target = TARGETS[name]()
                try:
                    target.setup(topo, services, topo.vip, cfg.port, backends)
                    block += _measure(topo, target, cfg, rnd, services)
                except (netns.NetnsError, RuntimeError, ValueError) as exc:
                    log.error("bench.target_failed", target=name, round=rnd,
                              services=services, error=str(exc)[-1000:])
                finally:
                    target.teardown()
            plain = {s.metric: s.rps for s in block if s.target == "plain"}
            for s in block:
                if plain.get(s.metric):
                    s.ratio_to_plain = s.rps / plain[s.metric]
            samples += block
    return samples


def control_plane_phase(topo: Topology, cfg: Config) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    eps = FAKE_CP_ENDPOINTS[: cfg.cp_endpoints]
    for name in cfg.targets:
        cls = TARGETS.get(name)
        if cls is None or not cls.control_plane:
            continue
        for rep in range(cfg.cp_reps):
            target = cls()
            try:
                target.setup(topo, cfg.cp_services, topo.vip, cfg.port, eps)
                if target.program_seconds is not None:
                    times.setdefault(name, []).append(target.program_seconds)
                log.info("bench.cp_sample", target=name, rep=rep, services=cfg.cp_services,
                         seconds=target.program_seconds)
            except (netns.NetnsError, RuntimeError, ValueError) as exc:
                log.error("bench.cp_failed", target=name, error=str(exc)[-1000:])
                break
            finally:
                target.teardown()
    return times


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(samples: list[Sample], cp: dict[str, list[float]], cfg: Config) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    scales = sorted({s.services for s in samples})
    for metric in METRICS:
        for services in scales:
            key = f"{metric}@{services}"
            row: dict[str, Any] = {}
            for name in cfg.targets:
                sel = [s for s in samples if s.target == name and s.metric == metric
                       and s.services == services]
                if not sel:
                    continue
                ratios = [s.ratio_to_plain for s in sel if s.ratio_to_plain is not None]
                row[name] = {
                    "rps_median": _median([s.rps for s in sel]),
                    "ratio_median": _median(ratios),
                    "rounds": len(sel),
                    "errors": sum(s.errors for s in sel),
                    "p99_ms_median": _median([s.p99_ms for s in sel if s.p99_ms is not None]),
                }
            summary[key] = row
    summary["control_plane_seconds"] = {
        name: {"median": _median(v), "samples": v} for name, v in cp.items()
    }
    return summary


def _fmt_rate(cell: dict[str, Any] | None, with_ratio: bool = True) -> str:
    if not cell or cell.get("rps_median") is None:
        return "-"
    txt = f"{cell['rps_median']:,.0f}"
    if with_ratio and cell.get("ratio_median") is not None:
        txt += f" ({cell['ratio_median']:.2f})"
    return txt


def table(summary: dict[str, Any], cfg: Config) -> str:
    rows: list[list[str]] = [["metric", "xlb", "iptables", "nftables", "floor", "ratio"]]
    for metric in METRICS:
        for services in sorted({int(k.split("@")[1]) for k in summary if "@" in k}):
            row = summary.get(f"{metric}@{services}", {})
            what = "req/s keep-alive" if metric == "RR" else "conn/s Connection: close"
            label = (f"{metric} {what}, 1 service" if services == 1
                     else f"{metric} {what}, {services - 1:,} other services")
            xlb = row.get("xlb")
            rows.append([
                label,
                _fmt_rate(xlb, with_ratio=False),
                _fmt_rate(row.get("iptables")),
                _fmt_rate(row.get("nftables")),
                _fmt_rate(row.get("plain"), with_ratio=False),
                f"{xlb['ratio_median']:.2f}" if xlb and xlb.get("ratio_median") else "-",
            ])
            for variant, label in (("xlb-maglev", "  same, Maglev"),
                                   ("xlb-fullnat", "  same, full-NAT")):
                mg = row.get(variant)
                if metric == "CRR" and mg:  # the same, every service with Maglev / full-NAT
                    rows.append([label, _fmt_rate(mg, with_ratio=False), "-", "-",
                                 _fmt_rate(row.get("plain"), with_ratio=False),
                                 f"{mg['ratio_median']:.2f}" if mg.get("ratio_median")
                                 else "-"])
    cp = summary.get("control_plane_seconds", {})

    def secs(name: str) -> str:
        m = cp.get(name, {}).get("median")
        return f"{m:.2f} s" if m is not None else "-"

    ratio = "-"
    if cp.get("xlb", {}).get("median") and cp.get("nftables", {}).get("median"):
        ratio = f"{cp['xlb']['median'] / cp['nftables']['median']:.2f}"
    rows.append([f"program {cfg.cp_services:,} services x {cfg.cp_endpoints} endpoints",
                 secs("xlb"), secs("iptables"), secs("nftables"), "-", ratio])
    rows.append(["  same, through policyd until SYNCED", secs("xlb-policyd"), "-", "-", "-", "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                        strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("rates: median over rounds; (x.xx) = median of per-round ratio to floor "
                 "(plain: routed straight to the backends, same round); ratio column = xlb/floor, "
                 "for programming xlb/nftables.")
    if cfg.skipped:
        lines.append("skipped targets: " + "; ".join(f"{k}: {v}" for k, v in cfg.skipped.items()))
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> Config:
    quick = bool(args.quick)
    return Config(
        quick=quick,
        rounds=args.rounds or (2 if quick else 5),
        duration=args.duration or (2.0 if quick else 10.0),
        others=args.services if args.services is not None else (1000 if quick else 10_000),
        cp_services=(args.cp_services if args.cp_services is not None
                     else (2_000 if quick else 10_000)),
        cp_endpoints=4,
        cp_reps=args.cp_reps or (1 if quick else 3),
        connections=args.connections,
        backends=args.backends,
        port=80,
        targets=[t.strip() for t in args.targets.split(",") if t.strip()],
        streams=args.streams or args.backends,
        warmup=not quick,
        ns_runs=20_000 if quick else 1_000_000,
        ns_services=[1, 10_000] if quick else [1, 1000, 10_000, 100_000],
        fw_rules=[10, 1000] if quick else [10, 1000, 10_000],
        ct_counts=[100_000] if quick else [100_000, 1_000_000],
        changes=10 if quick else 200,
        mem_counts=[1_000] if quick else [0, 10_000, 100_000],
    )


def prepare_client(topo: Topology) -> None:
    """Client tuning, and a second client address as the source for VIP traffic.

    Plain routing and the VIP targets reach the same backend sockets. A backend keeps
    TIME_WAIT for each closed connection (nginx closes first under CRR); a later SYN on
    the same 4-tuple whose sequence/timestamp does not follow on is answered with an ACK
    and costs the client a 1 s SYN retransmit. The client's ISN and timestamp offset are
    keyed on the address it connects to (backend vs VIP), so plain's leftovers would
    stall a VIP target run and cut its CRR ~10x. Separate source addresses keep the two
    families of 4-tuples apart."""
    netns.sysctl(topo.client_ns, {"net.ipv4.ip_local_port_range": "1024 65535",
                                  "net.ipv4.tcp_tw_reuse": 1})
    topo.run(topo.client_ns, ["ip", "addr", "add", f"{VIP_CLIENT_SRC}/24", "dev",
                              topo.client_iface])
    topo.run(topo.client_ns, ["ip", "route", "add", VIP_ROUTE, "via", topo.client_gw,
                              "src", VIP_CLIENT_SRC])


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short run (< 3 minutes)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma list; 'plain' (the floor) is always added")
    p.add_argument("--rounds", type=int, help="alternating rounds (quick 3, full 5)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (quick 2, full 10)")
    p.add_argument("--services", type=int,
                   help="other services ahead of the measured one (quick 1000, full 10000)")
    p.add_argument("--cp-services", type=int, help="services for the control-plane timing "
                   "(10000; 0 skips it)")
    p.add_argument("--cp-reps", type=int, help="control-plane repetitions (quick 1, full 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--backends", type=int, default=2)
    p.add_argument("--streams", type=int,
                   help="concurrent wrk processes, connections split between them "
                   "(default: one per backend; plain sends stream i to backend i)")
    p.add_argument("--out", type=Path,
                   help="results file (default bench/results/<date>.json; quick runs: "
                        "bench/results/quick/<time>.json)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--no-xlb-extra", action="store_true",
                   help="skip per-packet ns, conntrack scale, change latency and memory")
    args = p.parse_args(argv)
    configure_logging("kv", args.log_level)
    if os.geteuid() != 0:
        log.error("bench.needs_root")
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    _load_target_plugins()
    cfg = _config(args)
    if "plain" not in cfg.targets:
        cfg.targets.insert(0, "plain")
    for name in list(cfg.targets):
        cls = TARGETS.get(name)
        why = "not implemented yet" if cls is None else cls.unavailable()
        if why:
            cfg.skipped[name] = why
            cfg.targets.remove(name)
            log.warning("bench.target_skipped", target=name, reason=why)
    log.info("bench.start", **{k: v for k, v in asdict(cfg).items() if k != "skipped"})
    started = time.monotonic()
    samples: list[Sample] = []
    cp: dict[str, list[float]] = {}
    xlb_extra: dict[str, Any] = {}
    with Topology(backends=cfg.backends, vip=DEFAULT_VIP) as topo:
        prepare_client(topo)
        start_nginx(topo, port=cfg.port)
        backends = [Endpoint(ip, cfg.port) for ip in topo.backend_ips]
        samples = traffic_phase(topo, cfg, backends)
        if cfg.cp_services:
            cp = control_plane_phase(topo, cfg)
        if "xlb" in cfg.targets and not args.no_xlb_extra:
            xlb_extra = xlb_report.run_in_topology(topo, backends, cfg.changes, cfg.others,
                                                   cfg.mem_counts)
    if "xlb" in cfg.targets and not args.no_xlb_extra:
        xlb_extra.update(xlb_report.run_datapath(cfg.ns_services, cfg.ns_runs, cfg.ct_counts,
                                                 cfg.fw_rules, 20_000 if cfg.quick else 100_000))
    elapsed = time.monotonic() - started
    summary = summarize(samples, cp, cfg)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "elapsed_seconds": round(elapsed, 1),
        "host": host_info(),
        "config": asdict(cfg),
        "summary": summary,
        "xlb": xlb_extra,
        "samples": [asdict(s) for s in samples],
    }
    # A full run is a record (committed); a quick run is a check and goes to quick/
    # (git-ignored), so it never overwrites a recorded full run. A second full run on
    # one day gets the time in its name.
    stamp = dt.datetime.now(dt.UTC)
    out = args.out or (RESULTS_DIR / "quick" / f"{stamp:%Y-%m-%dT%H%M%S}.json" if cfg.quick
                       else RESULTS_DIR / f"{stamp:%Y-%m-%d}.json")
    if not args.out and not cfg.quick and out.exists():
        out = RESULTS_DIR / f"{stamp:%Y-%m-%dT%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    png = xlb_report.plot(summary, xlb_extra, out.with_suffix(".png"))
    print(table(summary, cfg))  # noqa: T201 - the report table
    if xlb_extra:
        print("\n" + xlb_report.tables(xlb_extra))  # noqa: T201
    print(f"\n{'quick' if cfg.quick else 'full'} run, {elapsed:.0f} s; "  # noqa: T201
          f"results: {out}" + (f", plot: {png}" if png else ""))
    log.info("bench.done", seconds=round(elapsed, 1), results=str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
