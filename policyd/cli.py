"""xlbctl: operate policyd from a shell.

    xlbctl apply -f site.yaml [--cas]        # services, rules, routes, nodes (YAML or JSON)
    xlbctl get services|firewall-rules|routes|blocklists|mirrors|policers|nodes [NAME]
        [-o yaml|json|wide]
    xlbctl delete -f site.yaml [--ignore-not-found] | delete KIND NAME [NAME...]
    xlbctl status [NODE] [-o table|wide|json] [--wait [--timeout S]]
    xlbctl --dpd unix:/run/xlb/dpd.sock services|conntrack|stats|interfaces|rules|routes|policers
    xlbctl completion bash > /etc/bash_completion.d/xlbctl
    xlbctl --version

    xlbctl --server unix:/run/xlb/policyd.sock service apply --name web \\
        --vip 198.19.0.10 --port 80 --protocol tcp \\
        --endpoint 198.18.1.2:8080 --endpoint 198.18.1.3:8080@2
    xlbctl service apply --name games --vip 198.19.0.10 --port 8000-8099 --protocol udp \\
        --endpoint 198.18.1.2:0      # a port range; endpoint port 0 keeps the client's port
    xlbctl service list | get NAME | delete NAME [NAME...]
    xlbctl service apply-file FILE.json     # many services in one call (FILE - : stdin)
    xlbctl firewall apply --name no-telnet --priority 100 --action drop \
        --protocol tcp --dst 198.19.0.0/16 --dst-ports 23 [--src P] [--src-ports 1-1023] \
        [--in-interface eth0] [--redirect-interface eth1] [--flush-existing]
    xlbctl firewall list | get NAME | delete NAME [NAME...]
    xlbctl route apply --name via-a --prefix 198.19.0.0/16 \
        --next-hop 198.18.1.1 --next-hop 198.18.2.1,dev=eth2,weight=3 [--next-hop dev=eth3]
    xlbctl route list | get NAME | delete NAME [NAME...]
    xlbctl blocklist apply --name scanners --prefix 198.18.66.0/24 [--prefix 2001:db8:66::/48]
    xlbctl blocklist list | get NAME | delete NAME [NAME...]
    xlbctl mirror apply --name tap --interface eth0 --mirror-interface mirror0
    xlbctl mirror list | get NAME | delete NAME [NAME...]
    xlbctl policer apply --name eth0-in --rate-bps 8000000 --burst-bytes 30000 \
        --interface eth0 [--interface eth1] [--node-selector K=V...]
    xlbctl policer list | get NAME | delete NAME [NAME...]
    xlbctl apply-file FILE                  # alias of apply -f
    xlbctl node register NAME ADDR [--label K=V...] | deregister NAME | list

``apply -f`` takes kubectl-style documents (``kind`` Service, FirewallRule, Route or
Node, ``metadata.name``, ``metadata.nodeSelector`` / ``metadata.labels``, ``spec``:
policyd.cli_objects), several per file; what ``get -o yaml|json`` prints it takes back.
With ``--cas`` each object's ``metadata.generation`` must still be the stored one
(ABORTED otherwise, nothing written). ``status`` prints a table on a terminal (JSON
when its output is not one; ``-o`` chooses) and, as a table, exits 1 when any node is
not SYNCED.

``service apply-file`` takes a JSON list of services as ``service list`` prints them (or
an object with a "services" list); all are applied in one ApplyServices call, all or
nothing. ``apply-file`` takes JSON or YAML (YAML needs PyYAML): an object with any of the
lists "services", "firewall_rules" and "routes" (objects as ``list`` prints them), or a
list (or YAML documents) of objects each with "kind": service, firewall_rule or route.
Each kind is applied in one call, all or nothing: firewall rules first, then routes,
then services (so a new service is not exposed before the rules that guard it).
Several names to ``delete`` are deleted in one call, all or nothing.

The older commands print their results as JSON on stdout. On error the gRPC status and
its message go to stderr and the exit code is 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from policyd import cli_certs, cli_events, cli_node, cli_objects
from policyd.client import (
    ACTIONS,
    ALGORITHMS,
    CHANNEL_OPTIONS,
    PROTOCOLS,
    RULE_PROTOCOLS,
    PolicyClient,
    is_synced,
    make_blocklist,
    make_mirror,
    make_policer,
    make_route,
    make_rule,
    make_service,
    parse_service_ports,
)
from policyd.defaults import DEFAULT_LISTEN, ENV_SERVER
from xlb.policy.v1 import policy_pb2
from xlbcore.errors import brief, quote


def _json(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2))  # noqa: T201 (CLI output)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xlbctl",
        description="Operate xlb-policyd.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--server",
        default=os.environ.get(ENV_SERVER, DEFAULT_LISTEN),
        help=f"policyd address, HOST:PORT or unix:PATH (default ${ENV_SERVER} or {DEFAULT_LISTEN})",
    )
    p.add_argument("--rpc-timeout", type=float, default=10.0, help="seconds per call")
    p.add_argument("--dpd", default="", metavar="ADDR",
                   help="a node's dpd (HOST:PORT or unix:PATH): for the node views "
                        f"({', '.join(cli_node.VIEWS)})")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    cli_certs.add_connection_args(p)
    sub = p.add_subparsers(dest="group", required=True)
    cli_certs.add_certs_parser(sub)
    cli_events.add_events_parser(sub)

    ap = sub.add_parser("apply", help="create or replace the objects of a file (-f)")
    ap.add_argument("-f", "--filename", required=True, metavar="FILE",
                    help="YAML or JSON, several documents and kinds; - for stdin")
    ap.add_argument("--cas", action="store_true",
                    help="compare-and-swap: each object's metadata.generation must be the "
                         "stored one (none: it must not exist)")
    get = sub.add_parser("get", help="show objects (as a table, or documents apply -f takes)")
    get.add_argument("kind", help="services, firewall-rules, routes, blocklists, mirrors, "
                                  "policers or nodes")
    get.add_argument("name", nargs="?", default="")
    get.add_argument("-o", "--output", choices=("table", "wide", "yaml", "json"),
                     default="table")
    de = sub.add_parser("delete", help="delete the objects of a file (-f), or KIND NAME...")
    de.add_argument("-f", "--filename", default="", metavar="FILE")
    de.add_argument("--ignore-not-found", action="store_true")
    de.add_argument("target", nargs="*", metavar="KIND NAME", help="KIND NAME [NAME...]")
    comp = sub.add_parser("completion", help="print a shell completion script")
    comp.add_argument("shell", choices=("bash",))
    for view in cli_node.VIEWS:
        nv = sub.add_parser(view, help=f"the node's {view} (needs --dpd), decoded")
        nv.add_argument("-o", "--output", choices=("table", "wide"), default="table")

    svc = sub.add_parser("service", help="desired services").add_subparsers(
        dest="verb", required=True
    )
    apply = svc.add_parser("apply", help="create or replace a service")
    apply.add_argument("--name", required=True)
    apply.add_argument("--vip", required=True)
    apply.add_argument("--port", required=True, metavar="PORT|FIRST-LAST|*",
                       help="one port, a port range (8000-8099) or * for every port of the "
                            "VIP (docs/services.md)")
    apply.add_argument("--port-last", type=int, default=None, metavar="PORT",
                       help="a port range's last port (as --port FIRST-LAST)")
    apply.add_argument("--protocol", choices=sorted(PROTOCOLS), default="tcp")
    apply.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="round-robin")
    apply.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="ADDR:PORT[@WEIGHT][,priority=N]",
        help="an endpoint; repeat for several (priority: its failover group, lower "
             "preferred; docs/algorithms.md)",
    )
    apply.add_argument("--persistence", type=int, default=0, metavar="SECONDS",
                       help="session persistence: a client's new connections go to its "
                            "last endpoint for this long (0: off)")
    apply.add_argument(
        "--health", default=None, metavar="KIND[,KEY=VALUE...]",
        help="probe the endpoints (docs/health.md): tcp, udp, http or icmp, with "
             "interval=, timeout= (200, 200ms, 1.5s), rise=, fall=, port=, path=, status=, "
             "request=, expect=; e.g. http,interval=500ms,path=/healthz",
    )
    apply.add_argument(
        "--ct-timeout", action="append", default=[], metavar="STATE=SECONDS",
        help="an idle timeout of this service's flows (docs/conntrack.md), e.g. "
             "tcp_established=600; repeat for several",
    )
    apply_file = svc.add_parser(
        "apply-file", help="create or replace every service of a JSON file, atomically"
    )
    apply_file.add_argument("file", help='JSON: a list of services, or {"services": [...]}')
    apply_file.add_argument(
        "--full", action="store_true", help="print every stored service, not a summary"
    )
    svc.add_parser("delete", help="delete services (several: atomically)").add_argument(
        "name", nargs="+"
    )
    svc.add_parser("get", help="show a service").add_argument("name")
    svc.add_parser("list", help="list services")

    fw = sub.add_parser("firewall", help="desired firewall rules").add_subparsers(
        dest="verb", required=True)
    rule = fw.add_parser("apply", help="create or replace a firewall rule")
    rule.add_argument("--name", required=True)
    rule.add_argument("--action", choices=sorted(ACTIONS), required=True)
    rule.add_argument("--priority", type=int, default=0,
                      help="0..65535; the higher decides between overlapping rules")
    rule.add_argument("--src", default="", help="source prefix or address (IPv4 or IPv6)")
    rule.add_argument("--dst", default="", help="destination prefix or address")
    rule.add_argument("--protocol", choices=sorted(RULE_PROTOCOLS), default="any")
    rule.add_argument("--src-ports", default="", metavar="PORT|FIRST-LAST")
    rule.add_argument("--dst-ports", default="", metavar="PORT|FIRST-LAST")
    rule.add_argument("--in-interface", default="", help="ingress interface (checked per node)")
    rule.add_argument("--redirect-interface", default="", help="for --action redirect")
    rule.add_argument("--flush-existing", action="store_true",
                      help="when a node takes the rule, also end the established flows its "
                           "new rule set drops (otherwise: new flows only)")
    fw.add_parser("delete", help="delete rules (several: atomically)").add_argument(
        "name", nargs="+")
    fw.add_parser("get", help="show a rule").add_argument("name")
    fw.add_parser("list", help="list rules")

    rt = sub.add_parser("route", help="desired routes").add_subparsers(
        dest="verb", required=True)
    route = rt.add_parser("apply", help="create or replace a route")
    route.add_argument("--name", required=True)
    route.add_argument("--prefix", required=True, help="198.19.0.0/16, 2001:db8:1::/48")
    route.add_argument("--next-hop", action="append", default=[], required=True,
                       metavar="GATEWAY[,dev=IFACE][,weight=N]|dev=IFACE",
                       help="a next hop; repeat for ECMP")
    rt.add_parser("delete", help="delete routes (several: atomically)").add_argument(
        "name", nargs="+")
    rt.add_parser("get", help="show a route").add_argument("name")
    rt.add_parser("list", help="list routes")

    bl = sub.add_parser("blocklist", help="desired blocklists (XDP early drop)").add_subparsers(
        dest="verb", required=True)
    blocklist = bl.add_parser("apply", help="create or replace a blocklist")
    blocklist.add_argument("--name", required=True)
    blocklist.add_argument("--prefix", action="append", default=[], required=True,
                           help="a source prefix or address (198.18.66.0/24, "
                                "2001:db8:66::/48); repeat for more")
    bl.add_parser("delete", help="delete blocklists (several: atomically)").add_argument(
        "name", nargs="+")
    bl.add_parser("get", help="show a blocklist").add_argument("name")
    bl.add_parser("list", help="list blocklists")

    mi = sub.add_parser("mirror", help="desired mirrors (copies of an interface's "
                                       "traffic)").add_subparsers(dest="verb", required=True)
    mirror = mi.add_parser("apply", help="create or replace a mirror")
    mirror.add_argument("--name", required=True)
    mirror.add_argument("--interface", required=True, help="the mirrored interface")
    mirror.add_argument("--mirror-interface", required=True, help="copies leave by it")
    mi.add_parser("delete", help="delete mirrors (several: atomically)").add_argument(
        "name", nargs="+")
    mi.add_parser("get", help="show a mirror").add_argument("name")
    mi.add_parser("list", help="list mirrors")

    po = sub.add_parser("policer", help="desired policers (token buckets charged by an "
                                        "interface's incoming packets)").add_subparsers(
        dest="verb", required=True)
    policer = po.add_parser("apply", help="create or replace a policer")
    policer.add_argument("--name", required=True)
    policer.add_argument("--rate-bps", type=int, required=True, help="bits per second")
    policer.add_argument("--burst-bytes", type=int, required=True, help="the bucket's depth")
    policer.add_argument("--interface", action="append", default=[],
                         help="a policed interface; repeat for more")
    policer.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                         help="the nodes that take it (labels); repeat for several")
    po.add_parser("delete", help="delete policers (several: atomically)").add_argument(
        "name", nargs="+")
    po.add_parser("get", help="show a policer").add_argument("name")
    po.add_parser("list", help="list policers")

    af = sub.add_parser("apply-file",
                        help="the older form of apply -f (JSON output, no Node documents)")
    af.add_argument("file", help="FILE, or - for stdin")
    af.add_argument("--full", action="store_true", help="print every stored object")

    node = sub.add_parser("node", help="dpd nodes policyd manages").add_subparsers(
        dest="verb", required=True
    )
    reg = node.add_parser("register", help="add a node, or move it to a new address")
    reg.add_argument("name")
    reg.add_argument("address", help="the node's dpd: HOST:PORT or unix:PATH")
    reg.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="a label objects' node selectors match; repeat for several")
    dereg = node.add_parser("deregister", help="stop managing a node (its datapath is left as is)")
    dereg.add_argument("name")
    node.add_parser("list", help="list nodes")

    status = sub.add_parser("status", help="per-node sync status")
    status.add_argument("node", nargs="?", default="")
    status.add_argument("--wait", action="store_true", help="wait until SYNCED")
    status.add_argument("--timeout", type=float, default=60.0, help="for --wait (seconds)")
    status.add_argument("-o", "--output", choices=("table", "wide", "json"), default="",
                        help="default: a table on a terminal, JSON otherwise")
    return p


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("xlb")
    except Exception:  # noqa: BLE001 - a checkout that is not installed
        return "unknown (not installed)"


def parse_labels(values: Sequence[str], flag: str = "--label") -> dict[str, str]:
    out = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {quote(text)}: use KEY=VALUE")
        out[key] = value
    return out


def completion_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for xlbctl, from the parser itself: commands, their
    verbs and flags, and the kinds of get/delete."""
    words: dict[str, list[str]] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        options = [o for a in p._actions for o in a.option_strings]
        subs: list[str] = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    subs.append(name)
                    walk(child, f"{path} {name}".strip())
        words[path] = subs + options
    walk(parser, "")
    kinds = ["services", "firewall-rules", "routes", "nodes", "blocklists", "mirrors",
             "policers"]
    words["get"] = [*kinds, *words["get"]]
    words["delete"] = [*kinds, *words["delete"]]
    cases = "\n".join(f'    "{k}") opts="{" ".join(v)}" ;;' for k, v in sorted(words.items()))
    return COMPLETION.replace("@CASES@", cases)


