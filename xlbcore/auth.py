"""Who may call what: roles, bearer tokens and the server interceptor that enforces them
(docs/security.md).

Two roles, ``read-only`` < ``admin``. Which one a method needs is decided here and
nowhere else (``required_role``): reads are the methods named ``Get*``, ``List*`` or
``Watch*`` and the health and reflection services; every other method, including any
added later, needs ``admin``.

A caller proves a role with a client certificate of the server's CA carrying
``xlb-role:ROLE`` (xlbcore.tls) or a bearer token (``authorization: Bearer TOKEN``)
listed in a token file, one per line::

    # NAME ROLE sha256:HEX-OF-THE-TOKEN
    ops     admin      sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
    grafana read-only  sha256:...

The file holds only SHA-256 digests (tokens are 256-bit random strings, see
``new_token``); a presented token is hashed and compared to every entry in constant
time. The file is read again when it changes (rotation needs no restart).

No credentials: UNAUTHENTICATED; a role too small: PERMISSION_DENIED. Both are logged
(``auth.unauthenticated``, ``auth.denied``) with the method, the peer and the caller's
name, never the token; admin calls that pass are logged as ``auth.admin_call``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from xlbcore.tls import ROLE_ADMIN, ROLE_READ_ONLY, ROLES, TLSError, peer_of_certificate

log = structlog.get_logger("xlb.auth")

READ_PREFIXES = ("Get", "List", "Watch")
READ_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
# Exceptions to the rule above, by full method name ("/pkg.Service/Method" -> role): a
# read whose name does not say so, or a Get/List/Watch that writes. None today.
METHOD_ROLES: dict[str, str] = {}


def required_role(full_method: str) -> str:
    """The role ``/pkg.Service/Method`` needs: read-only for reads (see the module
    docstring), admin for everything else, unknown and malformed names included."""
    if full_method in METHOD_ROLES:
        return METHOD_ROLES[full_method]
    service, _, method = full_method.lstrip("/").partition("/")
    if service in READ_SERVICES:
        return ROLE_READ_ONLY
    for prefix in READ_PREFIXES:  # Watch, GetNode; not Getaway
        rest = method[len(prefix):]
        if method.startswith(prefix) and (not rest or rest[0].isupper()):
            return ROLE_READ_ONLY
    return ROLE_ADMIN


def allows(role: str | None, required: str) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(required)


# -- tokens ---------------------------------------------------------------------------


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_line(name: str, role: str, token: str) -> str:
    """The token file line for `token` (its digest only)."""
    if role not in ROLES:
        raise TLSError(f"role {role!r}: one of {', '.join(ROLES)}")
    if not name or any(c.isspace() for c in name):
        raise TLSError(f"token name {name!r}: one word")
    return f"{name} {role} {token_digest(token)}\n"


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: str
    digest: bytes  # SHA-256 of the token


def parse_tokens(text: str, source: str = "token file") -> list[TokenEntry]:
    entries: list[TokenEntry] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source} line {number}"
        if len(parts) != 3:
            raise TLSError(f"{where}: expected NAME ROLE sha256:HEX")
        name, role, digest = parts
        if role not in ROLES:
            raise TLSError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        kind, _, hexdigest = digest.partition(":")
        try:
            value = bytes.fromhex(hexdigest)
        except ValueError:
            value = b""
        if kind != "sha256" or len(value) != 32:
            # never echo the value: it may be a token pasted in by mistake
            raise TLSError(f"{where}: the third field must be sha256:<64 hex digits> "
                           "(xlbctl certs token writes it)")
        entries.append(TokenEntry(name, role, value))
    return entries


class TokenFile:
    """A token file, read at start and again whenever its modification time or size
    changes (checked at most once a second). A file that becomes unreadable or
    malformed keeps the last good entries (and logs why)."""

    RECHECK = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._entries: list[TokenEntry] = []
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                entries = parse_tokens(f.read(), self.path)
        except (OSError, TLSError, UnicodeDecodeError) as exc:
            text = exc.strerror if isinstance(exc, OSError) else str(exc)
            if initial:
                raise TLSError(f"token file {self.path}: {text}") from None
            log.error("auth.token_file_unusable", path=self.path, error=text,
                      note="keeping the tokens read before")
            return
        if st.st_mode & 0o022:
            log.warning("auth.token_file_writable", path=self.path, mode=oct(st.st_mode & 0o777),
                        note="others who can write it can add an admin token; chmod 600")
        if not initial:
            log.info("auth.token_file_reloaded", path=self.path, tokens=len(entries))
        self._entries, self._stamp = entries, stamp

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> TokenEntry | None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self.RECHECK:
                self._checked = now
                self._load()
            entries = self._entries
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in entries:  # every entry, whatever matches: constant time
            if hmac.compare_digest(entry.digest, digest) and found is None:
                found = entry
        return found


# -- the interceptor ------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str  # "cert:CN" or "token:NAME"
    role: str | None


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call (client certificate of the server's CA with a role, or
    a bearer token from `tokens`) and checks its role against ``required_role``."""

    def __init__(self, tokens: TokenFile | None = None, daemon: str = "") -> None:
        self.tokens = tokens
        self.daemon = daemon

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        token = _bearer(details.invocation_metadata)

        def check(context: grpc.ServicerContext) -> None:
            try:
                self.authorize(method, token, context)
            except Refused as exc:
                context.abort(exc.code, exc.message)

        return _wrap(handler, check)

    def authenticate(self, token: str | None, context: grpc.ServicerContext) -> Caller | None:
        callers: list[Caller] = []
        pem = context.auth_context().get("x509_pem_cert")
        if pem:  # only present when the handshake verified it against our CA
            peer = peer_of_certificate(pem[0])
            callers.append(Caller(f"cert:{peer.subject}", peer.role))
        if token is not None:
            entry = self.tokens.lookup(token) if self.tokens is not None and token else None
            if entry is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
            callers.append(Caller(f"token:{entry.name}", entry.role))
        if not callers:
            return None
        return max(callers, key=lambda c: ROLES.index(c.role) if c.role in ROLES else -1)

    def authorize(self, method: str, token: str | None,
                  context: grpc.ServicerContext) -> Caller:
        needed = required_role(method)
        try:
            caller = self.authenticate(token, context)
        except Refused as exc:
            log.warning("auth.unauthenticated", daemon=self.daemon, method=method,
                        peer=context.peer(), reason=exc.message)
            raise
        if caller is None:
            log.warning("auth.unauthenticated", daemon=self.daemon, method=method,
                        peer=context.peer(), reason="no credentials")
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                          "credentials required: a client certificate or a bearer token "
                          "(xlbctl --cert/--key or --token; docs/security.md)")
        if not allows(caller.role, needed):
            log.warning("auth.denied", daemon=self.daemon, method=method, peer=context.peer(),
                        caller=caller.name, role=caller.role or "none", required=needed)
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"{method.rpartition('/')[2]} needs role {needed}; "
                          f"{caller.name} has {caller.role or 'no role'}")
        if needed == ROLE_ADMIN:
            log.info("auth.admin_call", daemon=self.daemon, method=method, caller=caller.name,
                     peer=context.peer())
        return caller


def _wrap(handler: grpc.RpcMethodHandler,
          check: Callable[[grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    """`handler` with `check(context)` run before its behaviour (check aborts)."""
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            yield from inner_us(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        def stream_unary(requests: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer)
    inner_ss = handler.stream_stream

    def stream_stream(requests: Any, context: grpc.ServicerContext) -> Any:
        check(context)
        yield from inner_ss(requests, context)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer)


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Client side: adds ``authorization: Bearer TOKEN`` to every call of a channel
    (``grpc.intercept_channel(channel, BearerToken(token))``); works on plaintext unix
    sockets too, where grpc's call credentials would not."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self._header], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any
