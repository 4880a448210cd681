"""docker-compose.yml against the code, without Docker: every daemon command parses with
its daemon's own argument parser, the setup job's xlbctl lines with xlbctl's, every
address is in 198.18.0.0/15, and the node containers ask only for what an engine without
--privileged grants (docs/cluster.md). make cluster-test runs the cluster for real."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpd.main import build_parser as dpd_parser
from policyd.cli import build_parser as xlbctl_parser
from policyd.main import build_parser as policyd_parser

ROOT = Path(__file__).resolve().parents[2]
LAB_NET = ipaddress.IPv4Network("198.18.0.0/15")
NODES = ("node1", "node2", "node3")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _shell(service: dict[str, Any]) -> str:
    """The script of a `sh -ec SCRIPT` / `bash -ec SCRIPT` command, compose's $$ undone."""
    command = service["command"]
    assert command[0] in ("sh", "bash") and command[1] == "-ec", command
    return str(command[2]).replace("$$", "$")


def test_every_address_is_in_the_lab_range(compose: dict[str, Any]) -> None:
    for name, net in compose["networks"].items():
        for pool in net["ipam"]["config"]:
            assert ipaddress.IPv4Network(pool["subnet"]).subnet_of(LAB_NET), name
            assert ipaddress.ip_address(pool["gateway"]) in LAB_NET, name
    text = (ROOT / "docker-compose.yml").read_text()
    quads = set(re.findall(r"(?<![\d.])(\d+\.\d+\.\d+\.\d+)(?![\d.])", text))
    assert quads
    outside = [q for q in quads if ipaddress.ip_address(q) not in LAB_NET
               and not ipaddress.ip_address(q).is_loopback
               and not ipaddress.ip_address(q).is_unspecified]
    assert outside == []


def test_each_container_address_is_in_its_network(compose: dict[str, Any]) -> None:
    subnets = {name: ipaddress.ip_network(net["ipam"]["config"][0]["subnet"])
               for name, net in compose["networks"].items()}
    seen: set[str] = set()
    for name, service in compose["services"].items():
        for net, conf in service.get("networks", {}).items():
            address = conf["ipv4_address"]
            assert ipaddress.ip_address(address) in subnets[net], (name, net)
            assert address not in seen, f"{address} given twice"
            seen.add(address)


def test_the_host_bridges_get_no_address(compose: dict[str, Any]) -> None:
    for name, net in compose["networks"].items():
        assert net.get("internal") is True, name
        opts = net.get("driver_opts", {})
        assert opts.get("com.docker.network.bridge.inhibit_ipv4") == "true", name


def test_dpd_commands_parse_and_match_their_health_checks(compose: dict[str, Any]) -> None:
    for name in NODES:
        service = compose["services"][name]
        command = service["command"]
        assert command[0] == "xlb-dpd"
        args = dpd_parser().parse_args(command[1:])
        assert args.name == name
        assert args.attach == "auto"
        port = args.listen.rsplit(":", 1)[1]
        check = service["healthcheck"]["test"]
        assert check[:2] == ["CMD", "xlb-health"] and check[-2] == f"127.0.0.1:{port}"
        ctl = service["networks"]["ctl"]["ipv4_address"]
        assert ctl == f"198.18.30.1{name[-1]}"
        assert not args.insecure_tcp
        assert (args.tls_cert, args.tls_key, args.tls_ca) == (
            f"/pki/{name}.crt", f"/pki/{name}.key", "/pki/ca.crt")


def test_node_containers_need_no_privileged_mode(compose: dict[str, Any]) -> None:
    for name in NODES:
        service = compose["services"][name]
        assert not service.get("privileged")
        caps = set(service["cap_add"])
        assert {"SYS_ADMIN", "NET_ADMIN", "NET_RAW"} <= caps
        assert not caps & {"BPF", "PERFMON"}, "engines before CAP_BPF refuse these names"
        assert "seccomp=unconfined" in service["security_opt"]
        assert service["sysctls"]["net.ipv4.ip_forward"] == "1"


def test_policyd_command_parses(compose: dict[str, Any]) -> None:
    service = compose["services"]["policyd"]
    command = service["command"]
    assert command[0] == "xlb-policyd"
    args = policyd_parser().parse_args(command[1:])
    assert args.db.startswith("/var/lib/xlb/")
    assert any(v.endswith(":/var/lib/xlb") for v in service["volumes"])
    port = args.listen.rsplit(":", 1)[1]
    assert service["healthcheck"]["test"][-2] == f"127.0.0.1:{port}"
    assert compose["services"]["setup"]["environment"]["XLB_POLICYD"] == (
        f"{service['networks']['ctl']['ipv4_address']}:{port}")
    assert not args.insecure_tcp
    assert args.tls_cert == args.node_tls_cert == "/pki/policyd.crt"
    assert args.tls_ca == args.node_tls_ca == "/pki/ca.crt"


def test_pki_job_certifies_what_the_others_use(compose: dict[str, Any]) -> None:
    script = _shell(compose["services"]["pki"]).replace("\\\n", " ")
    issued: dict[str, list[str]] = {}
    for command in re.findall(r"xlbctl certs [^;>\n]*", script):
        argv = [a.replace("$i", "1") for a in shlex.split(command)]
        args = xlbctl_parser().parse_args(argv[1:])
        if args.group == "certs" and args.verb == "issue":
            issued[args.name] = args.server or []
    assert issued["policyd"] == ["198.18.30.2", "127.0.0.1"]
    assert issued["node1"] == ["198.18.30.11", "127.0.0.1"]  # node$i, i=1 for the parse
    assert "for i in 1 2 3" in script
    files = {f"/pki/{n}.{ext}" for n in issued for ext in ("crt", "key")} | {"/pki/ca.crt"}
    used = set(re.findall(r"/pki/[\w.]+", (ROOT / "docker-compose.yml").read_text()))
    used = {u.replace("node2", "node1").replace("node3", "node1") for u in used}
    assert used <= files


def test_setup_job_xlbctl_lines_parse(compose: dict[str, Any]) -> None:
    script = _shell(compose["services"]["setup"]).replace("\\\n", " ")
    commands = re.findall(r"xlbctl [^;>\n]*", script)
    assert len(commands) >= 2
    registered = []
    for command in commands:
        argv = [a.replace("$i", "1") for a in shlex.split(command)]
        args = xlbctl_parser().parse_args(argv[1:])
        if args.group == "node":
            registered.append(args)
    assert registered, "the setup job registers the nodes"
    assert "for i in 1 2 3" in script


def test_image_files() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE=debian:bookworm-slim" in dockerfile
    for path in ("docker/entrypoint.sh", "docker/health.py", "scripts/cluster_test.sh"):
        assert os.access(ROOT / path, os.X_OK), path
