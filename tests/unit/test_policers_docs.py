"""docs/policers.md's "Through policyd" section as written: its grpcurl commands (the
real binary), its xlbctl lines (the policyd ones against policyd in this process, the
``--dpd`` view against dpd's servicer over in-memory maps) and its YAML example
(xlbctl apply -f). Only the socket paths are swapped for the test's."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from policyd import cli
from tests.docs_examples import commands, doc_section, fenced
from tests.unit.test_policyd_grpcurl import grpcurl  # noqa: F401 (fixture)

SOCKET = "/run/xlb/policyd.sock"
DPD_SOCKET = "unix:/run/xlb/dpd.sock"


def section() -> str:
    return doc_section("policers.md")


def blocks(lang: str) -> list[str]:
    return fenced(section(), lang)


def test_the_grpcurl_commands_work_as_written(grpcurl, policyd):  # noqa: F811
    server = policyd()
    socket = server.address.removeprefix("unix:")
    grpcurl_block, _xlbctl_block = blocks("sh")
    cmds = commands(grpcurl_block)
    assert [c[-1].rsplit("/", 1)[1] for c in cmds] == [
        "ApplyPolicer", "ApplyPolicers", "ApplyPolicer", "ListPolicers", "GetPolicer",
        "DeletePolicers"]
    replies = []
    for argv in cmds:
        argv = [grpcurl if a == "grpcurl" else a.replace(SOCKET, socket) for a in argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, (argv[-1], done.stderr)
        replies.append(done.stdout)
        if len(replies) == 3:  # as the doc says: the same again is ABORTED
            again = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                   check=False)
            assert again.returncode != 0 and "Code: Aborted" in again.stderr
    first = json.loads(replies[0])
    assert first["spec"] == {"rate_bps": "8000000", "burst_bytes": "30000",
                             "interfaces": ["eth0"]}
    assert (first["generation"], first["revision"]) == ("1", "1")
    assert json.loads(replies[2])["generation"] == "2"
    listed = [json.loads(b) for b in re.findall(r"^\{.*?^\}", replies[3], re.S | re.M)]
    assert [(p["name"], p.get("node_selector")) for p in listed] == [
        ("east-in", {"zone": "east"}), ("eth0-in", None)]
    assert json.loads(replies[4])["spec"]["rate_bps"] == "4000000"
    with cli.PolicyClient(server.address) as client:
        assert not client.list_policers()


def test_the_xlbctl_lines_and_yaml_work_as_written(capsys, policyd, fake_node, tmp_path,
                                                   monkeypatch):
    server = policyd()
    node = fake_node("a").start()
    monkeypatch.chdir(tmp_path)
    with cli.PolicyClient(server.address) as client:  # a node, for status's table
        client.register_node("node1", node.address)
    _grpcurl_block, xlbctl_block = blocks("sh")
    for argv in commands(xlbctl_block):
        assert argv[0] == "xlbctl"
        redirect = argv.index(">") if ">" in argv else None
        args = argv[1:redirect] if redirect else argv[1:]
        if args[0] == "--dpd":
            assert args[1] == DPD_SOCKET
            rc = cli.main(["--dpd", node.address, *args[2:]])
            out, err = capsys.readouterr()
            assert rc == 0, err
            assert out.split()[:4] == ["NAME", "RATE-BPS", "BURST-BYTES", "INTERFACES"]
            continue
        rc = cli.main(["--server", server.address, *args])
        out, err = capsys.readouterr()
        if args[0] == "status":
            assert "POLICERS" in out
            continue
        assert rc == 0, (argv, err)
        if redirect:
            Path(argv[redirect + 1]).write_text(out)
    assert cli.main(["--server", server.address, "apply", "-f", "eth0-in.yaml"]) == 0
    assert "policer/eth0-in unchanged (generation 1)" in capsys.readouterr().out

    (example,) = blocks("yaml")
    path = tmp_path / "site.yaml"
    path.write_text(example)
    assert cli.main(["--server", server.address, "apply", "-f", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "policer/eth0-in unchanged (generation 1)",
        "policer/east-in configured (generation 1)",
    ]
