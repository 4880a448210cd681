"""A huge bad value is quoted, never echoed whole: in status messages (a ~70 KB one wedges
a grpc-js client's connection), in policyd's log lines and in its domain errors."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from policyd.client import make_service, parse_endpoint
from policyd.nodeclient import describe_error
from policyd.reconciler import Reconciler
from policyd.store import Store
from policyd.validation import validate_names, validate_services
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2
from xlbcore.errors import ConflictError, NotFoundError, ValidationError
from xlbcore.service import EndpointSpec, Proto, ServiceSpec

BIG = 100_000
DETAILS_MAX = 300  # a status message's length must stay under this
LINE_MAX = 1000  # and so must every log line


def service(name: str = "web", vip: str = "198.19.0.10", address: str = "198.18.1.2"
            ) -> policy_pb2.Service:
    return policy_pb2.Service(
        name=name, vip=vip, port=80, protocol=types_pb2.PROTOCOL_TCP,
        endpoints=[types_pb2.Endpoint(address=address, port=8080)],
    )  # fmt: skip


CALLS = {
    "ApplyService name": ("ApplyService", policy_pb2.ApplyServiceRequest(
        service=service(name="a" * BIG))),
    "ApplyService vip": ("ApplyService", policy_pb2.ApplyServiceRequest(
        service=service(vip="1" * BIG))),
    "ApplyService endpoint address": ("ApplyService", policy_pb2.ApplyServiceRequest(
        service=service(address="2" * BIG))),
    "ApplyServices name": ("ApplyServices", policy_pb2.ApplyServicesRequest(
        services=[service(), service(name="b" * BIG)])),
    "DeleteService name": ("DeleteService", policy_pb2.DeleteServiceRequest(name="a" * BIG)),
    "DeleteServices names": ("DeleteServices", policy_pb2.DeleteServicesRequest(
        names=["web", "a" * BIG])),
    "GetService name": ("GetService", policy_pb2.GetServiceRequest(name="a" * BIG)),
    "RegisterNode name": ("RegisterNode", policy_pb2.RegisterNodeRequest(
        node=policy_pb2.Node(name="n" * BIG, address="127.0.0.1:1"))),
    "RegisterNode host": ("RegisterNode", policy_pb2.RegisterNodeRequest(
        node=policy_pb2.Node(name="n1", address="h" * BIG + ":1"))),
    "RegisterNode port": ("RegisterNode", policy_pb2.RegisterNodeRequest(
        node=policy_pb2.Node(name="n1", address="127.0.0.1:" + "x" * BIG))),
    "RegisterNode unix path": ("RegisterNode", policy_pb2.RegisterNodeRequest(
        node=policy_pb2.Node(name="n1", address="unix:/" + "p" * BIG))),
    "DeregisterNode name": ("DeregisterNode", policy_pb2.DeregisterNodeRequest(name="n" * BIG)),
    "GetSyncStatus node": ("GetSyncStatus", policy_pb2.GetSyncStatusRequest(node="n" * BIG)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CALLS))
def test_huge_values_are_quoted_in_status_and_log(case, policyd, client_for, captured_log):
    client = client_for(policyd())
    client.apply_service("web", "198.19.0.1", 80, "tcp", ["198.18.1.2:80"])
    method, request = CALLS[case]
    with pytest.raises(grpc.RpcError) as info:
        getattr(client.stub, method)(request, timeout=5)
    err = info.value
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), case
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # each value breaks a rule first
    assert len(err.details()) < DETAILS_MAX, err.details()[:500]
    assert "characters)" in err.details() or "bytes" in err.details(), err.details()
    lines = captured_log.getvalue().splitlines()
    assert any("rpc_refused" in line for line in lines)  # the refusal was logged...
    long = [line[:200] for line in lines if len(line) > LINE_MAX]
    assert not long, long  # ...on a short line


# -- the domain layer, called without the servicer's validation in front --------------


def spec(vip: str = "198.19.0.10") -> ServiceSpec:
    return ServiceSpec(vip, 80, Proto.TCP, endpoints=(EndpointSpec("198.18.1.2", 80),))


def short(exc: pytest.ExceptionInfo[Any]) -> str:
    text = str(exc.value)
    assert len(text) < DETAILS_MAX, text[:500]
    return text


def test_store_quotes_names_it_does_not_know():
    big = "s" * BIG
    with Store(":memory:") as store:
        for call in (
            lambda: store.get_service(big),
            lambda: store.delete_service(big),
            lambda: store.delete_services([big, "x"]),
            lambda: store.deregister_node(big),
            lambda: store.get_node(big),
        ):
            with pytest.raises(NotFoundError) as info:
                call()
            assert f"{BIG} characters" in short(info)


def test_store_conflict_quotes_the_holder():
    with Store(":memory:") as store:
        store.apply_service("h" * BIG, spec())
        with pytest.raises(ConflictError) as info:
            store.apply_service("other", spec())
        assert "already uses" in short(info)


def test_reconciler_status_quotes_an_unknown_node():
    with Store(":memory:") as store:
        reconciler = Reconciler(store)
        with pytest.raises(NotFoundError) as info:
            reconciler.status("n" * BIG)
        short(info)


def test_batch_validation_quotes_names():
    with pytest.raises(ValidationError) as info:
        validate_names(["a" * 10, "a" * 10])
    short(info)
    with pytest.raises(ValidationError) as info:
        validate_services([service(), service(vip="198.19.0.11")])
    short(info)


def test_node_errors_are_cut():
    class Huge(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INTERNAL

        def details(self) -> str:
            return "d" * BIG

    assert len(describe_error(Huge())) < DETAILS_MAX
    assert len(describe_error(RuntimeError("r" * BIG))) < DETAILS_MAX
    assert describe_error(RuntimeError("short")) == "RuntimeError: short"


def test_client_side_errors_are_quoted():
    for call in (
        lambda: parse_endpoint("e" * BIG),
        lambda: parse_endpoint("198.18.1.2:80@" + "w" * BIG),
        lambda: make_service("web", "198.19.0.1", 80, protocol="p" * BIG),
        lambda: make_service("web", "198.19.0.1", 80, algorithm="a" * BIG),
    ):
        with pytest.raises(ValueError) as info:
            call()
        short(info)


def test_cli_file_errors_are_quoted(tmp_path):
    from policyd.cli import read_services

    path = tmp_path / "services.json"
    path.write_text('[{"name": "web", "protocol": "%s"}]' % ("P" * BIG))
    with pytest.raises(ValueError) as info:
        read_services(str(path))
    assert "services[0]" in short(info)
