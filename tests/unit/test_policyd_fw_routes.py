"""Firewall rules and routes in policyd: store, validation, servicer and xlbctl (no nodes)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from policyd import cli
from policyd.client import PolicyClient, make_route, make_rule, make_service
from policyd.store import CHANGE_LOG_KEYS, Store
from policyd.validation import validate_routes, validate_rules
from xlbcore.errors import ConflictError, NotFoundError, ValidationError
from xlbcore.firewall import Action, RuleMatch, RuleProto, RuleSpec
from xlbcore.route import NextHopSpec, RouteSpec


def rule_spec(priority: int = 10, dst: str = "198.19.0.0/16",
              action: Action = Action.DROP) -> RuleSpec:
    return RuleSpec(priority, RuleMatch(dst=dst, protocol=RuleProto.TCP), action)


def route_spec(prefix: str = "198.19.0.0/16", gw: str = "198.18.1.1") -> RouteSpec:
    return RouteSpec(prefix, (NextHopSpec(gw),))


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "state.db") as s:
        yield s


# -- store ------------------------------------------------------------------------------


def test_rules_batch_is_one_generation_and_survives_reopen(store, tmp_path):
    result = store.apply_rules([("a", rule_spec(1)), ("b", rule_spec(2))])
    assert result.changed == 2 and result.generation == store.generation == 1
    assert [o.generation for o in result.objects] == [1, 1]
    again = store.apply_rules([("a", rule_spec(1)), ("b", rule_spec(3))])
    assert again.changed == 1 and again.generation == 2
    assert store.get_rule("a").generation == 1 and store.get_rule("b").generation == 2
    same = store.apply_rules([("a", rule_spec(1))])
    assert same.changed == 0 and same.generation == 2  # unchanged: no bump
    store.close()
    with Store(tmp_path / "state.db") as reopened:
        assert [(r.name, r.spec) for r in reopened.list_rules()] == [
            ("a", rule_spec(1)), ("b", rule_spec(3))]
        assert reopened.generation == 2


def test_flush_existing_is_stored_and_reported_with_the_changes(store, tmp_path):
    store.apply_rules([("a", rule_spec()), ("b", rule_spec())], flush={"b"})
    assert (store.get_rule("a").flush, store.get_rule("b").flush) == (False, True)
    changes = store.changed_rules(0)
    assert changes is not None and changes.flush == frozenset({"b"})
    assert store.desired_rules().flush == frozenset({"b"})
    flipped = store.apply_rules([("b", rule_spec())])  # only the flag: a change
    assert flipped.changed == 1 and not store.get_rule("b").flush
    store.apply_rules([("a", rule_spec())], flush={"a"})
    store.close()
    with Store(tmp_path / "state.db") as reopened:
        assert reopened.get_rule("a").flush and reopened.desired_rules().flush == {"a"}


def test_delete_rules_all_or_nothing(store):
    store.apply_rules([("a", rule_spec()), ("b", rule_spec())])
    with pytest.raises(NotFoundError, match="firewall rule 'zz' not found"):
        store.delete_rules(["a", "zz"])
    assert len(store.list_rules()) == 2 and store.generation == 1
    assert store.delete_rules(["a", "b"]).generation == 2
    assert store.list_rules() == []


def test_route_prefix_unique_among_routes(store):
    store.apply_routes([("r1", route_spec())])
    with pytest.raises(ConflictError, match=r"routes\[0\]: route 'r1' already uses"):
        store.apply_routes([("r2", route_spec(gw="198.18.2.1"))])
    assert store.generation == 1
    # the holder itself moving away in the same batch frees the prefix (a swap)
    store.apply_routes([("r1", route_spec("198.20.0.0/16")), ("r2", route_spec())])
    assert {r.name: r.spec.prefix for r in store.list_routes()} == {
        "r1": "198.20.0.0/16", "r2": "198.19.0.0/16"}


def test_change_logs_name_node_keys(store):
    start = store.generation
    store.apply_rules([("a", rule_spec()), ("b", rule_spec())])
    mid = store.generation
    store.apply_routes([("r1", route_spec())])
    store.apply_routes([("r1", route_spec("198.20.0.0/16"))])  # prefix moved
    store.delete_rules(["a"])
    rules = store.changed_rules(start)
    assert rules is not None and rules.specs == {"a": None, "b": rule_spec()}
    assert rules.count == 1 and rules.names == {"b": "b"}
    routes = store.changed_routes(mid)
    assert routes is not None
    assert routes.specs == {"198.19.0.0/16": None, "198.20.0.0/16": route_spec("198.20.0.0/16")}
    assert routes.names == {"198.20.0.0/16": "r1"}
    assert store.changed_routes(store.generation).specs == {}  # type: ignore[union-attr]
    assert store.changed_rules(start - 1) is None  # before the store opened: unknown
    assert CHANGE_LOG_KEYS > 1000


def test_services_and_objects_share_one_generation(store):
    store.apply_rules([("a", rule_spec())])
    from xlbcore.service import EndpointSpec, Proto, ServiceSpec

    svc = ServiceSpec("198.19.0.10", 80, Proto.TCP, endpoints=(EndpointSpec("198.18.1.2", 80),))
    stored, _ = store.apply_service("web", svc)
    assert (stored.revision, stored.generation) == (2, 1)  # the store's, the object's
    assert store.apply_routes([("r", route_spec())]).generation == 3


# -- validation -------------------------------------------------------------------------


def test_batch_validation_names_the_item():
    ok = make_rule("a", "drop", 5, dst="198.19.0.0/16")
    with pytest.raises(ValidationError, match=r"^rules\[1\]\.name: 'a' is also rules\[0\]"):
        validate_rules([ok, ok])
    with pytest.raises(ValidationError, match=r"^rules\[0\]\.spec\.match\.dst"):
        validate_rules([make_rule("a", "drop", dst="198.19.0.1/16")])
    with pytest.raises(ValidationError, match=r"^rules\[0\]\.name"):
        validate_rules([make_rule("Bad_Name", "drop")])
    r1 = make_route("r1", "198.19.0.0/16", ["198.18.1.1"])
    r2 = make_route("r2", "198.19.0.0/16", ["198.18.2.1"])
    with pytest.raises(ValidationError, match=r"^routes\[1\]\.spec\.prefix: .* routes\[0\]"):
        validate_routes([r1, r2])
    with pytest.raises(ValidationError, match=r"^routes\[0\]\.spec\.next_hops\[0\]\.weight"):
        validate_routes([make_route("r", "198.19.0.0/16", ["198.18.1.1,weight=999"])])


# -- servicer ---------------------------------------------------------------------------


def code_of(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code(), info.value.details()


def test_rule_and_route_verbs_over_grpc(policyd, client_for):
    client: PolicyClient = client_for(policyd())
    stored = client.apply_rule(make_rule("no-telnet", "drop", 100, protocol="tcp",
                                         dst="198.19.0.7", dst_ports="23"))
    assert stored.generation == 1 and stored.update_time.seconds > 0
    assert stored.spec.match.dst == "198.19.0.7/32"  # canonical
    assert client.get_rule("no-telnet") == stored
    reply = client.apply_rules([make_rule("a", "allow", 200, src="198.18.0.0/24"),
                                make_rule("b", "drop", 1)])
    assert reply.generation == 2 and [r.name for r in reply.rules] == ["a", "b"]
    assert [r.name for r in client.list_rules()] == ["a", "b", "no-telnet"]
    assert client.delete_rules(["a", "b"]) == 3
    client.delete_rule("no-telnet")
    assert client.list_rules() == []

    route = client.apply_route(make_route("via-a", "198.19.0.0/16",
                                          ["198.18.2.1,weight=2", "198.18.1.1"]))
    assert [h.gateway for h in route.spec.next_hops] == ["198.18.1.1", "198.18.2.1"]
    assert client.get_route("via-a") == route
    assert [r.name for r in client.list_routes()] == ["via-a"]
    code, details = code_of(client.apply_route,
                            make_route("other", "198.19.0.0/16", ["198.18.3.1"]))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "'via-a'" in details
    reply2 = client.apply_routes([make_route("b", "198.20.0.0/16", ["dev=eth1"])])
    assert reply2.routes[0].spec.next_hops[0].interface == "eth1"
    client.delete_route("via-a")
    client.delete_routes(["b"])
    assert client.list_routes() == []


def test_errors_as_for_services(policyd, client_for):
    client: PolicyClient = client_for(policyd())
    code, details = code_of(client.get_rule, "nope")
    assert code == grpc.StatusCode.NOT_FOUND and details == "firewall rule 'nope' not found"
    code, details = code_of(client.get_route, "nope")
    assert code == grpc.StatusCode.NOT_FOUND and details == "route 'nope' not found"
    code, details = code_of(client.apply_rule, make_rule("r", "drop", dst="x" * 10_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("rule.spec.match.dst:") and len(details) < 200
    code, details = code_of(client.apply_rules, [make_rule("r", "redirect")])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("rules[0].spec.redirect_interface")
    code, details = code_of(client.apply_route, make_route("r", "198.19.0.0/16", []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(
        "route.spec.next_hops")
    code, _ = code_of(client.delete_routes, ["a", "a"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# -- xlbctl -----------------------------------------------------------------------------


def run(capsys, server, *args: str) -> tuple[int, object, str]:
    rc = cli.main(["--server", server.address, *args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def test_xlbctl_firewall_and_route(capsys, policyd):
    server = policyd()
    rc, rule, _ = run(capsys, server, "firewall", "apply", "--name", "no-telnet",
                      "--action", "drop", "--priority", "100", "--protocol", "tcp",
                      "--dst", "198.19.0.0/16", "--dst-ports", "23", "--src-ports", "1-1023",
                      "--in-interface", "eth0")
    assert rc == 0 and rule["name"] == "no-telnet" and rule["generation"] == "1"
    assert rule["spec"]["match"]["dst_ports"] == {"first": 23, "last": 23}
    assert rule["spec"]["match"]["src_ports"] == {"first": 1, "last": 1023}
    assert rule["spec"]["action"] == "FIREWALL_ACTION_DROP"
    rc, got, _ = run(capsys, server, "firewall", "get", "no-telnet")
    assert got == rule
    rc, listed, _ = run(capsys, server, "firewall", "list")
    assert listed == [rule]
    rc, out, _ = run(capsys, server, "firewall", "delete", "no-telnet")
    assert rc == 0 and out == {"deleted": "no-telnet"}
    # docs/firewall.md: an SCTP rule by port range
    rc, rule, _ = run(capsys, server, "firewall", "apply", "--name", "no-ngap", "--priority",
                      "100", "--action", "drop", "--protocol", "sctp", "--dst-ports",
                      "38400-38499")
    assert rc == 0 and rule["spec"]["match"]["protocol"] == "PROTOCOL_SCTP"
    assert rule["spec"]["match"]["dst_ports"] == {"first": 38400, "last": 38499}
    rc, _, err = run(capsys, server, "firewall", "apply", "--name", "bad", "--priority", "1",
                     "--action", "drop", "--protocol", "icmp", "--dst-ports", "80")
    assert rc == 1 and "INVALID_ARGUMENT" in err and "PROTOCOL_SCTP" in err, err
    assert run(capsys, server, "firewall", "delete", "no-ngap")[0] == 0

    rc, route, _ = run(capsys, server, "route", "apply", "--name", "via-a", "--prefix",
                       "198.19.0.0/16", "--next-hop", "198.18.1.1",
                       "--next-hop", "198.18.2.1,dev=veth2,weight=3")
    assert rc == 0 and route["spec"]["next_hops"][1] == {
        "gateway": "198.18.2.1", "interface": "veth2", "weight": 3}
    rc, listed, _ = run(capsys, server, "route", "list")
    assert listed == [route]
    rc, _, err = run(capsys, server, "route", "apply", "--name", "x", "--prefix",
                     "198.19.0.0/16", "--next-hop", "198.18.3.1")
    assert rc == 1 and "ALREADY_EXISTS" in err
    rc, out, _ = run(capsys, server, "route", "delete", "via-a")
    assert rc == 0

    with pytest.raises(SystemExit) as info:
        cli.main(["--server", server.address, "firewall", "apply", "--name", "r",
                  "--action", "drop", "--dst-ports", "80-x"])
    assert info.value.code == 2
    assert "PORT or FIRST-LAST" in capsys.readouterr().err


def test_apply_file_json_with_every_kind(capsys, policyd, tmp_path):
    server = policyd()
    svc = json.loads(json.dumps(cli._json(make_service(
        "web", "198.19.0.10", 80, "tcp", ["198.18.1.2:80"]))))
    doc = {
        "services": [svc],
        "firewall_rules": [cli._json(make_rule("a", "drop", 5, dst="198.19.0.10"))],
        "routes": [cli._json(make_route("r", "198.20.0.0/16", ["198.18.1.1"]))],
    }
    path = tmp_path / "all.json"
    path.write_text(json.dumps(doc))
    rc, out, err = run(capsys, server, "apply-file", str(path))
    assert rc == 0, err
    assert out == {"firewall_rules": {"applied": 1, "generation": "1"},
                   "routes": {"applied": 1, "generation": "2"},
                   "services": {"applied": 1, "generation": "3"}}
    with PolicyClient(server.address) as client:
        assert [r.name for r in client.list_rules()] == ["a"]
        assert [r.name for r in client.list_routes()] == ["r"]
        assert [s.name for s in client.list_services()] == ["web"]


def test_apply_file_yaml_documents_with_kinds(capsys, policyd, tmp_path):
    pytest.importorskip("yaml")
    server = policyd()
    path = tmp_path / "all.yaml"
    path.write_text("""
