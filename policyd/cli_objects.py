"""xlbctl's object documents (kubectl style) and tables: ``apply -f``, ``get``,
``delete -f``, ``status``.

A document::

    apiVersion: xlb.policy/v1        # optional
    kind: Service                    # Service, FirewallRule, Route, Blocklist, Mirror,
                                     # Policer or Node
    metadata:
      name: web
      nodeSelector: {zone: east}     # objects: the nodes that take it (empty: all)
      labels: {zone: east}           # nodes: their labels
      generation: 3                  # output only; with apply --cas: the one expected
    spec:                            # the object's fields, as the API names them
      vip: 198.19.0.10
      port: 80
      protocol: PROTOCOL_TCP
      endpoints: [{address: 198.18.1.2, port: 8080}]

A Service's ``port`` may also be written ``"8000-8099"`` (a range: port and port_last)
or ``"*"`` (every port of the VIP); ``get`` prints port and port_last as the API has
them (an any-port service: no port at all).

A FirewallRule's spec is ``xlb.types.v1.FirewallRuleSpec`` plus ``flush_existing``; a
Route's is ``xlb.types.v1.RouteSpec``; a Blocklist's ``{prefixes: [...]}``; a Mirror's
``{interface: ..., mirror_interface: ...}``; a Policer's ``{rate_bps: ..., burst_bytes:
..., interfaces: [...]}``; a Node's is ``{address: ...}``. ``kind: List``
with ``items`` holds several; YAML files may hold several documents. ``get -o yaml`` and
``get -o json`` print documents that ``apply -f`` takes back (output-only metadata:
generation, revision, updateTime, registerTime, are ignored unless ``--cas``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from policyd.client import PolicyClient
from xlb.policy.v1 import policy_pb2
from xlbcore.errors import brief, quote
from xlbcore.service import host_text, ports_text

API_VERSION = "xlb.policy/v1"
# apply -f's order (policers before the rules that may name them)
KINDS = ("Node", "Policer", "FirewallRule", "Blocklist", "Mirror", "Route", "Service")
_ALIASES = {
    "service": "Service", "services": "Service", "svc": "Service",
    "firewallrule": "FirewallRule", "firewallrules": "FirewallRule", "rule": "FirewallRule",
    "rules": "FirewallRule", "firewall": "FirewallRule", "fw": "FirewallRule",
    "route": "Route", "routes": "Route", "rt": "Route",
    "blocklist": "Blocklist", "blocklists": "Blocklist", "bl": "Blocklist",
    "mirror": "Mirror", "mirrors": "Mirror",
    "policer": "Policer", "policers": "Policer",
    "node": "Node", "nodes": "Node", "no": "Node",
}
_OUTPUT_ONLY = {"generation", "revision", "updateTime", "update_time", "registerTime",
                "register_time"}


def kind_of(text: str) -> str | None:
    """The kind a word names (``svc``, ``firewall-rules``, ``Route``...), else None."""
    return _ALIASES.get(text.lower().replace("_", "").replace("-", ""))


@dataclass
class Doc:
    kind: str
    msg: Any  # policy_pb2.Service / FirewallRule / Route / Node
    generation: int | None  # metadata.generation, when given
    where: str

    @property
    def name(self) -> str:
        return str(self.msg.name)


def _dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def to_doc(kind: str, msg: Any) -> dict[str, Any]:
    """An object as a document ``apply -f`` takes back."""
    body = _dict(msg)
    meta: dict[str, Any] = {"name": body.pop("name", "")}
    if kind == "Node":
        labels = body.pop("labels", {})
        if labels:
            meta["labels"] = labels
        if "register_time" in body:
            meta["registerTime"] = body.pop("register_time")
        return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": body}
    selector = body.pop("node_selector", {})
    if selector:
        meta["nodeSelector"] = selector
    for out, key in (("generation", "generation"), ("revision", "revision"),
                     ("updateTime", "update_time")):
        if key in body:
            value = body.pop(key)
            meta[out] = int(value) if key != "update_time" else value
    if kind == "Service":
        spec = body
    else:
        spec = body.pop("spec", {})
        if body.pop("flush_existing", False):
            spec["flush_existing"] = True
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


def is_doc(value: Any) -> bool:
    """A kubectl-style document (or List), as opposed to apply-file's older forms."""
    return isinstance(value, dict) and ("metadata" in value or value.get("kind") == "List")


