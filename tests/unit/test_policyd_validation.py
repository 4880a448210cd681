"""Names, node addresses and the service message as policyd checks them."""

from __future__ import annotations

import pytest

from policyd.validation import (
    validate_name,
    validate_names,
    validate_node,
    validate_service,
    validate_services,
)
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2
from xlbcore.address import parse_address
from xlbcore.errors import ValidationError
from xlbcore.service import Proto


@pytest.mark.parametrize("name", ["a", "web", "web-1", "0abc", "a-", "x" * 63, "1-2-3"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "required"),
        ("x" * 64, "at most 63"),
        ("Web", "not a valid name"),
        ("-web", "not a valid name"),
        ("web_1", "not a valid name"),
        ("web.a", "not a valid name"),
        ("wéb", "not a valid name"),
        ("web ", "not a valid name"),
    ],
)
def test_invalid_names(name, words):
    with pytest.raises(ValidationError, match=words) as info:
        validate_name(name, "service.name")
    assert str(info.value).startswith("service.name: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051, "")),
        ("[::1]:50051", ("[::1]", 50051, "")),
        ("node-a.example:1", ("node-a.example", 1, "")),
        ("localhost:65535", ("localhost", 65535, "")),
        ("unix:/run/xlb/dpd.sock", ("", 0, "/run/xlb/dpd.sock")),
        ("unix:relative.sock", ("", 0, "relative.sock")),
        (" 127.0.0.1:80 ", ("127.0.0.1", 80, "")),
    ],
)
def test_valid_addresses(text, expected):
    addr = parse_address(text)
    assert (addr.host, addr.port, addr.path) == expected
    assert addr.is_unix == bool(expected[2])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "required"),
        ("127.0.0.1", "no port"),
        (":80", "no port"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:http", "not a number"),
        ("::1:80", "IPv6"),
        ("[zz::1]:80", "not a valid host"),
        ("bad_host:80", "not a valid host"),
        ("1.2.3:80", "not a valid host"),
        ("unix:", "no socket path"),
        ("unix:/" + "x" * 120, "at most 107"),
    ],
)
def test_invalid_addresses(text, words):
    with pytest.raises(ValidationError, match=words):
        parse_address(text, "node.address")


def test_port_zero_only_where_allowed():
    assert parse_address("127.0.0.1:0", allow_port_zero=True).port == 0


def test_validate_node_returns_canonical_address():
    assert validate_node("n1", " 127.0.0.1:7 ") == ("n1", "127.0.0.1:7")
    with pytest.raises(ValidationError, match="^node.name: "):
        validate_node("N1", "127.0.0.1:7")


def test_validate_service_uses_shared_model():
    msg = policy_pb2.Service(
        name="web",
        vip="198.19.0.10",
        port=80,
        protocol=types_pb2.PROTOCOL_UDP,
        endpoints=[
            types_pb2.Endpoint(address="198.18.1.3", port=80, weight=0),
            types_pb2.Endpoint(address="198.18.1.2", port=80),
        ],
        generation=99,  # output only: ignored
    )
    name, spec = validate_service(msg)
    assert name == "web"
    assert spec.key.proto is Proto.UDP
    assert [(e.address, e.weight) for e in spec.endpoints] == [("198.18.1.2", 1), ("198.18.1.3", 0)]


def test_validate_service_checks_name_first():
    msg = policy_pb2.Service(name="BAD", vip="nope")
    with pytest.raises(ValidationError, match="^service.name: "):
        validate_service(msg)
    msg.name = "ok"
    with pytest.raises(ValidationError, match="^service.vip: "):
        validate_service(msg)


def _svc(name: str, port: int, **fields: object) -> policy_pb2.Service:
    return policy_pb2.Service(
        name=name,
        vip="198.19.0.10",
        port=port,
        protocol=types_pb2.PROTOCOL_TCP,
        endpoints=[types_pb2.Endpoint(address="198.18.1.2", port=80)],
        **fields,  # type: ignore[arg-type]
    )


def test_validate_services_names_the_index():
    assert [n for n, _ in validate_services([_svc("a", 1), _svc("b", 2)])] == ["a", "b"]
    with pytest.raises(ValidationError, match=r"^services\[1\]\.port: "):
        validate_services([_svc("a", 1), _svc("b", 70000)])
    with pytest.raises(ValidationError, match=r"^services\[0\]\.mode: "):
        validate_services([_svc("a", 1, mode=7)])
    with pytest.raises(ValidationError, match=r"^services\[2\]\.name: 'a' is also services\[0\]"):
        validate_services([_svc("a", 1), _svc("b", 2), _svc("a", 3)])
    with pytest.raises(
        ValidationError, match=r"^services\[1\]: tcp://198.19.0.10:1 is also used by services\[0\]"
    ):
        validate_services([_svc("a", 1), _svc("b", 1)])


def test_validate_service_prefixes_every_field():
    with pytest.raises(ValidationError, match=r"^service\.algorithm: "):
        validate_service(_svc("a", 1, algorithm=9))


def test_validate_names():
    assert validate_names(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValidationError, match=r"^names\[1\]: 'a' is also names\[0\]"):
        validate_names(["a", "a"])
    with pytest.raises(ValidationError, match=r"^names\[0\]: "):
        validate_names(["A"])
