"""xlb-policyd: serve xlb.policy.v1.Policy and reconcile desired state onto dpd nodes."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

import structlog

from policyd.etcd_store import SNAPSHOT_EVERY
from policyd.reconciler import ReconcilerSettings
from policyd.server import DEFAULT_LISTEN, PolicydConfig, PolicyServer, StartupError
from xlbcore.daemon import STOP_LIMIT, StopSignals
from xlbcore.logs import FORMATS, LEVELS, configure_logging
from xlbcore.tls import ClientTLS, ServerTLS, TLSError

# In-flight calls get at most this on shutdown, so that the whole stop (API, reconciler
# workers, store) fits in STOP_LIMIT: Server.stop waits about grace, at most grace + 1 s.
MAX_GRACE = STOP_LIMIT / 2


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlb-policyd", description=__doc__)
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT or unix:PATH to serve the API on (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--db",
        default="/var/lib/xlb/policyd.db",
        help="SQLite file holding the desired state (default /var/lib/xlb/policyd.db)",
    )
    ha = p.add_argument_group("replicas on etcd (docs/ha.md)")
    ha.add_argument("--store", default="", metavar="URL",
                    help="keep the desired state in etcd at etcd://HOST:PORT (or "
                    "http://HOST:PORT) instead of --db; every policyd given the same etcd is "
                    "a replica: one leader reconciles and takes writes, the others serve reads")
    ha.add_argument("--replica-name", default="", metavar="NAME",
                    help="this replica's name in the election (default HOSTNAME-PID)")
    ha.add_argument("--advertise", default="", metavar="ADDR",
                    help="the address followers tell clients to send writes to when this "
                    "replica leads (default the --listen address)")
    ha.add_argument("--lease-ttl", type=int, default=2, metavar="S",
                    help="seconds of the leader's etcd lease: a dead leader is replaced "
                    "within about this (default 2)")
    ha.add_argument("--snapshot-every", type=int, default=SNAPSHOT_EVERY, metavar="N",
                    help="log entries between the leader's snapshots of the store in etcd "
                    f"(the log before the previous one is deleted; default {SNAPSHOT_EVERY})")
    p.add_argument(
        "--resync-interval",
        type=_positive,
        default=10.0,
        metavar="S",
        help="seconds between drift checks of each node (one cheap summary call; the "
        "node is read back only when its table changed behind policyd's back) (default 10)",
    )
    p.add_argument(
        "--backoff-max",
        type=_positive,
        default=10.0,
        metavar="S",
        help="longest wait before retrying a failing node; a node whose connection becomes "
        "READY again is retried at once (default 10)",
    )
    p.add_argument(
        "--backoff-initial",
        type=_positive,
        default=0.2,
        metavar="S",
        help="first wait before retrying a failing node, doubling up to --backoff-max "
        "(default 0.2)",
    )
    p.add_argument(
        "--readback-concurrency",
        type=int,
        default=4,
        metavar="N",
        help="read-back pages in flight across all nodes (default 4)",
    )
    p.add_argument(
        "--rpc-timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help="deadline of each call to a node's dpd (default 10)",
    )
    p.add_argument(
        "--metrics",
        default="",
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics (HOST:PORT, port 0: any free "
        "port, or unix:PATH; see docs/metrics.md); off by default",
    )
    trust = p.add_argument_group("trust (docs/security.md)")
    trust.add_argument("--tls-cert", default="", metavar="FILE",
                       help="serve the API over TLS with this certificate (xlbctl certs issue "
                       "NAME --server HOST)")
    trust.add_argument("--tls-key", default="", metavar="FILE", help="its private key")
    trust.add_argument("--tls-ca", default="", metavar="FILE",
                       help="accept client certificates of this CA; their xlb-role (admin or "
                       "read-only) decides what they may call")
    trust.add_argument("--token-file", default="", metavar="FILE",
                       help="accept bearer tokens listed here (NAME ROLE sha256:HEX a line; "
                       "xlbctl certs token writes them); re-read when it changes")
    trust.add_argument("--insecure-tcp", action="store_true",
                       help="serve TCP without --tls-ca or --token-file: anyone who reaches "
                       "the port is admin (test networks only; logged as a warning)")
    trust.add_argument("--node-tls-ca", default="", metavar="FILE",
                       help="the CA of the dpd nodes' server certificates (nodes at HOST:PORT "
                       "are then dialled with TLS)")
    trust.add_argument("--node-tls-cert", default="", metavar="FILE",
                       help="policyd's client certificate towards dpd nodes (role admin)")
    trust.add_argument("--node-tls-key", default="", metavar="FILE", help="its private key")
    p.add_argument("--log-format", choices=FORMATS, default="kv")
    p.add_argument("--log-level", choices=LEVELS, default="info")
    p.add_argument(
        "--grace",
        type=_positive,
        default=1.0,
        metavar="S",
        help=f"seconds in-flight calls get on shutdown (default 1, at most {MAX_GRACE:g}: "
        f"a stop ends within {STOP_LIMIT:g} s)",
    )
    return p


def _trust(args: argparse.Namespace) -> dict[str, Any]:
    """PolicydConfig's trust fields from the flags; TLSError when they do not fit."""
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise TLSError("--tls-cert and --tls-key go together")
        tls = ServerTLS(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_ca)
    elif args.tls_ca:
        raise TLSError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    node_tls = None
    if args.node_tls_ca or args.node_tls_cert or args.node_tls_key:
        if not args.node_tls_ca:
            raise TLSError("--node-tls-cert and --node-tls-key need --node-tls-ca")
        node_tls = ClientTLS(ca=args.node_tls_ca, cert=args.node_tls_cert,
                             key=args.node_tls_key)
        node_tls.credentials()  # unreadable files fail now, not at the first node
    return {"tls": tls, "token_file": args.token_file, "insecure_tcp": args.insecure_tcp,
            "node_tls": node_tls}


