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

import operator
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dpd import bpfsys
from dpd.maps import Map, percpu_stride
from dpd.node import Node
from xlb.dpd.v1 import datapath_pb2 as pb
from xlbcore.metrics import MetricsServer, RpcMetrics, family_header, labels_text, start_metrics
from xlbcore.service import Proto, ServiceSpec, host_text

PREFIX = "xlb_dpd"


def service_label(spec: ServiceSpec) -> str:
    """``VIP:PORT/PROTO``: the service label's value (an IPv6 VIP in brackets:
    ``[2001:db8::10]:80/tcp``)."""
    return f"{host_text(spec.vip)}:{spec.port}/{Proto(spec.proto).name.lower()}"


def _state_names() -> dict[int, str]:
    prefix = "CONNTRACK_STATE_"
    return {v.number: v.name.removeprefix(prefix).lower()
            for v in pb.ConntrackState.DESCRIPTOR.values}


def _chunks(m: Map, chunk: int = 4096) -> Iterator[tuple[int, bytes, bytes]]:
    """A kernel map's entries in raw chunks (bpfsys.lookup_batch_chunks)."""
    fd: int = m.fd  # type: ignore[attr-defined]
    return bpfsys.lookup_batch_chunks(fd, m.spec.key_size, m.value_bytes,
                                      max(1, min(chunk, m.spec.max_entries)))


def _sum_cpus(q: memoryview, field: int, stride: int, ncpus: int) -> list[int]:
    """Field `field` (0 packets, 1 bytes) of every slot of a per-CPU counter array viewed
    as u64s, summed over CPUs."""
    step = stride * ncpus
    total = list(q[field::step])
    for cpu in range(1, ncpus):
        total = list(map(operator.add, total, q[cpu * stride + field::step]))
    return total