COMPLETION = """# bash completion for xlbctl: xlbctl completion bash > /etc/bash_completion.d/xlbctl
_xlbctl() {
  local cur path="" w i
  cur="${COMP_WORDS[COMP_CWORD]}"
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${COMP_WORDS[i]}"
    case "$w" in
      --server|--dpd|--rpc-timeout|--ca|--cert|--key|--token|-f|--filename|-o|--output)
        ((i++)); continue ;;
      -*) continue ;;
    esac
    path="${path:+$path }$w"
  done
  local opts
  while :; do
    case "$path" in
@CASES@
    *) if [[ "$path" == *" "* ]]; then path="${path% *}"; continue; fi; opts="" ;;
    esac
    break
  done
  case "${COMP_WORDS[COMP_CWORD-1]}" in
    -f|--filename) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    -o|--output) COMPREPLY=($(compgen -W "table wide yaml json" -- "$cur")); return ;;
  esac
  COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -F _xlbctl xlbctl
"""


def read_services(path: str) -> list[policy_pb2.Service]:
    """Services from a JSON file (``-``: stdin); ValueError naming what is wrong."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        data = json.loads(text)
    except OSError as exc:
        raise ValueError(f"{brief(path, 120)}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{brief(path, 120)}: not JSON: {exc}") from None
    if isinstance(data, dict) and set(data) <= {"services", "generation"}:
        data = data.get("services", [])
    if not isinstance(data, list):
        raise ValueError(
            f'{brief(path, 120)}: expected a list of services or {{"services": [...]}}')
    services = []
    for i, item in enumerate(data):
        try:
            services.append(json_format.ParseDict(item, policy_pb2.Service()))
        except (json_format.ParseError, AttributeError, TypeError) as exc:
            raise ValueError(f"{brief(path, 120)}: services[{i}]: {brief(str(exc), 120)}") from None
    return services


# apply-file: kind -> (list key, message)
KINDS: dict[str, tuple[str, type[Message]]] = {
    "service": ("services", policy_pb2.Service),
    "firewall_rule": ("firewall_rules", policy_pb2.FirewallRule),
    "route": ("routes", policy_pb2.Route),
}
_KIND_NAMES = {k.replace("_", ""): k for k in KINDS}  # "FirewallRule", "firewall-rule", ...


def _load(path: str) -> list[Any]:
    """The documents of a JSON or YAML file (``-``: stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"{brief(path, 120)}: {exc.strerror}") from None
    try:
        return [json.loads(text)]
    except json.JSONDecodeError as exc:
        json_error = exc
    try:
        import yaml
    except ImportError:
        raise ValueError(f"{brief(path, 120)}: not JSON ({json_error}); for YAML install"
                         " PyYAML") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{brief(path, 120)}: neither JSON nor YAML: "
                         f"{brief(str(exc), 160)}") from None


