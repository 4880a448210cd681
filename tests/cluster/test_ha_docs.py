"""docs/ha.md's commands as written: etcd, two xlb-policyd replicas, etcdctl, grpcurl and
xlbctl run in a network namespace of this test whose loopback holds the doc's addresses
(198.18.30.2 and .3 the replicas, .5 etcd, .7 a node address where nothing answers).
Only etcd's --data-dir is swapped for the test's directory."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

import pytest

from lab import netns
from lab.topology import Topology
from tests.docs_examples import commands as split_commands
from tests.unit.test_policyd_grpcurl import grpcurl  # noqa: F401 (fixture)

pytestmark = pytest.mark.root

DOC = Path(__file__).resolve().parents[2] / "docs" / "ha.md"
BIN = Path(sys.executable).parent
ADDRESSES = ("198.18.30.2", "198.18.30.3", "198.18.30.5", "198.18.30.7")


def commands(block: str) -> list[list[str]]:
    """A sh block's commands; a comment after two spaces ends any line (the doc's comments
    also follow the last line of a continued command)."""
    return split_commands(re.sub(r" {2,}# [^\n]*", "", block))


def sh_blocks() -> list[list[list[str]]]:
    return [commands(b) for b in re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)]


def refusal_in_doc() -> str:
    """The follower's refusal as the doc quotes it (the plain block after its bullets)."""
    text = DOC.read_text()
    return re.search(r"```\n(policyd replica p2 is a follower: .*?)\n```", text).group(1)


def test_the_ha_docs_commands_work_as_written(grpcurl):  # noqa: F811
    etcd_block, replicas_block, leader_block, example_block = sh_blocks()
    assert [c[0] for c in etcd_block] == ["etcd"]
    assert [c[0] for c in replicas_block] == ["xlb-policyd", "xlb-policyd"]
    assert [c[0] for c in leader_block] == ["etcdctl"]
    assert [c[0] for c in example_block] == ["grpcurl"] * 5 + ["xlbctl"] * 2 + ["etcdctl"]

    with Topology(backends=1, prefix="xlbha" + secrets.token_hex(2)) as topo:
        ns = topo.client_ns
        for address in ADDRESSES:
            netns.run(None, ["ip", "-n", ns, "addr", "add", f"{address}/32", "dev", "lo"])
        netns.run(None, ["ip", "-n", ns, "link", "set", "lo", "up"])
        logs: list[Path] = []
        outputs: list[TextIO] = []

        def argv_of(cmd: list[str]) -> list[str]:
            exe = {"grpcurl": grpcurl, "xlb-policyd": str(BIN / "xlb-policyd"),
                   "xlbctl": str(BIN / "xlbctl")}.get(cmd[0], cmd[0])
            return [exe, *(str(topo.workdir / "etcd") if a == "/var/lib/xlb/etcd" else a
                           for a in cmd[1:])]

        def start(cmd: list[str], name: str) -> None:
            logs.append(topo.workdir / f"{name}.log")
            outputs.append(open(logs[-1], "w"))  # noqa: SIM115 (closed at the end)
            topo.popen(ns, argv_of(cmd), stdout=outputs[-1], stderr=subprocess.STDOUT)

        def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
            return topo.run(ns, argv_of(cmd), check=False, timeout=30)

        def until(cmd: list[str], ok, what: str) -> subprocess.CompletedProcess[str]:
            deadline = time.monotonic() + 20
            while True:
                done = run(cmd)
                if done.returncode == 0 and ok(done.stdout):
                    return done
                assert time.monotonic() < deadline, f"{what}: {done.stdout}{done.stderr}"
                time.sleep(0.2)

        try:
            start(etcd_block[0], "etcd")
            leader = leader_block[0]
            until(leader, lambda out: True, "etcd to answer")
            start(replicas_block[0], "p1")
            got = until(leader, lambda out: "p1" in out, "p1 to lead")
            assert got.stdout.splitlines() == ["/xlb/policyd/leader",
                                               '{"name": "p1", "address": "198.18.30.2:50151"}']
            start(replicas_block[1], "p2")
            until([grpcurl, "-plaintext", "198.18.30.3:50151", "list"],
                  lambda out: "xlb.policy.v1.Policy" in out, "p2 to serve")
            assert run(leader).stdout == got.stdout  # p1 still leads

            register, apply_leader, apply_follower, get, status, *rest = example_block
            xlbctl_list, xlbctl_status, etcdctl_status = rest
            done = run(register)
            assert done.returncode == 0, done.stderr
            done = run(apply_leader)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["generation"] == "1"
            done = run(apply_follower)
            assert done.returncode != 0 and "Code: Unavailable" in done.stderr
            assert f"Message: {refusal_in_doc()}" in done.stderr, done.stderr
            got_web = json.loads(until(get, lambda out: True, "p2 to hold web").stdout)
            assert (got_web["name"], got_web["generation"]) == ("web", "1")
            reported = json.loads(until(
                status, lambda out: "SYNC_STATE_ERROR" in out, "p2 to serve node1's status"
            ).stdout)
            node = reported["nodes"][0]
            assert node["node"] == "node1" and node["state"] == "SYNC_STATE_ERROR"
            assert "198.18.30.7:50051" in node["message"], node
            done = run(xlbctl_list)
            assert done.returncode == 0 and "web" in done.stdout, done.stderr
            done = run(xlbctl_status)
            assert done.returncode == 0 and "node1" in done.stdout, done.stderr
            done = run(etcdctl_status)
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines()[0] == "/xlb/policyd/status/node1"
            assert json.loads(done.stdout.splitlines()[1])["state"] == 3  # ERROR
        except AssertionError:
            for log in logs:
                sys.stderr.write(f"--- {log.name} ---\n{log.read_text()[-3000:]}\n")
            raise
        finally:
            for out in outputs:
                out.close()