def read_counters(m: Map, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(packets, bytes) of struct xlb_counter slots `ids` of per-CPU array `m`, summed
    over CPUs. A kernel map is read whole in a few syscalls (one lookup per slot costs
    ~5 us: 50,000 slots would be the whole scrape budget); others slot by slot."""
    stride = percpu_stride(m.spec.value_size) // 8  # in u64s: packets, bytes, padding
    ncpus = m.ncpus
    fd = getattr(m, "fd", None)
    raw = (b"".join(v for _, _, v in _chunks(m, 65536))
           if isinstance(fd, int) and m.spec.per_cpu else None)
    if raw is not None:
        q = memoryview(raw).cast("Q")
        packets = _sum_cpus(q, 0, stride, ncpus)
        nbytes = _sum_cpus(q, 1, stride, ncpus)
        n = len(packets)
        return [(packets[i], nbytes[i]) if i < n else (0, 0) for i in ids]
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
        self.names = [f"{PREFIX}_{suffix}" for suffix, _ in self.FAMILIES]
        # service key -> _Rendered, kept while the table's entry for it is the same object
        self._cache: dict[object, _Rendered] = {}

    def _render_labels(self, ident: object, spec: ServiceSpec, svc_id: int,
                       ep_ids: list[int]) -> _Rendered:
        node = self.node.settings.name
        service = service_label(spec)
        sp, sb, ep, eb = self.names
        svc = "{" + labels_text(node=node, service=service) + "} "
        eps = ["{" + labels_text(node=node, service=service,
                                 endpoint=f"{host_text(e.address)}:{e.port}") + "} "
               for e in spec.endpoints]
        return _Rendered(ident, sp + svc, sb + svc, [ep + x for x in eps],
                         [eb + x for x in eps], svc_id, ep_ids)

    def _current(self) -> list[_Rendered]:
        """Every service's rendered labels and counter slots (ServiceTable.entries()), so
        that both counter arrays can be read in bulk."""
        items = self.node.services.entries()
        cache = self._cache
        out = []
        for k, e in items:
            r = cache.get(k)
            if r is None or r.ident is not e:
                spec = e.spec
                r = self._render_labels(e, spec, e.svc_id, [
                    e.stat_ids[(ep.address, ep.port)] for ep in spec.endpoints])
                cache[k] = r
            out.append(r)
        if len(cache) > len(out):  # forget deleted services
            for key in set(cache) - {k for k, _ in items}:
                del cache[key]
        return out

    def stats(self) -> list[tuple[_Rendered, tuple[int, int], list[tuple[int, int]]]]:
        """(rendered labels, (packets, bytes), per endpoint (packets, bytes)) of every
        service."""
        table = self.node.services
        current = self._current()
        svc = iter(read_counters(table.svc_stats, [r.svc_id for r in current]))
        ep = iter(read_counters(table.ep_stats, [i for r in current for i in r.ep_ids]))
        return [(r, next(svc), [next(ep) for _ in r.ep_ids]) for r in current]

    def render(self) -> Iterator[str]:
        svc_packets: list[str] = []
        svc_bytes: list[str] = []
        ep_packets: list[str] = []
        ep_bytes: list[str] = []
        for r, total, eps in self.stats():
            svc_packets.append(f"{r.svc_packets}{total[0]}\n")
            svc_bytes.append(f"{r.svc_bytes}{total[1]}\n")
            for lp, lb, (packets, nbytes) in zip(r.ep_packets, r.ep_bytes, eps, strict=False):
                ep_packets.append(f"{lp}{packets}\n")
                ep_bytes.append(f"{lb}{nbytes}\n")
        for name, (_, help_text), lines in zip(
                self.names, self.FAMILIES, (svc_packets, svc_bytes, ep_packets, ep_bytes),
                strict=True):
            yield family_header(name, "counter", help_text)
            yield "".join(lines)


@dataclass(frozen=True)
class _Rendered:
    """A service's series names with their label sets, and its counter slots."""

    ident: object  # the table's entry these were made from
    svc_packets: str
    svc_bytes: str
    ep_packets: list[str]
    ep_bytes: list[str]
    svc_id: int
    ep_ids: list[int]


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
        # ct_v6_map: the value's state is its embedded IPv4 value's (`c`, at offset 0)
        self._state6_at = ct["xlb_ct6_val"].field("c").offset + self._state_at
        self._proto6_at = ct["xlb_ct6_key"].field("proto").offset

    def conntrack_by_state(self, v6: bool = False) -> Tally[tuple[int, int]]:
        """(protocol number, state number) -> entries (two per flow: both directions) of
        ct_v4_map (`v6`: of ct_v6_map)."""
        if v6:
            s, p, m = self._state6_at, self._proto6_at, self.node.conntrack.map6
        else:
            s, p, m = self._state_at, self._proto_at, self.node.conntrack.map
        if not isinstance(getattr(m, "fd", None), int):
            return Tally((k[p], v[s]) for k, v in m.items())
        tally: Tally[tuple[int, int]] = Tally()
        ks, vs = m.spec.key_size, m.value_bytes
        for n, keys, values in _chunks(m):  # the two bytes of each entry, by slicing
            tally.update(zip(keys[p:n * ks:ks], values[s:n * vs:vs], strict=True))
        return tally

    def map_fill(self, conntrack: int, conntrack6: int = -1) -> list[tuple[str, str, int, int]]:
        """(name, type, max_entries, used) as Node.maps() gives them, with ct_v4_map's
        count taken from the conntrack tally (`conntrack`) rather than read again (and
        ct_v6_map's: `conntrack6`, when given)."""
        used = {"ct_v4_map": conntrack}
        if conntrack6 >= 0:
            used["ct_v6_map"] = conntrack6
        return [(m.name, m.type, m.max_entries, m.used) for m in self.node.maps(used=used)]

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
        tally = self.conntrack_by_state()
        tally6 = self.conntrack_by_state(v6=True)
        for map_name, kind, max_entries, fill in self.map_fill(sum(tally.values()),
                                                                sum(tally6.values())):
            used.add_metric([name, map_name, kind], fill)
            size.add_metric([name, map_name, kind], max_entries)
        yield used
        yield size
        tally.update(tally6)  # both families' flows

        ct = GaugeMetricFamily(f"{PREFIX}_conntrack_entries", "conntrack entries (two per "
                               "flow, IPv4 and IPv6) by protocol and state",
                               labels=["node", "protocol", "state"])
        for proto in Proto:  # tcp, udp, sctp
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
        yield from self.firewall(name)
        yield from self.xdp(name)
        yield from self.policers(name)
        yield from self.health(name)

    def health(self, name: str) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Endpoints by health, the prober's counters, conntrack's removals (docs/health.md,
        docs/conntrack.md)."""
        h = self.node.health
        eps = GaugeMetricFamily(f"{PREFIX}_endpoints_health", "endpoints of services with a "
                                "health check, by state", labels=["node", "state"])
        for state, count in h.state_counts().items():
            eps.add_metric([name, state.name.lower()], count)
        yield eps
        c = h.counters
        probes = CounterMetricFamily(f"{PREFIX}_health_probes", "health probes done, by "
                                     "result", labels=["node", "result"])
        probes.add_metric([name, "ok"], c.probes - c.failures)
        probes.add_metric([name, "failed"], c.failures)
        yield probes
        changes = CounterMetricFamily(f"{PREFIX}_health_changes", "endpoint health "
                                      "changes, by the state entered", labels=["node", "to"])
        changes.add_metric([name, "down"], c.went_down)
        changes.add_metric([name, "up"], c.went_up)
        yield changes
        ct = self.node.conntrack.counters
        removed = CounterMetricFamily(f"{PREFIX}_conntrack_removed_flows", "flows dpd "
                                      "removed from conntrack, by why", labels=["node", "why"])
        removed.add_metric([name, "expired"], ct.expired)
        removed.add_metric([name, "flushed"], ct.flushed)
        yield removed

    def firewall(self, name: str) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Per-rule counters, the rule table's size and generation, drops by interface."""
        fw = self.node.firewall
        packets = CounterMetricFamily(f"{PREFIX}_rule_packets", "packets a firewall rule "
                                      "decided (flow openings, and every packet it dropped "
                                      "or redirected)", labels=["node", "rule"])
        nbytes = CounterMetricFamily(f"{PREFIX}_rule_bytes", "bytes of the packets a "
                                     "firewall rule decided", labels=["node", "rule"])
        for rule, counter in fw.stats():
            packets.add_metric([name, rule], counter.packets)
            nbytes.add_metric([name, rule], counter.bytes)
        yield packets
        yield nbytes
        generation, count = fw.summary()
        yield _gauge(f"{PREFIX}_firewall_rules", "firewall rules in the table", name, count)
        yield _gauge(f"{PREFIX}_firewall_generation", "the rule table's generation (bumped "
                     "by every write call)", name, generation)
        drops = CounterMetricFamily(f"{PREFIX}_interface_drops", "packets dropped by the "
                                    "datapath that came in on the interface, by reason",
                                    labels=["node", "interface", "reason"])
        for intf in fw.interfaces():
            ifname = fw.links.name(intf.ifindex) or str(intf.ifindex)
            for stat, n in fw.interface_drops(intf.ifindex).items():
                drops.add_metric([name, ifname, stat.removeprefix("drop_")], n)
        yield drops


    def xdp(self, name: str) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The blocklist's prefixes and what each dropped; the mirrors' copies."""
        n = self.node
        packets = CounterMetricFamily(f"{PREFIX}_blocklist_drops", "packets the XDP stage "
                                      "dropped for a blocked prefix", labels=["node", "prefix"])
        nbytes = CounterMetricFamily(f"{PREFIX}_blocklist_drop_bytes", "bytes of the packets "
                                     "the XDP stage dropped for a blocked prefix",
                                     labels=["node", "prefix"])
        entries = n.blocklist.entries()
        for b in entries:
            packets.add_metric([name, b.prefix], b.counters.packets)
            nbytes.add_metric([name, b.prefix], b.counters.bytes)
        yield packets
        yield nbytes
        yield _gauge(f"{PREFIX}_blocklist_prefixes", "prefixes in the blocklist", name,
                     len(entries))
        copies = CounterMetricFamily(f"{PREFIX}_mirror_packets", "packets copied out of a "
                                     "mirror interface", labels=["node", "interface", "mirror"])
        for m in n.mirrors.entries():
            copies.add_metric([name, m.spec.interface, m.spec.mirror_interface],
                              m.counters.packets)
        yield copies


    def policers(self, name: str) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Each policer's passed and dropped packets and bytes (polx_stats_map, summed
        over CPUs), and how many policers the node has (docs/policers.md)."""
        packets = CounterMetricFamily(f"{PREFIX}_policer_packets", "packets charged to a "
                                      "policer, by result (passed: the bucket paid for "
                                      "them; dropped: over the rate)",
                                      labels=["node", "policer", "result"])
        nbytes = CounterMetricFamily(f"{PREFIX}_policer_bytes", "bytes of the packets "
                                     "charged to a policer, by result",
                                     labels=["node", "policer", "result"])
        entries = self.node.policers.entries()
        for p in entries:
            for result, counter in (("passed", p.passed), ("dropped", p.dropped)):
                packets.add_metric([name, p.spec.name, result], counter.packets)
                nbytes.add_metric([name, p.spec.name, result], counter.bytes)
        yield packets
        yield nbytes
        yield _gauge(f"{PREFIX}_policers", "policers on the node", name, len(entries))


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
