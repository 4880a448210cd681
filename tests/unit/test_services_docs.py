"""docs/services.md's "Through policyd" section as written: its grpcurl commands (the
real binary) against policyd in this process, its xlbctl lines (the ``--dpd`` view
against dpd's servicer over in-memory maps), the table it shows and its YAML example
(xlbctl apply -f). Only the socket paths are swapped for the test's. The "Through dpd"
examples run against a real node in tests/e2e/test_ranges.py."""

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
    return doc_section("services.md")


def blocks(lang: str) -> list[str]:
    return fenced(section(), lang)


def test_the_grpcurl_commands_work_as_written(grpcurl, policyd):  # noqa: F811
    server = policyd()
    socket = server.address.removeprefix("unix:")
    cmds = commands(blocks("sh")[0])
    assert [c[-1].rsplit("/", 1)[1] for c in cmds] == ["ApplyService", "ApplyService",
                                                       "GetService"]
    replies = []
    for argv in cmds:
        argv = [grpcurl if a == "grpcurl" else a.replace(SOCKET, socket) for a in argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        replies.append(done)
    assert replies[0].returncode == 0, replies[0].stderr
    # as the doc says: the overlapping range is refused, naming the service it overlaps
    assert replies[1].returncode != 0 and "Code: FailedPrecondition" in replies[1].stderr
    assert "'games'" in replies[1].stderr and "8000-8099" in replies[1].stderr
    got = json.loads(replies[2].stdout)
    assert (got["name"], got["port"], got["port_last"]) == ("games", 8000, 8099)
    with cli.PolicyClient(server.address) as client:
        assert [s.name for s in client.list_services()] == ["games"]


def test_the_xlbctl_lines_table_and_yaml_work_as_written(capsys, policyd, fake_node, tmp_path,
                                                         monkeypatch, wait_for):
    server = policyd()
    node = fake_node("a").start()
    monkeypatch.chdir(tmp_path)
    with cli.PolicyClient(server.address) as client:
        client.register_node("node1", node.address)
    shown = ""
    for argv in commands(blocks("sh")[1]):
        assert argv[0] == "xlbctl"
        redirect = argv.index(">") if ">" in argv else None
        args = argv[1:redirect] if redirect else argv[1:]
        if args[0] == "--dpd":
            assert args[1] == DPD_SOCKET
            wait_for(lambda: len(node.datapath.node.list_services()) == 3, what="on the node")
            rc = cli.main(["--dpd", node.address, *args[2:]])
            out, err = capsys.readouterr()
            assert rc == 0, err
            assert sorted(line.split()[0] for line in out.splitlines()[1:]) == [
                "198.19.0.10:8000-8099", "198.19.0.10:8080", "198.19.0.11:*"]
            continue
        rc = cli.main(["--server", server.address, *args])
        out, err = capsys.readouterr()
        assert rc == 0, (argv, err)
        if args[:2] == ["get", "services"] and not redirect:
            shown = out
        if redirect:
            Path(argv[redirect + 1]).write_text(out)
        if args[:2] == ["apply", "-f"]:
            assert "configured" not in out and out.count("unchanged") == 3, out
    table = re.search(r"```\n(NAME .*?)```", section(), re.S)
    assert table is not None and shown.split() == table.group(1).split()

    (example,) = blocks("yaml")
    path = tmp_path / "site.yaml"
    path.write_text(example)
    assert cli.main(["--server", server.address, "apply", "-f", str(path)]) == 0
    # the documents say what the xlbctl lines said: nothing changes
    assert capsys.readouterr().out.splitlines() == [
        "service/games unchanged (generation 1)", "service/rest unchanged (generation 1)"]