kind: firewall_rule
name: block-telnet
spec:
  priority: 100
  action: FIREWALL_ACTION_DROP
  match: {protocol: PROTOCOL_TCP, dst_ports: {first: 23, last: 23}}
---
kind: Route
name: to-lab
spec:
  prefix: 198.20.0.0/16
  next_hops: [{gateway: 198.18.1.1, weight: 2}, {interface: eth1}]
---
kind: service
name: web
vip: 198.19.0.10
port: 80
protocol: PROTOCOL_TCP
endpoints: [{address: 198.18.1.2, port: 80}]
""")
    rc, out, err = run(capsys, server, "apply-file", str(path))
    assert rc == 0, err
    assert set(out) == {"firewall_rules", "routes", "services"}  # type: ignore[arg-type]
    with PolicyClient(server.address) as client:
        route = client.get_route("to-lab")
        assert route.spec.next_hops[0].interface == "eth1"
        assert client.get_rule("block-telnet").spec.match.dst_ports.first == 23


@pytest.mark.parametrize(("text", "message"), [
    ('{"rules": []}', "unknown key 'rules'"),
    ('[{"name": "x"}]', 'expected an object with "kind"'),
    ('[{"kind": "nat", "name": "x"}]', "[0].kind: 'nat' is not one of"),
    ('{"routes": [{"name": "r", "spec": {"prefix": 5, "bogus": 1}}]}', "routes[0]:"),
])
def test_apply_file_errors_name_the_place(capsys, policyd, tmp_path, text, message):
    server = policyd()
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as info:
        cli.main(["--server", server.address, "apply-file", str(path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_apply_file_server_error_is_reported(capsys, policyd, tmp_path):
    server = policyd()
    path = tmp_path / "bad.json"
    rule = cli._json(make_rule("a", "drop", dst="198.19.0.1/16"))
    path.write_text(json.dumps({"firewall_rules": [rule]}))
    rc, _, err = run(capsys, server, "apply-file", str(path))
    assert rc == 1 and "INVALID_ARGUMENT: rules[0].spec.match.dst" in err


# -- reconcile decisions (pure) ---------------------------------------------------------


class Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_refusals_are_told_of_the_object_not_its_place_in_the_batch():
    from policyd.objects import object_reason, refused_item

    bad = grpc.StatusCode.INVALID_ARGUMENT
    rule = Refusal(bad, "rules[3].spec.match.in_interface: no interface 'eth9' on this node")
    assert refused_item(rule) == (True, 3)
    assert object_reason(rule) == (
        "INVALID_ARGUMENT: spec.match.in_interface: no interface 'eth9' on this node")
    hop = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "routes[0]: next hop 198.18.7.1 is x")
    assert refused_item(hop) == (True, 0)
    assert object_reason(hop) == "FAILED_PRECONDITION: next hop 198.18.7.1 is x"
    dev = Refusal(bad, "routes[2].next_hops[1].interface: interface 'x' does not exist")
    assert object_reason(dev) == (
        "INVALID_ARGUMENT: spec.next_hops[1].interface: interface 'x' does not exist")
    assert refused_item(Refusal(bad, "rules: 'a' appears twice")) == (True, None)
    assert refused_item(Refusal(grpc.StatusCode.UNAVAILABLE, "rules[0]: gone")) == (False, None)


def test_plan_writes_only_what_differs():
    from policyd.objects import plan

    a, b = rule_spec(1), rule_spec(2)
    puts, deletes = plan({"x", "y", "z"}, {"x": a, "y": b, "z": None}, {"x": a, "y": a, "z": a})
    assert (puts, deletes) == ([("y", b)], ["z"])
    # unknown node: every changed key is written
    puts, deletes = plan({"x", "z"}, {"x": a, "z": None}, None)
    assert (puts, deletes) == ([("x", a)], ["z"])
