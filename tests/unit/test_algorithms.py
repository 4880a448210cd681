"""Endpoint selection's model and tables (no root): priority groups become effective
weights (only the best group with a selectable endpoint keeps its weights), session
persistence and priorities are written to the datapath's maps and read back by a
restarted dpd, policyd's stored form keeps them, bad values name their field."""

from __future__ import annotations

import pytest

from dpd.loader import Settings
from dpd.memory import MemoryDatapath
from dpd.services import ServiceTable
from policyd.store import decode_spec, encode_spec
from tests.unit.test_policyd_grpcurl import datapath_socket, grpcurl  # noqa: F401 - fixtures
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import ValidationError
from xlbcore.service import (
    Algorithm,
    EndpointSpec,
    HealthKind,
    HealthSpec,
    Proto,
    ServiceSpec,
    parse_service,
    parse_services,
)

EPS = (EndpointSpec("198.18.1.1", 80, 1, 0), EndpointSpec("198.18.1.2", 80, 2, 0),
       EndpointSpec("198.18.2.1", 80, 1, 1), EndpointSpec("198.18.2.2", 80, 1, 1))


def spec(**kw) -> ServiceSpec:
    base = {"algorithm": Algorithm.SOURCE_HASH, "endpoints": EPS, "persistence_s": 300,
            "health": HealthSpec(HealthKind.TCP)}
    return ServiceSpec("198.19.0.1", 80, Proto.TCP, **{**base, **kw})


def settings() -> Settings:
    return Settings(name="m", max_services=16, max_backends=64, ct_size=64)


def test_priority_groups_are_effective_weights_and_fail_over():
    t = ServiceTable(MemoryDatapath(settings()))
    s = spec()
    t.put([s])
    (_, e), = t.entries()
    assert t._effective(e) == (1, 2, 0, 0)  # group 0 serves
    t.set_down({s.key: frozenset({("198.18.1.1", 80)})})
    assert t._effective(t.entries()[0][1]) == (0, 2, 0, 0)
    t.set_down({s.key: frozenset({("198.18.1.1", 80), ("198.18.1.2", 80)})})
    assert t._effective(t.entries()[0][1]) == (0, 0, 1, 1)  # the backup group
    t.set_down({s.key: frozenset(ep[:2] for ep in [(e.address, e.port) for e in EPS])})
    assert t._effective(t.entries()[0][1]) == (1, 2, 0, 0)  # all down: fail open, best group
    t.set_down({s.key: frozenset()})
    assert t._effective(t.entries()[0][1]) == (1, 2, 0, 0)


def test_priorities_and_persistence_survive_a_restart_and_round_trip():
    dp = MemoryDatapath(settings())
    t = ServiceTable(dp)
    s = spec()
    t.put([s])
    t.set_down({s.key: frozenset({("198.18.1.1", 80), ("198.18.1.2", 80)})})
    again = ServiceTable(dp)  # a restarted dpd over the same maps
    assert again.specs() == [s]
    assert again.down(s.key) == {("198.18.1.1", 80), ("198.18.1.2", 80)}
    assert decode_spec(encode_spec("web", s)) == s  # policyd's stored form
    assert parse_service(again_msg(s)) == s  # dpd's ListServices form


def again_msg(s: ServiceSpec) -> pb.Service:
    from xlbcore.service import fill_service
    return fill_service(pb.Service(), s)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda m: setattr(m.endpoints[1], "priority", 256), "services[0].endpoints[1].priority"),
    (lambda m: setattr(m, "persistence_timeout_s", 65536),
     "services[0].persistence_timeout_s"),
])
def test_bad_values_name_their_field(mutate, field):
    msg = pb.Service(vip="198.19.0.1", port=80, protocol=tpb.PROTOCOL_TCP,
                     algorithm=tpb.ALGORITHM_LEAST_CONNECTIONS,
                     endpoints=[tpb.Endpoint(address="198.18.1.1", port=80),
                                tpb.Endpoint(address="198.18.1.2", port=80)])
    assert parse_services([msg])[0].algorithm == Algorithm.LEAST_CONNECTIONS
    mutate(msg)
    with pytest.raises(ValidationError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_services([msg])


def test_the_docs_grpcurl_examples_work_as_written(grpcurl, datapath_socket,  # noqa: F811
                                                   policyd):
    """docs/algorithms.md's grpcurl blocks, run as written with the real grpcurl (only the
    socket paths changed) against dpd's servicer over in-memory maps and a policyd."""
    from tests.unit.test_docs_health_conntrack import blocks, run_block

    policyd_socket = str(policyd().address.removeprefix("unix:"))
    found = blocks("algorithms.md")
    assert len(found) == 2
    out = "".join(run_block(b, grpcurl, datapath_socket, policyd_socket) for b in found)
    for text in ('"ALGORITHM_SOURCE_HASH"', '"ALGORITHM_LEAST_CONNECTIONS"', '"priority": 1',
                 '"persistence_timeout_s": 600', '"persistence_timeout_s": 300'):
        assert text in out, text


def test_xlbctl_takes_the_algorithms_priorities_and_persistence():
    from policyd.client import make_service, parse_endpoint

    msg = make_service("db", "198.19.0.12", 5432, "tcp",
                       ["198.18.1.2:5432", "198.18.2.2:5432@3,priority=1"],
                       "least-connections", persistence_s=300)
    spec = parse_service(msg)
    assert spec.algorithm == Algorithm.LEAST_CONNECTIONS and spec.persistence_s == 300
    assert [(e.weight, e.priority) for e in spec.endpoints] == [(1, 0), (3, 1)]
    assert make_service("w", "198.19.0.1", 80, algorithm="source-hash").algorithm == \
        tpb.ALGORITHM_SOURCE_HASH
    with pytest.raises(ValueError, match="priority=N"):
        parse_endpoint("198.18.1.2:80,prio=1")
