"""Port-range and any-port services in policyd (docs/services.md): the store's key
(vip, port, protocol, port_last), its refusal of overlapping ranges, the schema-6
migration, batch validation, and a range applied through policyd landing on a node
(dpd's real servicer over in-memory maps) as it was applied, drift included."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

import grpc
import pytest

from policyd.client import make_service
from policyd.store import Store, encode_spec
from policyd.validation import validate_services
from xlb.dpd.v1 import datapath_pb2
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2
from xlbcore.errors import ConflictError, PreconditionError, ValidationError
from xlbcore.service import EndpointSpec, Proto, ServiceKey, ServiceSpec

VIP = "198.19.0.10"


def spec(port: int, last: int = 0, proto: Proto = Proto.TCP, ep_port: int = 0) -> ServiceSpec:
    return ServiceSpec(VIP, port, proto, endpoints=(EndpointSpec("198.18.1.2", ep_port, 1),),
                       port_last=last)


def msg(name: str, port: int, last: int = 0, ep: str = "198.18.1.2:0") -> policy_pb2.Service:
    m = make_service(name, VIP, port, "tcp", [ep])
    m.port_last = last
    return m


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state.db") as s:
        yield s


# -- the store ----------------------------------------------------------------------------


def test_exact_port_range_and_any_port_at_one_port_are_three_services(store):
    store.apply_services([("exact", spec(8000, ep_port=80)), ("range", spec(8000, 8099)),
                          ("any", spec(0))])
    keys = set(store.snapshot().services)
    assert keys == {ServiceKey(VIP, 8000, Proto.TCP), ServiceKey(VIP, 8000, Proto.TCP, 8099),
                    ServiceKey(VIP, 0, Proto.TCP)}
    # the same range again under another name is the same key: refused
    with pytest.raises(ConflictError, match="'range' already uses tcp://198.19.0.10:8000-8099"):
        store.apply_service("copy", spec(8000, 8099))


@pytest.mark.parametrize(("first", "last"), [(8050, 8150), (7900, 8000), (8099, 0)])
def test_overlapping_range_refused_naming_both_nothing_written(store, first, last):
    store.apply_service("a", spec(8000, 8099))
    before = store.generation
    if not last:  # one port inside the range is an exact-port service: allowed
        store.apply_service("b", spec(first, ep_port=80))
        return
    with pytest.raises(PreconditionError) as info:
        store.apply_services([("ok", spec(9000, 9099)), ("b", spec(first, last))])
    text = str(info.value)
    assert text.startswith("services[1]: service 'b'")
    assert f"{first}-{last}" in text and "service 'a'" in text and "8000-8099" in text
    assert store.generation == before
    assert [s.name for s in store.list_services()] == ["a"]


def test_overlap_within_a_batch_is_invalid(store):
    with pytest.raises(ValidationError, match=r"^services\[1\]: service 'b'.*overlaps service "
                                              r"'a'"):
        store.apply_services([("a", spec(8000, 8099)), ("b", spec(8010, 8020))])
    assert store.list_services() == []


def test_ranges_of_other_vips_or_protocols_do_not_overlap(store):
    store.apply_services([("a", spec(8000, 8099)), ("b", spec(8000, 8099, Proto.UDP)),
                          ("c", replace(spec(8000, 8099), vip="198.19.0.11"))])
    assert len(store.list_services()) == 3


def test_a_range_moves_over_its_own_ports_and_a_deleted_one_frees_them(store):
    store.apply_service("a", spec(8000, 8099))
    store.apply_service("a", spec(8050, 8199))  # replaces itself: no overlap with itself
    assert store.get_service("a").spec.port_last == 8199
    with pytest.raises(PreconditionError):
        store.apply_service("b", spec(8100, 8109))
    # in one batch, a moves away and b takes its old ports
    store.apply_services([("a", spec(9000, 9099)), ("b", spec(8100, 8109))])
    store.delete_services(["a"])
    store.apply_service("c", spec(9000, 9099))
    assert {s.name for s in store.list_services()} == {"b", "c"}


def test_ranges_survive_a_reopen(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as store:
        store.apply_services([("exact", spec(8000, ep_port=80)), ("range", spec(8000, 8099))])
    with Store(path) as store:
        assert store.get_service("range").spec.port_last == 8099
        with pytest.raises(PreconditionError, match="'range'"):
            store.apply_service("b", spec(8090, 8100))


def test_a_schema_5_store_migrates_to_port_last_in_the_key(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('generation', 4);
        CREATE TABLE services (name TEXT PRIMARY KEY, vip TEXT NOT NULL, port INTEGER NOT NULL,
            protocol INTEGER NOT NULL, spec BLOB NOT NULL, generation INTEGER NOT NULL,
            update_time_ns INTEGER NOT NULL, object_generation INTEGER NOT NULL DEFAULT 1,
            selector TEXT NOT NULL DEFAULT '', UNIQUE (vip, port, protocol));
        PRAGMA user_version = 5;
    """)
    # a schema-5 policyd could hold a range already (its port_last only in the spec)
    conn.execute("INSERT INTO services VALUES ('range', ?, 8000, 1, ?, 3, 1, 2, ?)",
                 (VIP, encode_spec("range", spec(8000, 8099)), '{"zone": "a"}'))
    conn.commit()
    conn.close()
    with Store(path) as store:
        got = store.get_service("range")
        assert (got.spec.port_last, got.generation, got.revision, got.selector) == \
            (8099, 2, 3, (("zone", "a"),))
        store.apply_service("exact", spec(8000, ep_port=80))  # was a UNIQUE clash before
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 6
    assert sorted(conn.execute("SELECT name, port, port_last FROM services").fetchall()) == \
        [("exact", 8000, 0), ("range", 8000, 8099)]
    conn.close()


