"""The xlb-only parts of `make bench`: per-packet ns against services, conntrack scale,
one change's latency, daemon memory; their tables, and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from bench import datapath_ns, early_drop, firewall, xlb_phases
from bench.services import Endpoint
from lab.topology import Topology

log = structlog.get_logger("bench.xlb")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_in_topology(topo: Topology, backends: list[Endpoint], changes: int, fillers: int,
                    mem_counts: list[int], scrape_services: int | None = None) -> dict[str, Any]:
    """`scrape_services` (default `fillers`: 10,000, 1,000 in a quick run): the dpd whose
    Prometheus scrape is timed holds this many services (0: skip)."""
    out: dict[str, Any] = {}
    if changes:
        lat = xlb_phases.change_latency(topo, backends, changes, fillers)
        out["change_latency_ms"] = {
            path: {"p50": _pct(v, 0.5), "p99": _pct(v, 0.99), "max": max(v), "samples": v}
            for path, v in lat.items() if v
        }
        out["change_latency_fillers"] = fillers
    if mem_counts:
        out["memory"] = xlb_phases.memory(topo, mem_counts)
    scrape_services = fillers if scrape_services is None else scrape_services
    if scrape_services:
        out["metrics_scrape"] = xlb_phases.scrape_time(topo, scrape_services)
    return out


def run_datapath(ns_services: list[int], ns_runs: int, ct_counts: list[int],
                 fw_rules: list[int] | None = None, fw_packets: int = 100_000,
                 early_drop_packets: int = 1_000_000) -> dict[str, Any]:
    rows = datapath_ns.measure(ns_services, ns_runs)
    ct = datapath_ns.conntrack_scale(ct_counts, ns_runs) if ct_counts else []
    out: dict[str, Any] = {"per_packet_ns": [r.__dict__ for r in rows],
                           "per_packet_runs": ns_runs, "conntrack": ct}
    if fw_rules:
        fw = firewall.xlb([0, *fw_rules], ns_runs)
        nf = firewall.netfilter(fw_rules, fw_packets, rounds=3)
        out["firewall"] = {"xlb": [r.__dict__ for r in fw], "netfilter": nf,
                           "packets": fw_packets}
    if early_drop_packets:  # about 15 s: XDP, TC and nftables drops on one topology
        ed = early_drop.measure(early_drop_packets, rounds=3)
        out["early_drop"] = {"rows": [r.__dict__ for r in ed], "packets": early_drop_packets,
                             "xdp_cost": early_drop.xdp_cost(ns_runs)}
    return out


def tables(x: dict[str, Any]) -> str:
    parts = []
    if x.get("per_packet_ns"):
        rows = [datapath_ns.Row(**r) for r in x["per_packet_ns"]]
        parts.append(f"ns per packet (BPF_PROG_TEST_RUN, mean of {x['per_packet_runs']:,} "
                     f"runs)\n{datapath_ns.table(rows)}")
    if x.get("conntrack"):
        parts.append(datapath_ns.ct_table(x["conntrack"]))
    if x.get("firewall"):
        fw = x["firewall"]
        rows_fw = [firewall.XlbRow(**r) for r in fw["xlb"]]
        nf = {k: {int(n): v for n, v in cells.items()} for k, cells in fw["netfilter"].items()}
        parts.append("firewall: ns per packet against rules (xlb: BPF_PROG_TEST_RUN; "
                     "iptables/nftables: what the rules add to a real forwarded packet, "
                     f"median of 3 rounds of {fw['packets']:,})\n" + firewall.table(rows_fw, nf))
    if x.get("early_drop"):
        ed = x["early_drop"]
        parts.append(f"early drop: 64-byte frames from a blocked source, one core generating "
                     f"and dropping (XDP live frames into a veth, median of 3 runs of "
                     f"{ed['packets']:,})\n"
                     + early_drop.table([early_drop.Row(**r) for r in ed["rows"]]))
        if ed.get("xdp_cost"):
            parts.append(early_drop.cost_table(ed["xdp_cost"]))
    if x.get("change_latency_ms"):
        lines = [f"one service change, API call -> first connection through it "
                 f"(node holding {x['change_latency_fillers']:,} services)",
                 "| path | p50 ms | p99 ms | max ms | changes |", "|---|---:|---:|---:|---:|"]
        for path, v in x["change_latency_ms"].items():
            lines.append(f"| {path} | {v['p50']:.1f} | {v['p99']:.1f} | {v['max']:.1f} "
                         f"| {len(v['samples'])} |")
        parts.append("\n".join(lines))
    if x.get("memory"):
        lines = ["| services | dpd RSS | policyd RSS | nat_v4_map (kernel) | dpd first start "
                 "(compiles) -> serving | dpd restart -> serving |",
                 "|---:|---:|---:|---:|---:|---:|"]
        for r in x["memory"]:
            lines.append(f"| {r['services']:,} | {r['dpd_rss_mb']:.0f} MiB | "
                         f"{r['policyd_rss_mb']:.0f} MiB | {r['nat_map_mb']:.1f} MiB | "
                         f"{r.get('dpd_first_start_s', 0):.2f} s | "
                         f"{r.get('dpd_restart_s', 0):.2f} s |")
        parts.append("\n".join(lines))
    if x.get("metrics_scrape"):
        r = x["metrics_scrape"]
        parts.append("\n".join([
            "| Prometheus scrape of dpd (GET /metrics) | first ms | p50 ms | max ms | "
            "series | size |",
            "|---|---:|---:|---:|---:|---:|",
            f"| {r['services']:,} services x {r['endpoints_per_service']} endpoints "
            f"({r['scrapes']} scrapes) | {r['first_ms']:.0f} | {r['p50_ms']:.0f} | "
            f"{r['max_ms']:.0f} | {r['series']:,} | {r['bytes'] / 2**20:.1f} MiB |"]))
    return "\n\n".join(parts)


def plot(summary: dict[str, Any], x: dict[str, Any], path: Path) -> Path | None:
    """CRR against services per target, and xlb's ns/packet against services."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("bench.no_matplotlib")
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    scales = sorted(int(k.split("@")[1]) for k in summary if k.startswith("CRR@"))
    targets = sorted({t for k in summary if k.startswith("CRR@") for t in summary[k]})
    for t in targets:
        ys = [summary[f"CRR@{s}"].get(t, {}).get("rps_median") for s in scales]
        if any(y is not None for y in ys):
            a.plot(scales, ys, marker="o", label="floor (plain)" if t == "plain" else t)
    a.set_xscale("symlog")
    a.set_xlabel("services programmed")
    a.set_ylabel("connections/s (Connection: close)")
    a.set_title("CRR")
    a.legend()
    rows = x.get("per_packet_ns", [])
    if rows:
        svc = [r["services"] for r in rows]
        for key, label in (("floor", "parse-only floor"), ("pass_", "pass (no VIP)"),
                           ("established", "established"), ("new_flow", "new flow")):
            b.plot(svc, [r[key] for r in rows], marker="o", label=label)
        b.set_xscale("log")
        b.set_xlabel("services programmed")
        b.set_ylabel("ns per packet")
        b.set_title("xlb datapath cost (BPF_PROG_TEST_RUN)")
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
