"""xlb-dpd: load xlb's eBPF datapath on this node and serve xlb.dpd.v1.Datapath.

Stopping dpd (SIGTERM, SIGINT, even SIGKILL) leaves the datapath running: programs stay
attached and maps stay pinned, and the next dpd picks them up. `--cleanup` removes it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import structlog

from dpd import maglev
from dpd.loader import LoaderError, Settings
from dpd.netns import Netns
from dpd.routes import RTPROT_XLB, check_proto
from xlbcore.address import parse_address
from xlbcore.auth import AuthInterceptor
from xlbcore.daemon import StopSignals
from xlbcore.logs import FORMATS, LEVELS, configure_logging
from xlbcore.server import Server, StartupError, start_server
from xlbcore.tls import ServerTLS, check_listen, server_tls

if TYPE_CHECKING:
    from dpd.metrics import Exporter

log = structlog.get_logger("dpd")

DATAPATH_SERVICE = "xlb.dpd.v1.Datapath"
DEFAULT_LISTEN = "unix:/run/xlb/dpd.sock"
SOCKET_MODE = 0o600  # a unix socket: dpd's user alone
TLS_FLAGS = "--tls-cert, --tls-key and --tls-ca"


def _maglev_size(text: str) -> int:
    try:
        return maglev.check_size(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ct_timeout(text: str) -> str:
    from dpd.conntrack import Timeouts

    try:
        Timeouts.parse([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _ct_timeouts(args: argparse.Namespace) -> Any:
    from dpd.conntrack import Timeouts

    return Timeouts.parse(args.ct_timeout)


def _route_proto(text: str) -> int:
    try:
        return check_proto(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlb-dpd", description=__doc__)
    p.add_argument("--name", required=True, help="node name; pins go under BPF_ROOT/NAME")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help="unix:PATH (mode 0600) or HOST:PORT; TCP needs --tls-cert, --tls-key "
                        f"and --tls-ca (mutual TLS) or --insecure-tcp (default {DEFAULT_LISTEN})")
    p.add_argument("--tls-cert", default="", metavar="FILE",
                   help="this dpd's server certificate (xlbctl certs issue NAME --server HOST)")
    p.add_argument("--tls-key", default="", metavar="FILE", help="its private key")
    p.add_argument("--tls-ca", default="", metavar="FILE",
                   help="the CA whose client certificates may call: reads need role read-only, "
                        "writes admin (docs/security.md)")
    p.add_argument("--insecure-tcp", action="store_true",
                   help="serve TCP without TLS: anyone who reaches the port controls the node "
                        "(test networks only; logged as a warning)")
    p.add_argument("--bpf-root", default="/opt/xlb/dp/bpf",
                   help="bpffs mount for the pins (created if missing)")
    p.add_argument("--attach", default="",
                   help="comma-separated interfaces to attach to; 'auto': every physical, "
                        "veth and bond interface, now and as they appear (docs/routing.md)")
    p.add_argument("--netns", default="",
                   help="run in this named network namespace (only the network namespace "
                        "changes, so the bpffs mount outlives dpd); see --listen-netns")
    p.add_argument("--listen-netns", choices=("caller", "inside"), default="caller",
                   help="with --netns, where a TCP --listen address is bound: caller (the "
                        "default): in the network namespace xlb-dpd was started from, where "
                        "policyd and xlbctl reach it; inside: in the --netns namespace. A "
                        "unix socket lives in the filesystem: reachable from every namespace. "
                        "--metrics listens inside")
    p.add_argument("--max-services", type=int, default=Settings.max_services)
    p.add_argument("--max-backends", type=int, default=Settings.max_backends,
                   help="endpoint counter slots, shared by all services")
    p.add_argument("--maglev-size", type=_maglev_size, default=maglev.DEFAULT_SIZE,
                   metavar="PRIME",
                   help="entries of each Maglev service's lookup table: a prime, at most "
                        f"{maglev.DEFAULT_SIZE} (the same on every node, so that nodes "
                        "pick the same endpoint for a flow)")
    p.add_argument("--ct-size", type=int, default=Settings.ct_size,
                   help="conntrack entries (two per flow)")
    p.add_argument("--blocklist-size", type=int, default=Settings.blocklist_size,
                   help="blocked source prefixes the XDP stage holds (v4 and v6 together)")
    p.add_argument("--xdp", choices=("off", "auto", "native", "generic"), default=None,
                   help="also attach (or, off: remove) the XDP stage (early drop of blocked "
                        "sources, docs/xdp.md) on the --attach interfaces: auto is native "
                        "where the driver supports it, else generic; unset: as it is")
    p.add_argument("--no-redirect", action="store_true",
                   help="hand NATed packets to the kernel to route instead of bpf_redirect")
    p.add_argument("--ct-aging-interval", type=float, default=5.0,
                   help="seconds between conntrack aging sweeps (0: off)")
    p.add_argument("--ct-timeout", type=_ct_timeout, action="append", default=[],
                   metavar="STATE=SECONDS",
                   help="the node's default idle timeout of a conntrack state (repeat for "
                        "several): tcp_handshake (30), tcp_established (3600), tcp_closing "
                        "(60), tcp_closed (10), udp_new (30), udp_established (180); a "
                        "service's conntrack_timeouts override them (docs/conntrack.md)")
    p.add_argument("--datapath", choices=("kernel", "memory"), default="kernel",
                   help="kernel: load the eBPF datapath; memory: a simulated node (dpd's "
                        "real tables and API over in-memory maps, no kernel, no root)")
    p.add_argument("--simulate", type=int, default=1, metavar="N",
                   help="with --datapath memory: serve N simulated nodes from this process, "
                        "each with its own gRPC server; --listen must contain {i} (0..N-1), "
                        "and node i is named NAME-i")
    p.add_argument("--metrics", default="", metavar="ADDR",
                   help="serve Prometheus metrics at http://ADDR/metrics (HOST:PORT, port 0: "
                        "any free port, or unix:PATH; see docs/metrics.md); off by default")
    p.add_argument("--route-proto", type=_route_proto, default=RTPROT_XLB, metavar="ID",
                   help="route protocol id of the routes dpd installs (and alone touches)")
    p.add_argument("--cleanup", action="store_true",
                   help="detach from every interface, remove the pins and exit")
    p.add_argument("--log-format", choices=FORMATS, default="kv")
    p.add_argument("--log-level", choices=LEVELS, default="info")
    return p


def _enter_netns(args: argparse.Namespace) -> Netns | None:
    """Enter --netns (before any thread exists, so every later thread inherits it);
    the Netns when a TCP listener is to be bound in the starting namespace."""
    if not args.netns:
        return None
    ns = Netns(args.netns)
    ns.enter()
    if args.listen_netns == "inside":
        ns.close()
        return None
    return ns


def serve(node: object, listen: str, max_workers: int = 8,
          exporter: Exporter | None = None, tls: ServerTLS | None = None,
          insecure_tcp: bool = False, netns: Netns | None = None) -> Server:
    """Serve `node` on `listen`: a unix socket (0600), or TCP with mutual TLS (`tls`:
    every call needs a client certificate of its CA with a role, xlbcore.auth) or with
    `insecure_tcp`; StartupError otherwise. With `netns` (dpd runs in a namespace) a TCP
    listener is bound in the namespace dpd was started from."""
    from dpd.servicer import DatapathServicer
    from xlb.dpd.v1 import datapath_pb2_grpc

    try:
        addr = parse_address(listen, "listen", allow_port_zero=True)
        check_listen(addr, tls is not None, insecure_tcp, "xlb-dpd", TLS_FLAGS, warn=False)
    except ValueError as exc:  # ValidationError, TLSError
        raise StartupError(str(exc)) from None
    interceptors = list(exporter.interceptors) if exporter else []
    if tls is not None:
        interceptors.append(AuthInterceptor(daemon="dpd"))
    servicer = DatapathServicer(node)  # type: ignore[arg-type]
    return start_server(
        addr, DATAPATH_SERVICE,
        lambda server: datapath_pb2_grpc.add_DatapathServicer_to_server(servicer, server),
        max_workers=max_workers,
        interceptors=interceptors,
        credentials=tls.credentials() if tls is not None else None,
        socket_mode=SOCKET_MODE,
        bind_context=netns.caller() if netns is not None and not addr.is_unix else None,
    )


def _server_tls(args: argparse.Namespace) -> ServerTLS | None:
    """The TLS of --tls-*, after checking --listen may be served with it (before
    anything is loaded: a refusal costs nothing); StartupError otherwise."""
    try:
        tls = server_tls(args.tls_cert, args.tls_key, args.tls_ca)
        addr = parse_address(args.listen.replace("{i}", "0"), "listen", allow_port_zero=True)
        check_listen(addr, tls is not None, args.insecure_tcp, "xlb-dpd", TLS_FLAGS)
    except ValueError as exc:  # TLSError, ValidationError
        raise StartupError(str(exc)) from None
    return tls


def start_metrics(exporter: Exporter | None, nodes: list[Any]) -> None:
    """Start the exporter (if --metrics) over `nodes`; StartupError if it cannot listen."""
    if exporter is not None:
        server = exporter.start(nodes)
        log.info("dpd_metrics", listen=server.address)


def _exporter(args: argparse.Namespace) -> Exporter | None:
    if not args.metrics:
        return None
    from dpd.metrics import Exporter

    return Exporter(args.metrics)


def simulate(args: argparse.Namespace, settings: Settings, stop: StopSignals,
             netns: Netns | None = None) -> int:
    """Serve --simulate N nodes over in-memory maps from this process until stopped."""
    from dataclasses import replace

    from dpd.memory import MemoryDatapath
    from dpd.node import Node

    count = max(1, args.simulate)
    if count > 1 and "{i}" not in args.listen:
        log.error("dpd_start_failed", error="--simulate N needs {i} in --listen")
        return 1
    stop.watch(log, prefix="dpd_")
    exporter = _exporter(args)
    nodes: list[Node] = []
    servers: list[Server] = []
    try:
        tls = _server_tls(args)
        for i in range(count):
            if stop.requested():
                break
            name = settings.name if count == 1 else f"{settings.name}-{i}"
            node = Node(MemoryDatapath(replace(settings, name=name)), ct_aging_interval=0,
                        maglev_size=args.maglev_size, ct_timeouts=_ct_timeouts(args))
            nodes.append(node)
            servers.append(serve(node, args.listen.replace("{i}", str(i)),
                                 max_workers=8 if count == 1 else 2, exporter=exporter,
                                 tls=tls, insecure_tcp=args.insecure_tcp, netns=netns))
        start_metrics(exporter, nodes)
    except (StartupError, ValueError) as e:
        log.error("dpd_start_failed", error=str(e))
        for server in servers:
            server.stop(0)
        return 1
    log.info("dpd_started", name=settings.name, datapath="memory", nodes=len(servers),
             listen=servers[0].address if len(servers) == 1 else args.listen)
    sig = stop.wait()
    stop.step("log_signal")
    log.info("dpd_signal", signal=sig.name)
    if exporter is not None:
        stop.step("metrics_stop")
        exporter.stop()
    stop.step("server_stop")
    for server in servers:
        server.stop(0)
    stop.step("node_close")
    for node in nodes:
        node.close()
    log.info("dpd_stopped", datapath="memory")
    stop.step("interpreter_exit")
    return 0


def main(argv: list[str] | None = None) -> int:
    stop = StopSignals()  # first, before any thread exists: see xlbcore.daemon
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        netns = _enter_netns(args)
    except OSError as e:
        log.error("dpd_start_failed", error=f"--netns {args.netns}: {e.strerror}")
        return 1
    settings = Settings(
        name=args.name,
        bpf_root=args.bpf_root,
        max_services=args.max_services,
        max_backends=args.max_backends,
        ct_size=args.ct_size,
        blocklist_size=args.blocklist_size,
        redirect=not args.no_redirect,
        route_proto=args.route_proto,
    )
    from dpd.attach import InterfaceMissing
    from dpd.node import Node, cleanup

    if args.cleanup:
        stop.release()  # a one-shot run: SIGINT/SIGTERM act as they did before
        cleanup(settings, remove_routes=True)
        return 0

    if args.datapath == "memory":
        return simulate(args, settings, stop, netns)

    try:
        tls = _server_tls(args)
    except StartupError as e:
        log.error("dpd_start_failed", error=str(e))
        return 1
    stop.watch(log, prefix="dpd_")  # from here a stop ends the process within 2 s
    exporter = _exporter(args)
    stop.step("load")  # compiling (a child process) stops when a stop signal is pending
    try:
        node = Node.load(settings, ct_aging_interval=args.ct_aging_interval,
                         should_stop=stop.requested, maglev_size=args.maglev_size,
                         ct_timeouts=_ct_timeouts(args))
    except LoaderError as e:
        if stop.requested():  # cancelled by the stop signal: a stop, not a failure
            log.info("dpd_signal", signal=stop.wait().name, during="start-up")
            log.info("dpd_stopped", note="start-up cancelled")
            return 0
        log.error("dpd_start_failed", error=str(e))
        return 1
    server = None
    auto = None
    from dpd.xdp import XdpMode

    xdp_mode = XdpMode[args.xdp.upper()] if args.xdp else XdpMode.UNSPECIFIED
    try:
        for ifname in filter(None, (s.strip() for s in args.attach.split(","))):
            if stop.requested():
                break
            stop.step(f"attach_{ifname}")
            if ifname == "auto":
                from dpd.autoattach import AutoAttacher

                auto = AutoAttacher(lambda name: node.attach(name, xdp_mode), node.detach)
                auto.start()
            else:
                node.attach(ifname, xdp_mode)
        if not stop.requested():
            stop.step("serve")
            server = serve(node, args.listen, exporter=exporter, tls=tls,
                           insecure_tcp=args.insecure_tcp, netns=netns)
            start_metrics(exporter, [node])
    except (InterfaceMissing, StartupError, ValueError) as e:
        log.error("dpd_start_failed", error=str(e))
        if server is not None:
            server.stop(0)
        if auto is not None:
            auto.stop()
        node.close()
        return 1
    if server is not None:
        log.info("dpd_started", name=settings.name, listen=server.address,
                 listen_netns=(args.listen_netns if args.netns else ""),
                 pin_dir=settings.pin_dir, services=node.services.count(),
                 interfaces=[a.name for a in node.interfaces()])
    sig = stop.wait()  # the stop signal, taken in this thread: logging here is safe
    stop.step("log_signal")
    log.info("dpd_signal", signal=sig.name)
    if exporter is not None:
        stop.step("metrics_stop")  # first: a scrape reads the maps node_close closes
        exporter.stop()
    if server is not None:
        stop.step("server_stop")
        server.stop(1.0)
    if auto is not None:
        stop.step("autoattach_stop")
        auto.stop()
    stop.step("node_close")
    node.close()
    log.info("dpd_stopped", note="datapath left running; --cleanup removes it")
    stop.step("interpreter_exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
