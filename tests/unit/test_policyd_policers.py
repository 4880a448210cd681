"""policyd's Policer objects: the store (generations, selectors, a reopen), validation
naming the field, the API (INVALID_ARGUMENT, ABORTED on a stale generation, NOT_FOUND,
Watch), the reconcile onto dpd's real servicer over in-memory maps (the selected nodes
take a policer, a change and a delete reach them, a hand delete through dpd is repaired,
an interface another policer holds on a node is an ObjectError there only), and xlbctl
(``kind: Policer`` documents round trip, the ``policer`` subcommand, the dpd view)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import yaml

from policyd import cli
from policyd.client import PolicyClient, make_policer
from policyd.policer_objects import PolicerSpec, validate_policer, validate_policers
from policyd.store import GenerationConflict, Store
from tests.unit.conftest import FakeNode
from tests.unit.test_xlbctl_documents import xlbctl
from xlb.dpd.v1 import datapath_pb2
from xlb.policy.v1 import policy_pb2
from xlbcore.errors import ValidationError

# -- store ------------------------------------------------------------------------------


def test_store_generations_selectors_and_reopen(tmp_path: Path):
    path = tmp_path / "s.db"
    with Store(path) as s:
        r = s.apply_policers([("a", PolicerSpec(8_000_000, 30_000, ("eth0",))),
                              ("b", PolicerSpec(1_000_000, 3_000, ("eth1",)))],
                             selectors={"b": (("zone", "east"),)})
        assert (r.generation, r.changed) == (1, 2)
        assert set(s.desired_policers({"zone": "east"}).specs) == {"a", "b"}
        assert set(s.desired_policers({"zone": "west"}).specs) == {"a"}
        assert s.apply_policers([("a", PolicerSpec(8_000_000, 30_000, ("eth0",)))]).changed == 0
        r = s.apply_policers([("a", PolicerSpec(9_000_000, 30_000, ("eth0",)))])
        assert (r.objects[0].generation, r.generation) == (2, 2)
        changes = s.changed_policers(1)
        assert changes is not None
        assert changes.specs == {"a": PolicerSpec(9_000_000, 30_000, ("eth0",))}
        with pytest.raises(GenerationConflict):  # compare-and-swap: a stale generation
            s.apply_policers([("a", PolicerSpec(1_000_000, 30_000, ()))], expected={"a": 1})
        assert s.get_policer("a").spec.rate_bps == 9_000_000  # nothing written
        moved = s.selected_policers({"zone": "west"})
        assert moved.specs == {"b": None}
    with Store(path) as s:  # reopened
        assert [(p.name, p.spec, p.generation, p.selector) for p in s.list_policers()] == [
            ("a", PolicerSpec(9_000_000, 30_000, ("eth0",)), 2, ()),
            ("b", PolicerSpec(1_000_000, 3_000, ("eth1",)), 1, (("zone", "east"),))]
        s.delete_policers(["a"])
        assert set(s.desired_policers().specs) == {"b"}


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(("policer", "message"), [
    (make_policer("Bad_Name", 8000, 1500), "policer.name: 'Bad_Name' is not a valid name"),
    (make_policer("p", 7999, 1500), "policer.spec.rate_bps: 7999 is outside 8000.."),
    (make_policer("p", 400_000_000_001, 1500), "policer.spec.rate_bps: 400000000001 is outside"),
    (make_policer("p", 8000, 1499), "policer.spec.burst_bytes: 1499 is outside 1500.."),
    (make_policer("p", 8000, (1 << 30) + 1), "policer.spec.burst_bytes: 1073741825 is outside"),
    (make_policer("p", 8000, 1500, ["eth0", ""]),
     "policer.spec.interfaces[1]: an interface name is required"),
    (make_policer("p", 8000, 1500, ["eth0", "eth0"]),
     "policer.spec.interfaces[1]: 'eth0' is also policer.spec.interfaces[0]"),
    (make_policer("p", 8000, 1500, ["a/b"]), "policer.spec.interfaces[0]: 'a/b' is not an"),
    (make_policer("p", 8000, 1500, [f"e{i}" for i in range(65)]),
     "policer.spec.interfaces: 65 interfaces, at most 64"),
])
def test_validation_names_the_field(policer, message):
    with pytest.raises(ValidationError) as e:
        validate_policer(policer)
    assert str(e.value).startswith(message)


def test_interfaces_sorted_and_a_batch_has_each_name_once():
    assert validate_policer(make_policer("p", 8000, 1500, ["eth1", "eth0"])) == (
        "p", PolicerSpec(8000, 1500, ("eth0", "eth1")))
    assert validate_policer(make_policer("p", 8000, 1500)) == ("p", PolicerSpec(8000, 1500))
    with pytest.raises(ValidationError, match=r"^policers\[1\]\.name: 'p' is also policers\[0\]"):
        validate_policers([make_policer("p", 8000, 1500), make_policer("p", 9000, 1500)])


# -- the API ------------------------------------------------------------------------------


def test_api_verbs_errors_and_watch(policyd, client_for):
    client: PolicyClient = client_for(policyd())
    stored = client.apply_policer(make_policer("eth0-in", 8_000_000, 30_000, ["eth0"]))
    assert (stored.generation, stored.spec.rate_bps, list(stored.spec.interfaces)) == (
        1, 8_000_000, ["eth0"])
    with pytest.raises(grpc.RpcError) as e:
        client.apply_policer(make_policer("x", 8_000_000, 100))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == ("policer.spec.burst_bytes: 100 is outside 1500..1073741824 "
                                 "bytes")
    with pytest.raises(grpc.RpcError) as e:  # compare-and-swap: it exists already
        client.apply_policer(make_policer("eth0-in", 1_000_000, 30_000), expected_generation=0)
    assert e.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as e:  # a batch with a stale generation: nothing
        client.apply_policers([make_policer("new", 8000, 1500),
                               policy_pb2.Policer(name="eth0-in", generation=7,
                                                  spec=stored.spec)], check_generations=True)
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert [p.name for p in client.list_policers()] == ["eth0-in"]
    changed = client.apply_policer(make_policer("eth0-in", 1_000_000, 30_000, ["eth0"]),
                                   expected_generation=1)
    assert changed.generation == 2
    events = client.stub.Watch(policy_pb2.WatchRequest(from_revision=0, kinds=["policer"]))
    got = []
    for ev in events:
        got.append((ev.type, ev.kind, ev.name, ev.policer.spec.rate_bps))
        if ev.type == policy_pb2.EVENT_TYPE_CURRENT:
            break
    events.cancel()
    assert got == [(policy_pb2.EVENT_TYPE_PUT, "policer", "eth0-in", 1_000_000),
                   (policy_pb2.EVENT_TYPE_CURRENT, "", "", 0)]
    client.delete_policer("eth0-in")
    with pytest.raises(grpc.RpcError) as e:
        client.get_policer("eth0-in")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        client.delete_policers(["eth0-in"])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# -- reconcile onto dpd's servicer --------------------------------------------------------


def status(client: PolicyClient, node: str) -> policy_pb2.NodeSyncStatus:
    (s,) = client.sync_status(node).nodes
    return s


def synced(client: PolicyClient, node: str, generation: int) -> bool:
    s = status(client, node)
    return s.state == policy_pb2.SYNC_STATE_SYNCED and s.observed_generation >= generation


def policers_on(node: FakeNode) -> dict[str, tuple[int, int, tuple[str, ...]]]:
    return {p.spec.name: (p.spec.rate_bps, p.spec.burst_bytes, p.spec.interfaces)
            for p in node.datapath.node.policers.entries()}


def test_selected_nodes_take_policers_and_a_hand_delete_is_repaired(
        wait_for, policyd, fake_node, client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    client = client_for(policyd())
    client.register_node("node-a", a.address, {"zone": "east"})
    client.register_node("node-b", b.address, {"zone": "west"})
    reply = client.apply_policers([
        make_policer("eth0-in", 8_000_000, 30_000, ["eth0"]),
        make_policer("east-lo", 1_000_000, 3_000, ["lo"], {"zone": "east"})])
    wait_for(lambda: synced(client, "node-a", reply.generation), what="node-a synced")
    wait_for(lambda: synced(client, "node-b", reply.generation), what="node-b synced")
    assert policers_on(a) == {"eth0-in": (8_000_000, 30_000, ("eth0",)),
                              "east-lo": (1_000_000, 3_000, ("lo",))}
    assert policers_on(b) == {"eth0-in": (8_000_000, 30_000, ("eth0",))}
    assert (status(client, "node-a").policers, status(client, "node-b").policers) == (2, 1)

    # a change reaches the node, the bucket's name kept
    reply = client.apply_policers([make_policer("eth0-in", 4_000_000, 30_000, ["eth0"])])
    wait_for(lambda: synced(client, "node-a", reply.generation), what="change synced")
    assert policers_on(a)["eth0-in"] == (4_000_000, 30_000, ("eth0",))

    # a hand delete through dpd: the summary moves, policyd reads back and repairs
    a.datapath.DeletePolicers(datapath_pb2.DeletePolicersRequest(names=["east-lo"]), None)
    wait_for(lambda: "east-lo" in policers_on(a), what="repaired")
    wait_for(lambda: status(client, "node-a").drift_repaired_total >= 1, what="drift counted")

    # node-b relabeled east: it takes east-lo too; deleted in policyd: gone everywhere
    client.register_node("node-b", b.address, {"zone": "east"})
    wait_for(lambda: "east-lo" in policers_on(b), what="relabel moved it")
    client.delete_policers(["eth0-in", "east-lo"])
    generation = client.sync_status().generation
    for name, node in (("node-a", a), ("node-b", b)):
        wait_for(lambda n=name: synced(client, n, generation), what=f"{name} synced")
        assert policers_on(node) == {}
        assert status(client, name).policers == 0


def test_an_interface_held_on_a_node_is_an_error_there_only(wait_for, policyd, fake_node,
                                                            client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    client = client_for(policyd())
    client.register_node("node-a", a.address, {"zone": "east"})
    client.register_node("node-b", b.address, {"zone": "west"})
    reply = client.apply_policers([
        make_policer("west-eth0", 8_000_000, 30_000, ["eth0"], {"zone": "west"}),
        make_policer("all-eth0", 1_000_000, 30_000, ["eth0"], {"zone": "east"})])
    wait_for(lambda: synced(client, "node-a", reply.generation), what="node-a synced")
    wait_for(lambda: synced(client, "node-b", reply.generation), what="node-b synced")
    # node-a becomes west: both select it and both name eth0; dpd takes one, refuses the
    # other (an ObjectError on node-a only)
    client.register_node("node-a", a.address, {"zone": "west"})
    client.apply_policer(make_policer("all-eth0", 1_000_000, 30_000, ["eth0"]))

    def errored() -> policy_pb2.NodeSyncStatus | None:
        s = status(client, "node-a")
        return s if s.state == policy_pb2.SYNC_STATE_ERROR and s.errors else None

    s = wait_for(errored, what="node-a ERROR")
    (error,) = s.errors
    assert error.kind == "policer"
    holder = "west-eth0" if error.name == "all-eth0" else "all-eth0"
    assert error.message == (f"INVALID_ARGUMENT: spec.interfaces[0]: 'eth0' is policed by "
                             f"'{holder}'")
    assert set(policers_on(a)) == {holder}
    # node-b (west) holds west-eth0 on eth0 and is refused all-eth0 too: its own error
    wait_for(lambda: status(client, "node-b").state == policy_pb2.SYNC_STATE_ERROR,
             what="node-b ERROR")
    # the holder deleted: the next drift check takes the other, the nodes are SYNCED
    client.delete_policer(holder)
    generation = client.sync_status().generation
    wait_for(lambda: synced(client, "node-a", generation), what="node-a synced")
    assert set(policers_on(a)) == {error.name}


def test_dpd_summary_has_policers(fake_node):
    node = fake_node("a").start()
    servicer = node.datapath
    servicer.PutPolicers(datapath_pb2.PutPolicersRequest(policers=[datapath_pb2.Policer(
        name="p", rate_bps=8000, burst_bytes=1500, interfaces=["eth0"])]), None)
    tables = {t.table: t for t in servicer.GetSummary(datapath_pb2.GetSummaryRequest(),
                                                      None).tables}
    assert (tables["policers"].generation, tables["policers"].count) == (1, 1)


# -- xlbctl ---------------------------------------------------------------------------------

SITE = """\
kind: Node
metadata: {name: node-a}
spec: {address: ADDRESS}
---
kind: Policer
metadata: {name: eth0-in}
spec: {rate_bps: 8000000, burst_bytes: 30000, interfaces: [eth0]}
---
kind: Policer
metadata: {name: west-lo, nodeSelector: {zone: west}}
spec: {rate_bps: 1000000, burst_bytes: 3000, interfaces: [lo]}
"""


def test_documents_roundtrip_and_reach_the_node(capsys, policyd, fake_node, tmp_path,
                                                wait_for):
    node = fake_node("a").start()
    server = policyd()
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("ADDRESS", node.address))
    rc, out, err = xlbctl(capsys, server, "apply", "-f", str(site))
    assert rc == 0, err
    assert out.splitlines() == [f"node/node-a registered ({node.address})",
                                "policer/eth0-in configured (generation 1)",
                                "policer/west-lo configured (generation 1)"]
    wait_for(lambda: policers_on(node) == {"eth0-in": (8_000_000, 30_000, ("eth0",))},
             what="the policer on the node (not west-lo: the node has no zone label)")

    rc, text, _ = xlbctl(capsys, server, "get", "policers", "-o", "yaml")
    docs = list(yaml.safe_load_all(text))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("Policer", "eth0-in"), ("Policer", "west-lo")]
    assert docs[0]["spec"] == {"rate_bps": "8000000", "burst_bytes": "30000",
                               "interfaces": ["eth0"]}
    assert docs[1]["metadata"]["nodeSelector"] == {"zone": "west"}
    back = tmp_path / "back.yaml"
    back.write_text(text)
    rc, out, _ = xlbctl(capsys, server, "apply", "-f", str(back))
    assert rc == 0 and "configured" not in out, out
    rc, out, _ = xlbctl(capsys, server, "get", "policer", "eth0-in", "-o", "json")
    assert json.loads(out)["spec"]["interfaces"] == ["eth0"]
    rc, out, _ = xlbctl(capsys, server, "get", "policers")
    assert out.splitlines()[0].split() == ["NAME", "RATE-BPS", "BURST-BYTES", "INTERFACES",
                                           "GENERATION"]
    assert out.splitlines()[1].split() == ["eth0-in", "8000000", "30000", "eth0", "1"]
    wait_for(lambda: xlbctl(capsys, server, "status", "-o", "table")[0] == 0, what="SYNCED")
    rc, out, _ = xlbctl(capsys, server, "status", "-o", "wide")
    assert "POLICERS" in out.splitlines()[0]
    # the node's own view (dpd)
    assert cli.main(["--dpd", node.address, "policers"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["NAME", "RATE-BPS", "BURST-BYTES", "INTERFACES"]
    assert out.splitlines()[1].split()[:4] == ["eth0-in", "8000000", "30000", "eth0"]

    rc, out, _ = xlbctl(capsys, server, "delete", "-f", str(site))
    assert rc == 0
    assert out.splitlines() == ["policer/eth0-in deleted", "policer/west-lo deleted",
                                "node/node-a deregistered"]


def test_subcommand(capsys, policyd):
    server = policyd()
    rc, out, err = xlbctl(capsys, server, "policer", "apply", "--name", "eth0-in",
                          "--rate-bps", "8000000", "--burst-bytes", "30000",
                          "--interface", "eth1", "--interface", "eth0",
                          "--node-selector", "zone=east")
    assert rc == 0, err
    got = json.loads(out)
    assert got["spec"] == {"rate_bps": "8000000", "burst_bytes": "30000",
                           "interfaces": ["eth0", "eth1"]}
    assert got["node_selector"] == {"zone": "east"}
    rc, out, err = xlbctl(capsys, server, "policer", "apply", "--name", "slow",
                          "--rate-bps", "10", "--burst-bytes", "30000")
    assert rc == 1
    assert "INVALID_ARGUMENT: policer.spec.rate_bps: 10 is outside 8000..400000000000" in err
    rc, out, _ = xlbctl(capsys, server, "policer", "get", "eth0-in")
    assert json.loads(out)["generation"] == "1"
    rc, out, _ = xlbctl(capsys, server, "policer", "list")
    assert [p["name"] for p in json.loads(out)] == ["eth0-in"]
    rc, out, _ = xlbctl(capsys, server, "policer", "delete", "eth0-in")
    assert json.loads(out) == {"deleted": "eth0-in"}
    rc, out, _ = xlbctl(capsys, server, "get", "policers")
    assert out.strip() == "no policers"
