"""policyd as an object: store + reconciler + gRPC server (Policy, health, reflection).

In-process use (tests, demos)::

    from policyd.server import PolicydConfig, PolicyServer

    with PolicyServer(PolicydConfig(listen="unix:/tmp/policyd.sock", db_path="p.db")) as srv:
        ...  # srv.address is the target to dial

``PolicyServer.start`` returns once the server accepts calls and every registered node
has a worker; ``stop`` stops the API first, then the workers, then closes the store, and
removes the unix socket it created.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from policyd.reconciler import Reconciler, ReconcilerSettings
from policyd.servicer import PolicyServicer
from policyd.store import Store
from policyd.validation import Address, parse_address
from xlb.policy.v1 import policy_pb2, policy_pb2_grpc

log = structlog.get_logger()

POLICY_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
DEFAULT_LISTEN = "127.0.0.1:50151"
# An ApplyServices of 10,000 services with many endpoints each is well over grpc's
# default 4 MiB; replies are not limited on the sending side.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


@dataclass(frozen=True)
class PolicydConfig:
    listen: str = DEFAULT_LISTEN  # HOST:PORT (port 0: any free port) or unix:PATH
    db_path: str = "policyd.db"
    reconciler: ReconcilerSettings = field(default_factory=ReconcilerSettings)
    max_workers: int = 16  # gRPC handler threads


class StartupError(RuntimeError):
    """policyd cannot start (bad listen address, socket in use, unusable store)."""


def prepare_unix_socket(path: str) -> None:
    """Refuse a path another process listens on; remove a stale socket file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
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
        log.info("policyd.stale_socket_removed", path=path)
        return
    finally:
        probe.close()
    raise StartupError(f"{path}: another process is listening there")


class PolicyServer:
    def __init__(self, config: PolicydConfig) -> None:
        self.config = config
        try:
            self._listen: Address = parse_address(config.listen, "listen", allow_port_zero=True)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.address = ""  # the target clients dial, known after start()
        self.store: Store | None = None
        self.reconciler: Reconciler | None = None
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._socket_path = ""
        self._stopped = False

    def start(self) -> PolicyServer:
        try:
            self.store = Store(self.config.db_path)
        except Exception as exc:
            raise StartupError(f"store {self.config.db_path}: {exc}") from exc
        try:
            self._start_server(self.store)
        except BaseException:
            self.store.close()
            raise
        assert self.reconciler is not None
        self.reconciler.start()
        log.info(
            "policyd.started",
            listen=self.address,
            db=self.config.db_path,
            generation=self.store.generation,
            nodes=len(self.store.list_nodes()),
            resync_interval=self.config.reconciler.resync_interval,
        )
        return self

    def _start_server(self, store: Store) -> None:
        self.reconciler = Reconciler(store, self.config.reconciler)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.max_workers),
            options=SERVER_OPTIONS,
        )
        policy_pb2_grpc.add_PolicyServicer_to_server(PolicyServicer(store, self.reconciler), server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (POLICY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if self._listen.is_unix:
            prepare_unix_socket(self._listen.path)
        try:
            port = server.add_insecure_port(self._listen.text)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {self._listen.text}: {exc}") from None
        if self._listen.is_unix:
            self._socket_path = self._listen.path
            self.address = self._listen.text
        else:
            self.address = f"{self._listen.host}:{port}"
        server.start()
        self._server = server
        for name in ("", POLICY_SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server ends (True) or `timeout` passes (False)."""
        if self._server is None:
            return True
        return bool(self._server.wait_for_termination(timeout))

    def stop(self, grace: float = 2.0) -> None:
        """Stop the API (in-flight calls get `grace` seconds), the workers, the store.
        Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.store is not None:
            self.store.close()
        if self._socket_path:
            try:
                os.unlink(self._socket_path)
            except FileNotFoundError:
                pass
            self._socket_path = ""
        log.info("policyd.stopped")

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
