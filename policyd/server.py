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

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog

from policyd.defaults import DEFAULT_LISTEN
from policyd.etcd import Etcd
from policyd.etcd_store import SNAPSHOT_EVERY, EtcdStore
from policyd.ha import Election, FollowerInterceptor
from policyd.ha_status import ReplicaStatus, StatusMirror, StatusPublisher
from policyd.nodeclient import node_channels
from policyd.reconciler import Reconciler, ReconcilerSettings
from policyd.servicer import PolicyServicer
from policyd.store import Store
from xlb.policy.v1 import policy_pb2, policy_pb2_grpc
from xlbcore.address import Address, parse_address
from xlbcore.auth import AuthInterceptor, TokenFile
from xlbcore.errors import ValidationError
from xlbcore.server import Server, StartupError, start_server
from xlbcore.tls import ClientTLS, ServerTLS, TLSError, check_listen

__all__ = ["DEFAULT_LISTEN", "PolicyServer", "PolicydConfig", "StartupError"]

log = structlog.get_logger()

POLICY_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
# A unix socket without credentials is local trust: its owner and group (chgrp it to
# the operators' group) have every role.
SOCKET_MODE = 0o660


@dataclass(frozen=True)
class PolicydConfig:
    listen: str = DEFAULT_LISTEN  # HOST:PORT (port 0: any free port) or unix:PATH
    db_path: str = "policyd.db"
    reconciler: ReconcilerSettings = field(default_factory=ReconcilerSettings)
    max_workers: int = 16  # gRPC handler threads
    # see every call of the API (xlbcore.metrics.RpcMetrics with --metrics)
    interceptors: tuple[grpc.ServerInterceptor, ...] = ()
    # Trust (docs/security.md): the API's TLS (its client_ca: client certificates with
    # roles), a token file (bearer tokens with roles); either one turns on the role
    # checks (xlbcore.auth). Without them: a unix socket only, unless insecure_tcp.
    tls: ServerTLS | None = None
    token_file: str = ""
    insecure_tcp: bool = False
    node_tls: ClientTLS | None = None  # policyd's certificate towards dpd nodes over TCP
    # Replicas on etcd (docs/ha.md): the store's URL (etcd://HOST:PORT; "" = SQLite at
    # db_path), this replica's name, the address followers name as the leader's (default:
    # the listen address), the lease's seconds, and what to do when leadership is lost
    # (or the store's log was compacted past this replica): a replica that must start again.
    store: str = ""
    replica: str = ""
    advertise: str = ""
    lease_ttl: int = 2
    snapshot_every: int = SNAPSHOT_EVERY  # log entries between the leader's snapshots
    on_leadership_lost: Callable[[], None] | None = None


