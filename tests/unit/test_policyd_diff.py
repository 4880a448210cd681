"""diff_services: what to put and delete so that a node holds exactly the desired set."""

from __future__ import annotations

from policyd.diff import diff_services
from xlbcore.service import EndpointSpec, Proto, ServiceKey, ServiceSpec


def svc(
    vip: str, port: int = 80, proto: Proto = Proto.TCP, *eps: tuple[str, int, int]
) -> ServiceSpec:
    endpoints = tuple(sorted(EndpointSpec(a, p, w) for a, p, w in eps)) or (
        EndpointSpec("198.18.1.2", 8080),
    )
    return ServiceSpec(vip, port, proto, endpoints=endpoints)


def by_key(*specs: ServiceSpec) -> dict[ServiceKey, ServiceSpec]:
    return {s.key: s for s in specs}


def test_both_empty():
    plan = diff_services({}, {})
    assert plan.empty
    assert plan == ([], [])


def test_identical_sets_need_nothing():
    a, b = svc("198.19.0.1"), svc("198.19.0.2", 53, Proto.UDP)
    assert diff_services(by_key(a, b), by_key(b, a)).empty


def test_missing_are_put_and_extra_are_deleted():
    a, b, c = svc("198.19.0.1"), svc("198.19.0.2"), svc("198.19.0.3")
    to_put, to_delete = diff_services(by_key(a, b), by_key(b, c))
    assert to_put == [a]
    assert to_delete == [c.key]


def test_changed_service_is_put_not_deleted():
    old = svc("198.19.0.1", 80, Proto.TCP, ("198.18.1.2", 8080, 1))
    new = svc("198.19.0.1", 80, Proto.TCP, ("198.18.1.2", 8080, 5))
    to_put, to_delete = diff_services(by_key(new), by_key(old))
    assert to_put == [new]
    assert to_delete == []


def test_protocol_is_part_of_the_key():
    tcp, udp = svc("198.19.0.1", 53, Proto.TCP), svc("198.19.0.1", 53, Proto.UDP)
    to_put, to_delete = diff_services(by_key(tcp), by_key(udp))
    assert to_put == [tcp]
    assert to_delete == [udp.key]


def test_unreadable_actual_entry_is_replaced_or_deleted():
    a, b = svc("198.19.0.1"), svc("198.19.0.2")
    to_put, to_delete = diff_services(by_key(a), {a.key: None, b.key: None})
    assert to_put == [a]
    assert to_delete == [b.key]


def test_output_is_sorted_and_inputs_untouched():
    desired = by_key(svc("198.19.0.9"), svc("198.19.0.1", 443), svc("198.19.0.1", 80))
    actual = by_key(svc("198.19.0.7"), svc("198.19.0.5"))
    snapshot = (dict(desired), dict(actual))
    to_put, to_delete = diff_services(desired, actual)
    assert [(s.vip, s.port) for s in to_put] == [
        ("198.19.0.1", 80),
        ("198.19.0.1", 443),
        ("198.19.0.9", 80),
    ]
    assert [k.vip for k in to_delete] == ["198.19.0.5", "198.19.0.7"]
    assert (desired, actual) == snapshot
