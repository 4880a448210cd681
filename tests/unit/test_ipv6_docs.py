"""docs/ipv6.md's "Through policyd" section as written: its grpcurl commands (the real
binary) against policyd in this process, its xlbctl lines (the policyd ones against that
policyd, the ``--dpd`` view against a node's dpd servicer over in-memory maps), its YAML
document (xlbctl apply -f) and the table it shows; what it says of unquoted addresses and
of another spelling of a VIP. Only the socket paths are swapped for the test's. The dpd
example runs against a real node in tests/e2e/test_ipv6.py."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from policyd import cli
from tests.docs_examples import commands, doc_section, fenced
from tests.unit.test_policyd_grpcurl import grpcurl  # noqa: F401 (fixture)

SOCKET = "/run/xlb/policyd.sock"
DPD_SOCKET = "unix:/run/xlb/dpd.sock"
VIP = "2001:db8:ff::10"
EP1, EP2 = "2001:db8:11::2", "2001:db8:12::2"


def section() -> str:
    return doc_section("ipv6.md")


def blocks(lang: str) -> list[str]:
    return fenced(section(), lang)


def test_the_grpcurl_commands_work_as_written(grpcurl, policyd, fake_node,  # noqa: F811
                                              wait_for):
    server = policyd()
    node = fake_node("a").start()
    with cli.PolicyClient(server.address) as client:
        client.register_node("node1", node.address)
    socket = server.address.removeprefix("unix:")
    cmds = commands(blocks("sh")[0])
    assert [c[-1].rsplit("/", 1)[1] for c in cmds] == ["ApplyService", "GetService"]
    replies = []
    for argv in cmds:
        argv = [grpcurl if a == "grpcurl" else a.replace(SOCKET, socket) for a in argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, (argv[-1], done.stderr)
        replies.append(json.loads(done.stdout))
    assert replies[0]["generation"] == "1"
    got = replies[1]
    assert (got["name"], got["vip"], got["port"]) == ("web6", VIP, 80)
    assert [(e["address"], e["port"], e.get("weight", 1)) for e in got["endpoints"]] == [
        (EP1, 8080, 1), (EP2, 8080, 2)]
    # and it reaches the node as applied
    (svc,) = wait_for(lambda: node.datapath.node.list_services(), what="on the node")
    assert (svc.vip, svc.port, [(e.address, e.port, e.weight) for e in svc.endpoints]) == (
        VIP, 80, [(EP1, 8080, 1), (EP2, 8080, 2)])


def test_the_xlbctl_lines_yaml_and_table_work_as_written(capsys, policyd, fake_node,
                                                         tmp_path, monkeypatch, wait_for):
    server = policyd()
    node = fake_node("a").start()
    monkeypatch.chdir(tmp_path)
    with cli.PolicyClient(server.address) as client:
        client.register_node("node1", node.address)
    (document,) = blocks("yaml")
    (tmp_path / "dns6.yaml").write_text(document)
    shown = ""
    for argv in commands(blocks("sh")[1]):
        assert argv[0] == "xlbctl"
        args = argv[1:]
        if args[0] == "--dpd":
            assert args[1] == DPD_SOCKET
            wait_for(lambda: len(node.datapath.node.list_services()) == 2, what="on the node")
            rc = cli.main(["--dpd", node.address, *args[2:]])
            out, err = capsys.readouterr()
            assert rc == 0, err
            assert sorted(line.split()[0] for line in out.splitlines()[1:]) == [
                f"[{VIP}]:53", f"[{VIP}]:80"], out
            continue
        rc = cli.main(["--server", server.address, *args])
        out, err = capsys.readouterr()
        assert rc == 0, (argv, err)
        if args[:2] == ["get", "services"]:
            shown = out
    table = re.search(r"```\n(NAME .*?)```", section(), re.S)
    assert table is not None and shown.split() == table.group(1).split(), shown
    by_port = {s.port: s for s in node.datapath.node.list_services()}
    assert (by_port[53].mode.name, [(e.address, e.port) for e in by_port[53].endpoints]) == (
        "FULLNAT", [(EP1, 5353), (EP2, 5353)])

    # as the page says: unquoted, 2001:0:0:0:0:0:0:10 is a number, refused before sending
    bad = tmp_path / "bad.yaml"
    bad.write_text(document.replace(f'"{VIP}"', "2001:0:0:0:0:0:0:10")
                   .replace("name: dns6", "name: other"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--server", server.address, "apply", "-f", str(bad)])
    assert exit_.value.code == 2
    assert "Failed to parse vip field: expected string or bytes-like object, got 'int'" in \
        capsys.readouterr().err
    flow = tmp_path / "flow.yaml"
    flow.write_text(document.replace(f'"{EP1}"', "::1").replace("name: dns6", "name: other"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--server", server.address, "apply", "-f", str(flow)])
    assert exit_.value.code == 2
    assert "while parsing a flow node" in capsys.readouterr().err
    # another name at the same key, spelled otherwise: refused, nothing stored
    assert cli.main(["--server", server.address, "service", "apply", "--name", "other",
                     "--vip", "2001:DB8:ff:0:0:0:0:10", "--port", "80",
                     "--endpoint", f"[{EP1}]:8080"]) != 0
    capsys.readouterr()
    with cli.PolicyClient(server.address) as client:
        assert sorted(s.name for s in client.list_services()) == ["dns6", "web6"]
        assert {s.vip for s in client.list_services()} == {VIP}
