"""docs/policyd.md as written: its grpcurl commands (the real binary) and its YAML
example (xlbctl apply -f) against policyd in this process. Only the socket path is
swapped for the test's; streams get a deadline."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from policyd import cli
from policyd.client import PolicyClient, make_route
from tests.unit.test_policyd_grpcurl import grpcurl  # noqa: F401 (fixture)

DOC = Path(__file__).resolve().parents[2] / "docs" / "policyd.md"
SOCKET = "/run/xlb/policyd.sock"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def commands() -> list[list[str]]:
    """Every grpcurl command of the doc's sh blocks, comments and continuations handled."""
    out = []
    for block in blocks("sh"):
        text = re.sub(r"\\\n\s*", " ", block)
        pending = ""
        for line in text.splitlines():
            if not pending:
                line = line.split(" # ")[0].strip()
                if not line.startswith("grpcurl "):
                    continue
            pending += line + "\n"
            if pending.count("'") % 2 == 0:  # quotes closed: the command is whole
                out.append(shlex.split(pending))
                pending = ""
    return out


def run(argv: list[str], socket: str, stream: bool) -> subprocess.CompletedProcess[str]:
    argv = [a.replace(SOCKET, socket) for a in argv]
    if stream:
        argv[1:1] = ["-max-time", "1"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_the_docs_grpcurl_commands_work_as_written(grpcurl, policyd):  # noqa: F811
    server = policyd()
    socket = server.address.removeprefix("unix:")
    cmds = commands()
    assert [c[-1] for c in cmds] == [
        "xlb.policy.v1.Policy/ApplyService", "xlb.policy.v1.Policy/Watch",
        "xlb.policy.v1.Policy/Watch", "xlb.policy.v1.Policy/WatchSyncStatus"]
    apply_web, watch_all, watch_routes, watch_status = cmds
    for argv in cmds:
        argv[0] = grpcurl

    done = run(apply_web, socket, stream=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["generation"] == "1"
    done = run(apply_web, socket, stream=False)  # as the doc says: the second is refused
    assert "Code: Aborted" in done.stderr and "is at generation 1, not 0" in done.stderr

    done = run(watch_all, socket, stream=True)
    events = [json.loads(e) for e in re.findall(r"^\{.*?^\}", done.stdout, re.S | re.M)]
    assert [(e.get("type"), e.get("name")) for e in events] == [
        ("EVENT_TYPE_PUT", "web"), ("EVENT_TYPE_CURRENT", None)]
    assert "DeadlineExceeded" in done.stderr  # the stream was still open: -max-time ended it

    done = run(watch_routes, socket, stream=True)  # from 41: the store is at 1 now
    assert "OutOfRange" in done.stderr and "ahead of the store's revision 1" in done.stderr
    routes = [make_route(f"r{i}", f"198.20.{i}.0/24", ["198.18.1.1"]) for i in range(41)]
    with PolicyClient(server.address) as client:
        for route in routes:
            client.apply_route(route)
        client.delete_route("r0")
        done = run(watch_routes, socket, stream=True)
        events = [json.loads(e) for e in re.findall(r"^\{.*?^\}", done.stdout, re.S | re.M)]
        assert [(e["type"], e["name"], e["revision"]) for e in events] == [
            ("EVENT_TYPE_PUT", "r40", "42"), ("EVENT_TYPE_DELETE", "r0", "43")]

        done = run(watch_status, socket, stream=True)
        assert "NotFound" in done.stderr and "node 'node1' not found" in done.stderr
        client.register_node("node1", f"unix:{socket}.none")
        done = run(watch_status, socket, stream=True)
        events = [json.loads(e) for e in re.findall(r"^\{.*?^\}", done.stdout, re.S | re.M)]
        assert events[0]["node"]["node"] == "node1" and events[-1]["current"] is True


def test_the_docs_yaml_example_applies(capsys, policyd, tmp_path):
    server = policyd()
    (example,) = blocks("yaml")
    path = tmp_path / "site.yaml"
    path.write_text(example)
    assert cli.main(["--server", server.address, "apply", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "node/node1 registered (unix:/run/xlb/dpd.sock)",
        "firewall-rule/no-telnet configured (generation 1)",
        "route/lab configured (generation 1)",
        "service/web configured (generation 1)",
    ]


@pytest.mark.parametrize("needle", ["xlbctl apply -f", "EVENT_TYPE_CURRENT",
                                    "drift_repaired_total", "expected_generation"])
def test_the_doc_covers(needle):
    assert needle in DOC.read_text()