def from_doc(value: Any, where: str) -> list[Doc]:
    """The objects of one document (a List: each item); ValueError naming the place."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object with kind, metadata and spec")
    if value.get("kind") == "List":
        items = value.get("items")
        if not isinstance(items, list):
            raise ValueError(f"{where}.items: expected a list")
        return [d for i, item in enumerate(items) for d in from_doc(item, f"{where}.items[{i}]")]
    unknown = set(value) - {"apiVersion", "kind", "metadata", "spec", "status"}
    if unknown:
        raise ValueError(f"{where}: unknown key {quote(sorted(unknown)[0])}")
    version = value.get("apiVersion", API_VERSION)
    if version != API_VERSION:
        raise ValueError(f"{where}.apiVersion: {quote(version)}: use {API_VERSION}")
    kind = kind_of(str(value.get("kind", "")))
    if kind is None:
        raise ValueError(f"{where}.kind: {quote(value.get('kind'))} is not one of"
                         f" {', '.join(KINDS)}")
    meta = value.get("metadata")
    spec = value.get("spec") or {}
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ValueError(f"{where}.metadata.name: required")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}.spec: expected an object")
    allowed = {"name", "labels"} if kind == "Node" else {"name", "nodeSelector",
                                                         "node_selector"}
    unknown = set(meta) - allowed - _OUTPUT_ONLY
    if unknown:
        raise ValueError(f"{where}.metadata: {quote(sorted(unknown)[0])} does not apply to"
                         f" a {kind}")
    name = str(meta["name"])
    generation = meta.get("generation")
    try:
        if kind == "Node":
            msg: Any = policy_pb2.Node(name=name, address=str(spec.get("address", "")),
                                       labels=_strings(meta.get("labels"), where, "labels"))
        elif kind == "Service":
            msg = json_format.ParseDict({**_service_ports(spec, where), "name": name},
                                        policy_pb2.Service())
        else:
            body = dict(spec)
            flush = bool(body.pop("flush_existing", body.pop("flushExisting", False)))
            message = _MESSAGES[kind]()
            msg = json_format.ParseDict({"name": name, "spec": body}, message)
            if flush:
                if kind != "FirewallRule":
                    raise ValueError(f"{where}.spec.flush_existing: only firewall rules have it")
                msg.flush_existing = True
        if kind != "Node":
            msg.node_selector.update(_strings(meta.get("nodeSelector",
                                                       meta.get("node_selector")),
                                              where, "nodeSelector"))
    except (json_format.ParseError, AttributeError, TypeError) as exc:
        raise ValueError(f"{where}.spec: {brief(str(exc), 160)}") from None
    return [Doc(kind, msg, int(generation) if generation is not None else None, where)]


def _service_ports(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """A Service spec whose ``port`` is written as people write ports, ``"8000-8099"`` or
    ``"*"`` (every port), as the API's port and port_last."""
    port = spec.get("port")
    if not isinstance(port, str) or port.isdigit():
        return spec
    from policyd.client import parse_service_ports

    first, last = parse_service_ports(port, f"{where}.spec.port")
    if last and spec.get("port_last", spec.get("portLast", last)) != last:
        raise ValueError(f"{where}.spec.port_last: {quote(spec.get('port_last'))} but port is"
                         f" {quote(port)}; give the range once")
    out = {k: v for k, v in spec.items() if k not in ("port", "port_last", "portLast")}
    return {**out, "port": first, "port_last": last}


_MESSAGES: dict[str, Any] = {"FirewallRule": policy_pb2.FirewallRule, "Route": policy_pb2.Route,
                             "Blocklist": policy_pb2.Blocklist, "Mirror": policy_pb2.Mirror,
                             "Policer": policy_pb2.Policer}


def _strings(value: Any, where: str, key: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}.metadata.{key}: expected a map of strings")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def read_docs(path: str) -> list[Doc]:
    """Every object of a file (``-``: stdin): kubectl-style documents, and the forms
    ``apply-file`` took before them (lists by kind, objects with a flat ``kind``)."""
    from policyd import cli  # the loader and the older forms live there

    where = brief(path, 120)
    out: list[Doc] = []
    for d, value in enumerate(cli._load(path)):
        at = f"{where}: document {d}" if d else where
        if is_doc(value):
            out.extend(from_doc(value, at))
            continue
        if isinstance(value, list) and value and all(is_doc(v) for v in value):
            for i, item in enumerate(value):
                out.extend(from_doc(item, f"{at}[{i}]"))
            continue
        legacy = cli.objects_from([value], where, first=d)
        for key, kind in (("firewall_rules", "FirewallRule"), ("routes", "Route"),
                          ("services", "Service")):
            out.extend(Doc(kind, m, None, at) for m in legacy[key])
    seen: dict[tuple[str, str], str] = {}
    for doc in out:
        first = seen.setdefault((doc.kind, doc.name), doc.where)
        if first != doc.where:
            raise ValueError(f"{doc.where}: {doc.kind} {quote(doc.name)} is also in {first}")
    return out