def read_objects(path: str) -> dict[str, list[Message]]:
    """{"services": [...], "firewall_rules": [...], "routes": [...]} from a file; see
    the module docstring for its forms. ValueError naming what is wrong."""
    return objects_from(_load(path), brief(path, 120))


def objects_from(docs: list[Any], where: str, first: int = 0) -> dict[str, list[Message]]:
    """read_objects' work on documents already loaded (`first`: the index of the first
    one in its file, for the messages)."""
    out: dict[str, list[Message]] = {key: [] for key, _ in KINDS.values()}
    lists = {key: message for key, message in KINDS.values()}

    def add(kind_key: str, item: Any, label: str) -> None:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {label}: expected an object")
        try:
            out[kind_key].append(json_format.ParseDict(item, lists[kind_key]()))
        except (json_format.ParseError, AttributeError, TypeError) as exc:
            raise ValueError(f"{where}: {label}: {brief(str(exc), 160)}") from None

    def add_kinded(item: Any, label: str) -> None:
        if not isinstance(item, dict) or "kind" not in item:
            raise ValueError(f'{where}: {label}: expected an object with "kind" (one of'
                             f" {', '.join(KINDS)})")
        body = dict(item)
        kind = str(body.pop("kind"))
        norm = _KIND_NAMES.get(kind.lower().replace("_", "").replace("-", ""))
        if norm is None:
            raise ValueError(f"{where}: {label}.kind: {quote(kind)} is not one of"
                             f" {', '.join(KINDS)}")
        add(KINDS[norm][0], body, label)

    for d, doc in enumerate(docs, first):
        at = f"document {d}: " if d else ""
        if isinstance(doc, dict) and "kind" in doc:
            add_kinded(doc, f"{at}object")
        elif isinstance(doc, dict):
            unknown = set(doc) - set(lists) - {"generation"}
            if unknown:
                raise ValueError(f"{where}: {at}unknown key {quote(sorted(unknown)[0])}; use"
                                 f" {', '.join(lists)}")
            for key in lists:
                items = doc.get(key) or []
                if not isinstance(items, list):
                    raise ValueError(f"{where}: {at}{key}: expected a list")
                for i, item in enumerate(items):
                    add(key, item, f"{at}{key}[{i}]")
        elif isinstance(doc, list):
            for i, item in enumerate(doc):
                add_kinded(item, f"{at}[{i}]")
        else:
            raise ValueError(f"{where}: {at}expected an object or a list of objects")
    return out


