"""Prometheus text exposition shared by dpd and policyd: a small threaded HTTP server
(``--metrics HOST:PORT`` or ``--metrics unix:PATH``) whose stop is bounded in time, and a
gRPC server interceptor counting calls and timing them by method and status code.

Every value is computed on scrape by collectors (nothing runs between scrapes). A
daemon's exposition is a prometheus_client registry (rendered with its own text
encoder) plus, optionally, `fast` families: text a collector writes itself with label
strings it keeps across scrapes, for the families with a line per service or endpoint,
where prometheus_client's per-sample objects would cost more than the whole budget of a
scrape (200 ms for 10,000 services).

    exporter = start_metrics("127.0.0.1:9161", registry, fast=[collector.render])
    ...
    exporter.stop()   # within about 0.2 s; its threads never keep the process alive
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from xlbcore.address import parse_address
from xlbcore.errors import ValidationError
from xlbcore.server import StartupError, prepare_unix_socket

log = structlog.get_logger("xlb.metrics")

STOP_WAIT = 0.2  # at most this long for the HTTP server's loop to end on stop()
_POLL = 0.1  # the serving loop looks for a stop this often

# RPC latency buckets (seconds): from a cheap unary call to a bulk write of 10,000s
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
               2.5, 5.0, 10.0, 30.0)

Render = Callable[[], Iterable[str]]


def escape_label(value: str) -> str:
    """A label value as the text format wants it between double quotes."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels_text(**labels: str) -> str:
    """``a="x",b="y"``: a label set, rendered once and kept by a fast collector."""
    return ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())


def family_header(name: str, kind: str, help_text: str) -> str:
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


class Exposition:
    """What a scrape returns: the registry's text, then every fast family's text."""

    def __init__(self, registry: CollectorRegistry, fast: Iterable[Render] = ()) -> None:
        self.registry = registry
        self.fast = list(fast)

    def render(self) -> bytes:
        parts = [generate_latest(self.registry)]
        for render in self.fast:
            try:
                parts.append("".join(render()).encode())
            except Exception:  # one broken family must not take the others with it
                log.exception("metrics_render_failed")
        return b"".join(parts)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            self.send_error(404, "only /metrics")
            return
        try:
            body = self.server.exposition.render()
        except Exception:
            log.exception("metrics_scrape_failed")
            self.send_error(500, "scrape failed; see the daemon's log")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        addr = self.client_address
        return addr[0] if isinstance(addr, tuple) and addr else "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes are not worth a log line each


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True  # a scrape in progress never keeps the process alive
    block_on_close = False
    allow_reuse_address = True
    exposition: Exposition

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (socket.getfqdn): not needed
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", 0


class _UnixServer(_Server):
    address_family = socket.AF_UNIX
    allow_reuse_address = False


class _TcpServer(_Server):
    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        host = address[0]
        if host.startswith("["):
            self.address_family = socket.AF_INET6
            address = (host[1:-1], address[1])
        super().__init__(address, handler)


class MetricsServer:
    """A started exporter; `address` is where it listens (``HOST:PORT`` or ``unix:PATH``)."""

    def __init__(self, server: _Server, address: str, socket_path: str) -> None:
        self._server = server
        self.address = address
        self._socket_path = socket_path
        self._stopped = False
        self._thread = threading.Thread(target=server.serve_forever, args=(_POLL,),
                                        name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, within about STOP_WAIT; scrapes in progress are abandoned (their
        threads are daemon threads). Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        stopper = threading.Thread(target=self._server.shutdown, name="metrics-stop",
                                   daemon=True)
        stopper.start()
        stopper.join(STOP_WAIT)
        self._server.server_close()
        if self._socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)


def start_metrics(listen: str, registry: CollectorRegistry,
                  fast: Iterable[Render] = ()) -> MetricsServer:
    """Serve the registry (and the fast families) at ``/metrics`` on `listen`
    (``HOST:PORT``, port 0 for any free port, or ``unix:PATH``)."""
    try:
        addr = parse_address(listen, "metrics", allow_port_zero=True)
    except ValidationError as exc:
        raise StartupError(str(exc)) from None
    server: _Server
    try:
        if addr.is_unix:
            prepare_unix_socket(addr.path)
            server = _UnixServer(addr.path, _Handler)  # type: ignore[arg-type]
            address = addr.text
        else:
            server = _TcpServer((addr.host, addr.port), _Handler)
            port = server.socket.getsockname()[1]
            address = f"{addr.host}:{port}"
    except OSError as exc:
        raise StartupError(f"cannot listen on {addr.text}: {exc.strerror or exc}") from None
    server.exposition = Exposition(registry, fast)
    return MetricsServer(server, address, addr.path if addr.is_unix else "")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def scrape(address: str, timeout: float = 10.0) -> str:
    """GET /metrics from an exporter at ``HOST:PORT`` or ``unix:PATH`` (tests, benchmarks,
    a quick look: curl cannot speak to a unix socket's HTTP without --unix-socket)."""
    conn: http.client.HTTPConnection
    addr = parse_address(address, "metrics")
    if addr.is_unix:
        conn = _UnixHTTPConnection(addr.path, timeout)
    else:
        conn = http.client.HTTPConnection(addr.host.strip("[]"), addr.port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"{address}/metrics: HTTP {resp.status}")
        return body.decode()
    finally:
        conn.close()


# -- RPC metrics ---------------------------------------------------------------------------


class RpcMetrics(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts every call by service, method and status code, and times it (a histogram
    with the same labels), as ``<prefix>_rpc_requests_total`` and
    ``<prefix>_rpc_duration_seconds``. Register with start_server(interceptors=[...]).

    A streaming response is timed until its last message is sent (or the stream fails).
    Methods the server does not implement are not counted (their names are the
    client's choice: unbounded)."""

    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        self.requests = Counter(f"{prefix}_rpc_requests", "gRPC calls handled",
                                ["service", "method", "code"], registry=registry)
        self.duration = Histogram(f"{prefix}_rpc_duration_seconds",
                                  "gRPC call handling time, by status code",
                                  ["service", "method", "code"], buckets=RPC_BUCKETS,
                                  registry=registry)

    def _record(self, service: str, method: str, code: str, started: float) -> None:
        self.requests.labels(service, method, code).inc()
        self.duration.labels(service, method, code).observe(time.perf_counter() - started)

    @staticmethod
    def _code(context: Any, failed: bool) -> str:
        code = None
        with contextlib.suppress(Exception):
            code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
        return "UNKNOWN" if failed else "OK"

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method or ""
        service, _, method = full.lstrip("/").rpartition("/")
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream
            wrapped = self._streaming(inner, service, method)
        else:
            inner = handler.unary_unary or handler.stream_unary
            wrapped = self._unary(inner, service, method)
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _unary(self, inner: Any, service: str, method: str) -> Any:
        def call(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            failed = True
            try:
                response = inner(request, context)
                failed = False
                return response
            finally:
                self._record(service, method, self._code(context, failed), started)

        return call

    def _streaming(self, inner: Any, service: str, method: str) -> Any:
        def call(request: Any, context: Any) -> Iterator[Any]:
            started = time.perf_counter()
            code = ""
            failed = True
            try:
                yield from inner(request, context)
                failed = False
            except GeneratorExit:  # the client went away mid-stream
                code = "CANCELLED"
                raise
            finally:
                self._record(service, method, code or self._code(context, failed), started)

        return call
