"""xlbctl: operate policyd from a shell.

    xlbctl --server unix:/run/xlb/policyd.sock service apply --name web \\
        --vip 198.19.0.10 --port 80 --protocol tcp \\
        --endpoint 198.18.1.2:8080 --endpoint 198.18.1.3:8080@2
    xlbctl service list | get NAME | delete NAME [NAME...]
    xlbctl service apply-file FILE.json     # many services in one call (FILE - : stdin)
    xlbctl firewall apply --name no-telnet --priority 100 --action drop \
        --protocol tcp --dst 198.19.0.0/16 --dst-ports 23 [--src P] [--src-ports 1-1023] \
        [--in-interface eth0] [--redirect-interface eth1] [--flush-existing]
    xlbctl firewall list | get NAME | delete NAME [NAME...]
    xlbctl route apply --name via-a --prefix 198.19.0.0/16 \
        --next-hop 198.18.1.1 --next-hop 198.18.2.1,dev=eth2,weight=3 [--next-hop dev=eth3]
    xlbctl route list | get NAME | delete NAME [NAME...]
    xlbctl apply-file FILE                  # services, firewall rules and routes (JSON or YAML)
    xlbctl node register NAME ADDR | deregister NAME | list
    xlbctl status [NODE] [--wait [--timeout S]]

``service apply-file`` takes a JSON list of services as ``service list`` prints them (or
an object with a "services" list); all are applied in one ApplyServices call, all or
nothing. ``apply-file`` takes JSON or YAML (YAML needs PyYAML): an object with any of the
lists "services", "firewall_rules" and "routes" (objects as ``list`` prints them), or a
list (or YAML documents) of objects each with "kind": service, firewall_rule or route.
Each kind is applied in one call, all or nothing: firewall rules first, then routes,
then services (so a new service is not exposed before the rules that guard it).
Several names to ``delete`` are deleted in one call, all or nothing.

Results are printed as JSON on stdout. On error the gRPC status and its message go to
stderr and the exit code is 1 (2 for a bad command line).
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

from policyd import cli_certs
from policyd.client import (
    ACTIONS,
    ALGORITHMS,
    PROTOCOLS,
    RULE_PROTOCOLS,
    PolicyClient,
    is_synced,
    make_route,
    make_rule,
    make_service,
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
    cli_certs.add_connection_args(p)
    sub = p.add_subparsers(dest="group", required=True)
    cli_certs.add_certs_parser(sub)

    svc = sub.add_parser("service", help="desired services").add_subparsers(
        dest="verb", required=True
    )
    apply = svc.add_parser("apply", help="create or replace a service")
    apply.add_argument("--name", required=True)
    apply.add_argument("--vip", required=True)
    apply.add_argument("--port", type=int, required=True)
    apply.add_argument("--protocol", choices=sorted(PROTOCOLS), default="tcp")
    apply.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="round-robin")
    apply.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="ADDR:PORT[@WEIGHT]",
        help="an endpoint; repeat for several",
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

    af = sub.add_parser("apply-file",
                        help="apply services, firewall rules and routes from a JSON or YAML file")
    af.add_argument("file", help="FILE, or - for stdin")
    af.add_argument("--full", action="store_true", help="print every stored object")

    node = sub.add_parser("node", help="dpd nodes policyd manages").add_subparsers(
        dest="verb", required=True
    )
    reg = node.add_parser("register", help="add a node, or move it to a new address")
    reg.add_argument("name")
    reg.add_argument("address", help="the node's dpd: HOST:PORT or unix:PATH")
    dereg = node.add_parser("deregister", help="stop managing a node (its datapath is left as is)")
    dereg.add_argument("name")
    node.add_parser("list", help="list nodes")

    status = sub.add_parser("status", help="per-node sync status")
    status.add_argument("node", nargs="?", default="")
    status.add_argument("--wait", action="store_true", help="wait until SYNCED")
    status.add_argument("--timeout", type=float, default=60.0, help="for --wait (seconds)")
    return p


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
    where = brief(path, 120)
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

    for d, doc in enumerate(_load(path)):
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
    elif args.group == "apply-file":
        _print(apply_objects(client, read_objects(args.file), args.full))
    elif args.group == "service":
        if args.verb == "apply":
            service = make_service(
                args.name, args.vip, args.port, args.protocol, args.endpoint, args.algorithm
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
            _print(_json(client.register_node(args.name, args.address)))
        elif args.verb == "deregister":
            client.deregister_node(args.name)
            _print({"deregistered": args.name})
        else:
            _print([_json(n) for n in client.list_nodes()])
    else:
        if args.wait:
            nodes = [args.node] if args.node else None
            try:
                client.wait_synced(nodes=nodes, timeout=args.timeout)
            except TimeoutError as exc:
                _print(_json(client.sync_status(args.node)))
                sys.stderr.write(f"xlbctl: {exc}\n")
                return 1
        response = client.sync_status(args.node)
        _print(_json(response))
        if args.wait and not is_synced(response, [args.node] if args.node else None):
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.group == "certs":  # local files only: no server
        return cli_certs.run(args)
    try:
        with PolicyClient(args.server, timeout=args.rpc_timeout,
                          **cli_certs.connection(args)) as client:
            return run(args, client)
    except ValueError as exc:  # a malformed argument caught before any call
        parser.error(str(exc))
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "ERROR"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        sys.stderr.write(f"xlbctl: {code}: {details}\n")
        return 1
    except BrokenPipeError:  # output piped into head and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
