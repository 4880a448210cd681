"""Test servers for the backends: TCP line echo with identity, UDP echo with identity.

Run ``python -m lab.servers --name be1 --tcp-port 8080 --udp-port 8080 --bind 0.0.0.0``.

TCP: per connection, each line ``L`` is answered with ``{name} L``; the line ``WHO`` is
answered with ``{name}``. The connection stays open until the client closes it.
UDP: each datagram ``P`` is answered with ``{name} P``.
"""

from __future__ import annotations

import argparse
import signal
import socketserver
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from lab import netns

if TYPE_CHECKING:
    from lab.topology import Topology

log = structlog.get_logger(__name__)


class _TCPHandler(socketserver.StreamRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        name = self.server.ident
        try:
            for raw in self.rfile:
                line = raw.rstrip(b"\r\n")
                if line == b"WHO":
                    reply = name + b"\n"
                else:
                    reply = name + b" " + line + b"\n"
                self.wfile.write(reply)
                self.wfile.flush()
        except (ConnectionError, OSError):
            pass


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, addr: tuple[str, int], ident: bytes) -> None:
        self.ident = ident
        super().__init__(addr, _TCPHandler)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        try:
            sock.sendto(self.server.ident + b" " + data, self.client_address)
        except OSError:
            pass


class _UDPServer(socketserver.UDPServer):
    allow_reuse_address = True
    max_packet_size = 65535

    def __init__(self, addr: tuple[str, int], ident: bytes) -> None:
        self.ident = ident
        super().__init__(addr, _UDPHandler)


def serve(name: str, bind: str, tcp_port: int | None, udp_port: int | None) -> None:
    """Serve until SIGTERM/SIGINT."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    ident = name.encode()
    servers: list[socketserver.BaseServer] = []
    if tcp_port:
        servers.append(_TCPServer((bind, tcp_port), ident))
    if udp_port:
        servers.append(_UDPServer((bind, udp_port), ident))
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        for s in servers
    ]
    for t in threads:
        t.start()
    log.info("servers.started", name=name, bind=bind, tcp_port=tcp_port, udp_port=udp_port)
    while not stop.wait(0.5):
        pass
    for s in servers:
        s.shutdown()
        s.server_close()
    log.info("servers.stopped", name=name)


def is_listening(topo: Topology, ns: str, proto: str, port: int) -> bool:
    """Whether something in ``ns`` listens on ``proto`` (tcp/udp) ``port`` (per ``ss``)."""
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    out = topo.run(ns, ["ss", flag, f"sport = :{port}"], check=False, timeout=10).stdout
    return bool(out.strip())


def wait_listening(
    topo: Topology,
    ns: str,
    port: int,
    proto: str = "tcp",
    proc: subprocess.Popen[str] | None = None,
    deadline: float = 15.0,
    what: str = "server",
) -> None:
    """Poll ``ss`` in ``ns`` until ``port`` listens; fail early if ``proc`` exits."""
    end = time.monotonic() + deadline
    while not is_listening(topo, ns, proto, port):
        if proc is not None and proc.poll() is not None:
            raise netns.NetnsError(f"{what} in {ns} exited {proc.returncode} before listening")
        if time.monotonic() > end:
            raise netns.NetnsError(f"{what} in {ns} not listening on {proto}/{port} "
                                   f"after {deadline}s")
        time.sleep(0.05)


def start_backends(
    topo: Topology,
    port: int = 8080,
    udp_port: int | None = None,
    bind: str = "0.0.0.0",
    deadline: float = 15.0,
) -> list[subprocess.Popen[str]]:
    """Start one server per backend namespace (name ``be{i}``), TCP and UDP on ``port``
    (UDP on ``udp_port`` if given; 0 disables UDP), and wait until each is listening.
    The processes are tracked by ``topo`` and ended by its cleanup."""
    udp = port if udp_port is None else udp_port
    procs: list[subprocess.Popen[str]] = []
    for i, ns in enumerate(topo.backend_ns, start=1):
        logf = open(topo.workdir / f"be{i}.log", "w")
        try:
            argv = [sys.executable, "-m", "lab.servers", "--name", f"be{i}",
                    "--tcp-port", str(port), "--udp-port", str(udp), "--bind", bind]
            procs.append(topo.popen(ns, argv, stderr=logf, env=netns.python_env()))
        finally:
            logf.close()
    end = time.monotonic() + deadline
    for i, (ns, proc) in enumerate(zip(topo.backend_ns, procs, strict=True), start=1):
        try:
            left = max(0.1, end - time.monotonic())
            wait_listening(topo, ns, port, "tcp", proc, left, f"server be{i}")
            if udp:
                left = max(0.1, end - time.monotonic())
                wait_listening(topo, ns, udp, "udp", proc, left, f"server be{i}")
        except netns.NetnsError as exc:
            err = (topo.workdir / f"be{i}.log").read_text()[-2000:]
            raise netns.NetnsError(f"{exc}; log: {err}") from exc
    log.info("servers.backends_ready", count=len(procs), port=port, udp_port=udp)
    return procs


def main(argv: list[str] | None = None) -> int:
    from xlbcore.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m lab.servers", description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--tcp-port", type=int, default=8080, help="0 disables TCP")
    p.add_argument("--udp-port", type=int, default=8080, help="0 disables UDP")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    configure_logging("kv", args.log_level)
    serve(args.name, args.bind, args.tcp_port or None, args.udp_port or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
