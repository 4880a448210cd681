"""policyd plus two xlb nodes, each a full topology (client, lb running xlb-dpd,
backends) in its own namespaces; programmed only through policyd's API."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.root

VIP = "198.19.0.10"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nodes(n): how many xlb nodes a cluster test gets (2)")
    config.addinivalue_line("markers", "policyd_args(*args): extra xlb-policyd arguments")


def wait_until(predicate, timeout: float, what: str):
    """`predicate()` once it is truthy (polled every 0.1 s); AssertionError naming `what`
    after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Cluster:
    workdir: Path
    policyd: object
    policy: object
    topos: list = field(default_factory=list)
    nodes: dict = field(default_factory=dict)  # name -> Dpd
    channels: list = field(default_factory=list)
    procs: list = field(default_factory=list)  # each node's backend processes

    def datapath(self, name: str):
        from xlb.dpd.v1 import datapath_pb2_grpc

        ch = grpc.insecure_channel(self.nodes[name].address)
        self.channels.append(ch)
        return datapath_pb2_grpc.DatapathStub(ch)

    def status(self, name: str):
        from xlb.policy.v1 import policy_pb2 as ppb

        return self.policy.GetSyncStatus(ppb.GetSyncStatusRequest(node=name), timeout=5).nodes[0]

    def wait_state(self, name: str, state: int, timeout: float = 30.0, generation: int = 0):
        end = time.monotonic() + timeout
        while True:
            st = self.status(name)
            if st.state == state and st.observed_generation >= generation:
                return st
            if time.monotonic() > end:
                raise AssertionError(f"node {name} did not reach state {state}: {st}")
            time.sleep(0.1)


@contextlib.contextmanager
def open_cluster(nodes: int = 2, resync: float = 1.0, policyd_args: list[str] | None = None,
                 prefix: str | None = None, udp_port: int | None = None,
                 workdir_prefix: str = "xlb-cluster-",
                 disable_ipv6: bool = True) -> Iterator[Cluster]:
    """policyd (`resync` s, `policyd_args`) and `nodes` nodes, each a Topology (namespaces
    named `prefix` and 4 random hex digits, or the default) with test servers on its two
    backends (8080, UDP on `udp_port`) and a dpd registered with policyd. The logs are
    dumped (shown by pytest only when the test failed) and everything removed afterwards.
    `disable_ipv6`: as Topology's (False leaves IPv6 on in the nodes' namespaces)."""
    require_root()
    from lab.daemons import Dpd, Policyd
    from lab.servers import start_backends
    from lab.topology import Topology
    from xlb.policy.v1 import policy_pb2 as ppb
    from xlb.policy.v1 import policy_pb2_grpc

    workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix))
    policyd = Policyd(workdir, resync_interval=resync, extra=policyd_args)
    channel = None
    c: Cluster | None = None
    try:
        policyd.start()
        channel = grpc.insecure_channel(policyd.address)
        c = Cluster(workdir, policyd, policy_pb2_grpc.PolicyStub(channel))
        for i in range(1, nodes + 1):
            topo = Topology(backends=2, vip=VIP, disable_ipv6=disable_ipv6,
                            prefix=None if prefix is None else prefix + secrets.token_hex(2))
            c.topos.append(topo)
            c.procs.append(start_backends(topo, port=8080, udp_port=udp_port))
            name = f"node{i}"
            c.nodes[name] = Dpd(name, topo.lb_ns, topo.lb_ifaces, workdir).start()
            c.policy.RegisterNode(ppb.RegisterNodeRequest(
                node=ppb.Node(name=name, address=c.nodes[name].address)), timeout=5)
        yield c
    finally:
        # shown by pytest only when the test failed
        sys.stderr.write(f"--- policyd log ---\n{policyd.log_text()[-6000:]}\n")
        if c is not None:
            for name, dpd in c.nodes.items():
                sys.stderr.write(f"--- dpd {name} log ---\n{dpd.log_text()[-3000:]}\n")
            for ch in c.channels:
                ch.close()
            for dpd in c.nodes.values():
                dpd.cleanup()
            for topo in c.topos:
                topo.cleanup()
        if channel is not None:
            channel.close()
        policyd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    marker = request.node.get_closest_marker("resync")
    args = request.node.get_closest_marker("policyd_args")
    count = request.node.get_closest_marker("nodes")
    with open_cluster(nodes=count.args[0] if count else 2,
                      resync=marker.args[0] if marker else 1.0,
                      policyd_args=list(args.args) if args else None) as c:
        yield c