def main(argv: list[str] | None = None) -> int:
    stop = StopSignals()  # first, before any thread exists: see xlbcore.daemon
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    log = structlog.get_logger()
    stop.watch(log, prefix="policyd.")
    grace = min(args.grace, MAX_GRACE)
    if grace < args.grace:
        log.warning("policyd.grace_capped", requested=args.grace, grace=grace)

    reconciler = ReconcilerSettings(
        resync_interval=args.resync_interval,
        rpc_timeout=args.rpc_timeout,
        backoff_max=args.backoff_max,
        backoff_initial=min(args.backoff_initial, args.backoff_max),
        readback_concurrency=max(1, args.readback_concurrency),
    )
    exporter = None
    if args.metrics:
        from policyd.metrics import Exporter

        exporter = Exporter(args.metrics)
        reconciler = exporter.settings(reconciler)  # pass durations and errors
    try:
        trust = _trust(args)
    except (TLSError, StartupError) as exc:
        log.error("policyd.start_failed", error=str(exc))
        return 1
    lost = threading.Event()  # leadership lost (replicas on etcd): stop, exit 1

    def leadership_lost() -> None:
        lost.set()
        os.kill(os.getpid(), signal.SIGTERM)  # taken by stop.wait() below

    config = PolicydConfig(listen=args.listen, db_path=args.db, reconciler=reconciler,
                           interceptors=(exporter.rpc,) if exporter else (), **trust,
                           store=args.store, replica=args.replica_name,
                           advertise=args.advertise, lease_ttl=max(1, args.lease_ttl),
                           snapshot_every=max(1, args.snapshot_every),
                           on_leadership_lost=leadership_lost)
    server = None
    if not stop.requested():
        stop.step("server_start")
        try:
            server = PolicyServer(config).start()
            if exporter is not None and server.reconciler is not None:
                log.info("policyd.metrics", listen=exporter.start(server.reconciler).address)
        except StartupError as exc:
            log.error("policyd.start_failed", error=str(exc))
            if server is not None:
                server.stop(0)
            return 1
    sig = stop.wait()  # the stop signal, taken in this thread: logging here is safe
    stop.step("log_signal")
    log.info("policyd.signal", signal=sig.name)
    if exporter is not None:
        stop.step("metrics_stop")
        exporter.stop()
    if server is not None:
        stop.step("server_stop")
        server.stop(grace)
    stop.step("interpreter_exit")
    return 1 if lost.is_set() else 0


if __name__ == "__main__":
    raise SystemExit(main())
