"""xlbctl events: follow every node's events (policyd's WatchEvents) like tail -f, one
line each (or -o json: one JSON object a line)."""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

from google.protobuf import json_format

from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2 as tpb

KINDS = {"trap": tpb.EVENT_KIND_TRAP, "flow-refused": tpb.EVENT_KIND_FLOW_REFUSED,
         "policer-drop": tpb.EVENT_KIND_POLICER_DROP, "health": tpb.EVENT_KIND_HEALTH}
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


def add_events_parser(sub: Any) -> None:
    ev = sub.add_parser("events", help="follow the nodes' events (trapped packets, refused "
                                       "flows, policer drops, health changes) until Ctrl-C")
    ev.add_argument("--node", action="append", default=[],
                    help="only this node's events; repeat for several (default: every node)")
    ev.add_argument("--kind", action="append", default=[], choices=sorted(KINDS),
                    help="only events of this kind; repeat for several (default: every kind)")
    ev.add_argument("-o", "--output", choices=("line", "json"), default="line")


def _addr(host: str, port: int) -> str:
    if not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def line(e: tpb.Event) -> str:
    ts = datetime.datetime.fromtimestamp(e.time_unix_ns / 1e9, datetime.UTC)
    kind = tpb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_")
    head = [ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", e.node or "-", kind]
    if e.kind == tpb.EVENT_KIND_TRAP:
        h = e.packet
        proto = PROTOCOLS.get(h.ip_protocol, str(h.ip_protocol))
        flags = f" [{','.join(h.tcp_flags)}]" if h.tcp_flags else ""
        rest = [e.interface, e.reason, proto,
                f"{_addr(h.src, h.src_port)} -> {_addr(h.dst, h.dst_port)}{flags}",
                f"len {e.packet_length}"]
    elif e.kind == tpb.EVENT_KIND_POLICER_DROP:
        rest = [e.interface, f"policer {e.policer}", f"dropped {e.count}"]
    elif e.kind == tpb.EVENT_KIND_HEALTH:
        rest = [e.service, e.endpoint, e.reason]
    else:
        rest = [e.interface, e.reason]
    return " ".join(x for x in head + rest if x)


def run(args: argparse.Namespace, client: Any) -> int:
    req = policy_pb2.WatchEventsRequest(nodes=args.node,
                                        kinds=[KINDS[k] for k in args.kind])
    call = client.stub.WatchEvents(req)
    try:
        for e in call:
            if args.output == "json":
                text = json_format.MessageToJson(e, indent=None,
                                                 preserving_proto_field_name=True)
            else:
                text = line(e)
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        call.cancel()
    return 0
