"""dpd's Prometheus metrics, read from the node's maps on every scrape (docs/metrics.md).

Nothing is kept between scrapes but rendered label strings: every counter is read from
its per-CPU map and summed over CPUs when Prometheus asks, so a value is never counted
twice and nothing runs while nobody scrapes. Families:

- per service and per endpoint packets and bytes (svc_stats_map, ep_stats_map): written
  as text directly (`ServiceFamilies`), one line per series, label strings kept per
  service until the service changes: 10,000 services stay well under 200 ms a scrape;
- the global counters (stats_map): ``drop_*`` as xlb_dpd_drops_total{reason}, the rest
  as xlb_dpd_datapath_events_total{event};
- map fill levels, conntrack entries by protocol and state, the service table's size and
  generation (`NodeCollector`, through prometheus_client);
- gRPC calls by method and code (xlbcore.metrics.RpcMetrics).

Every series has a ``node`` label (one process can serve several simulated nodes).
"""

from __future__ import annotations

import ctypes
import errno
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dpd import bpfsys
from dpd.maps import Map, percpu_stride
from dpd.node import Node
from xlb.dpd.v1 import datapath_pb2 as pb
from xlbcore.metrics import MetricsServer, RpcMetrics, family_header, labels_text, start_metrics
from xlbcore.service import Proto, ServiceSpec

PREFIX = "xlb_dpd"


def service_label(spec: ServiceSpec) -> str:
    """``VIP:PORT/PROTO``: the service label's value."""
    return f"{spec.vip}:{spec.port}/{Proto(spec.proto).name.lower()}"


def _state_names() -> dict[int, str]:
    prefix = "CONNTRACK_STATE_"
    return {v.number: v.name.removeprefix(prefix).lower()
            for v in pb.ConntrackState.DESCRIPTOR.values}


def _read_percpu_array(fd: int, entries: int, value_bytes: int) -> bytes | None:
    """A whole per-CPU array in a few BPF_MAP_LOOKUP_BATCH calls (None: not supported)."""
    chunk = min(entries, 65536)
    out = bytearray()
    token_in = ctypes.create_string_buffer(8)
    token_out = ctypes.create_string_buffer(8)
    keys = ctypes.create_string_buffer(4 * chunk)
    values = ctypes.create_string_buffer(value_bytes * chunk)
    first = True
    lib: Any = bpfsys._lib  # the libbpf handle dpd already loaded
    while True:
        count = ctypes.c_uint32(chunk)
        rc = lib.bpf_map_lookup_batch(fd, None if first else token_in, token_out, keys,
                                      values, ctypes.byref(count), None)
        err = ctypes.get_errno() if rc < 0 else 0
        out += values.raw[:count.value * value_bytes]
        if rc < 0:
            if err == errno.ENOENT:
                return bytes(out)
            return None
        ctypes.memmove(token_in, token_out, 8)
        first = False