def by_kind(docs: Iterable[Doc]) -> dict[str, list[Doc]]:
    out: dict[str, list[Doc]] = {k: [] for k in KINDS}
    for doc in docs:
        out[doc.kind].append(doc)
    return out


# -- apply, delete ------------------------------------------------------------------------


def apply_docs(client: PolicyClient, docs: list[Doc], cas: bool) -> list[str]:
    """Apply every object: nodes one by one, then each kind in one call, all or nothing
    (rules, routes, then services: a new service is not exposed before the rules that
    guard it). With `cas`, each object's metadata.generation is the one expected (none:
    it must not exist). Returns a line per object."""
    groups = by_kind(docs)
    before = client.sync_status().generation
    lines: list[str] = []
    for doc in groups["Node"]:
        node = client.register_node(doc.name, doc.msg.address, dict(doc.msg.labels))
        lines.append(f"node/{node.name} registered ({node.address})")
    calls = (
        ("Policer", "policer", "policers", policy_pb2.ApplyPolicersRequest,
         client.stub.ApplyPolicers),
        ("FirewallRule", "firewall-rule", "rules", policy_pb2.ApplyFirewallRulesRequest,
         client.stub.ApplyFirewallRules),
        ("Blocklist", "blocklist", "blocklists", policy_pb2.ApplyBlocklistsRequest,
         client.stub.ApplyBlocklists),
        ("Mirror", "mirror", "mirrors", policy_pb2.ApplyMirrorsRequest, client.stub.ApplyMirrors),
        ("Route", "route", "routes", policy_pb2.ApplyRoutesRequest, client.stub.ApplyRoutes),
        ("Service", "service", "services", policy_pb2.ApplyServicesRequest,
         client.stub.ApplyServices),
    )
    for kind, label, field, request_type, call in calls:
        group = groups[kind]
        if not group:
            continue
        for doc in group:
            doc.msg.generation = (doc.generation or 0) if cas else 0
        request = request_type(**{field: [d.msg for d in group]}, check_generations=cas)
        reply = call(request, timeout=client.timeout)
        for stored in getattr(reply, field):
            what = "configured" if stored.revision > before else "unchanged"
            lines.append(f"{label}/{stored.name} {what} (generation {stored.generation})")
    return lines


def delete_docs(client: PolicyClient, docs: list[Doc], ignore_missing: bool) -> list[str]:
    """Delete every object of the documents: each kind in one call (all or nothing;
    NOT_FOUND names the first missing unless `ignore_missing`), services first, nodes
    last (deregistered: their datapath is left as it is)."""
    groups = by_kind(docs)
    lines: list[str] = []
    kinds = (("Service", "service", client.list_services, client.delete_services),
             ("Route", "route", client.list_routes, client.delete_routes),
             ("Mirror", "mirror", client.list_mirrors, client.delete_mirrors),
             ("Blocklist", "blocklist", client.list_blocklists, client.delete_blocklists),
             ("FirewallRule", "firewall-rule", client.list_rules, client.delete_rules),
             ("Policer", "policer", client.list_policers, client.delete_policers))
    for kind, label, listing, delete in kinds:
        names = [d.name for d in groups[kind]]
        if ignore_missing and names:
            have = {o.name for o in listing()}
            lines.extend(f"{label}/{n} not found" for n in names if n not in have)
            names = [n for n in names if n in have]
        if names:
            delete(names)
            lines.extend(f"{label}/{n} deleted" for n in names)
    nodes = {n.name for n in client.list_nodes()} if ignore_missing else None
    for doc in groups["Node"]:
        if nodes is not None and doc.name not in nodes:
            lines.append(f"node/{doc.name} not found")
            continue
        client.deregister_node(doc.name)
        lines.append(f"node/{doc.name} deregistered")
    return lines


