"""policyd's Blocklist and Mirror objects: the store (union of prefixes, shared
prefixes, a mirrored interface unique, generations, a reopen), validation naming the
field, the API (INVALID_ARGUMENT, CONFLICT, Watch), and the reconcile onto dpd's real
servicer over in-memory maps: the union reaches every node, a prefix no object wants any
more is removed while one still shared stays, only what changed is written, a hand edit
is repaired, and a mirror whose interface a node does not have is an ObjectError on that
node only."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from policyd.client import PolicyClient, make_blocklist, make_mirror
from policyd.store import Store
from policyd.xdp_objects import (
    BlocklistSpec,
    MirrorSpec,
    validate_blocklists,
    validate_mirrors,
)
from tests.unit.conftest import FakeNode
from xlb.dpd.v1 import datapath_pb2
from xlb.policy.v1 import policy_pb2
from xlbcore.errors import ConflictError, ValidationError

# -- store ----------------------------------------------------------------------------


def bl(*prefixes: str) -> BlocklistSpec:
    return BlocklistSpec(tuple(prefixes))


def test_store_blocklists_are_a_union_and_share_prefixes(tmp_path: Path):
    path = tmp_path / "s.db"
    with Store(path) as s:
        r = s.apply_blocklists([("a", bl("198.18.66.0/24", "198.18.67.0/24")),
                                ("b", bl("198.18.67.0/24", "2001:db8:66::/48"))])
        assert (r.generation, r.changed) == (1, 2)
        assert dict(s.desired_blocklist().specs) == {
            p: p for p in ("198.18.66.0/24", "198.18.67.0/24", "2001:db8:66::/48")}
        assert s.desired_blocklist().names["198.18.67.0/24"] == "a"  # the first by name
        # deleting a: its own prefix goes, the shared one stays (b wants it)
        gen = s.delete_blocklists(["a"]).generation
        changes = s.changed_blocklist(gen - 1)
        assert changes is not None
        assert changes.specs == {"198.18.66.0/24": None, "198.18.67.0/24": "198.18.67.0/24"}
        assert changes.names == {"198.18.67.0/24": "b"}
        # an unchanged apply changes nothing; a changed one moves that object's generation
        assert s.apply_blocklists([("b", bl("198.18.67.0/24", "2001:db8:66::/48"))]).changed == 0
        r = s.apply_blocklists([("b", bl("198.18.67.0/24"))])
        assert (r.objects[0].generation, r.changed) == (2, 1)
        s.apply_mirrors([("m", MirrorSpec("eth0", "mirror0"))])
    with Store(path) as s:  # reopened: the same objects and union
        assert [(b.name, b.spec, b.generation) for b in s.list_blocklists()] == [
            ("b", bl("198.18.67.0/24"), 2)]
        assert dict(s.desired_blocklist().specs) == {"198.18.67.0/24": "198.18.67.0/24"}
        assert s.get_mirror("m").spec == MirrorSpec("eth0", "mirror0")
        assert s.desired_mirrors().specs == {"eth0": MirrorSpec("eth0", "mirror0")}


def test_store_selectors_pick_the_union_per_node():
    with Store(":memory:") as s:
        s.apply_blocklists([("all", bl("198.18.1.0/24")),
                            ("east", bl("198.18.1.0/24", "198.18.2.0/24"))],
                           selectors={"east": (("zone", "east"),)})
        assert set(s.desired_blocklist({"zone": "east"}).specs) == {
            "198.18.1.0/24", "198.18.2.0/24"}
        assert set(s.desired_blocklist({"zone": "west"}).specs) == {"198.18.1.0/24"}
        moved, _mirrors = s.selected_xdp({"zone": "west"})
        # the keys a selector touches, each as the node wants it now
        assert moved.specs == {"198.18.1.0/24": "198.18.1.0/24", "198.18.2.0/24": None}


def test_store_a_mirrored_interface_is_one_mirrors():
    with Store(":memory:") as s:
        s.apply_mirrors([("m", MirrorSpec("eth0", "mirror0"))])
        with pytest.raises(ConflictError, match=r"mirrors\[0\]: mirror 'm' already uses 'eth0'"):
            s.apply_mirrors([("n", MirrorSpec("eth0", "mirror1"))])
        # moving it within one batch is fine
        s.apply_mirrors([("m", MirrorSpec("eth1", "mirror0")),
                         ("n", MirrorSpec("eth0", "mirror1"))])
        assert set(s.desired_mirrors().specs) == {"eth0", "eth1"}


# -- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "message"), [
    ([], r"blocklists\[0\]\.spec\.prefixes: at least one prefix"),
    (["198.18.66.1/24"], r"blocklists\[0\]\.spec\.prefixes\[0\]: .* has host bits set"),
    (["nope"], r"blocklists\[0\]\.spec\.prefixes\[0\]: 'nope' is not"),
    (["198.18.66.0/24", "198.18.66.0/24"],
     r"blocklists\[0\]\.spec\.prefixes\[1\]: 198\.18\.66\.0/24 is also"),
])
def test_blocklist_validation_names_the_field(spec, message):
    with pytest.raises(ValidationError, match=message):
        validate_blocklists([make_blocklist("a", spec)])


def test_blocklist_prefixes_are_canonical_and_sorted():
    ((_, spec),) = validate_blocklists([make_blocklist(
        "a", ["2001:db8:66::/48", "198.18.66.7", "198.18.0.0/24"])])
    assert spec.prefixes == ("198.18.0.0/24", "198.18.66.7/32", "2001:db8:66::/48")


@pytest.mark.parametrize(("mirrors", "message"), [
    ([make_mirror("m", "", "x")], r"mirrors\[0\]\.spec\.interface: an interface is required"),
    ([make_mirror("m", "eth0", "eth0")], r"mirrors\[0\]\.spec\.mirror_interface: 'eth0' is the"),
    ([make_mirror("m", "eth0", "a/b")], r"mirrors\[0\]\.spec\.mirror_interface: 'a/b' is not"),
    ([make_mirror("m", "eth0", "x"), make_mirror("n", "eth0", "y")],
     r"mirrors\[1\]\.spec\.interface: 'eth0' is also mirrored by mirrors\[0\]"),
    ([make_mirror("M", "eth0", "x")], r"mirrors\[0\]\.name: 'M' is not a valid name"),
])
def test_mirror_validation_names_the_field(mirrors, message):
    with pytest.raises(ValidationError, match=message):
        validate_mirrors(mirrors)


# -- the API --------------------------------------------------------------------------


def test_api_verbs_errors_and_watch(policyd, client_for):
    client: PolicyClient = client_for(policyd())
    stored = client.apply_blocklist(make_blocklist("bad-hosts", ["198.18.66.0/24"]))
    assert (stored.generation, list(stored.spec.prefixes)) == (1, ["198.18.66.0/24"])
    with pytest.raises(grpc.RpcError) as e:
        client.apply_blocklist(make_blocklist("x", ["198.18.66.1/24"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("blocklist.spec.prefixes[0]: '198.18.66.1/24' has host")
    with pytest.raises(grpc.RpcError) as e:  # compare-and-swap
        client.stub.ApplyBlocklist(policy_pb2.ApplyBlocklistRequest(
            blocklist=make_blocklist("bad-hosts", ["198.18.67.0/24"]), expected_generation=0))
    assert e.value.code() == grpc.StatusCode.ABORTED
    reply = client.apply_mirrors([make_mirror("tap", "eth0", "eth1")])
    with pytest.raises(grpc.RpcError) as e:
        client.apply_mirror(make_mirror("tap2", "eth0", "eth2"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert [m.name for m in client.list_mirrors()] == ["tap"]
    assert client.get_mirror("tap").spec.mirror_interface == "eth1"
    assert [b.name for b in client.list_blocklists()] == ["bad-hosts"]
    events = client.stub.Watch(policy_pb2.WatchRequest(from_revision=0,
                                                       kinds=["blocklist", "mirror"]))
    got = []
    for ev in events:
        got.append((ev.type, ev.kind, ev.name))
        if ev.type == policy_pb2.EVENT_TYPE_CURRENT:
            break
    events.cancel()
    assert got == [(policy_pb2.EVENT_TYPE_PUT, "blocklist", "bad-hosts"),
                   (policy_pb2.EVENT_TYPE_PUT, "mirror", "tap"),
                   (policy_pb2.EVENT_TYPE_CURRENT, "", "")]
    assert client.delete_mirrors(["tap"]) == reply.generation + 1
    client.delete_blocklist("bad-hosts")
    with pytest.raises(grpc.RpcError) as e:
        client.get_blocklist("bad-hosts")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# -- reconcile onto dpd's servicer ----------------------------------------------------


def status(client: PolicyClient, node: str) -> policy_pb2.NodeSyncStatus:
    (s,) = client.sync_status(node).nodes
    return s


def synced(client: PolicyClient, node: str, generation: int) -> bool:
    s = status(client, node)
    return s.state == policy_pb2.SYNC_STATE_SYNCED and s.observed_generation >= generation


def blocked(node: FakeNode) -> set[str]:
    return {b.prefix for b in node.datapath.node.blocklist.entries()}


def mirrors_on(node: FakeNode) -> dict[str, str]:
    return {m.spec.interface: m.spec.mirror_interface for m in node.datapath.node.mirrors.entries()}


def test_the_union_reaches_every_node_and_removal_keeps_shared(wait_for, policyd, fake_node,
                                                                client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    client = client_for(policyd())
    client.register_node("node-a", a.address)
    client.register_node("node-b", b.address)
    reply = client.apply_blocklists([
        make_blocklist("scanners", ["198.18.66.0/24", "198.18.67.0/24"]),
        make_blocklist("abuse", ["198.18.67.0/24", "2001:db8:66::/48"])])
    union = {"198.18.66.0/24", "198.18.67.0/24", "2001:db8:66::/48"}
    for name, node in (("node-a", a), ("node-b", b)):
        wait_for(lambda n=name: synced(client, n, reply.generation), what=f"{name} synced")
        assert blocked(node) == union
        assert status(client, name).blocklist_prefixes == 3
    reads = a.datapath.calls["GetSummary"]
    client.delete_blocklist("scanners")  # 198.18.67.0/24 is abuse's too: it stays
    generation = client.sync_status().generation
    for name, node in (("node-a", a), ("node-b", b)):
        wait_for(lambda n=name: synced(client, n, generation), what=f"{name} synced")
        assert blocked(node) == {"198.18.67.0/24", "2001:db8:66::/48"}
    assert a.datapath.calls["GetSummary"] >= reads
    client.delete_blocklist("abuse")
    generation = client.sync_status().generation
    for name, node in (("node-a", a), ("node-b", b)):
        wait_for(lambda n=name: synced(client, n, generation), what=f"{name} synced")
        assert blocked(node) == set()
        assert status(client, name).blocklist_prefixes == 0


def test_only_changed_prefixes_are_written_and_a_hand_edit_is_repaired(
        wait_for, policyd, fake_node, client_for, monkeypatch):
    node = fake_node("a").start()
    servicer = node.datapath
    calls: list[tuple[str, list[str]]] = []
    table = servicer.node.blocklist
    put, delete = table.put, table.delete
    monkeypatch.setattr(table, "put", lambda p: (calls.append(("put", list(p))), put(p))[1])
    monkeypatch.setattr(table, "delete", lambda p: (
        calls.append(("delete", list(p))), delete(p))[1])
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    reply = client.apply_blocklist(make_blocklist(
        "many", [f"198.18.{i}.0/24" for i in range(100)]))
    wait_for(lambda: synced(client, "node-a", reply.revision), what="synced")
    assert len(blocked(node)) == 100
    calls.clear()
    reply = client.apply_blocklist(make_blocklist(
        "many", [f"198.18.{i}.0/24" for i in range(1, 101)]))
    wait_for(lambda: synced(client, "node-a", reply.revision), what="change synced")
    assert calls == [("delete", ["198.18.0.0/24"]), ("put", ["198.18.100.0/24"])]
    # a hand edit through dpd's API: the summary moves, policyd reads back and repairs
    calls.clear()
    delete(["198.18.5.0/24"])
    wait_for(lambda: "198.18.5.0/24" in blocked(node), what="repaired")
    wait_for(lambda: status(client, "node-a").drift_repaired_total >= 1, what="drift counted")


def test_a_refused_mirror_is_an_error_on_that_node_only(wait_for, policyd, fake_node,
                                                        client_for):
    a, b = fake_node("a").start(), fake_node("b").start()
    b.datapath.node.firewall.links.by_name["mirror0"] = 9  # only node b has it
    client = client_for(policyd())
    client.register_node("node-a", a.address)
    client.register_node("node-b", b.address)
    reply = client.apply_mirrors([make_mirror("tap", "eth0", "mirror0"),
                                  make_mirror("tap1", "eth1", "lo")])
    client.apply_blocklist(make_blocklist("bad", ["198.18.66.0/24"]))
    wait_for(lambda: synced(client, "node-b", reply.generation + 1), what="node-b synced")
    assert mirrors_on(b) == {"eth0": "mirror0", "eth1": "lo"}
    assert status(client, "node-b").mirrors == 2

    def errored() -> policy_pb2.NodeSyncStatus | None:
        s = status(client, "node-a")
        return s if s.state == policy_pb2.SYNC_STATE_ERROR and s.errors else None

    s = wait_for(errored, what="node-a ERROR")
    (error,) = s.errors
    assert (error.kind, error.name) == ("mirror", "tap")
    assert error.message == ("INVALID_ARGUMENT: spec.mirror_interface: no interface"
                             " 'mirror0' on this node")
    # the rest applies on node a
    wait_for(lambda: mirrors_on(a) == {"eth1": "lo"}, what="node-a's other mirror")
    wait_for(lambda: blocked(a) == {"198.18.66.0/24"}, what="node-a's blocklist")
    # the interface appears: the next drift check takes the mirror and the node is SYNCED
    a.datapath.node.firewall.links.by_name["mirror0"] = 9
    wait_for(lambda: synced(client, "node-a", client.sync_status().generation),
             what="node-a synced")
    assert mirrors_on(a) == {"eth0": "mirror0", "eth1": "lo"}
    # deleted in policyd: deleted on the nodes
    client.delete_mirror("tap")
    generation = client.sync_status().generation
    for name, node in (("node-a", a), ("node-b", b)):
        wait_for(lambda n=name: synced(client, n, generation), what=f"{name} synced")
        assert mirrors_on(node) == {"eth1": "lo"}


def test_dpd_summary_has_mirrors(fake_node):
    node = fake_node("a").start()
    servicer = node.datapath
    servicer.PutMirrors(datapath_pb2.PutMirrorsRequest(
        mirrors=[datapath_pb2.Mirror(interface="eth0", mirror_interface="eth1")]), None)
    tables = {t.table: t for t in servicer.GetSummary(datapath_pb2.GetSummaryRequest(),
                                                      None).tables}
    assert (tables["mirrors"].generation, tables["mirrors"].count) == (1, 1)
