"""Certificates and TLS credentials for dpd, policyd and xlbctl (docs/security.md).

A small private CA signs every certificate (``xlbctl certs init`` / ``issue``):

- a CA: ``ca.key`` (0600) and ``ca.crt``, ECDSA P-256, 10 years;
- a leaf: ``NAME.key`` (0600) and ``NAME.crt``, signed by the CA, 1 year, usable as a
  client certificate and, with ``servers`` (DNS names or IP addresses, put in its
  subjectAltName), as a server certificate too.

A client certificate carries its role as a subjectAltName URI ``xlb-role:admin`` or
``xlb-role:read-only`` (``role_of_certificate``); a certificate without one authenticates
its holder but grants nothing.

``ServerTLS`` and ``ClientTLS`` turn files into gRPC credentials; ``check_listen``
decides whether a daemon may serve on an address with the security it has.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import grpc
import structlog

from xlbcore.address import Address

log = structlog.get_logger("xlb.tls")

ROLE_ADMIN = "admin"
ROLE_READ_ONLY = "read-only"
ROLES = (ROLE_READ_ONLY, ROLE_ADMIN)  # in order of what they allow
ROLE_URI_SCHEME = "xlb-role"

CA_DAYS = 3650
LEAF_DAYS = 365


class TLSError(ValueError):
    """A certificate or key that cannot be made, read or used."""


# -- files ----------------------------------------------------------------------------


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` readable by its owner only (0600), never briefly wider: the
    file is created with mode 0600 and an existing one is set to 0600 before it is
    written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_public(path: str | os.PathLike[str], data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSError(f"{what} {path}: {exc.strerror}") from None


# -- making certificates --------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _san_entries(servers: Sequence[str], role: str | None) -> list:  # type: ignore[type-arg]
    from cryptography import x509

    entries: list = []  # type: ignore[type-arg]
    for name in servers:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c in name for c in " /:@"):
                raise TLSError(f"--server {name!r}: not a DNS name or IP address") from None
            entries.append(x509.DNSName(name))
    if role is not None:
        entries.append(x509.UniformResourceIdentifier(f"{ROLE_URI_SCHEME}:{role}"))
    return entries


def _not_after(cert: Any) -> datetime.datetime:
    if hasattr(cert, "not_valid_after_utc"):  # cryptography >= 42
        return cert.not_valid_after_utc  # type: ignore[no-any-return]
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)  # type: ignore[no-any-return]


def make_ca(directory: str | os.PathLike[str], common_name: str = "xlb CA",
            days: int = CA_DAYS, force: bool = False) -> tuple[Path, Path]:
    """Write ``ca.key`` (0600) and ``ca.crt`` into `directory`; returns their paths.
    Refuses to replace an existing CA unless `force`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, cert_path = out / "ca.key", out / "ca.crt"
    if not force and (key_path.exists() or cert_path.exists()):
        raise TLSError(f"{out} already holds a CA (ca.key/ca.crt); remove it or use --force")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xlb"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def issue(ca_dir: str | os.PathLike[str], name: str, *, role: str | None = None,
          servers: Sequence[str] = (), out_dir: str | os.PathLike[str] | None = None,
          days: int = LEAF_DAYS) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0600) and ``NAME.crt``, signed by the CA in `ca_dir`, into
    `out_dir` (default `ca_dir`); returns their paths. `role` goes into the certificate
    as ``xlb-role:ROLE``; `servers` (DNS names, IP addresses) make it a server
    certificate too."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if role is not None and role not in ROLES:
        raise TLSError(f"role {role!r}: one of {', '.join(ROLES)}")
    if not name or "/" in name or name.startswith("."):
        raise TLSError(f"certificate name {name!r}: a plain file name is needed")
    ca = Path(ca_dir)
    ca_cert = x509.load_pem_x509_certificate(_read(ca / "ca.crt", "CA certificate"))
    ca_key = serialization.load_pem_private_key(_read(ca / "ca.key", "CA key"), password=None)
    out = Path(out_dir) if out_dir is not None else ca
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if servers:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xlb"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), _not_after(ca_cert)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    )
    sans = _san_entries(servers, role)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_path, cert_path = out / f"{name}.key", out / f"{name}.crt"
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


# -- reading certificates -------------------------------------------------------------


@dataclass(frozen=True)
class PeerCert:
    subject: str  # the certificate's common name
    role: str | None  # from its xlb-role: URI; None: no role


@lru_cache(maxsize=256)
def peer_of_certificate(pem: bytes) -> PeerCert:
    """The common name and role (``xlb-role:ROLE`` subjectAltName URI) of a PEM
    certificate. Several roles: the least of them; an unknown role: none."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else ""
    found: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            scheme, _, value = uri.partition(":")
            if scheme == ROLE_URI_SCHEME:
                found.append(value)
    except x509.ExtensionNotFound:
        pass
    role = None
    if found:
        role = min(found, key=lambda r: ROLES.index(r) if r in ROLES else -1)
        if role not in ROLES:
            role = None
    return PeerCert(subject, role)


def role_of_certificate(pem: bytes) -> str | None:
    return peer_of_certificate(pem).role


# -- credentials ----------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key; with `client_ca`, the CA whose client
    certificates it requires of every client (the handshake fails without one: gRPC
    Python cannot request a certificate and still let a client go without)."""

    cert: str
    key: str
    client_ca: str = ""

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        if not self.client_ca:
            return grpc.ssl_server_credentials([pair])
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read(self.client_ca, "TLS client CA"),
            require_client_auth=True)


@dataclass(frozen=True)
class ClientTLS:
    """The CA a client trusts for the server's certificate, and its own certificate
    and key (optional: a server that takes tokens needs no client certificate)."""

    ca: str
    cert: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise TLSError("a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA"),
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None)


def server_tls(cert: str, key: str, ca: str, what: str = "--tls") -> ServerTLS | None:
    """ServerTLS from the three flags of a daemon (all or none); TLSError otherwise."""
    given = [bool(cert), bool(key), bool(ca)]
    if not any(given):
        return None
    if not all(given):
        raise TLSError(f"{what}-cert, {what}-key and {what}-ca go together (mutual TLS)")
    tls = ServerTLS(cert=cert, key=key, client_ca=ca)
    tls.credentials()  # unreadable files fail at start-up, not at the first call
    return tls


def check_listen(addr: Address, secured: bool, insecure_tcp: bool, daemon: str,
                 how: str, warn: bool = True) -> None:
    """Refuse (TLSError) a TCP listen address without `secured` (TLS / authentication)
    unless `insecure_tcp`, which logs a warning (if `warn`). A unix socket is always
    allowed: its file mode is the access control."""
    if addr.is_unix or secured:
        return
    if not insecure_tcp:
        raise TLSError(
            f"refusing to serve {addr.text} (TCP) without {how}: anyone who can reach the "
            f"port could drive {daemon}. Listen on unix:PATH, give {how}, or pass "
            "--insecure-tcp for a test network (docs/security.md)")
    if warn:
        log.warning("insecure_tcp", listen=addr.text, daemon=daemon,
                    note=f"serving TCP without {how}: anyone who reaches it has full control")
