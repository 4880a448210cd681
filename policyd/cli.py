"""xlbctl: operate policyd from a shell.

    xlbctl --server unix:/run/xlb/policyd.sock service apply --name web \\
        --vip 198.19.0.10 --port 80 --protocol tcp \\
        --endpoint 198.18.1.2:8080 --endpoint 198.18.1.3:8080@2
    xlbctl service list | get NAME | delete NAME [NAME...]
    xlbctl service apply-file FILE.json     # many services in one call (FILE - : stdin)
    xlbctl node register NAME ADDR | deregister NAME | list
    xlbctl status [NODE] [--wait [--timeout S]]

apply-file takes a JSON list of services as ``service list`` prints them (or an object
with a "services" list); all are applied in one ApplyServices call, all or nothing.
Several names to ``delete`` are deleted in one DeleteServices call, all or nothing.

Results are printed as JSON on stdout. On error the gRPC status and its message go to
stderr and the exit code is 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from policyd.client import ALGORITHMS, PROTOCOLS, PolicyClient, is_synced, make_service
from policyd.defaults import DEFAULT_LISTEN, ENV_SERVER
from xlb.policy.v1 import policy_pb2
from xlbcore.errors import brief


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
    sub = p.add_subparsers(dest="group", required=True)

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


def run(args: argparse.Namespace, client: PolicyClient) -> int:
    if args.group == "service":
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
    try:
        with PolicyClient(args.server, timeout=args.rpc_timeout) as client:
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