def apply_objects(client: PolicyClient, objects: dict[str, list[Message]],
                  full: bool) -> dict[str, Any]:
    """Apply each kind of `objects` in one call: rules, routes, services."""
    result: dict[str, Any] = {}
    calls: tuple[tuple[str, Callable[[Any], Any]], ...] = (
        ("firewall_rules", client.apply_rules), ("routes", client.apply_routes),
        ("services", client.apply_services))
    for key, apply in calls:
        if not objects[key]:
            continue
        reply = apply(objects[key])
        result[key] = _json(reply) if full else {
            "applied": len(objects[key]), "generation": str(reply.generation)}
    return result


def _delete(names: list[str], one: Any, many: Any) -> dict[str, Any]:
    if len(names) == 1:
        one(names[0])
        return {"deleted": names[0]}
    return {"deleted": names, "generation": str(many(names))}


def run(args: argparse.Namespace, client: PolicyClient) -> int:
    if args.group == "events":
        return cli_events.run(args, client)
    if args.group in ("apply", "get", "delete"):
        return run_documents(args, client)
    if args.group == "firewall":
        if args.verb == "apply":
            rule = make_rule(args.name, args.action, args.priority, src=args.src, dst=args.dst,
                             protocol=args.protocol, src_ports=args.src_ports,
                             dst_ports=args.dst_ports, in_interface=args.in_interface,
                             redirect_interface=args.redirect_interface,
                             flush_existing=args.flush_existing)
            _print(_json(client.apply_rule(rule)))
        elif args.verb == "delete":
            _print(_delete(args.name, client.delete_rule, client.delete_rules))
        elif args.verb == "get":
            _print(_json(client.get_rule(args.name)))
        else:
            _print([_json(r) for r in client.list_rules()])
    elif args.group == "route":
        if args.verb == "apply":
            _print(_json(client.apply_route(make_route(args.name, args.prefix, args.next_hop))))
        elif args.verb == "delete":
            _print(_delete(args.name, client.delete_route, client.delete_routes))
        elif args.verb == "get":
            _print(_json(client.get_route(args.name)))
        else:
            _print([_json(r) for r in client.list_routes()])
    elif args.group == "blocklist":
        if args.verb == "apply":
            _print(_json(client.apply_blocklist(make_blocklist(args.name, args.prefix))))
        elif args.verb == "delete":
            _print(_delete(args.name, client.delete_blocklist, client.delete_blocklists))
        elif args.verb == "get":
            _print(_json(client.get_blocklist(args.name)))
        else:
            _print([_json(b) for b in client.list_blocklists()])
    elif args.group == "mirror":
        if args.verb == "apply":
            _print(_json(client.apply_mirror(make_mirror(args.name, args.interface,
                                                         args.mirror_interface))))
        elif args.verb == "delete":
            _print(_delete(args.name, client.delete_mirror, client.delete_mirrors))
        elif args.verb == "get":
            _print(_json(client.get_mirror(args.name)))
        else:
            _print([_json(m) for m in client.list_mirrors()])
    elif args.group == "policer":
        if args.verb == "apply":
            _print(_json(client.apply_policer(make_policer(
                args.name, args.rate_bps, args.burst_bytes, args.interface,
                parse_labels(args.node_selector, "--node-selector")))))
        elif args.verb == "delete":
            _print(_delete(args.name, client.delete_policer, client.delete_policers))
        elif args.verb == "get":
            _print(_json(client.get_policer(args.name)))
        else:
            _print([_json(m) for m in client.list_policers()])
    elif args.group == "apply-file":  # apply -f's documents, JSON output as before
        docs = cli_objects.by_kind(cli_objects.read_docs(args.file))
        if docs["Node"]:
            raise ValueError(f"{docs['Node'][0].where}: Node documents need apply -f")
        objects: dict[str, list[Message]] = {
            "firewall_rules": [d.msg for d in docs["FirewallRule"]],
            "routes": [d.msg for d in docs["Route"]],
            "services": [d.msg for d in docs["Service"]]}
        _print(apply_objects(client, objects, args.full))
    elif args.group == "service":
        if args.verb == "apply":
            port, port_last = parse_service_ports(args.port, "--port")
            if args.port_last is not None:
                if port_last and port_last != args.port_last:
                    raise ValueError(f"--port {quote(args.port)} and --port-last "
                                     f"{args.port_last} disagree; give the range once")
                port_last = args.port_last
            service = make_service(
                args.name, args.vip, port, args.protocol, args.endpoint, args.algorithm,
                args.health, args.ct_timeout, persistence_s=args.persistence,
                port_last=port_last,
            )
            _print(_json(client.apply(service)))
        elif args.verb == "apply-file":
            reply = client.apply_services(read_services(args.file))
            if args.full:
                _print(_json(reply))
            else:
                _print({"generation": str(reply.generation), "services": len(reply.services)})
        elif args.verb == "delete":
            if len(args.name) == 1:
                client.delete_service(args.name[0])
                _print({"deleted": args.name[0]})
            else:
                generation = client.delete_services(args.name)
                _print({"deleted": args.name, "generation": str(generation)})
        elif args.verb == "get":
            _print(_json(client.get_service(args.name)))
        else:
            _print([_json(s) for s in client.list_services()])
    elif args.group == "node":
        if args.verb == "register":
            _print(_json(client.register_node(args.name, args.address,
                                              parse_labels(args.label))))
        elif args.verb == "deregister":
            client.deregister_node(args.name)
            _print({"deregistered": args.name})
        else:
            _print([_json(n) for n in client.list_nodes()])
    else:
        output = args.output or ("table" if sys.stdout.isatty() else "json")
        show = (lambda r: _print(_json(r))) if output == "json" else (
            lambda r: cli_objects.say(cli_objects.status_table(r, output == "wide")))
        if args.wait:
            nodes = [args.node] if args.node else None
            try:
                client.wait_synced(nodes=nodes, timeout=args.timeout)
            except TimeoutError as exc:
                show(client.sync_status(args.node))
                sys.stderr.write(f"xlbctl: {exc}\n")
                return 1
        response = client.sync_status(args.node)
        show(response)
        if args.wait and not is_synced(response, [args.node] if args.node else None):
            return 1
        if output != "json" and not cli_objects.all_synced(response):
            return 1  # a person's view: any node not SYNCED is a failure
    return 0


