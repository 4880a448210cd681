"""IPv6 test server and client (the e2e tests of IPv6 services, docs/ipv6.md).

``python -m lab.peer6 serve --name be1 --port 8080`` serves TCP and UDP on [::]:8080:
each TCP line is answered with ``{name} {peer address} {line length}``, each UDP
datagram with ``{name} {peer address}`` (the peer as this server saw it: the client's
address through DNAT, the node's through full-NAT).

``python -m lab.peer6 tcp --vip V --port P --count N [--size S]`` makes N connections,
sends one line of S bytes (a short one by default) on each and prints JSON: the answers
as [server name, peer the server saw, bytes it counted, the peer this client was
connected to] and the error count. ``udp`` sends N datagrams from unconnected sockets and
records the address each answer came from.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import socketserver
import sys
import threading
from types import FrameType
from typing import Any


class _TCPHandler(socketserver.StreamRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        peer = self.client_address[0]
        try:
            for raw in self.rfile:
                line = raw.rstrip(b"\n")
                self.wfile.write(f"{self.server.ident} {peer} {len(line)}\n".encode())
                self.wfile.flush()
        except OSError:
            pass


class _TCPServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, port: int, ident: str) -> None:
        self.ident = ident
        super().__init__(("::", port), _TCPHandler)


def _udp_loop(sock: socket.socket, name: str, stop: threading.Event) -> None:
    """Answer each datagram from the address it was sent to (IPV6_PKTINFO): a DSR
    backend answers from the VIP on its lo, not from the address its route prefers."""
    while not stop.is_set():
        try:
            data, anc, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(20))
        except TimeoutError:
            continue
        except OSError:
            return
        info = [d for lvl, typ, d in anc
                if lvl == socket.IPPROTO_IPV6 and typ == socket.IPV6_PKTINFO]
        reply = f"{name} {peer[0]}".encode()
        try:
            if info:  # the destination address, any interface
                sock.sendmsg([reply], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                                        info[0][:16] + bytes(4))], 0, peer)
            else:
                sock.sendto(reply, peer)
        except OSError:
            pass


def serve(name: str, port: int) -> None:
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    tcp_server = _TCPServer(port, name)
    threading.Thread(target=tcp_server.serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True).start()
    udp_sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    udp_sock.bind(("::", port))
    udp_sock.settimeout(0.2)
    udp = threading.Thread(target=_udp_loop, args=(udp_sock, name, stop), daemon=True)
    udp.start()
    while not stop.wait(0.5):
        pass
    tcp_server.shutdown()
    tcp_server.server_close()
    udp.join()
    udp_sock.close()


def tcp(vip: str, port: int, count: int, size: int, timeout: float) -> dict[str, Any]:
    answers: list[list[Any]] = []
    errors: list[str] = []
    for _ in range(count):
        try:
            with socket.create_connection((vip, port), timeout=timeout) as s:
                peer = s.getpeername()
                s.sendall(b"x" * size + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed before the answer")
                    buf += chunk
                name, seen, got = buf.decode().split()
                answers.append([name, seen, int(got), f"[{peer[0]}]:{peer[1]}"])
        except (OSError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return {"answers": answers, "errors": len(errors), "first_errors": errors[:3]}


def udp(vip: str, port: int, count: int, timeout: float) -> dict[str, Any]:
    answers: list[list[Any]] = []
    errors: list[str] = []
    for _ in range(count):
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(b"WHO", (vip, port))
                data, addr = s.recvfrom(65535)
                name, seen = data.decode().split()
                answers.append([name, seen, 0, f"[{addr[0]}]:{addr[1]}"])
        except (OSError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return {"answers": answers, "errors": len(errors), "first_errors": errors[:3]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.peer6")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=8080)
    for cmd in ("tcp", "udp"):
        c = sub.add_parser(cmd)
        c.add_argument("--vip", required=True)
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--count", type=int, default=1)
        c.add_argument("--size", type=int, default=3)
        c.add_argument("--timeout", type=float, default=2.0)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.name, args.port)
        return 0
    if args.cmd == "tcp":
        res = tcp(args.vip, args.port, args.count, args.size, args.timeout)
    else:
        res = udp(args.vip, args.port, args.count, args.timeout)
    json.dump(res, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
