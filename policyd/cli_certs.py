"""xlbctl's trust: how it connects (``--ca/--cert/--key``, ``--token``) and the ``certs``
commands that make a CA, certificates and tokens (docs/security.md)::

    xlbctl certs init                                   # pki/ca.key (0600), pki/ca.crt
    xlbctl certs issue policyd --role admin --server policyd --server 198.18.30.2
    xlbctl certs issue node1 --server 198.18.30.11     # a dpd: a server certificate
    xlbctl certs issue alice --role read-only           # a person: a client certificate
    xlbctl certs token ci --role admin --file tokens    # prints the token once

    xlbctl --server 198.18.30.2:50151 --ca pki/ca.crt --cert pki/alice.crt \\
        --key pki/alice.key status
    XLB_TOKEN=... xlbctl --server 198.18.30.2:50151 --ca pki/ca.crt status
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import grpc

ENV_CA = "XLB_CA"
ENV_CERT = "XLB_CERT"
ENV_KEY = "XLB_KEY"
ENV_TOKEN = "XLB_TOKEN"
ENV_PKI = "XLB_PKI"


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """--ca, --cert, --key, --token (each defaulting to its environment variable)."""
    env = os.environ.get
    g = p.add_argument_group("trust (docs/security.md)")
    g.add_argument("--ca", default=env(ENV_CA, ""), metavar="FILE",
                   help=f"CA of policyd's server certificate: dial with TLS (${ENV_CA})")
    g.add_argument("--cert", default=env(ENV_CERT, ""), metavar="FILE",
                   help=f"client certificate (its role decides what you may do) (${ENV_CERT})")
    g.add_argument("--key", default=env(ENV_KEY, ""), metavar="FILE",
                   help=f"the client certificate's key (${ENV_KEY})")
    g.add_argument("--token", default=env(ENV_TOKEN, ""), metavar="TOKEN",
                   help=f"bearer token (prefer ${ENV_TOKEN}: a command line is visible to "
                   "every user of the machine)")


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """PolicyClient keyword arguments (credentials, token) from the connection flags;
    ValueError when they do not fit."""
    from xlbcore.tls import ClientTLS

    credentials: grpc.ChannelCredentials | None = None
    if args.cert or args.key or args.ca:
        if not args.ca:
            raise ValueError("--cert and --key need --ca (the CA of policyd's certificate)")
        credentials = ClientTLS(ca=args.ca, cert=args.cert, key=args.key).credentials()
    return {"credentials": credentials, "token": args.token or None}


def hint(args: argparse.Namespace, code: str) -> str:
    """A line for stderr after a failed call that missing credentials may explain ("" when
    none fits). A server with TLS closes a plaintext connection, and one with mutual TLS a
    connection without a client certificate: both look like UNAVAILABLE to the client."""
    target = getattr(args, "dpd", "") or args.server
    if code != "UNAVAILABLE" or target.startswith("unix:"):
        return ""
    if not args.ca:
        return ("xlbctl: if the server serves TLS, give --ca (and --cert/--key or --token); "
                "docs/security.md\n")
    if not args.cert:
        return ("xlbctl: if the server asks for client certificates, give --cert and --key; "
                "docs/security.md\n")
    return ""


def add_certs_parser(sub: Any) -> None:
    """The ``certs`` command group, on xlbctl's subparsers."""
    certs = sub.add_parser("certs", help="make a CA, certificates and tokens (no server call)",
                           description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = certs.add_subparsers(dest="verb", required=True)
    default_dir = os.environ.get(ENV_PKI, "pki")
    init = verbs.add_parser("init", help="make a CA: DIR/ca.key (0600) and DIR/ca.crt")
    init.add_argument("--dir", default=default_dir, help=f"(default ${ENV_PKI} or pki)")
    init.add_argument("--name", default="xlb CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650)
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    issue = verbs.add_parser("issue", help="a certificate signed by the CA: NAME.key, NAME.crt")
    issue.add_argument("name", help="common name and file name")
    issue.add_argument("--role", choices=("admin", "read-only"), default=None,
                       help="what its holder may call as a client (none: nothing; enough "
                       "for a dpd's server certificate)")
    issue.add_argument("--server", action="append", default=[], metavar="DNS|IP",
                       help="a name or address it serves as (repeat): a server certificate")
    issue.add_argument("--dir", default=default_dir, help="the CA's directory")
    issue.add_argument("--out", default="", help="where to write (default: --dir)")
    issue.add_argument("--days", type=int, default=365)
    token = verbs.add_parser("token", help="a new bearer token: printed once, its SHA-256 "
                             "appended to the token file")
    token.add_argument("name", help="who holds it (logged with each refused or admin call)")
    token.add_argument("--role", choices=("admin", "read-only"), required=True)
    token.add_argument("--file", required=True, help="policyd's --token-file (made 0600)")


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")


def run(args: argparse.Namespace) -> int:
    from xlbcore import tls

    try:
        if args.verb == "init":
            key, cert = tls.make_ca(args.dir, args.name, days=args.days, force=args.force)
            _say(f"CA: {cert} (give it to every server and client), {key} (keep it offline)")
        elif args.verb == "issue":
            key, cert = tls.issue(args.dir, args.name, role=args.role, servers=args.server,
                                  out_dir=args.out or None, days=args.days)
            what = ", ".join(filter(None, [
                f"server for {', '.join(args.server)}" if args.server else "",
                f"role {args.role}" if args.role else "no role"]))
            _say(f"{cert} and {key} ({what})")
        else:
            return _token(args)
    except (tls.TLSError, OSError) as exc:
        _say(f"xlbctl certs: {exc}")
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    from xlbcore.auth import new_token, token_line

    secret = new_token()
    line = token_line(args.name, args.role, secret)
    path = Path(args.file)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    _say(f"token {args.name} ({args.role}) added to {path}; it is shown once:")
    sys.stdout.write(secret + "\n")
    return 0
