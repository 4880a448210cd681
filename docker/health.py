#!/opt/xlb/bin/python
"""xlb-health: a grpc.health.v1 probe for container health checks.

    xlb-health 127.0.0.1:50161 [SERVICE]     # exit 0 when SERVING, 1 otherwise
    xlb-health --ca /pki/ca.crt --cert /pki/probe.crt --key /pki/probe.key 127.0.0.1:50161

SERVICE defaults to "" (the server as a whole); dpd also reports "xlb.dpd.v1.Datapath",
policyd "xlb.policy.v1.Policy". With --ca the server is dialled over TLS (a server that
requires client certificates needs --cert and --key too; read-only is enough).
"""

from __future__ import annotations

import argparse
import sys

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xlbcore.address import parse_address
from xlbcore.logs import configure_logging
from xlbcore.tls import ClientTLS, TLSError

log = structlog.get_logger("xlb.health")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xlb-health", description=__doc__)
    p.add_argument("address", help="HOST:PORT or unix:PATH")
    p.add_argument("service", nargs="?", default="")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--ca", default="", help="the CA of the server's certificate: dial TLS")
    p.add_argument("--cert", default="", help="this probe's client certificate")
    p.add_argument("--key", default="", help="its key")
    args = p.parse_args(argv)
    configure_logging("kv", "info", stream=sys.stderr)
    target = parse_address(args.address).text  # a gRPC target as it is
    if args.ca:
        try:
            creds = ClientTLS(ca=args.ca, cert=args.cert, key=args.key).credentials()
        except TLSError as exc:
            log.error("health_check_failed", target=target, error=str(exc))
            return 1
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
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
