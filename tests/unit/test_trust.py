"""Trust (docs/security.md): policyd's API over TLS with client certificates and bearer
tokens, two roles; dpd over mutual TLS and policyd reaching it with its certificate;
neither daemon serving plain TCP unless told to. In-process servers on localhost TCP,
certificates made by xlbcore.tls in tmp dirs; no root."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dpd.loader import Settings
from dpd.main import serve as serve_dpd
from dpd.memory import MemoryDatapath
from dpd.node import Node
from policyd import cli
from policyd.client import PolicyClient
from policyd.server import PolicydConfig, PolicyServer
from tests.unit.conftest import FAST, poll_until
from xlb.dpd.v1 import datapath_pb2, datapath_pb2_grpc
from xlb.policy.v1 import policy_pb2
from xlbcore import tls
from xlbcore.auth import (
    METHOD_ROLES,
    TokenFile,
    allows,
    new_token,
    parse_tokens,
    required_role,
    token_line,
)
from xlbcore.server import StartupError

ROOT = Path(__file__).resolve().parents[2]
REFUSED = (grpc.StatusCode.UNAVAILABLE,)  # a failed TLS handshake: the call never starts


# -- certificates and tokens ----------------------------------------------------------


class Pki:
    def __init__(self, base: Path) -> None:
        self.dir = base / "pki"
        tls.make_ca(self.dir)
        self.ca = str(self.dir / "ca.crt")
        tls.issue(self.dir, "policyd", role=tls.ROLE_ADMIN, servers=["localhost", "127.0.0.1"])
        tls.issue(self.dir, "node1", servers=["127.0.0.1"])
        tls.issue(self.dir, "ops", role=tls.ROLE_ADMIN)
        tls.issue(self.dir, "viewer", role=tls.ROLE_READ_ONLY)
        tls.issue(self.dir, "nobody")
        self.other = base / "other"
        tls.make_ca(self.other, "another CA")
        tls.issue(self.other, "intruder", role=tls.ROLE_ADMIN)
        self.admin_token, self.read_token = new_token(), new_token()
        self.tokens = base / "tokens"
        self.tokens.write_text(token_line("ci", "admin", self.admin_token)
                               + token_line("grafana", "read-only", self.read_token))

    def cert(self, name: str, other: bool = False) -> tuple[str, str]:
        d = self.other if other else self.dir
        return str(d / f"{name}.crt"), str(d / f"{name}.key")

    def client(self, server: PolicyServer, name: str = "", other: bool = False,
               token: str | None = None, ca: str | None = None) -> PolicyClient:
        cert, key = self.cert(name, other) if name else ("", "")
        creds = tls.ClientTLS(ca=ca or self.ca, cert=cert, key=key).credentials()
        return PolicyClient(server.address, timeout=5.0, credentials=creds, token=token)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("trust"))


def start_policyd(pki: Pki, tmp_path: Path, certs: bool, tokens: bool) -> PolicyServer:
    cert, key = pki.cert("policyd")
    db = tmp_path / f"p-{certs:d}{tokens:d}.db"
    config = PolicydConfig(listen="127.0.0.1:0", db_path=str(db), reconciler=FAST,
                           tls=tls.ServerTLS(cert=cert, key=key,
                                             client_ca=pki.ca if certs else ""),
                           token_file=str(pki.tokens) if tokens else "")
    return PolicyServer(config).start()


@pytest.fixture
def policyd(pki: Pki, tmp_path: Path) -> Iterator[PolicyServer]:
    """policyd on localhost TCP: TLS (no client certificates) and pki's tokens."""
    server = start_policyd(pki, tmp_path, certs=False, tokens=True)
    yield server
    server.stop(0)


@pytest.fixture
def mtls_policyd(pki: Pki, tmp_path: Path) -> Iterator[PolicyServer]:
    """policyd with client certificates of pki's CA (no token file): mutual TLS."""
    server = start_policyd(pki, tmp_path, certs=True, tokens=False)
    yield server
    server.stop(0)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def apply_web(client: PolicyClient) -> Any:
    return client.apply_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:8080"])


def stored(server: PolicyServer) -> tuple[list[str], list[str], int]:
    assert server.store is not None
    return ([s.name for s in server.store.list_services()],
            [n.name for n in server.store.list_nodes()], server.store.generation)


