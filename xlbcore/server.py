"""Server bootstrap shared by dpd and policyd: one gRPC server with the service, the
standard health service and server reflection, listening on ``HOST:PORT`` or
``unix:PATH``, and a stop that is bounded in time.

    server = start_server("unix:/run/xlb/dpd.sock", "xlb.dpd.v1.Datapath",
                          lambda s: add_DatapathServicer_to_server(servicer, s))
    ...
    server.stop(grace=1.0)   # NOT_SERVING, in-flight calls get `grace`, socket removed
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from xlbcore.address import Address, parse_address
from xlbcore.errors import ValidationError

log = structlog.get_logger("xlb.server")

# A batch of 10,000 services with many endpoints each is well over grpc's default 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

class StartupError(RuntimeError):
    """A daemon cannot start (bad listen address, socket in use, unusable store...)."""


def prepare_unix_socket(path: str) -> None:
    """Refuse a path another process listens on; remove a stale socket file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"{path}: {exc.strerror}") from None
        os.unlink(path)
        log.info("stale_socket_removed", path=path)
        return
    finally:
        probe.close()
    raise StartupError(f"{path}: another process is listening there")


class _Reflection(reflection.ReflectionServicer):  # type: ignore[misc]
    """Server reflection that also resolves method symbols (``pkg.Service.Method``),
    as the C++ and Go servers do: grpcurl's ``describe pkg.Service.Method`` asks for
    the file containing that symbol, which protobuf's pool does not index."""

    def _file_containing_symbol(self, request, fully_qualified_name):  # type: ignore[no-untyped-def]
        pool = self._pool
        try:
            pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            service, _, method = fully_qualified_name.rpartition(".")
            try:
                if method in pool.FindServiceByName(service).methods_by_name:
                    fully_qualified_name = service
            except KeyError:
                pass
        return super()._file_containing_symbol(request, fully_qualified_name)


class Server:
    """A started gRPC server; `address` is what clients dial."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer,
                 address: str, socket_path: str) -> None:
        self.grpc = server
        self.health = health_servicer
        self.address = address
        self._socket_path = socket_path
        self._stopped = False

    def stop(self, grace: float = 1.0) -> None:
        """NOT_SERVING, then stop: in-flight calls get `grace` seconds, then they are
        cancelled. Returns within about `grace` + 1 s. Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self.grpc.stop(grace).wait(grace + 1.0)
        if self._socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)


def start_server(
    listen: str | Address,
    service_name: str,
    register: Callable[[grpc.Server], None],
    *,
    max_workers: int = 16,
    options: list[tuple[str, int]] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    socket_mode: int | None = None,
    bind_context: contextlib.AbstractContextManager[object] | None = None,
) -> Server:
    """Serve `service_name` (added to the server by `register`), health and reflection
    on `listen` (``HOST:PORT``, port 0 for any free port, or ``unix:PATH``);
    `interceptors` see every call (xlbcore.metrics.RpcMetrics counts and times them).
    With `credentials` (xlbcore.tls) the port serves TLS; `socket_mode` is set on a unix
    socket before the server accepts calls (dpd: 0600). Who may call what: the caller's
    checks go in `interceptors` (xlbcore.auth.AuthInterceptor). The listening socket is
    made and bound inside `bind_context` (dpd --netns: in the starting namespace)."""
    try:
        addr = listen if isinstance(listen, Address) else parse_address(
            listen, "listen", allow_port_zero=True)
    except ValidationError as exc:
        raise StartupError(str(exc)) from None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=options if options is not None else MESSAGE_OPTIONS,
                         interceptors=list(interceptors) or None)
    register(server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _Reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
                    pool=descriptor_pool.Default()),
        server,
    )
    if addr.is_unix:
        prepare_unix_socket(addr.path)
    try:
        with bind_context or contextlib.nullcontext():
            if credentials is not None:
                port = server.add_secure_port(addr.text, credentials)
            else:
                port = server.add_insecure_port(addr.text)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {addr.text}: {exc}") from None
    if addr.is_unix and socket_mode is not None:
        try:
            os.chmod(addr.path, socket_mode)  # bound (not yet accepting): before start()
        except OSError as exc:
            server.stop(0)
            raise StartupError(f"{addr.path}: chmod: {exc.strerror}") from None
    server.start()
    for name in ("", service_name):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = addr.text if addr.is_unix else f"{addr.host}:{port}"
    return Server(server, hs, address, addr.path if addr.is_unix else "")
