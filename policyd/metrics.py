"""policyd's Prometheus metrics (docs/metrics.md): per-node sync state and generations
(read from Reconciler.status() on scrape), reconcile passes (from ReconcilerSettings.
on_pass: duration histogram, errors, services written), and gRPC calls by method and
code (xlbcore.metrics.RpcMetrics). Every per-node series has a ``node`` label."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from policyd.reconciler import PassReport, Reconciler, ReconcilerSettings
from policyd.status import SyncState
from xlbcore.metrics import MetricsServer, RpcMetrics, start_metrics

PREFIX = "xlb_policyd"
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0)


class StatusCollector(Collector):
    """xlb_policyd_node_sync_state{node,state} (1 for the node's state, 0 for the others),
    observed and desired generations, services, firewall rules, routes and refused objects
    per node, the desired generation."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        generation, nodes = self.reconciler.status()
        state = GaugeMetricFamily(f"{PREFIX}_node_sync_state", "1 for the node's sync "
                                  "state (pending, synced, error), 0 for the others",
                                  labels=["node", "state"])
        observed = GaugeMetricFamily(f"{PREFIX}_node_observed_generation", "the desired "
                                     "generation the node last fully synced to",
                                     labels=["node"])
        services = GaugeMetricFamily(f"{PREFIX}_node_services", "services the node held "
                                     "after its last successful sync", labels=["node"])
        rules = GaugeMetricFamily(f"{PREFIX}_node_firewall_rules", "firewall rules the node "
                                  "held after its last successful sync", labels=["node"])
        routes = GaugeMetricFamily(f"{PREFIX}_node_routes", "routes the node held after its "
                                   "last successful sync", labels=["node"])
        blocked = GaugeMetricFamily(f"{PREFIX}_node_blocklist_prefixes", "blocked prefixes "
                                    "the node held after its last successful sync (the "
                                    "union of its blocklists)", labels=["node"])
        mirrors = GaugeMetricFamily(f"{PREFIX}_node_mirrors", "mirrored interfaces the node "
                                    "held after its last successful sync", labels=["node"])
        policers = GaugeMetricFamily(f"{PREFIX}_node_policers", "policers the node held "
                                     "after its last successful sync", labels=["node"])
        refused = GaugeMetricFamily(f"{PREFIX}_node_refused_objects", "objects the node "
                                    "refused (it is in error while any remain)",
                                    labels=["node", "kind"])
        last_sync = GaugeMetricFamily(f"{PREFIX}_node_last_sync_timestamp_seconds",
                                      "when the node last synced (0: never)", labels=["node"])
        drift = CounterMetricFamily(f"{PREFIX}_node_drift_repaired", "writes that repaired "
                                    "drift found on the node (objects changed behind policyd's"
                                    " back) since policyd started", labels=["node"])
        epoch = GaugeMetricFamily(f"{PREFIX}_node_epoch", "datapaths (dpd instances, tables) "
                                  "policyd has seen on the node since it started",
                                  labels=["node"])
        for n in nodes:
            for s in SyncState:
                state.add_metric([n.node, s.name.lower()], 1.0 if n.state == s else 0.0)
            observed.add_metric([n.node], n.observed_generation)
            services.add_metric([n.node], n.services)
            rules.add_metric([n.node], n.firewall_rules)
            routes.add_metric([n.node], n.routes)
            blocked.add_metric([n.node], n.blocklist_prefixes)
            mirrors.add_metric([n.node], n.mirrors)
            policers.add_metric([n.node], n.policers)
            for kind in ("firewall_rule", "route", "blocklist", "mirror", "policer"):
                refused.add_metric([n.node, kind], sum(1 for e in n.errors if e.kind == kind))
            last_sync.add_metric([n.node], n.last_sync_ns / 1e9)
            drift.add_metric([n.node], n.drift_repaired_total)
            epoch.add_metric([n.node], n.epoch)
        yield state
        yield observed
        yield services
        yield rules
        yield routes
        yield blocked
        yield mirrors
        yield policers
        yield refused
        yield last_sync
        yield drift
        yield epoch
        desired = GaugeMetricFamily(f"{PREFIX}_desired_generation", "the store's generation "
                                    "(every node should reach it)")
        desired.add_metric([], generation)
        yield desired
        count = GaugeMetricFamily(f"{PREFIX}_nodes", "registered nodes")
        count.add_metric([], len(nodes))
        yield count


class PassMetrics:
    """Reconcile passes, from PassReport (an on_pass observer)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(f"{PREFIX}_pass_duration_seconds", "reconcile pass "
                                  "duration, snapshot to the node's last reply, by result",
                                  ["node", "result"], buckets=PASS_BUCKETS, registry=registry)
        self.errors = Counter(f"{PREFIX}_pass_errors", "reconcile passes that failed",
                              ["node"], registry=registry)
        self.writes = Counter(f"{PREFIX}_pass_services_written", "services written "
                              "(put or deleted) by passes", ["node", "op"], registry=registry)
        self.calls = Counter(f"{PREFIX}_pass_write_calls", "PutServices and DeleteServices "
                             "calls made by passes", ["node"], registry=registry)

    def observe(self, node: str, report: PassReport) -> None:
        ok = report.result is not None
        self.duration.labels(node, "ok" if ok else "error").observe(
            max(0.0, report.ended - report.started))
        if report.result is None:
            self.errors.labels(node).inc()
            return
        self.writes.labels(node, "put").inc(report.result.put)
        self.writes.labels(node, "delete").inc(report.result.deleted)
        self.calls.labels(node).inc(report.result.calls)


class Exporter:
    """policyd's exporter (``xlb-policyd --metrics ADDR``).

    Before the server starts: `settings(reconciler_settings)` adds the pass observer
    (composed with any there is), and `rpc` goes into PolicydConfig.interceptors. After:
    `start(reconciler)`; `stop()` ends the HTTP server."""

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.registry = CollectorRegistry()
        self.rpc = RpcMetrics(PREFIX, self.registry)
        self.passes = PassMetrics(self.registry)
        self.server: MetricsServer | None = None

    def settings(self, settings: ReconcilerSettings) -> ReconcilerSettings:
        previous = settings.on_pass
        observe = self.passes.observe
        if previous is None:
            return dataclasses.replace(settings, on_pass=observe)

        def both(node: str, report: PassReport) -> None:
            try:
                observe(node, report)
            finally:
                previous(node, report)

        return dataclasses.replace(settings, on_pass=both)

    def start(self, reconciler: Reconciler) -> MetricsServer:
        self.registry.register(StatusCollector(reconciler))
        self.server = start_metrics(self.listen, self.registry)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