def test_certificates_on_disk(pki: Pki) -> None:
    for key in pki.dir.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(pki.tokens.stat().st_mode) != 0  # written by the test itself
    roles = {name: tls.role_of_certificate(Path(pki.cert(name)[0]).read_bytes())
             for name in ("policyd", "ops", "viewer", "nobody", "node1")}
    assert roles == {"policyd": "admin", "ops": "admin", "viewer": "read-only",
                     "nobody": None, "node1": None}
    with pytest.raises(tls.TLSError, match="already holds a CA"):
        tls.make_ca(pki.dir)


# -- refused, and nothing changed -----------------------------------------------------


def test_no_client_certificate_is_refused_by_mutual_tls(pki, mtls_policyd):
    before = stored(mtls_policyd)
    with pki.client(mtls_policyd) as client:
        assert code_of(lambda: apply_web(client)) in REFUSED
        assert code_of(client.list_services) in REFUSED
    assert stored(mtls_policyd) == before


def test_certificate_of_another_ca_is_refused(pki, mtls_policyd):
    before = stored(mtls_policyd)
    with pki.client(mtls_policyd, "intruder", other=True) as client:
        assert code_of(lambda: apply_web(client)) in REFUSED
    assert stored(mtls_policyd) == before


def test_server_of_another_ca_is_not_trusted(pki, policyd):
    """xlbctl with the wrong CA does not send its token to that server."""
    with pki.client(policyd, token=pki.admin_token,
                    ca=str(pki.other / "ca.crt")) as client:
        assert code_of(lambda: apply_web(client)) in REFUSED
    assert stored(policyd)[0] == []


def test_certificates_and_tokens_together(pki, tmp_path):
    """Both: every client needs a certificate; a token may add to its role."""
    server = start_policyd(pki, tmp_path, certs=True, tokens=True)
    try:
        with pki.client(server, token=pki.admin_token) as client:  # no certificate
            assert code_of(lambda: apply_web(client)) in REFUSED
        with pki.client(server, "viewer") as client:
            assert code_of(lambda: apply_web(client)) == grpc.StatusCode.PERMISSION_DENIED
        with pki.client(server, "nobody", token=pki.read_token) as client:
            assert client.list_services() == []
            assert code_of(lambda: apply_web(client)) == grpc.StatusCode.PERMISSION_DENIED
        with pki.client(server, "viewer", token="wrong") as client:
            assert code_of(client.list_services) == grpc.StatusCode.UNAUTHENTICATED
        with pki.client(server, "viewer", token=pki.admin_token) as client:
            apply_web(client)
        assert stored(server)[0] == ["web"]
    finally:
        server.stop(0)


def test_no_credentials_unauthenticated(pki, policyd, captured_log):
    before = stored(policyd)
    with pki.client(policyd) as client:  # TLS, no certificate, no token
        assert code_of(lambda: apply_web(client)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(client.list_services) == grpc.StatusCode.UNAUTHENTICATED
    with pki.client(policyd, token="not-a-token") as client:
        assert code_of(client.list_services) == grpc.StatusCode.UNAUTHENTICATED
    assert stored(policyd) == before
    text = captured_log.getvalue()
    assert "auth.unauthenticated" in text and "ApplyService" in text
    assert "not-a-token" not in text


def test_read_only_token_cannot_apply(pki, policyd, captured_log):
    with pki.client(policyd, token=pki.admin_token) as admin:
        apply_web(admin)
    before = stored(policyd)
    with pki.client(policyd, token=pki.read_token) as viewer:
        assert code_of(lambda: viewer.apply_service(
            "web", "198.19.0.10", 80, "tcp", ["198.18.9.9:80"])) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: viewer.delete_service("web")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: viewer.register_node("n", "unix:/x")) == \
            grpc.StatusCode.PERMISSION_DENIED
        # reads pass
        assert [s.name for s in viewer.list_services()] == ["web"]
        assert viewer.get_service("web").endpoints[0].address == "198.18.1.2"
        viewer.sync_status()
        viewer.list_nodes()
    assert stored(policyd) == before
    text = captured_log.getvalue()
    assert "auth.denied" in text and "token:grafana" in text and "required=admin" in text
    assert pki.read_token not in text and pki.admin_token not in text