# -- batch validation -------------------------------------------------------------------


def test_validate_services_takes_an_exact_port_and_a_range_from_it():
    items = validate_services([msg("exact", 8000, ep="198.18.1.2:80"), msg("range", 8000, 8099),
                               msg("any", 0)])
    assert [(n, s.port, s.port_last) for n, s in items] == \
        [("exact", 8000, 0), ("range", 8000, 8099), ("any", 0, 0)]
    with pytest.raises(ValidationError, match=r"^services\[1\]: tcp://198.19.0.10:8000-8099 is "
                                              r"also used by services\[0\] \('a'\)"):
        validate_services([msg("a", 8000, 8099), msg("b", 8000, 8099)])
    with pytest.raises(ValidationError, match=r"^services\[0\]\.port_last: 7999 is out of range"):
        validate_services([msg("a", 8000, 7999)])
    with pytest.raises(ValidationError, match=r"^services\[0\]\.endpoints\[0\]\.port: "):
        validate_services([msg("a", 80)])  # port 0 keeps the client's: ranges only


# -- through policyd onto a node ------------------------------------------------------------


def node_services(node: Any) -> dict[tuple[int, int], list[tuple[str, int]]]:
    return {(s.port, s.port_last): [(e.address, e.port) for e in s.endpoints]
            for s in node.datapath.node.list_services()}


def synced(client: Any, name: str) -> bool:
    reply = client.sync_status()
    (status,) = [n for n in reply.nodes if n.node == name]
    return bool(status.state == policy_pb2.SYNC_STATE_SYNCED
                and status.observed_generation == reply.generation)


def test_ranges_through_policyd_land_on_the_node_and_drift_is_repaired(
        wait_for, policyd, fake_node, client_for, fast):
    node = fake_node("a").start()
    client = client_for(policyd(settings=replace(fast, resync_interval=0.2)))
    client.register_node("node-a", node.address)
    client.apply_services([msg("exact", 8000, ep="198.18.1.2:80"), msg("range", 8000, 8099),
                           msg("fixed", 9000, 9099, ep="198.18.1.3:7000"), msg("any", 0)])
    want = {(8000, 0): [("198.18.1.2", 80)], (8000, 8099): [("198.18.1.2", 0)],
            (9000, 9099): [("198.18.1.3", 7000)], (0, 0): [("198.18.1.2", 0)]}
    wait_for(lambda: synced(client, "node-a") and node_services(node) == want, what="SYNCED")
    # policyd's view of what it applied is what the node lists back
    assert {(s.port, s.port_last) for s in client.list_services()} == set(want)

    # a range moved to other ports (same first port): the node follows
    client.apply_services([msg("range", 8000, 8199)])
    want[(8000, 8199)] = want.pop((8000, 8099))
    wait_for(lambda: synced(client, "node-a") and node_services(node) == want, what="moved")

    # drift: the range deleted by hand through dpd's API comes back
    node.datapath.DeleteServices(datapath_pb2.DeleteServicesRequest(keys=[
        types_pb2.ServiceKey(vip=VIP, port=8000, port_last=8199,
                             protocol=types_pb2.PROTOCOL_TCP)]), None)
    assert (8000, 8199) not in node_services(node)
    wait_for(lambda: node_services(node) == want, what="drift repaired")

    client.delete_services(["range", "any"])
    del want[(8000, 8199)], want[(0, 0)]
    wait_for(lambda: synced(client, "node-a") and node_services(node) == want, what="deleted")


def test_policyd_api_codes_for_overlapping_ranges(policyd, client_for):
    client = client_for(policyd())
    client.apply_services([msg("a", 8000, 8099)])
    with pytest.raises(grpc.RpcError) as info:
        client.apply_services([msg("b", 8050, 8150)])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'b'" in info.value.details() and "'a'" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.apply_services([msg("c", 9000, 9099), msg("d", 9050, 9060)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.apply(msg("e", 8099, 8100))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [s.name for s in client.list_services()] == ["a"]


