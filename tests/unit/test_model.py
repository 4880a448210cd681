import pytest

from dpd.ids import IdPool
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import Exhausted, ValidationError
from xlbcore.service import MAX_ENDPOINTS, parse_ipv4, parse_service


@pytest.mark.parametrize("bad", ["0.0.0.0", "127.0.0.1", "224.0.0.1", "239.1.1.1",
                                 "255.255.255.255", "1.2.3", "1.2.3.4.5", "256.1.1.1",
                                 "a.b.c.d", "", "2001:db8::1"])
def test_unusable_or_malformed_addresses_are_refused(bad):
    with pytest.raises(ValidationError, match="vip"):
        parse_ipv4(bad, "vip")


def test_addresses_are_canonical():
    assert parse_ipv4(" 198.18.0.1 ", "vip") == "198.18.0.1"


def svc(**kw):
    base = dict(vip="198.19.0.10", port=80, protocol=tpb.PROTOCOL_TCP,
                endpoints=[tpb.Endpoint(address="198.18.2.2", port=8080),
                           tpb.Endpoint(address="198.18.1.2", port=8080, weight=0)])
    base.update(kw)
    return pb.Service(**base)


def test_endpoints_are_sorted_and_weights_defaulted():
    spec = parse_service(svc())
    assert [(e.address, e.weight) for e in spec.endpoints] == [("198.18.1.2", 0),
                                                                 ("198.18.2.2", 1)]


@pytest.mark.parametrize(("kw", "field"), [
    ({"port": 65536}, "port"),
    ({"port": 80, "port_last": 79}, "port_last"),  # a range ends after it starts
    ({"port": 0, "port_last": 90}, "port_last"),  # any-port has no last port
    # endpoint port 0 (the client's port, kept): port-range and any-port services only
    ({"endpoints": [tpb.Endpoint(address="198.18.1.2", port=0)]}, "endpoints\\[0\\].port"),
    ({"protocol": 0}, "protocol"),
    ({"algorithm": 7}, "algorithm"),
    ({"endpoints": []}, "endpoints"),
    ({"endpoints": [tpb.Endpoint(address="198.18.1.2", port=1)] * 2}, "listed twice"),
    ({"endpoints": [tpb.Endpoint(address="198.18.1.2", port=1, weight=1001)]}, "weight"),
    ({"endpoints": [tpb.Endpoint(address="198.18.1.2", port=i + 1)
                    for i in range(MAX_ENDPOINTS + 1)]}, "at most"),
])
def test_bad_services_name_the_field(kw, field):
    with pytest.raises(ValidationError, match=field):
        parse_service(svc(**kw))


def test_id_pool_reservations_roll_back_and_released_ids_are_dirty():
    pool = IdPool(4)
    ids = pool.reserve(3, "x")
    pool.rollback()
    assert pool.free == 4
    ids = pool.reserve(3, "x")
    pool.commit()
    with pytest.raises(Exhausted, match="2 more needed, 1 of 4 free"):
        pool.reserve(2, "x")
    assert pool.take_dirty(ids) == []  # never used before: nothing to zero
    pool.release(ids[:1])
    assert pool.take_dirty(ids) == ids[:1]
    assert IdPool(2, assume_dirty=True).take_dirty([0, 1]) == [0, 1]