def test_read_only_certificate_cannot_apply(pki, mtls_policyd):
    before = stored(mtls_policyd)
    for name in ("viewer", "nobody"):
        with pki.client(mtls_policyd, name) as client:
            assert code_of(lambda c=client: apply_web(c)) == grpc.StatusCode.PERMISSION_DENIED
    with pki.client(mtls_policyd, "viewer") as viewer:
        assert viewer.list_services() == []
    with pki.client(mtls_policyd, "nobody") as nobody:  # no role: not even reads
        assert code_of(nobody.list_services) == grpc.StatusCode.PERMISSION_DENIED
    assert stored(mtls_policyd) == before


def test_admin_token_and_certificate_succeed(pki, policyd, mtls_policyd, captured_log):
    with pki.client(policyd, token=pki.admin_token) as client:
        assert apply_web(client).generation > 0
        client.register_node("n1", "unix:/nonexistent/dpd.sock")
    with pki.client(mtls_policyd, "ops") as client:
        apply_web(client)
        client.delete_service("web")
    assert stored(policyd)[:2] == (["web"], ["n1"])
    assert stored(mtls_policyd)[:2] == ([], [])
    assert "auth.admin_call" in captured_log.getvalue()
    assert "caller=cert:ops" in captured_log.getvalue()


def test_health_is_read_only(pki, policyd):
    for token, expected in ((None, grpc.StatusCode.UNAUTHENTICATED), (pki.read_token, None)):
        creds = tls.ClientTLS(ca=pki.ca).credentials()
        with grpc.secure_channel(policyd.address, creds) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            meta = [("authorization", f"Bearer {token}")] if token else None
            if expected is None:
                reply = stub.Check(health_pb2.HealthCheckRequest(), metadata=meta, timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            else:
                assert code_of(lambda s=stub, m=meta: s.Check(
                    health_pb2.HealthCheckRequest(), metadata=m, timeout=5)) == expected


def test_xlbctl_with_certificates_and_tokens(pki, policyd, mtls_policyd, capsys, monkeypatch):
    cert, key = pki.cert("viewer")
    assert cli.main(["--server", mtls_policyd.address, "--ca", pki.ca, "--cert", cert,
                     "--key", key, "node", "register", "n", "unix:/x"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    cert, key = pki.cert("ops")
    monkeypatch.setenv("XLB_CERT", cert)
    monkeypatch.setenv("XLB_KEY", key)
    assert cli.main(["--server", mtls_policyd.address, "--ca", pki.ca, "node", "register",
                     "n", "unix:/x"]) == 0
    monkeypatch.delenv("XLB_CERT")
    monkeypatch.delenv("XLB_KEY")
    base = ["--server", policyd.address, "--ca", pki.ca]
    monkeypatch.setenv("XLB_TOKEN", pki.admin_token)
    assert cli.main([*base, "node", "register", "n", "unix:/x"]) == 0
    monkeypatch.delenv("XLB_TOKEN")
    assert cli.main([*base, "node", "register", "m", "unix:/y"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert stored(policyd)[1] == ["n"]


def test_xlbctl_certs_commands(tmp_path, capsys):
    d = str(tmp_path / "pki")
    assert cli.main(["certs", "init", "--dir", d]) == 0
    assert cli.main(["certs", "issue", "p", "--role", "admin", "--server", "10.0.0.1",
                     "--server", "policyd", "--dir", d]) == 0
    assert cli.main(["certs", "init", "--dir", d]) == 1  # will not replace a CA
    assert tls.role_of_certificate((tmp_path / "pki" / "p.crt").read_bytes()) == "admin"
    assert stat.S_IMODE((tmp_path / "pki" / "p.key").stat().st_mode) == 0o600
    capsys.readouterr()
    tokens = tmp_path / "tokens"
    assert cli.main(["certs", "token", "ci", "--role", "read-only", "--file", str(tokens)]) == 0
    token = capsys.readouterr().out.strip()
    assert token not in tokens.read_text()
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    entry = TokenFile(str(tokens)).lookup(token)
    assert entry is not None and (entry.name, entry.role) == ("ci", "read-only")


# -- roles by method name, tokens -----------------------------------------------------


def test_every_method_has_a_role():
    """Reads by name (Get*, List*, Watch*), everything else admin, new methods too."""
    for service in (policy_pb2.DESCRIPTOR.services_by_name["Policy"],
                    datapath_pb2.DESCRIPTOR.services_by_name["Datapath"]):
        for method in service.methods:
            full = f"/{service.full_name}/{method.name}"
            role = required_role(full)
            reads = method.name.startswith(("Get", "List", "Watch"))
            assert role == ("read-only" if reads else "admin"), full
    assert required_role("/xlb.policy.v1.Policy/ApplyService") == "admin"
    assert required_role("/xlb.policy.v1.Policy/RegisterNode") == "admin"
    assert required_role("/xlb.policy.v1.Policy/GetSyncStatus") == "read-only"
    assert required_role("/xlb.policy.v1.Policy/SomethingNew") == "admin"
    assert required_role("/xlb.policy.v1.Policy/Getaway") == "admin"
    assert required_role("/xlb.policy.v1.Policy/Watch") == "read-only"
    assert required_role("/xlb.policy.v1.Policy/WatchSyncStatus") == "read-only"
    assert required_role("/grpc.health.v1.Health/Check") == "read-only"
    assert required_role("garbage") == "admin"
    assert METHOD_ROLES == {}
    assert allows("admin", "read-only") and not allows("read-only", "admin")
    assert not allows(None, "read-only")


def test_token_file(tmp_path):
    token = new_token()
    assert len(token) >= 43
    path = tmp_path / "tokens"
    path.write_text("# comment\n\n" + token_line("ops", "admin", token))
    tokens = TokenFile(str(path))
    assert tokens.lookup(token).role == "admin"  # type: ignore[union-attr]
    assert tokens.lookup(token + "x") is None
    assert tokens.lookup("") is None
    for bad in ("ops admin", "ops root sha256:" + "0" * 64, f"ops admin {token}",
                "ops admin sha256:abc"):
        with pytest.raises(tls.TLSError, match="line 1") as info:
            parse_tokens(bad)
        assert token not in str(info.value)
    # rotation: a changed file is read again
    second = new_token()
    path.write_text(token_line("ops", "read-only", second) + "# longer, so the size changes\n")
    tokens._checked = 0.0
    assert tokens.lookup(token) is None
    assert tokens.lookup(second).role == "read-only"  # type: ignore[union-attr]
    with pytest.raises(tls.TLSError):
        TokenFile(str(tmp_path / "missing"))


def test_token_file_writable_by_others_is_logged(tmp_path, captured_log):
    path = tmp_path / "tokens"
    path.write_text(token_line("ops", "admin", new_token()))
    path.chmod(0o666)
    TokenFile(str(path))
    assert "auth.token_file_writable" in captured_log.getvalue()


def test_keys_are_not_written_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "k").symlink_to(target)
    with pytest.raises(OSError):
        tls.write_private(tmp_path / "k", b"secret")
    assert target.read_text() == "keep"


# -- listening: unix by default, TCP only when secured --------------------------------


def test_policyd_refuses_plain_tcp(tmp_path, pki):
    config = PolicydConfig(listen="127.0.0.1:0", db_path=str(tmp_path / "p.db"), reconciler=FAST)
    with pytest.raises(StartupError, match="--insecure-tcp"):
        PolicyServer(config).start()
    cert, key = pki.cert("policyd")  # TLS without client certificates or tokens: no auth
    with pytest.raises(StartupError, match="--tls-ca"):
        PolicyServer(PolicydConfig(listen="127.0.0.1:0", db_path=str(tmp_path / "p.db"),
                                   tls=tls.ServerTLS(cert=cert, key=key))).start()
    server = PolicyServer(PolicydConfig(listen="127.0.0.1:0", db_path=str(tmp_path / "p.db"),
                                        reconciler=FAST, insecure_tcp=True)).start()
    try:
        with PolicyClient(server.address) as client:  # the old, open behaviour
            apply_web(client)
    finally:
        server.stop(0)


def test_policyd_unix_socket_is_local_trust(tmp_path, sockdir):
    server = PolicyServer(PolicydConfig(listen=f"unix:{sockdir}/p.sock",
                                        db_path=str(tmp_path / "p.db"), reconciler=FAST)).start()
    try:
        assert stat.S_IMODE(os.stat(sockdir / "p.sock").st_mode) == 0o660
        with PolicyClient(server.address) as client:
            apply_web(client)
    finally:
        server.stop(0)


def memory_node(name: str = "node1") -> Node:
    return Node(MemoryDatapath(Settings(name=name, max_services=64, max_backends=256,
                                        ct_size=64)), ct_aging_interval=0)


def test_dpd_refuses_plain_tcp(pki, sockdir):
    node = memory_node()
    try:
        with pytest.raises(StartupError, match="--tls-cert, --tls-key and --tls-ca"):
            serve_dpd(node, "127.0.0.1:0")
        server = serve_dpd(node, f"unix:{sockdir}/d.sock")
        assert stat.S_IMODE(os.stat(sockdir / "d.sock").st_mode) == 0o600
        server.stop(0)
    finally:
        node.close()


def test_xlb_dpd_refuses_plain_tcp_at_start(pki):
    """The command: refused before anything is loaded, with what to do; --insecure-tcp
    starts it (with a warning); half the TLS flags is an error."""
    base = [sys.executable, "-m", "dpd.main", "--name", "t", "--datapath", "memory",
            "--log-format", "kv"]
    res = subprocess.run([*base, "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "dpd_start_failed" in out and "--insecure-tcp" in out and "--tls-ca" in out
    cert, key = pki.cert("node1")
    res = subprocess.run([*base, "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1 and "go together" in res.stdout + res.stderr
    proc = subprocess.Popen([*base, "--listen", "127.0.0.1:0", "--insecure-tcp"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "dpd_started" in line:
                break
        assert any("insecure_tcp" in line for line in lines), lines
    finally:
        proc.terminate()
        proc.wait(10)


# -- policyd -> dpd over mutual TLS ---------------------------------------------------


@pytest.fixture
def tls_dpd(pki: Pki) -> Iterator[tuple[Node, str]]:
    node = memory_node()
    cert, key = pki.cert("node1")
    server = serve_dpd(node, "127.0.0.1:0",
                       tls=tls.server_tls(cert, key, pki.ca))
    yield node, server.address
    server.stop(0)
    node.close()


def test_policyd_reconciles_onto_dpd_over_mutual_tls(pki, tls_dpd, tmp_path, sockdir):
    node, address = tls_dpd
    cert, key = pki.cert("policyd")  # role admin: dpd lets it write
    server = PolicyServer(PolicydConfig(
        listen=f"unix:{sockdir}/p.sock", db_path=str(tmp_path / "p.db"), reconciler=FAST,
        node_tls=tls.ClientTLS(ca=pki.ca, cert=cert, key=key))).start()
    try:
        with PolicyClient(server.address) as client:
            client.register_node("node1", address)
            apply_web(client)
            client.wait_synced(["node1"], timeout=20)
        assert node.services.count() == 1
    finally:
        server.stop(0)


def test_dpd_over_tls_refuses_what_its_certificates_do_not_allow(pki, tls_dpd):
    node, address = tls_dpd
    put = datapath_pb2.PutServicesRequest()
    svc = put.services.add(vip="198.19.0.10", port=80, protocol=1)
    svc.endpoints.add(address="198.18.1.2", port=8080)

    def stub(name: str = "", other: bool = False) -> Any:
        cert, key = pki.cert(name, other) if name else ("", "")
        creds = tls.ClientTLS(ca=pki.ca, cert=cert, key=key).credentials()
        return datapath_pb2_grpc.DatapathStub(grpc.secure_channel(address, creds))

    assert code_of(lambda: stub().PutServices(put, timeout=5)) in REFUSED
    assert code_of(lambda: stub("intruder", True).PutServices(put, timeout=5)) in REFUSED
    viewer = stub("viewer")
    assert code_of(lambda: viewer.PutServices(put, timeout=5)) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert list(viewer.ListServices(datapath_pb2.ListServicesRequest(), timeout=5)) == []
    assert node.services.count() == 0
    stub("ops").PutServices(put, timeout=5)
    assert node.services.count() == 1


def test_policyd_without_its_certificate_cannot_reach_dpd(pki, tls_dpd, tmp_path, sockdir):
    node, address = tls_dpd
    cert, key = pki.cert("viewer")  # a certificate of the right CA, but read-only
    server = PolicyServer(PolicydConfig(
        listen=f"unix:{sockdir}/p.sock", db_path=str(tmp_path / "p.db"), reconciler=FAST,
        node_tls=tls.ClientTLS(ca=pki.ca, cert=cert, key=key))).start()
    try:
        with PolicyClient(server.address) as client:
            client.register_node("node1", address)
            apply_web(client)
            status = poll_until(lambda: [n for n in client.sync_status("node1").nodes
                                         if n.state == policy_pb2.SYNC_STATE_ERROR],
                                what="node1 in ERROR")
            assert "PERMISSION_DENIED" in status[0].message or "needs role" in status[0].message
        assert node.services.count() == 0
    finally:
        server.stop(0)


# -- the commands, as docs/security.md runs them --------------------------------------


def _start(argv: list[str], ready: str) -> tuple[subprocess.Popen[str], str]:
    """Start a daemon; return it and the `listen=` of its `ready` log line."""
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--log-format", "kv"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if ready in line:
            listen = line.split(" listen=", 1)[1].split()[0]
            # keep draining the pipe so that the daemon never blocks on a full one
            import threading

            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, listen
    raise AssertionError(f"{argv[0]} exited ({proc.wait()}) before {ready}")


def test_policyd_command_refuses_plain_tcp_and_half_flags(tmp_path, pki):
    base = [sys.executable, "-m", "policyd.main", "--db", str(tmp_path / "p.db")]
    cert, key = pki.cert("policyd")
    for extra, expected in (
            (["--listen", "127.0.0.1:0"], "--insecure-tcp"),
            (["--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key],
             "--tls-ca (client certificates) or --token-file"),
            (["--listen", "127.0.0.1:0", "--tls-ca", pki.ca], "needs --tls-cert"),
            (["--node-tls-cert", cert, "--node-tls-key", key], "need --node-tls-ca"),
            (["--listen", "127.0.0.1:0", "--token-file", str(tmp_path / "none")], "token file")):
        res = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
        out = res.stdout + res.stderr
        assert res.returncode == 1 and "policyd.start_failed" in out and expected in out, out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dpd_policyd_and_xlbctl_commands_over_tls(pki, tmp_path):
    cert, key = pki.cert("node1")
    dpd_at = f"127.0.0.1:{_free_port()}"  # (a simulated dpd logs --listen as given)
    dpd, _ = _start(["dpd.main", "--name", "node1", "--datapath", "memory",
                     "--listen", dpd_at, "--tls-cert", cert, "--tls-key", key,
                     "--tls-ca", pki.ca], "dpd_started")
    procs = [dpd]
    try:
        cert, key = pki.cert("policyd")
        policyd, policyd_at = _start(
            ["policyd.main", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "p.db"),
             "--resync-interval", "1", "--tls-cert", cert, "--tls-key", key,
             "--tls-ca", pki.ca, "--token-file", str(pki.tokens),
             "--node-tls-ca", pki.ca, "--node-tls-cert", cert, "--node-tls-key", key],
            "policyd.started")
        procs.append(policyd)
        ops_cert, ops_key = pki.cert("ops")
        env = {**os.environ, "XLB_POLICYD": policyd_at, "XLB_CA": pki.ca}

        def xlbctl(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "policyd.cli", *args],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT,
                                  env={**env, **extra})

        ops = ["--cert", ops_cert, "--key", ops_key]
        assert xlbctl(*ops, "node", "register", "node1", dpd_at).returncode == 0
        assert xlbctl(*ops, "service", "apply", "--name", "web", "--vip", "198.19.0.10",
                      "--port", "80", "--endpoint", "198.18.1.2:8080").returncode == 0
        viewer_cert, viewer_key = pki.cert("viewer")
        res = xlbctl("--cert", viewer_cert, "--key", viewer_key, "status", "--wait",
                     "--timeout", "20")
        assert res.returncode == 0 and "SYNC_STATE_SYNCED" in res.stdout, res.stderr
        res = xlbctl("--cert", viewer_cert, "--key", viewer_key, "service", "delete", "web")
        assert res.returncode == 1 and "PERMISSION_DENIED" in res.stderr
        # the certificate with a token that does not raise it: still read-only
        res = xlbctl("--cert", viewer_cert, "--key", viewer_key, "service", "delete", "web",
                     XLB_TOKEN=pki.read_token)
        assert res.returncode == 1 and "PERMISSION_DENIED" in res.stderr
        res = xlbctl("status")  # no certificate: the handshake fails
        assert res.returncode == 1 and "give --cert and --key" in res.stderr, res.stderr
        res = xlbctl("status", XLB_CA="")  # no TLS at all
        assert res.returncode == 1 and "give --ca" in res.stderr, res.stderr
        with grpc.secure_channel(dpd_at, tls.ClientTLS(
                ca=pki.ca, cert=viewer_cert, key=viewer_key).credentials()) as channel:
            held = list(datapath_pb2_grpc.DatapathStub(channel).ListServices(
                datapath_pb2.ListServicesRequest(), timeout=5))
        assert [(s.vip, s.port) for s in held] == [("198.19.0.10", 80)]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