class PolicyServer:
    def __init__(self, config: PolicydConfig) -> None:
        self.config = config
        try:
            self._listen: Address = parse_address(config.listen, "listen", allow_port_zero=True)
        except ValidationError as exc:
            raise StartupError(str(exc)) from None
        self.address = ""  # the target clients dial, known after start()
        self.store: Store | None = None
        self.reconciler: Reconciler | None = None
        self._server: Server | None = None
        self._servicer: PolicyServicer | None = None
        self._stopped = False
        self.election: Election | None = None  # replicas on etcd only
        self._mirror: StatusMirror | None = None  # the leader's published node status
        self._publisher: StatusPublisher | None = None  # it, while this replica leads

    def start(self) -> PolicyServer:
        where = self.config.store or self.config.db_path
        try:
            self.store = (EtcdStore(Etcd(self.config.store),
                                    snapshot_every=self.config.snapshot_every)
                          if self.config.store else Store(self.config.db_path))
        except Exception as exc:
            raise StartupError(f"store {where}: {exc}") from exc
        store = self.store
        try:
            interceptors, credentials = self._security()
            if self.config.store:  # after the role checks: no leader named to strangers
                interceptors += (FollowerInterceptor(lambda: self.election),)
            self.reconciler = Reconciler(store, self.config.reconciler,
                                         **node_channels(self.config.node_tls))
            status = None
            if isinstance(store, EtcdStore):  # followers answer the leader's published status
                self._mirror = StatusMirror(store.etcd, store.prefix, store)
                status = ReplicaStatus(lambda: self.election is not None
                                       and self.election.leading, self.reconciler,
                                       self._mirror)
            servicer = self._servicer = PolicyServicer(store, self.reconciler, status=status)
            self._server = start_server(
                self._listen,
                POLICY_SERVICE,
                lambda server: policy_pb2_grpc.add_PolicyServicer_to_server(servicer, server),
                max_workers=self.config.max_workers,
                interceptors=self.config.interceptors + interceptors,
                credentials=credentials,
                socket_mode=SOCKET_MODE,
            )
        except BaseException:
            store.close()
            raise
        self.address = self._server.address
        if isinstance(store, EtcdStore):
            store.on_compacted = self._leadership_lost  # behind a snapshot: start again
            store.follow()
            if self._mirror is not None:
                self._mirror.start()
            election = self.election = Election(
                store, self.config.replica or f"{socket.gethostname()}-{os.getpid()}",
                self.config.advertise or self.address, ttl=self.config.lease_ttl,
                on_elected=self._elected, on_lost=self._leadership_lost)
            self._publisher = StatusPublisher(store.etcd, store.prefix, self.reconciler,
                                              lambda: election.lease)
            election.start()
        else:
            self.reconciler.start()
        log.info(
            "policyd.started",
            listen=self.address,
            db=where,
            generation=store.generation,
            nodes=len(store.list_nodes()),
            resync_interval=self.config.reconciler.resync_interval,
        )
        return self

    def _security(self) -> tuple[tuple[grpc.ServerInterceptor, ...],
                                 grpc.ServerCredentials | None]:
        """The role checks and TLS credentials of the config; StartupError when the
        listen address may not be served with them."""
        config = self.config
        try:
            tokens = TokenFile(config.token_file) if config.token_file else None
            tls = config.tls
            credentials = tls.credentials() if tls is not None else None
            authenticated = tokens is not None or bool(tls and tls.client_ca)
            check_listen(self._listen, authenticated, config.insecure_tcp, "xlb-policyd",
                         "--tls-ca (client certificates) or --token-file")
        except TLSError as exc:
            raise StartupError(str(exc)) from None
        if tokens is not None and tls is None and not self._listen.is_unix:
            log.warning("policyd.tokens_in_clear", listen=self._listen.text,
                        note="bearer tokens over TCP without TLS can be read on the network; "
                             "add --tls-cert and --tls-key")
        if not authenticated:
            return (), credentials
        log.info("policyd.auth", tokens=len(tokens) if tokens is not None else 0,
                 client_certificates=bool(tls and tls.client_ca), tls=tls is not None)
        return (AuthInterceptor(tokens, daemon="policyd"),), credentials

    def _elected(self) -> None:
        if self.reconciler is not None:
            self.reconciler.start()
        if self._publisher is not None:
            self._publisher.start()

    def _leadership_lost(self) -> None:
        if self._publisher is not None:
            self._publisher.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.config.on_leadership_lost is not None:
            self.config.on_leadership_lost()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server ends (True) or `timeout` passes (False)."""
        if self._server is None:
            return True
        return bool(self._server.grpc.wait_for_termination(timeout))

    def stop(self, grace: float = 1.0) -> None:
        """Stop the API (in-flight calls get `grace` seconds), the workers, the store.
        Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self._servicer is not None:
            self._servicer.close()  # Watch streams end (UNAVAILABLE) before the grace
        if self._mirror is not None:
            self._mirror.signal_stop()  # a follower's WatchSyncStatus streams too; its
            # etcd watch ends within a second, beside the store's (joined below)
        if self._server is not None:
            self._server.stop(grace)
        if self._publisher is not None:
            self._publisher.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.election is not None:
            self.election.stop()  # after the reconciler: never two leaders pushing
        if self._mirror is not None:
            self._mirror.close()
        if self.store is not None:
            self.store.close()
        log.info("policyd.stopped")

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