def run_documents(args: argparse.Namespace, client: PolicyClient) -> int:
    """apply -f, get, delete (policyd.cli_objects)."""
    if args.group == "apply":
        lines = cli_objects.apply_docs(client, cli_objects.read_docs(args.filename), args.cas)
        cli_objects.say("\n".join(lines) or "nothing to apply")
        return 0
    if args.group == "get":
        kind = cli_objects.kind_of(args.kind)
        if kind is None:
            raise ValueError(f"get: {quote(args.kind)} is not one of services, "
                             "firewall-rules, routes, blocklists, mirrors, policers, nodes")
        objects = cli_objects.fetch(client, kind, args.name)
        if not objects and args.output in ("table", "wide"):
            cli_objects.say(f"no {args.kind}")
            return 0
        cli_objects.say(cli_objects.render(kind, objects, args.output, bool(args.name)))
        return 0
    if args.filename:
        docs = cli_objects.read_docs(args.filename)
    elif len(args.target) >= 2 and cli_objects.kind_of(args.target[0]) is not None:
        kind = str(cli_objects.kind_of(args.target[0]))
        message = {"Service": policy_pb2.Service, "FirewallRule": policy_pb2.FirewallRule,
                   "Route": policy_pb2.Route, "Node": policy_pb2.Node,
                   "Blocklist": policy_pb2.Blocklist, "Mirror": policy_pb2.Mirror,
                   "Policer": policy_pb2.Policer}[kind]
        docs = [cli_objects.Doc(kind, message(name=n), None, "") for n in args.target[1:]]
    else:
        raise ValueError("delete: use -f FILE, or KIND NAME [NAME...]")
    cli_objects.say("\n".join(cli_objects.delete_docs(client, docs, args.ignore_not_found)))
    return 0


