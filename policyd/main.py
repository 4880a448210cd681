"""xlb-policyd: serve xlb.policy.v1.Policy and reconcile desired state onto dpd nodes."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

import structlog

from policyd.reconciler import ReconcilerSettings
from policyd.server import DEFAULT_LISTEN, PolicydConfig, PolicyServer, StartupError
from xlbcore.logs import FORMATS, LEVELS, configure_logging


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
    p.add_argument(
        "--resync-interval",
        type=_positive,
        default=10.0,
        metavar="S",
        help="seconds between full reconciliations of each node (default 10)",
    )
    p.add_argument(
        "--rpc-timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help="deadline of each call to a node's dpd (default 10)",
    )
    p.add_argument("--log-format", choices=FORMATS, default="kv")
    p.add_argument("--log-level", choices=LEVELS, default="info")
    p.add_argument(
        "--grace",
        type=_positive,
        default=5.0,
        metavar="S",
        help="seconds in-flight calls get on shutdown (default 5)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    log = structlog.get_logger()

    config = PolicydConfig(
        listen=args.listen,
        db_path=args.db,
        reconciler=ReconcilerSettings(
            resync_interval=args.resync_interval, rpc_timeout=args.rpc_timeout
        ),
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("policyd.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = PolicyServer(config).start()
    except StartupError as exc:
        log.error("policyd.start_failed", error=str(exc))
        return 1
    try:
        stop.wait()
    finally:
        server.stop(args.grace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
