"""Blocklists and mirrors through policyd onto two real dpd processes: a Blocklist
applied once reaches both nodes (read back from each with ListBlocklist) and drops
each node's blocked client in XDP; a prefix removed by hand through one dpd is put back
at the next drift check; a Mirror whose mirror interface only node1 has is held there
and is an ObjectError on node2, which takes it once the interface appears."""

from __future__ import annotations

import pytest

from lab import netns
from lab.client import run_udp_who
from tests.cluster.conftest import VIP, wait_until
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.types.v1 import types_pb2 as tpb

pytestmark = pytest.mark.root

SYNCED, ERROR = ppb.SYNC_STATE_SYNCED, ppb.SYNC_STATE_ERROR
CLIENT = "198.18.0.2"  # each topology's client


def blocked(cluster, name: str) -> dict[str, int]:
    return {b.prefix: b.counters.packets for b in cluster.datapath(name).ListBlocklist(
        dpb.ListBlocklistRequest(), timeout=5)}


def mirrors(cluster, name: str) -> dict[str, str]:
    return {m.interface: m.mirror_interface for m in cluster.datapath(name).ListMirrors(
        dpb.ListMirrorsRequest(), timeout=5)}


def test_a_blocklist_reaches_both_nodes_and_drops_in_xdp(cluster):
    svc = cluster.policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
        name="dns", vip=VIP, port=53, protocol=tpb.PROTOCOL_UDP,
        endpoints=[tpb.Endpoint(address=f"198.18.{i}.2", port=8080) for i in (1, 2)])),
        timeout=5)
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=svc.revision)
        cluster.datapath(name).AttachInterface(dpb.AttachInterfaceRequest(
            name="c0", xdp_mode=dpb.XDP_MODE_NATIVE), timeout=10)
    for topo in cluster.topos:
        assert run_udp_who(topo, VIP, 53, count=3).get("errors") == 0

    reply = cluster.policy.ApplyBlocklists(ppb.ApplyBlocklistsRequest(blocklists=[
        ppb.Blocklist(name="clients", spec=ppb.BlocklistSpec(prefixes=[CLIENT])),
        ppb.Blocklist(name="more", spec=ppb.BlocklistSpec(
            prefixes=[CLIENT, "198.18.66.0/24", "2001:db8:66::/48"]))]), timeout=5)
    want = {f"{CLIENT}/32", "198.18.66.0/24", "2001:db8:66::/48"}
    for name in cluster.nodes:
        st = cluster.wait_state(name, SYNCED, generation=reply.generation)
        assert st.blocklist_prefixes == 3
        assert set(blocked(cluster, name)) == want
    for name, topo in zip(cluster.nodes, cluster.topos, strict=True):
        assert run_udp_who(topo, VIP, 53, count=3, timeout=0.5).get("errors") == 3
        assert blocked(cluster, name)[f"{CLIENT}/32"] >= 3
        stats = cluster.datapath(name).GetStats(dpb.GetStatsRequest(), timeout=5)
        assert stats.global_counters["drop_blocklist"] >= 3

    # one of the two objects holding the client goes: the prefix stays blocked
    cluster.policy.DeleteBlocklist(ppb.DeleteBlocklistRequest(name="clients"), timeout=5)
    generation = cluster.policy.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5).generation
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=generation)
        assert set(blocked(cluster, name)) == want

    # a hand edit through node1's dpd is repaired at the next drift check
    cluster.datapath("node1").DeleteBlocklist(dpb.DeleteBlocklistRequest(
        prefixes=["198.18.66.0/24"]), timeout=5)
    wait_until(lambda: set(blocked(cluster, "node1")) == want, 15, "node1 repaired")

    cluster.policy.DeleteBlocklist(ppb.DeleteBlocklistRequest(name="more"), timeout=5)
    generation = cluster.policy.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5).generation
    for name, topo in zip(cluster.nodes, cluster.topos, strict=True):
        cluster.wait_state(name, SYNCED, generation=generation)
        assert blocked(cluster, name) == {}
        assert run_udp_who(topo, VIP, 53, count=3).get("errors") == 0


def test_a_mirror_a_node_cannot_take_is_an_error_there_only(cluster):
    node1, node2 = cluster.topos
    netns.run(None, ["ip", "-n", node1.lb_ns, "link", "add", "bmmir0", "type", "veth",
                     "peer", "name", "bmmir1"])
    reply = cluster.policy.ApplyMirror(ppb.ApplyMirrorRequest(mirror=ppb.Mirror(
        name="tap", spec=ppb.MirrorSpec(interface="c0", mirror_interface="bmmir0"))),
        timeout=5)
    st = cluster.wait_state("node1", SYNCED, generation=reply.revision)
    assert (st.mirrors, mirrors(cluster, "node1")) == (1, {"c0": "bmmir0"})
    st = cluster.wait_state("node2", ERROR)
    assert [(e.kind, e.name, e.message) for e in st.errors] == [
        ("mirror", "tap", "INVALID_ARGUMENT: spec.mirror_interface: no interface 'bmmir0'"
                          " on this node")]
    assert mirrors(cluster, "node2") == {}
    # the interface appears on node2: it takes the mirror at its next drift check
    netns.run(None, ["ip", "-n", node2.lb_ns, "link", "add", "bmmir0", "type", "veth",
                     "peer", "name", "bmmir1"])
    st = cluster.wait_state("node2", SYNCED, generation=reply.revision, timeout=15)
    assert (st.mirrors, mirrors(cluster, "node2")) == (1, {"c0": "bmmir0"})
    cluster.policy.DeleteMirror(ppb.DeleteMirrorRequest(name="tap"), timeout=5)
    generation = cluster.policy.GetSyncStatus(ppb.GetSyncStatusRequest(), timeout=5).generation
    for name in cluster.nodes:
        cluster.wait_state(name, SYNCED, generation=generation)
        assert mirrors(cluster, name) == {}