def connect(args: argparse.Namespace) -> PolicyClient:
    """xlbctl's connection to policyd: the one place it is made (credentials and token
    from the connection flags, policyd.cli_certs)."""
    return PolicyClient(args.server, timeout=args.rpc_timeout, **cli_certs.connection(args))


def connect_dpd(args: argparse.Namespace) -> grpc.Channel:
    """xlbctl's connection to a node's dpd (--dpd): the one place it is made (TLS when
    the connection flags give credentials)."""
    credentials = cli_certs.connection(args).get("credentials")
    if credentials is not None:
        return grpc.secure_channel(args.dpd, credentials, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(args.dpd, options=CHANNEL_OPTIONS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.group == "certs":  # local files only: no server
        return cli_certs.run(args)
    if args.group == "completion":
        cli_objects.say(completion_script(parser))
        return 0
    try:
        if args.group in cli_node.VIEWS:
            if not args.dpd:
                parser.error(f"{args.group}: a node view; give the node's dpd with --dpd ADDR")
            channel = connect_dpd(args)
            try:
                cli_objects.say(cli_node.show(channel, args))
            finally:
                channel.close()
            return 0
        with connect(args) as client:
            return run(args, client)
    except ValueError as exc:  # a malformed argument caught before any call
        parser.error(str(exc))
    except LookupError as exc:
        sys.stderr.write(f"xlbctl: NOT_FOUND: {exc}\n")
        return 1
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "ERROR"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        sys.stderr.write(f"xlbctl: {code}: {details}\n")
        sys.stderr.write(cli_certs.hint(args, code))
        return 1
    except BrokenPipeError:  # output piped into head and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
