"""xlbctl for blocklists and mirrors: ``kind: Blocklist`` / ``kind: Mirror`` documents
through apply -f, get -o yaml (taken back unchanged), delete -f, the tables, and the
``blocklist`` / ``mirror`` subcommands; the objects reach a node (dpd's real servicer
over in-memory maps)."""

from __future__ import annotations

import json

import yaml

from tests.unit.test_xlbctl_documents import xlbctl

SITE = """\
kind: Node
metadata: {name: node-a}
spec: {address: ADDRESS}
---
kind: Blocklist
metadata: {name: scanners}
spec:
  prefixes: [198.18.66.0/24, "2001:db8:66::/48"]
---
kind: Blocklist
metadata: {name: abuse, nodeSelector: {zone: west}}
spec:
  prefixes: [198.18.66.0/24]
---
kind: Mirror
metadata: {name: tap}
spec: {interface: eth0, mirror_interface: eth1}
"""


def test_documents_roundtrip_and_reach_the_node(capsys, policyd, fake_node, tmp_path,
                                                wait_for):
    node = fake_node("a").start()
    server = policyd()
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("ADDRESS", node.address))
    rc, out, err = xlbctl(capsys, server, "apply", "-f", str(site))
    assert rc == 0, err
    assert out.splitlines() == [
        f"node/node-a registered ({node.address})",
        "blocklist/scanners configured (generation 1)",
        "blocklist/abuse configured (generation 1)",
        "mirror/tap configured (generation 1)",
    ]
    wait_for(lambda: {b.prefix for b in node.datapath.node.blocklist.entries()} == {
        "198.18.66.0/24", "2001:db8:66::/48"}, what="the blocklist on the node")
    wait_for(lambda: [m.spec.mirror_interface for m in node.datapath.node.mirrors.entries()]
             == ["eth1"], what="the mirror on the node")

    text = ""
    for kind in ("blocklists", "mirrors"):
        rc, more, _ = xlbctl(capsys, server, "get", kind, "-o", "yaml")
        text += "\n---\n" + more
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("Blocklist", "abuse"), ("Blocklist", "scanners"), ("Mirror", "tap")]
    assert docs[1]["spec"] == {"prefixes": ["198.18.66.0/24", "2001:db8:66::/48"]}
    assert docs[0]["metadata"]["nodeSelector"] == {"zone": "west"}
    assert docs[2]["spec"] == {"interface": "eth0", "mirror_interface": "eth1"}
    back = tmp_path / "back.yaml"
    back.write_text(text)
    rc, out, _ = xlbctl(capsys, server, "apply", "-f", str(back))
    assert rc == 0 and "configured" not in out, out

    rc, out, _ = xlbctl(capsys, server, "get", "bl")
    assert out.splitlines()[0].split() == ["NAME", "PREFIXES", "GENERATION"]
    assert "198.18.66.0/24,2001:db8:66::/48" in out
    rc, out, _ = xlbctl(capsys, server, "get", "mirror", "tap")
    assert out.splitlines()[1].split() == ["tap", "eth0", "eth1", "1"]
    wait_for(lambda: xlbctl(capsys, server, "status", "-o", "table")[0] == 0, what="SYNCED")
    rc, out, _ = xlbctl(capsys, server, "status", "-o", "wide")
    assert out.split()[:6] == ["NODE", "STATE", "OBSERVED", "SERVICES", "RULES", "ROUTES"]
    assert "BLOCKED" in out and "MIRRORS" in out

    rc, out, _ = xlbctl(capsys, server, "delete", "-f", str(site))
    assert rc == 0
    assert out.splitlines() == ["mirror/tap deleted", "blocklist/scanners deleted",
                                "blocklist/abuse deleted", "node/node-a deregistered"]


def test_subcommands(capsys, policyd):
    server = policyd()
    rc, out, err = xlbctl(capsys, server, "blocklist", "apply", "--name", "bad",
                          "--prefix", "198.18.66.7", "--prefix", "2001:db8:66::/48")
    assert rc == 0, err
    assert json.loads(out)["spec"]["prefixes"] == ["198.18.66.7/32", "2001:db8:66::/48"]
    rc, out, err = xlbctl(capsys, server, "blocklist", "apply", "--name", "worse",
                          "--prefix", "198.18.66.1/24")
    assert rc == 1
    assert "INVALID_ARGUMENT: blocklist.spec.prefixes[0]: '198.18.66.1/24' has host bits" in err
    rc, out, err = xlbctl(capsys, server, "mirror", "apply", "--name", "tap",
                          "--interface", "eth0", "--mirror-interface", "mirror0")
    assert rc == 0, err
    rc, out, _ = xlbctl(capsys, server, "mirror", "get", "tap")
    assert json.loads(out)["spec"] == {"interface": "eth0", "mirror_interface": "mirror0"}
    rc, out, _ = xlbctl(capsys, server, "blocklist", "list")
    assert [b["name"] for b in json.loads(out)] == ["bad"]
    rc, out, _ = xlbctl(capsys, server, "mirror", "delete", "tap")
    assert json.loads(out) == {"deleted": "tap"}
    rc, out, _ = xlbctl(capsys, server, "delete", "blocklists", "bad")
    assert out.strip() == "blocklist/bad deleted"
    rc, out, _ = xlbctl(capsys, server, "get", "mirrors")
    assert out.strip() == "no mirrors"