# -- get ------------------------------------------------------------------------------------


def fetch(client: PolicyClient, kind: str, name: str) -> list[Any]:
    if kind == "Service":
        return [client.get_service(name)] if name else client.list_services()
    if kind == "FirewallRule":
        return [client.get_rule(name)] if name else client.list_rules()
    if kind == "Route":
        return [client.get_route(name)] if name else client.list_routes()
    if kind == "Blocklist":
        return [client.get_blocklist(name)] if name else client.list_blocklists()
    if kind == "Mirror":
        return [client.get_mirror(name)] if name else client.list_mirrors()
    if kind == "Policer":
        return [client.get_policer(name)] if name else client.list_policers()
    nodes = client.list_nodes()
    if name:
        nodes = [n for n in nodes if n.name == name]
        if not nodes:
            raise LookupError(f"node {quote(name)} not found")
    return nodes


def render(kind: str, objects: Sequence[Any], output: str, single: bool) -> str:
    """`objects` as yaml, json, wide or a table."""
    if output in ("yaml", "json"):
        docs = [to_doc(kind, o) for o in objects]
        if output == "json":
            value: Any = docs[0] if single else {"apiVersion": API_VERSION, "kind": "List",
                                                 "items": docs}
            return json.dumps(value, indent=2)
        import yaml

        return str(yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)).rstrip()
    wide = output == "wide"
    headers, rows = _ROWS[kind](objects, wide)
    return table(headers, rows)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, the last one left ragged."""
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) if i < len(headers) - 1 else c
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
                     for row in cells)


def labels_text(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(labels).items())) or "-"


def enum_name(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _services(objects: Sequence[Any], wide: bool) -> tuple[list[str], list[list[Any]]]:
    from xlb.types.v1 import types_pb2

    headers = ["NAME", "VIP", "PORT", "PROTO", "ENDPOINTS", "GENERATION"]
    if wide:
        headers += ["ALGORITHM", "NODE-SELECTOR", "REVISION", "UPDATED"]
    rows = []
    for s in objects:
        eps = ",".join(f"{host_text(e.address)}:{e.port}@{e.weight or 1}"
                       for e in s.endpoints)
        row = [s.name, s.vip, ports_text(s.port, s.port_last),
               enum_name(s.protocol, types_pb2.Protocol, "PROTOCOL_"),
               eps or "-", s.generation]
        if wide:
            row += [enum_name(s.algorithm, types_pb2.Algorithm, "ALGORITHM_"),
                    labels_text(s.node_selector), s.revision, s.update_time.ToJsonString()]
        rows.append(row)
    return headers, rows


def rule_match(spec: Any) -> str:
    from xlb.types.v1 import types_pb2

    m = spec.match
    parts = []
    if m.src:
        parts.append(f"src={m.src}")
    if m.dst:
        parts.append(f"dst={m.dst}")
    if m.protocol:
        parts.append(enum_name(m.protocol, types_pb2.Protocol, "PROTOCOL_"))
    for label, ports in (("sport", m.src_ports), ("dport", m.dst_ports)):
        if ports.first or ports.last:
            parts.append(f"{label}={ports.first}" if ports.first == ports.last
                         else f"{label}={ports.first}-{ports.last}")
    if m.in_interface:
        parts.append(f"in={m.in_interface}")
    return " ".join(parts) or "any"


def _rules(objects: Sequence[Any], wide: bool) -> tuple[list[str], list[list[Any]]]:
    from xlb.types.v1 import types_pb2

    headers = ["NAME", "PRIORITY", "ACTION", "MATCH", "GENERATION"]
    if wide:
        headers += ["FLUSH", "NODE-SELECTOR", "REVISION"]
    rows = []
    for r in objects:
        action = enum_name(r.spec.action, types_pb2.FirewallAction, "FIREWALL_ACTION_")
        if r.spec.redirect_interface:
            action += f"->{r.spec.redirect_interface}"
        row = [r.name, r.spec.priority, action, rule_match(r.spec), r.generation]
        if wide:
            row += ["yes" if r.flush_existing else "no", labels_text(r.node_selector),
                    r.revision]
        rows.append(row)
    return headers, rows


def next_hops(spec: Any) -> str:
    hops = []
    for h in spec.next_hops:
        text = h.gateway or ""
        if h.interface:
            text += f"{' ' if text else ''}dev {h.interface}"
        if h.weight and h.weight != 1:
            text += f" weight {h.weight}"
        hops.append(text)
    return ", ".join(hops) or "-"


def _routes(objects: Sequence[Any], wide: bool) -> tuple[list[str], list[list[Any]]]:
    headers = ["NAME", "PREFIX", "NEXT-HOPS", "GENERATION"]
    if wide:
        headers += ["NODE-SELECTOR", "REVISION"]
    rows = []
    for r in objects:
        row = [r.name, r.spec.prefix, next_hops(r.spec), r.generation]
        if wide:
            row += [labels_text(r.node_selector), r.revision]
        rows.append(row)
    return headers, rows


def _nodes(objects: Sequence[Any], wide: bool) -> tuple[list[str], list[list[Any]]]:
    headers = ["NAME", "ADDRESS", "LABELS"] + (["REGISTERED"] if wide else [])
    rows = [[n.name, n.address, labels_text(n.labels)]
            + ([n.register_time.ToJsonString()] if wide else []) for n in objects]
    return headers, rows


def _blocklists(objects: Sequence[Any], wide: bool) -> tuple[list[str], list[list[Any]]]:
    headers = ["NAME", "PREFIXES", "GENERATION"]
    if wide:
        headers += ["NODE-SELECTOR", "REVISION"]
    rows = []
    for b in objects:
        prefixes = list(b.spec.prefixes)
        text = ",".join(prefixes if wide or len(prefixes) <= 3
                        else [*prefixes[:3], f"... ({len(prefixes)})"])
        row = [b.name, text or "-", b.generation]
        if wide:
            row += [labels_text(b.node_selector), b.revision]
        rows.append(row)
    return headers, rows


def _mirrors(objects: Sequence[Any], wide: bool) -> tuple[list[str], list[list[Any]]]:
    headers = ["NAME", "INTERFACE", "MIRROR-INTERFACE", "GENERATION"]
    if wide:
        headers += ["NODE-SELECTOR", "REVISION"]
    rows = []
    for m in objects:
        row = [m.name, m.spec.interface, m.spec.mirror_interface, m.generation]
        if wide:
            row += [labels_text(m.node_selector), m.revision]
        rows.append(row)
    return headers, rows


def _policers(objects: Sequence[Any], wide: bool) -> tuple[list[str], list[list[Any]]]:
    headers = ["NAME", "RATE-BPS", "BURST-BYTES", "INTERFACES", "GENERATION"]
    if wide:
        headers += ["NODE-SELECTOR", "REVISION"]
    rows = []
    for p in objects:
        row = [p.name, p.spec.rate_bps, p.spec.burst_bytes, ",".join(p.spec.interfaces) or "-",
               p.generation]
        if wide:
            row += [labels_text(p.node_selector), p.revision]
        rows.append(row)
    return headers, rows


_ROWS = {"Service": _services, "FirewallRule": _rules, "Route": _routes, "Node": _nodes,
         "Blocklist": _blocklists, "Mirror": _mirrors, "Policer": _policers}


# -- status -----------------------------------------------------------------------------------


def status_table(status: policy_pb2.GetSyncStatusResponse, wide: bool = False) -> str:
    headers = ["NODE", "STATE", "OBSERVED", "SERVICES", "RULES", "ROUTES", "DRIFT", "MESSAGE"]
    if wide:
        headers[-1:-1] = ["BLOCKED", "MIRRORS", "POLICERS", "EPOCH", "FOREIGN"]
    rows = []
    for n in status.nodes:
        state = policy_pb2.SyncState.Name(n.state).removeprefix("SYNC_STATE_")
        row: list[Any] = [n.node, state, f"{n.observed_generation}/{status.generation}",
                          n.services, n.firewall_rules, n.routes,
                          f"{n.drift_repaired_total}", brief(n.message, 80) or "-"]
        if wide:
            row[-1:-1] = [n.blocklist_prefixes, n.mirrors, n.policers, n.epoch, len(n.foreign)]
        rows.append(row)
    return table(headers, rows) if rows else "no nodes"


def all_synced(status: policy_pb2.GetSyncStatusResponse) -> bool:
    return all(n.state == policy_pb2.SYNC_STATE_SYNCED
               and n.observed_generation >= status.generation for n in status.nodes)


def say(text: str) -> None:
    """CLI output: one block of text on stdout."""
    sys.stdout.write(text + "\n")
