"""A real node: client, lb and two backend namespaces, xlb-dpd attached to the lb's
interfaces, test servers on the backends. Everything is removed afterwards.

`open_lab` makes such a node with the variations the e2e tests need (namespace prefix,
backend count, dpd's extra arguments, a step before dpd starts, ...); the `lab` fixture
is its default."""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.root

VIP = "198.19.0.10"
CLIENT = "198.18.0.2"  # the client namespace's address
CLIENT2 = "198.18.0.3"  # a second address of the client namespace (add_client_address)
DPD_LIMITS = ["--max-services", "16", "--max-backends", "64", "--ct-size", "16384"]


@dataclass
class Lab:
    topo: Any
    dpd: Any
    channel: grpc.Channel
    stub: Any
    procs: list[Any] = field(default_factory=list)  # the backends' servers, in order


def dump_dpd_log(dpd: Any, tail: int = 6000) -> None:
    """dpd's log on stderr: shown by pytest only when the test failed."""
    sys.stderr.write(f"--- dpd log ---\n{dpd.log_text()[-tail:]}\n")


@contextlib.contextmanager
def open_lab(prefix: str | None = None, backends: int = 2,
             extra: Sequence[str] | Callable[[Any], Sequence[str]] = (),
             before_dpd: Callable[[Any], object] | None = None, servers: bool = True,
             name: str = "lb", attach: Sequence[str] | None = None,
             **topo_args: Any) -> Iterator[Lab]:
    """A Topology (`backends`, `topo_args`; its namespaces named `prefix` and 4 random hex
    digits, or the Topology's default), `before_dpd(topo)` run first, test
    servers on the backends (port 8080) unless `servers` is false, and dpd `name` attached
    to the lb's interfaces (or `attach`) with DPD_LIMITS and `extra` (a list, or a function
    of the topology giving one). dpd's log is dumped and everything removed afterwards."""
    require_root()
    from lab.daemons import Dpd
    from lab.servers import start_backends
    from lab.topology import Topology
    from xlb.dpd.v1 import datapath_pb2_grpc

    topo = Topology(backends=backends, vip=VIP,
                    prefix=None if prefix is None else prefix + secrets.token_hex(2),
                    **topo_args)
    dpd = None
    channel = None
    try:
        if before_dpd is not None:
            before_dpd(topo)
        procs = start_backends(topo, port=8080) if servers else []
        more = extra(topo) if callable(extra) else extra
        dpd = Dpd(name, topo.lb_ns, list(attach) if attach is not None else topo.lb_ifaces,
                  topo.workdir, extra=[*DPD_LIMITS, *more])
        dpd.start()
        channel = grpc.insecure_channel(dpd.address)
        yield Lab(topo, dpd, channel, datapath_pb2_grpc.DatapathStub(channel), procs)
    finally:
        if dpd is not None:
            dump_dpd_log(dpd)
        if channel is not None:
            channel.close()
        if dpd is not None:
            dpd.cleanup()
        topo.cleanup()


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab() as lab:
        yield lab


def wait_until(pred: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.05) -> bool:
    """Poll `pred` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return False


def endpoint_states(lab: Lab, port: int = 80) -> dict[str, int]:
    """The health of each endpoint of the service on `port`, by address."""
    from xlb.dpd.v1 import datapath_pb2 as pb

    svc = next(s for s in lab.stub.ListServices(pb.ListServicesRequest(), timeout=5)
               if s.port == port)
    return {e.address: e.health for e in svc.endpoint_status}


def wait_state(lab: Lab, address: str, state: int, deadline: float = 10.0,
               port: int = 80) -> float:
    """Poll until `address` is in `state`; the monotonic time it was first seen so."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if endpoint_states(lab, port).get(address) == state:
            return time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"{address} not in state {state} after {deadline}s: "
                         f"{endpoint_states(lab, port)}")


def add_client_address(topo: Any, address: str) -> None:
    """A second address (/24) on the client namespace's interface."""
    from lab import netns

    netns.run(topo.client_ns, ["ip", "addr", "add", f"{address}/24", "dev", topo.client_iface])


def reach(lab: Lab, source: str) -> dict[str, int]:
    """Errors of TCP and UDP from `source` to the VIP (80/tcp, 53/udp) and to the first
    backend directly (8080, no VIP endpoint: see put_vip_services), three tries each."""
    from lab.client import run_tcp_who, run_udp_who

    be = lab.topo.backend_ips[0]
    out = {}
    for what, fn, dst, port in (("tcp-vip", run_tcp_who, VIP, 80),
                                ("udp-vip", run_udp_who, VIP, 53),
                                ("tcp-be", run_tcp_who, be, 8080),
                                ("udp-be", run_udp_who, be, 8080)):
        res = fn(lab.topo, dst, port, count=3, timeout=0.5, source=source)
        out[what] = res.get("errors", 0)
    return out


def put_vip_services(lab: Lab) -> None:
    """VIP 80/tcp and 53/udp onto the backends' 8080 but the first's, which `reach` tries
    directly: a client port in a VIP flow to an endpoint and then straight to that same
    endpoint ip:port is one tuple to the endpoint, refused by the datapath (drop_ct_clash),
    so that ports the client picks at random cannot make reach() fail."""
    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.types.v1 import types_pb2 as tpb

    eps = [tpb.Endpoint(address=ip, port=8080) for ip in lab.topo.backend_ips[1:]]
    lab.stub.PutServices(pb.PutServicesRequest(services=[
        pb.Service(vip=VIP, port=80, protocol=tpb.PROTOCOL_TCP, endpoints=eps),
        pb.Service(vip=VIP, port=53, protocol=tpb.PROTOCOL_UDP, endpoints=eps)]), timeout=10)


def doc_grpcurl_commands(doc: str, target: str = "/run/xlb/dpd.sock") -> list[list[str]]:
    """The grpcurl commands of a page of docs/ that call `target` (dpd's socket; the
    policyd examples are run by unit tests), as argument lists (tests.docs_examples)."""
    from tests.docs_examples import DOCS, commands, fenced

    return [argv for block in fenced((DOCS / doc).read_text(), "sh") for argv in commands(block)
            if argv[0] == "grpcurl" and target in argv]
