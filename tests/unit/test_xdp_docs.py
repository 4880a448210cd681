"""docs/xdp.md's "Through policyd" section as written: its grpcurl commands (the real
binary), its xlbctl lines and its YAML example (xlbctl apply -f) against policyd in this
process. Only the socket path is swapped for the test's."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from policyd import cli
from tests.docs_examples import commands, doc_section, fenced
from tests.unit.test_policyd_grpcurl import grpcurl  # noqa: F401 (fixture)

SOCKET = "/run/xlb/policyd.sock"


def section() -> str:
    return doc_section("xdp.md")


def blocks(lang: str) -> list[str]:
    return fenced(section(), lang)


def test_the_grpcurl_commands_work_as_written(grpcurl, policyd):  # noqa: F811
    server = policyd()
    socket = server.address.removeprefix("unix:")
    (xlbctl_block, _grpcurl_block) = blocks("sh")
    cmds = commands(_grpcurl_block)
    assert [c[-1].rsplit("/", 1)[1] for c in cmds] == [
        "ApplyBlocklist", "ApplyBlocklists", "ListBlocklists", "ApplyMirror", "GetMirror",
        "DeleteBlocklists", "DeleteMirror"]
    replies = []
    for argv in cmds:
        argv = [grpcurl if a == "grpcurl" else a.replace(SOCKET, socket) for a in argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, (argv[-1], done.stderr)
        replies.append(done.stdout)
    applied = json.loads(replies[0])
    assert applied["spec"]["prefixes"] == ["198.18.66.0/24", "2001:db8:66::/48"]
    assert applied["generation"] == "1"
    listed = [json.loads(b) for b in re.findall(r"^\{.*?^\}", replies[2], re.S | re.M)]
    assert [(b["name"], b.get("node_selector")) for b in listed] == [
        ("abuse", {"zone": "east"}), ("scanners", None)]
    assert json.loads(replies[4])["spec"] == {"interface": "eth0", "mirror_interface": "eth1"}
    assert not list(cli.PolicyClient(server.address).list_blocklists())


def test_the_xlbctl_lines_and_yaml_work_as_written(capsys, policyd, tmp_path, monkeypatch):
    server = policyd()
    monkeypatch.chdir(tmp_path)
    with cli.PolicyClient(server.address) as client:  # a node, for status's table
        client.register_node("node1", f"unix:{tmp_path}/none.sock")
    (xlbctl_block, _grpcurl_block) = blocks("sh")
    for argv in commands(xlbctl_block):
        assert argv[0] == "xlbctl"
        redirect = argv.index(">") if ">" in argv else None
        args = argv[1:redirect] if redirect else argv[1:]
        rc = cli.main(["--server", server.address, *args])
        out, err = capsys.readouterr()
        if args[0] == "status":
            assert "BLOCKED" in out and "MIRRORS" in out
            continue
        assert rc == 0, (argv, err)
        if redirect:
            Path(argv[redirect + 1]).write_text(out)
    assert cli.main(["--server", server.address, "apply", "-f", "tap.yaml"]) == 0
    assert "mirror/tap unchanged (generation 1)" in capsys.readouterr().out

    (example,) = blocks("yaml")
    path = tmp_path / "site.yaml"
    path.write_text(example)
    assert cli.main(["--server", server.address, "apply", "-f", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "blocklist/scanners configured (generation 1)",
        "blocklist/abuse configured (generation 1)",
        "mirror/tap configured (generation 2)",
    ]
