#!/opt/xlb/bin/python
"""xlb-health: a grpc.health.v1 probe for container health checks.

    xlb-health 127.0.0.1:50161 [SERVICE]     # exit 0 when SERVING, 1 otherwise

SERVICE defaults to "" (the server as a whole); dpd also reports "xlb.dpd.v1.Datapath",
policyd "xlb.policy.v1.Policy".
"""

from __future__ import annotations

import argparse
import sys

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xlbcore.address import parse_address
from xlbcore.logs import configure_logging

log = structlog.get_logger("xlb.health")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xlb-health", description=__doc__)
    p.add_argument("address", help="HOST:PORT or unix:PATH")
    p.add_argument("service", nargs="?", default="")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = p.parse_args(argv)
    configure_logging("kv", "info", stream=sys.stderr)
    target = parse_address(args.address).text  # a gRPC target as it is
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                               timeout=args.timeout)
        except grpc.RpcError as exc:
            log.error("health_check_failed", target=target, code=exc.code().name,
                      error=exc.details())
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        log.error("health_not_serving", target=target, status=status)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
