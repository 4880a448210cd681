"""xlb-dpd --netns NS --listen HOST:PORT: the TCP listener is bound in the namespace dpd
was started from (--listen-netns caller, the default), so a client there (policyd,
xlbctl) reaches it, with mutual TLS as on any TCP listener; while the calls it serves
act inside NS (they see NS's interfaces). --listen-netns inside binds it in NS."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import require_root
from tests.e2e.conftest import DPD_LIMITS, VIP, dump_dpd_log
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.dpd.v1 import datapath_pb2_grpc
from xlb.types.v1 import types_pb2
from xlbcore import tls

pytestmark = pytest.mark.root

STARTED = re.compile(r"event=dpd_started .*?listen=(\S+)")


class Pki:
    def __init__(self, base: Path) -> None:
        self.dir = base
        tls.make_ca(base)
        self.ca = str(base / "ca.crt")
        tls.issue(base, "node1", servers=["127.0.0.1"])
        tls.issue(base, "ops", role=tls.ROLE_ADMIN)

    def files(self, name: str) -> tuple[str, str]:
        return str(self.dir / f"{name}.crt"), str(self.dir / f"{name}.key")

    def channel(self, address: str, name: str = "") -> grpc.Channel:
        cert, key = self.files(name) if name else ("", "")
        return grpc.secure_channel(
            address, tls.ClientTLS(ca=self.ca, cert=cert, key=key).credentials())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("netns-pki"))


def start(dpd: Any, timeout: float = 120.0) -> str:
    """Start `dpd` (its argv as made) and return the address it logs as serving."""
    from lab import netns

    with open(dpd.logfile, "a") as logf:
        dpd.proc = subprocess.Popen(dpd.argv, stdout=logf, stderr=subprocess.STDOUT,
                                    env=netns.python_env(), start_new_session=True)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = STARTED.search(dpd.log_text())
        if m:
            return m.group(1)
        if dpd.proc.poll() is not None:
            raise RuntimeError(f"dpd exited with {dpd.proc.returncode}: {dpd.log_text()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"dpd not started after {timeout}s")


def listening(port: int, ns: str = "") -> bool:
    """Whether a TCP socket listens on `port` in namespace `ns` ("": this one)."""
    argv = ["ss", "-Hltn", f"sport = :{port}"]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return bool(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip())


@pytest.fixture
def node(pki: Pki) -> Iterator[tuple[Any, Any, str]]:
    """A real node (kernel datapath) in the topology's lb namespace, --listen on
    127.0.0.1:0 with mutual TLS and the default --listen-netns: (topology, dpd, address)."""
    require_root()
    from lab.daemons import Dpd
    from lab.topology import Topology

    topo = Topology(backends=1, vip=VIP, prefix="xnl" + secrets.token_hex(2))
    dpd = None
    try:
        cert, key = pki.files("node1")
        dpd = Dpd("nl", topo.lb_ns, topo.lb_ifaces, topo.workdir,
                  extra=[*DPD_LIMITS, "--listen", "127.0.0.1:0", "--tls-cert", cert,
                         "--tls-key", key, "--tls-ca", pki.ca])
        address = start(dpd)
        yield topo, dpd, address
    finally:
        if dpd is not None:
            dump_dpd_log(dpd)
            dpd.cleanup()
        topo.cleanup()


def test_tcp_listener_in_the_callers_namespace_with_mutual_tls(pki: Pki, node: Any) -> None:
    topo, dpd, address = node
    port = int(address.rsplit(":", 1)[1])
    assert "listen_netns=caller" in dpd.log_text()
    # bound here (the namespace xlb-dpd was started from), not in the lb namespace
    assert listening(port) and not listening(port, topo.lb_ns)
    with pki.channel(address, "ops") as ch:
        stub = datapath_pb2_grpc.DatapathStub(ch)
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        assert stats.ByteSize() >= 0
        # the calls act inside the namespace: its interfaces, attached by dpd
        names = {i.name for i in stub.ListInterfaces(pb.ListInterfacesRequest(), timeout=10)}
        assert names == set(topo.lb_ifaces)
        first = topo.lb_ifaces[0]
        stub.DetachInterface(pb.DetachInterfaceRequest(name=first), timeout=10)
        again = stub.AttachInterface(pb.AttachInterfaceRequest(name=first), timeout=30)
        assert again.attached and again.ifindex > 0
        stub.PutServices(pb.PutServicesRequest(services=[pb.Service(
            vip=VIP, port=80, protocol=types_pb2.PROTOCOL_TCP,
            endpoints=[types_pb2.Endpoint(address=topo.backend_ips[0], port=8080)])]),
            timeout=10)
        assert stub.GetNode(pb.GetNodeRequest(), timeout=10).services == 1
    # mutual TLS as on any TCP listener: no client certificate, no call
    with pki.channel(address) as ch, pytest.raises(grpc.RpcError) as info:
        datapath_pb2_grpc.DatapathStub(ch).GetStats(pb.GetStatsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


CLIENT = """
import sys, grpc
from xlb.dpd.v1 import datapath_pb2 as pb, datapath_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    print(datapath_pb2_grpc.DatapathStub(ch).GetNode(pb.GetNodeRequest(), timeout=10).name)
"""


def test_listen_netns_inside_binds_in_the_namespace(tmp_path: Path) -> None:
    """--listen-netns inside: the listener is the namespace's (reached from there only)."""
    require_root()
    from lab import netns
    from lab.daemons import Daemon

    ns = "xnl" + secrets.token_hex(2)
    netns.create(ns)
    dpd = Daemon([sys.executable, "-m", "dpd.main", "--name", "inside", "--datapath", "memory",
                  "--netns", ns, "--listen-netns", "inside", "--listen", "127.0.0.1:0",
                  "--insecure-tcp"], "", tmp_path / "dpd.log")
    try:
        address = start(dpd)
        port = int(address.rsplit(":", 1)[1])
        assert listening(port, ns) and not listening(port)
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, address],
                             capture_output=True, text=True, timeout=60, env=netns.python_env())
        assert res.returncode == 0 and res.stdout.strip() == "inside", res.stderr[-2000:]
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as info:
            datapath_pb2_grpc.DatapathStub(ch).GetNode(pb.GetNodeRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        sys.stderr.write(f"--- dpd log ---\n{dpd.log_text()[-3000:]}\n")
        dpd.stop()
        netns.delete(ns)