# -- xlbctl -----------------------------------------------------------------------------------

RANGES = """\
kind: Service
metadata: {name: games}
spec:
  vip: 198.19.0.10
  port: "8000-8099"
  protocol: PROTOCOL_UDP
  endpoints: [{address: 198.18.1.2, port: 0}]
---
kind: Service
metadata: {name: fixed}
spec:
  vip: 198.19.0.10
  port: 9000
  port_last: 9099
  protocol: PROTOCOL_TCP
  endpoints: [{address: 198.18.1.3, port: 7000}]
---
kind: Service
metadata: {name: every}
spec:
  vip: 198.19.0.11
  port: "*"
  protocol: PROTOCOL_TCP
  endpoints: [{address: 198.18.1.2}]
"""


def xlbctl(capsys: Any, server: Any, *args: str) -> tuple[int, str, str]:
    from policyd import cli

    rc = cli.main(["--server", server.address, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_xlbctl_service_apply_takes_port_ranges_and_any_port(capsys, policyd):
    server = policyd()
    for name, ports, extra in (("range", "8000-8099", ()), ("any", "*", ()),
                               ("flag", "9000", ("--port-last", "9099"))):
        rc, out, err = xlbctl(capsys, server, "service", "apply", "--name", name, "--vip", VIP,
                              "--port", ports, *extra, "--endpoint", "198.18.1.2:0")
        assert rc == 0, err
    rc, out, _ = xlbctl(capsys, server, "get", "services")
    rows = {line.split()[0]: line.split()[2] for line in out.splitlines()[1:]}
    assert rows == {"range": "8000-8099", "flag": "9000-9099", "any": "*"}
    # a malformed port is the command line's fault (exit 2), a bad range the server's
    with pytest.raises(SystemExit) as info:
        xlbctl(capsys, server, "service", "apply", "--name", "x", "--vip", VIP, "--port",
               "80-", "--endpoint", "198.18.1.2:80")
    assert info.value.code == 2 and "FIRST-LAST" in capsys.readouterr().err
    rc, _, err = xlbctl(capsys, server, "service", "apply", "--name", "x", "--vip", VIP,
                        "--port", "8099-8000", "--endpoint", "198.18.1.2:0")
    assert rc == 1 and "INVALID_ARGUMENT: service.port_last: 8000 is out of range" in err
    rc, _, err = xlbctl(capsys, server, "service", "apply", "--name", "x", "--vip", VIP,
                        "--port", "8050-8150", "--endpoint", "198.18.1.2:0")
    assert rc == 1 and "FAILED_PRECONDITION" in err and "'range'" in err


def test_xlbctl_documents_with_ranges_round_trip(capsys, policyd, fake_node, tmp_path, wait_for):
    import yaml

    node = fake_node("a").start()
    server = policyd()
    xlbctl(capsys, server, "node", "register", "node-a", node.address)
    site = tmp_path / "ranges.yaml"
    site.write_text(RANGES)
    rc, out, err = xlbctl(capsys, server, "apply", "-f", str(site))
    assert rc == 0, err
    rc, text, _ = xlbctl(capsys, server, "get", "services", "-o", "yaml")
    docs = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(text)}
    assert (docs["games"]["port"], docs["games"]["port_last"]) == (8000, 8099)
    assert (docs["fixed"]["port"], docs["fixed"]["port_last"]) == (9000, 9099)
    assert "port" not in docs["every"] and "port_last" not in docs["every"]
    back = tmp_path / "back.yaml"
    back.write_text(text)
    rc, out, _ = xlbctl(capsys, server, "apply", "-f", str(back))
    assert rc == 0 and "configured" not in out and out.count("unchanged") == 3, out
    rc, out, _ = xlbctl(capsys, server, "get", "services", "-o", "wide")
    assert {line.split()[0]: line.split()[2] for line in out.splitlines()[1:]} == \
        {"every": "*", "fixed": "9000-9099", "games": "8000-8099"}
    # the node holds them; its own view (--dpd) shows the ranges too
    wait_for(lambda: len(node.datapath.node.list_services()) == 3, what="on the node")
    rc = __import__("policyd.cli", fromlist=["main"]).main(
        ["--dpd", node.address, "services"])
    out = capsys.readouterr().out
    assert rc == 0
    vips = sorted(line.split()[0] for line in out.splitlines()[1:])
    assert vips == ["198.19.0.10:8000-8099", "198.19.0.10:9000-9099", "198.19.0.11:*"]
    # a port written twice, differently
    site.write_text(RANGES.replace('port: "8000-8099"', 'port: "8000-8099"\n  port_last: 8100'))
    with pytest.raises(SystemExit):
        xlbctl(capsys, server, "apply", "-f", str(site))
    assert "give the range once" in capsys.readouterr().err
