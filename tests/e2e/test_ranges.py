"""Port-range and any-port services over real sockets (docs/services.md): TCP connections
and UDP datagrams from the client namespace to several ports of a range reach a backend
listening on the port the client chose, a fixed-port range reaches the one port its
endpoints name, an any-port VIP takes every port, an exact-port service inside a range
takes its port, and ports outside the ranges are not served. Each backend port has its
own server, named ``be{i}:{port}`` (the default servers on 8080 are ``be{i}``), so the
answer says which server, and so which port, the flow reached."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.conftest import VIP, Lab, doc_grpcurl_commands, open_lab

pytestmark = pytest.mark.root

VIP2 = "198.19.0.11"  # the any-port VIP
RANGE_PORTS = (8000, 8042, 8099)  # first, inside, last of 8000-8099
OUTSIDE = (7999, 8100)


def start_port_servers(topo: Any, ports: tuple[int, ...]) -> None:
    """A TCP and UDP server on each of `ports` in every backend of the Topology `topo`,
    named ``be{i}:{port}`` (ended by its cleanup)."""
    from lab import netns
    from lab.servers import wait_listening

    started = []
    for port in ports:
        for i, ns in enumerate(topo.backend_ns, start=1):
            argv = [sys.executable, "-m", "lab.servers", "--name", f"be{i}:{port}",
                    "--tcp-port", str(port), "--udp-port", str(port)]
            started.append((ns, port, topo.popen(ns, argv, stderr=subprocess.DEVNULL,
                                                  env=netns.python_env())))
    for ns, port, proc in started:
        wait_listening(topo, ns, port, "tcp", proc)
        wait_listening(topo, ns, port, "udp", proc)


def who(lab: Lab, proto: str, vip: str, port: int, count: int = 4,
        timeout: float = 2.0) -> dict[str, int]:
    from lab.client import run_tcp_who, run_udp_who

    fn = run_tcp_who if proto == "tcp" else run_udp_who
    return fn(lab.topo, vip, port, count=count, timeout=timeout)


def served(counts: dict[str, int]) -> dict[str, int]:
    """The servers that answered (errors left out)."""
    return {k: v for k, v in counts.items() if k != "errors" and v}


def put(lab: Lab, *services: Any) -> None:
    from xlb.dpd.v1 import datapath_pb2 as pb

    lab.stub.PutServices(pb.PutServicesRequest(services=list(services)), timeout=10)


def service(vip: str, port: int, last: int, proto: str, *eps: tuple[str, int]) -> Any:
    from xlb.dpd.v1 import datapath_pb2 as pb
    from xlb.types.v1 import types_pb2 as tpb

    return pb.Service(vip=vip, port=port, port_last=last,
                      protocol=tpb.PROTOCOL_TCP if proto == "tcp" else tpb.PROTOCOL_UDP,
                      endpoints=[tpb.Endpoint(address=a, port=p) for a, p in eps])


def test_ranges_fixed_ports_and_any_port_over_real_sockets():
    with open_lab(prefix="xrg") as lab:
        be1, be2 = lab.topo.backend_ips
        start_port_servers(lab.topo, RANGE_PORTS + OUTSIDE)
        for proto in ("tcp", "udp"):
            put(lab,
                service(VIP, 8000, 8099, proto, (be1, 0), (be2, 0)),     # kept port
                service(VIP, 9000, 9009, proto, (be1, 8080), (be2, 8080)),  # fixed port
                service(VIP2, 0, 0, proto, (be2, 0)))                    # any-port
        put(lab, service(VIP, 8050, 0, "tcp", (be1, 8080)))  # one port inside the range

        for proto in ("tcp", "udp"):
            for port in RANGE_PORTS:  # each flow reaches a server on the client's port
                got = who(lab, proto, VIP, port)
                assert got["errors"] == 0, (proto, port, got)
                assert served(got) == {f"be1:{port}": 2, f"be2:{port}": 2}, (proto, port)
            for port in (9000, 9005, 9009):  # every port of the range onto 8080
                got = who(lab, proto, VIP, port)
                assert got["errors"] == 0 and served(got) == {"be1": 2, "be2": 2}, got
            for port in (*OUTSIDE, 8080):  # any port of VIP2 (servers on 7999, 8100, 8080)
                got = who(lab, proto, VIP2, port)
                want = f"be2:{port}" if port != 8080 else "be2"
                assert got["errors"] == 0 and served(got) == {want: 4}, (proto, port, got)
            # outside the ranges of VIP: not served, though the backends listen there
            for port in OUTSIDE:
                got = who(lab, proto, VIP, port, count=2, timeout=0.5)
                assert got["errors"] == 2 and not served(got), (proto, port, got)
        # the exact-port service takes its port out of the range (TCP only: UDP 8050 is
        # still the range's, and no server listens on 8050)
        got = who(lab, "tcp", VIP, 8050)
        assert got["errors"] == 0 and served(got) == {"be1": 4}, got
        got = who(lab, "udp", VIP, 8050, count=2, timeout=0.5)
        assert got["errors"] == 2, got

        # deleting the range stops it; the any-port VIP goes on
        from xlb.dpd.v1 import datapath_pb2 as pb
        from xlb.types.v1 import types_pb2 as tpb

        lab.stub.DeleteServices(pb.DeleteServicesRequest(keys=[tpb.ServiceKey(
            vip=VIP, port=8000, port_last=8099, protocol=tpb.PROTOCOL_TCP)]), timeout=10)
        got = who(lab, "tcp", VIP, 8042, count=2, timeout=0.5)
        assert got["errors"] == 2, got
        assert served(who(lab, "tcp", VIP2, 8042)) == {"be2:8042": 4}


def test_the_dpd_examples_of_the_docs_work_as_written():
    from tests.unit.test_policyd_grpcurl import GRPCURL

    if GRPCURL is None:
        pytest.skip("grpcurl is missing")
    commands = doc_grpcurl_commands("services.md")
    assert [c[-1].rsplit("/", 1)[1] for c in commands] == [
        "PutServices", "PutServices", "ListServices", "DeleteServices"]
    with open_lab(prefix="xrd") as lab:
        start_port_servers(lab.topo, (8042, 9001))
        outs = []
        for argv in commands:
            argv = [GRPCURL if a == "grpcurl" else lab.dpd.socket if a == "/run/xlb/dpd.sock"
                    else a for a in argv]
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert res.returncode == 0, f"{argv}: {res.stderr}"
            outs.append(res.stdout)
        listed = outs[2]
        assert '"port": 8000' in listed and '"port_last": 8099' in listed
        assert '"port_last": 9009' in listed and '"vip": "198.19.0.11"' in listed
        # as the page says: 8000-8099/tcp keeps the port, every TCP port of 198.19.0.11
        # goes to 198.18.2.2 on the client's port, and 9000-9009/udp is gone
        assert set(served(who(lab, "tcp", VIP, 8042))) <= {"be1:8042", "be2:8042"}
        assert who(lab, "tcp", VIP, 8042)["errors"] == 0
        assert served(who(lab, "tcp", VIP2, 9001)) == {"be2:9001": 4}
        assert who(lab, "udp", VIP, 9001, count=2, timeout=0.5)["errors"] == 2