def read_counters(m: Map, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(packets, bytes) of struct xlb_counter slots `ids` of per-CPU array `m`, summed
    over CPUs. A kernel map is read whole in a few syscalls (one lookup per slot costs
    ~5 us: 50,000 slots would be the whole scrape budget); others slot by slot."""
    stride = percpu_stride(m.spec.value_size) // 8  # in u64s: packets, bytes, padding
    ncpus = m.ncpus
    fd = getattr(m, "fd", None)
    raw = (_read_percpu_array(fd, m.spec.max_entries, m.value_bytes)
           if isinstance(fd, int) and m.spec.per_cpu else None)
    if raw is not None:
        q = memoryview(raw).cast("Q")
        per_slot = stride * ncpus
        if ncpus == 1:
            return [(q[i * per_slot], q[i * per_slot + 1]) for i in ids]
        out = []
        for i in ids:
            base = i * per_slot
            if base >= len(q):
                out.append((0, 0))
                continue
            cells = q[base:base + per_slot]
            out.append((sum(cells[0::stride]), sum(cells[1::stride])))
        return out
    out = []
    for i in ids:
        value = m.get(i.to_bytes(4, "little"))
        if value is None:
            out.append((0, 0))
            continue
        q = memoryview(value).cast("Q")
        out.append((sum(q[0::stride]), sum(q[1::stride])))
    return out


class ServiceFamilies:
    """Per-service and per-endpoint packets and bytes, as exposition text."""

    FAMILIES = (
        ("service_packets_total", "packets to the service's VIP:port, summed over CPUs"),
        ("service_bytes_total", "bytes to the service's VIP:port, summed over CPUs"),
        ("endpoint_packets_total", "packets sent to the endpoint, summed over CPUs"),
        ("endpoint_bytes_total", "bytes sent to the endpoint, summed over CPUs"),
    )

    def __init__(self, node: Node) -> None:
        self.node = node
        # service key -> (the spec the labels were made for, its label set, endpoints')
        self._labels: dict[object, tuple[ServiceSpec, str, list[str]]] = {}

    def _labels_of(self, key: object, spec: ServiceSpec) -> tuple[str, list[str]]:
        cached = self._labels.get(key)
        if cached is not None and cached[0] is spec:
            return cached[1], cached[2]
        node = self.node.settings.name
        service = service_label(spec)
        svc = "{" + labels_text(node=node, service=service) + "} "
        eps = ["{" + labels_text(node=node, service=service,
                                 endpoint=f"{ep.address}:{ep.port}") + "} "
               for ep in spec.endpoints]
        self._labels[key] = (spec, svc, eps)
        return svc, eps

    def stats(self) -> list[tuple[object, ServiceSpec, tuple[int, int], list[tuple[int, int]]]]:
        """(key, spec, (packets, bytes), per endpoint (packets, bytes)) of every service.

        Reads the table's index of counter slots (ServiceTable._index, read-only) to fetch
        both counter arrays in bulk; without it, ServiceTable.stats() (one lookup per
        counter)."""
        table = self.node.services
        index = getattr(table, "_index", None)
        lock = getattr(table, "_lock", None)
        try:
            if not isinstance(index, dict) or lock is None:
                raise AttributeError("no index")
            with lock:
                entries = [(k, e.spec, e.svc_id, [e.stat_ids[(ep.address, ep.port)]
                                                  for ep in e.spec.endpoints])
                           for k, e in index.items()]
        except (AttributeError, KeyError, TypeError):
            return [(spec.key, spec, (t.packets, t.bytes), [(c.packets, c.bytes) for _, c in eps])
                    for spec, t, eps in table.stats()]
        svc = iter(read_counters(table.svc_stats, [sid for _, _, sid, _ in entries]))
        ep = iter(read_counters(table.ep_stats,
                                [i for _, _, _, ids in entries for i in ids]))
        return [(k, spec, next(svc), [next(ep) for _ in ids]) for k, spec, _, ids in entries]

    def render(self) -> Iterator[str]:
        names = [f"{PREFIX}_{suffix}" for suffix, _ in self.FAMILIES]
        sp, sb, ep, eb = names
        svc_packets: list[str] = []
        svc_bytes: list[str] = []
        ep_packets: list[str] = []
        ep_bytes: list[str] = []
        seen = set()
        for key, spec, total, eps in self.stats():
            seen.add(key)
            svc, ep_labels = self._labels_of(key, spec)
            svc_packets.append(f"{sp}{svc}{total[0]}\n")
            svc_bytes.append(f"{sb}{svc}{total[1]}\n")
            for lbl, (packets, nbytes) in zip(ep_labels, eps, strict=False):
                ep_packets.append(f"{ep}{lbl}{packets}\n")
                ep_bytes.append(f"{eb}{lbl}{nbytes}\n")
        if len(self._labels) > len(seen):  # forget deleted services
            for key in [k for k in self._labels if k not in seen]:
                del self._labels[key]
        for name, (_, help_text), lines in zip(
                names, self.FAMILIES, (svc_packets, svc_bytes, ep_packets, ep_bytes),
                strict=True):
            yield family_header(name, "counter", help_text)
            yield "".join(lines)


class NodeCollector(Collector):
    """Global counters, map fill, conntrack by state, service table size and generation."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._states = _state_names()
        ct = node.dp.abi.structs
        self._state_at = next(f.offset for f in ct["xlb_ct_val"].fields
                              if f.name == "state")
        self._proto_at = next(f.offset for f in ct["xlb_ct_key"].fields
                              if f.name == "proto")

    def conntrack_by_state(self) -> Tally[tuple[int, int]]:
        """(protocol number, state number) -> entries (two per flow: both directions)."""
        s, p = self._state_at, self._proto_at
        return Tally((k[p], v[s]) for k, v in self.node.conntrack.map.items())

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        n = self.node
        name = n.settings.name
        drops = CounterMetricFamily(f"{PREFIX}_drops", "packets dropped by the datapath, "
                                    "by reason (stats_map drop_* counters)",
                                    labels=["node", "reason"])
        events = CounterMetricFamily(f"{PREFIX}_datapath_events", "the datapath's other "
                                     "global counters (stats_map), by event",
                                     labels=["node", "event"])
        for stat, counter in n.global_stats().items():
            if stat.startswith("drop_"):
                drops.add_metric([name, stat.removeprefix("drop_")], counter.packets)
            else:
                events.add_metric([name, stat], counter.packets)
        yield drops
        yield events

        used = GaugeMetricFamily(f"{PREFIX}_map_entries", "entries in the map (hash maps; "
                                 "nat_v4_map: services; 0 for arrays)",
                                 labels=["node", "map", "type"])
        size = GaugeMetricFamily(f"{PREFIX}_map_max_entries", "the map's capacity",
                                 labels=["node", "map", "type"])
        for m in n.maps():
            used.add_metric([name, m.name, m.type], m.used)
            size.add_metric([name, m.name, m.type], m.max_entries)
        yield used
        yield size

        ct = GaugeMetricFamily(f"{PREFIX}_conntrack_entries", "conntrack entries (two per "
                               "flow) by protocol and state", labels=["node", "protocol", "state"])
        tally = self.conntrack_by_state()
        for proto in (Proto.TCP, Proto.UDP):
            for number, state in self._states.items():
                if number:
                    ct.add_metric([name, proto.name.lower(), state],
                                  tally.pop((int(proto), number), 0))
        for (proto_n, number), count in sorted(tally.items()):  # anything unexpected
            ct.add_metric([name, str(proto_n), self._states.get(number, str(number))], count)
        yield ct

        generation, count = n.services.summary()
        yield _gauge(f"{PREFIX}_services", "services in the table", name, count)
        yield _gauge(f"{PREFIX}_services_generation", "the service table's generation "
                     "(bumped by every write call)", name, generation)


def _gauge(metric: str, help_text: str, node: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(metric, help_text, labels=["node"])
    g.add_metric([node], value)
    return g


def register_node(registry: CollectorRegistry, node: Node) -> ServiceFamilies:
    """Add `node`'s collectors to `registry`; returns its fast families (for start_metrics)."""
    registry.register(NodeCollector(node))
    return ServiceFamilies(node)


class Exporter:
    """dpd's exporter (``xlb-dpd --metrics ADDR``): its registry, the RPC interceptor to
    give the gRPC servers, and the HTTP server, started once the nodes exist."""

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.registry = CollectorRegistry()
        self.rpc = RpcMetrics(PREFIX, self.registry)
        self.server: MetricsServer | None = None

    @property
    def interceptors(self) -> list[RpcMetrics]:
        return [self.rpc]

    def start(self, nodes: Sequence[Node]) -> MetricsServer:
        fast = [register_node(self.registry, n).render for n in nodes]
        self.server = start_metrics(self.listen, self.registry, fast)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
