"""xlbctl for people: apply -f, get -o yaml|json|wide, delete -f, status as a table with
its exit code, --version, completion, the node views (--dpd). policyd in-process, dpd's
real servicer over in-memory maps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from policyd import cli
from xlb.dpd.v1 import datapath_pb2
from xlb.types.v1 import types_pb2

SITE = """\
apiVersion: xlb.policy/v1
kind: Node
metadata: {name: node-a, labels: {zone: east}}
spec: {address: ADDRESS}
---
kind: Service
metadata:
  name: web
spec:
  vip: 198.19.0.10
  port: 80
  protocol: PROTOCOL_TCP
  endpoints:
    - {address: 198.18.1.2, port: 8080, weight: 2}
    - {address: 198.18.1.3, port: 8080}
---
kind: Service
metadata:
  name: west-only
  nodeSelector: {zone: west}
spec:
  vip: 198.19.0.11
  port: 53
  protocol: PROTOCOL_UDP
  endpoints: [{address: 198.18.1.2, port: 53}]
---
kind: FirewallRule
metadata: {name: no-telnet}
spec:
  priority: 100
  action: FIREWALL_ACTION_DROP
  match: {protocol: PROTOCOL_TCP, dst_ports: {first: 23, last: 23}}
  flush_existing: true
---
kind: Route
metadata: {name: lab, nodeSelector: {zone: east}}
spec:
  prefix: 198.20.0.0/16
  next_hops: [{interface: lo}]
"""


def xlbctl(capsys, server, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["--server", server.address, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_apply_get_roundtrip_delete_and_status(capsys, policyd, fake_node, tmp_path,
                                               wait_for):
    node = fake_node("a").start()
    server = policyd()
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("ADDRESS", node.address))

    rc, out, _ = xlbctl(capsys, server, "apply", "-f", str(site))
    assert rc == 0, out
    assert out.splitlines() == [
        f"node/node-a registered ({node.address})",
        "firewall-rule/no-telnet configured (generation 1)",
        "route/lab configured (generation 1)",
        "service/web configured (generation 1)",
        "service/west-only configured (generation 1)",
    ]
    rc, out, _ = xlbctl(capsys, server, "apply", "-f", str(site))  # again: nothing moves
    assert rc == 0 and "service/web unchanged (generation 1)" in out

    # get -o yaml gives back what apply -f takes, and applying it changes nothing
    rc, text, _ = xlbctl(capsys, server, "get", "services", "-o", "yaml")
    docs = list(yaml.safe_load_all(text))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("Service", "web"), ("Service", "west-only")]
    assert docs[1]["metadata"]["nodeSelector"] == {"zone": "west"}
    assert docs[0]["metadata"]["generation"] == 1
    for kind in ("firewall-rules", "routes", "nodes"):
        rc, more, _ = xlbctl(capsys, server, "get", kind, "-o", "yaml")
        text += "\n---\n" + more
    back = tmp_path / "back.yaml"
    back.write_text(text)
    rc, out, _ = xlbctl(capsys, server, "apply", "-f", str(back))
    assert rc == 0 and "configured" not in out, out
    rc, out, _ = xlbctl(capsys, server, "get", "firewall-rule", "no-telnet", "-o", "json")
    rule = json.loads(out)
    assert rule["spec"]["flush_existing"] is True and rule["kind"] == "FirewallRule"

    # a table, and wide
    rc, out, _ = xlbctl(capsys, server, "get", "svc")
    assert out.splitlines()[0].split() == ["NAME", "VIP", "PORT", "PROTO", "ENDPOINTS",
                                           "GENERATION"]
    assert "198.18.1.2:8080@2,198.18.1.3:8080@1" in out
    rc, out, _ = xlbctl(capsys, server, "get", "routes", "-o", "wide")
    assert "zone=east" in out and "dev lo" in out
    rc, out, _ = xlbctl(capsys, server, "get", "nodes")
    assert "zone=east" in out

    # compare-and-swap: a stale generation is refused, nothing written
    stale = back.read_text().replace("port: 80\n", "port: 81\n", 1)
    back.write_text(stale.replace("generation: 1", "generation: 7", 1))
    rc, out, err = xlbctl(capsys, server, "apply", "-f", str(back), "--cas")
    assert rc == 1 and "xlbctl: ABORTED: services[0]: service 'web' is at" in err

    # status: SYNCED is exit 0 with a table
    wait_for(lambda: xlbctl(capsys, server, "status", "-o", "table")[0] == 0, what="SYNCED")
    rc, out, _ = xlbctl(capsys, server, "status", "-o", "table")
    assert out.split()[:10] == ["NODE", "STATE", "OBSERVED", "SERVICES", "RULES", "ROUTES",
                                "DRIFT", "MESSAGE", "node-a", "SYNCED"]
    assert sorted(node.datapath.snapshot()) == [("198.19.0.10", 80, types_pb2.PROTOCOL_TCP)]

    # delete -f removes what the file names (the node last: deregistered)
    rc, out, _ = xlbctl(capsys, server, "delete", "-f", str(site))
    assert rc == 0
    assert out.splitlines() == ["service/web deleted", "service/west-only deleted",
                                "route/lab deleted", "firewall-rule/no-telnet deleted",
                                "node/node-a deregistered"]
    rc, out, err = xlbctl(capsys, server, "delete", "-f", str(site))
    assert rc == 1 and "NOT_FOUND" in err
    rc, out, _ = xlbctl(capsys, server, "delete", "-f", str(site), "--ignore-not-found")
    assert rc == 0 and "service/web not found" in out


def test_status_table_exits_nonzero_when_a_node_is_not_synced(capsys, policyd, fake_node,
                                                             wait_for):
    up, down = fake_node("up").start(), fake_node("down")  # down: never started
    server = policyd()
    xlbctl(capsys, server, "node", "register", "up", up.address, "--label", "zone=a")
    xlbctl(capsys, server, "node", "register", "down", down.address)
    wait_for(lambda: "ERROR" in xlbctl(capsys, server, "status", "-o", "table")[1],
             what="down ERROR")
    rc, out, _ = xlbctl(capsys, server, "status", "-o", "table")
    assert rc == 1
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows == {"down": "ERROR", "up": "SYNCED"}
    rc, out, _ = xlbctl(capsys, server, "status", "up", "-o", "wide")
    assert rc == 0 and "EPOCH" in out
    rc, out, _ = xlbctl(capsys, server, "status")  # not a terminal: JSON, as before
    assert rc == 0 and json.loads(out)["nodes"][0]["node"] == "down"


def test_bad_documents_name_the_place(capsys, policyd, tmp_path):
    server = policyd()
    path = tmp_path / "bad.yaml"
    path.write_text("kind: Service\nmetadata: {name: web}\nspec: {vip: 198.19.0.10}\n---\n"
                    "kind: Pod\nmetadata: {name: x}\n")
    with pytest.raises(SystemExit):
        cli.main(["--server", server.address, "apply", "-f", str(path)])
    assert "document 1.kind: 'Pod' is not one of" in capsys.readouterr().err
    path.write_text("kind: Route\nmetadata: {name: r}\n---\nkind: route\nmetadata: {name: r}\n")
    with pytest.raises(SystemExit):
        cli.main(["--server", server.address, "apply", "-f", str(path)])
    assert "document 1: Route 'r' is also in" in capsys.readouterr().err
    path.write_text("kind: Route\nmetadata: {name: r, labels: {a: b}}\nspec: {}\n")
    with pytest.raises(SystemExit):
        cli.main(["--server", server.address, "apply", "-f", str(path)])
    assert "metadata: 'labels' does not apply to a Route" in capsys.readouterr().err
    path.write_text("kind: Service\nmetadata: {name: web}\nspec: {vip: 198.19.0.10, port: 0,"
                    " endpoints: []}\n")
    rc, _, err = xlbctl(capsys, server, "apply", "-f", str(path))
    assert rc == 1 and "xlbctl: INVALID_ARGUMENT: services[0]." in err


def test_apply_file_takes_documents_too(capsys, policyd, tmp_path):
    server = policyd()
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"kind": "List", "apiVersion": "xlb.policy/v1", "items": [
        {"kind": "Service", "metadata": {"name": "web"}, "spec": {
            "vip": "198.19.0.10", "port": 80, "protocol": "PROTOCOL_TCP",
            "endpoints": [{"address": "198.18.1.2", "port": 80}]}}]}))
    rc = cli.main(["--server", server.address, "apply-file", str(path)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out == {"services": {"applied": 1, "generation": "1"}}


def test_version_and_completion(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("xlbctl ")
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -F _xlbctl xlbctl" in script
    assert '"get") opts="services firewall-rules routes nodes' in script
    done = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    words = subprocess.run(
        ["bash", "-c", script + '\nCOMP_WORDS=(xlbctl ge); COMP_CWORD=1; _xlbctl;'
         ' echo "${COMPREPLY[@]}"'], text=True, capture_output=True, check=True).stdout
    assert words.split() == ["get"]


def test_node_views_decode_the_tables(capsys, fake_node):
    node = fake_node("a").start()
    node.datapath.PutServices(datapath_pb2.PutServicesRequest(services=[datapath_pb2.Service(
        vip="198.19.0.10", port=80, protocol=types_pb2.PROTOCOL_TCP,
        endpoints=[types_pb2.Endpoint(address="198.18.1.2", port=8080, weight=3)])]), None)
    assert cli.main(["--dpd", node.address, "services"]) == 0
    out = capsys.readouterr().out
    assert out.split()[:5] == ["VIP", "PROTO", "ALGORITHM", "MODE", "ENDPOINTS"]
    assert "198.19.0.10:80" in out and "198.18.1.2:8080@3" in out and "round_robin" in out
    for view in ("conntrack", "stats", "interfaces", "rules", "routes"):
        assert cli.main(["--dpd", node.address, view]) == 0, view
    out = capsys.readouterr().out
    assert "198.19.0.10:80/tcp" in out  # stats: the service decoded
    with pytest.raises(SystemExit):
        cli.main(["services"])
    assert "--dpd" in capsys.readouterr().err


def test_module_runs_as_a_script():
    done = subprocess.run([sys.executable, "-m", "policyd.cli", "--version"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("xlbctl ")
