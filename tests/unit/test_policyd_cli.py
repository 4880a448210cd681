"""xlbctl against an in-process policyd and a fake dpd node."""

from __future__ import annotations

import json

import pytest

from policyd import cli


def run(capsys, server, *args: str) -> tuple[int, object, str]:
    rc = cli.main(["--server", server.address, *args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def test_service_lifecycle(capsys, policyd):
    server = policyd()
    rc, svc, _ = run(
        capsys, server, "service", "apply", "--name", "web", "--vip", "198.19.0.10",
        "--port", "80", "--protocol", "tcp",
        "--endpoint", "198.18.1.3:8080@2", "--endpoint", "198.18.1.2:8080",
    )  # fmt: skip
    assert rc == 0
    assert svc["name"] == "web" and svc["generation"] == "1"
    assert [e["address"] for e in svc["endpoints"]] == ["198.18.1.2", "198.18.1.3"]
    assert svc["endpoints"][1]["weight"] == 2

    rc, got, _ = run(capsys, server, "service", "get", "web")
    assert rc == 0 and got == svc
    rc, listed, _ = run(capsys, server, "service", "list")
    assert rc == 0 and listed == [svc]
    rc, out, _ = run(capsys, server, "service", "delete", "web")
    assert rc == 0 and out == {"deleted": "web"}
    rc, listed, _ = run(capsys, server, "service", "list")
    assert listed == []


def test_errors_exit_nonzero_with_status_message(capsys, policyd):
    server = policyd()
    rc, out, err = run(capsys, server, "service", "get", "nope")
    assert rc == 1 and out is None
    assert "xlbctl: NOT_FOUND: service 'nope' not found\n" in err

    rc, _, err = run(
        capsys, server, "service", "apply", "--name", "web", "--vip", "198.19.0.10",
        "--port", "70000", "--endpoint", "198.18.1.2:80",
    )  # fmt: skip
    assert rc == 1
    assert "INVALID_ARGUMENT: service.port" in err

    with pytest.raises(SystemExit) as info:
        cli.main(["--server", server.address, "service", "apply", "--name", "w",
                  "--vip", "198.19.0.1", "--port", "1", "--endpoint", "198.18.1.2"])  # fmt: skip
    assert info.value.code == 2
    assert "ADDRESS:PORT" in capsys.readouterr().err


def test_nodes_and_status(capsys, policyd, fake_node):
    node = fake_node("a").start()
    server = policyd()
    rc, reg, _ = run(capsys, server, "node", "register", "node-a", node.address)
    assert rc == 0 and reg["address"] == node.address
    run(capsys, server, "service", "apply", "--name", "web", "--vip", "198.19.0.10",
        "--port", "80", "--endpoint", "198.18.1.2:80")  # fmt: skip
    rc, status, _ = run(capsys, server, "status", "node-a", "--wait", "--timeout", "10")
    assert rc == 0
    (entry,) = status["nodes"]
    assert entry["state"] == "SYNC_STATE_SYNCED"
    assert entry["observed_generation"] == status["generation"] == "1"
    rc, nodes, _ = run(capsys, server, "node", "list")
    assert [n["name"] for n in nodes] == ["node-a"]
    rc, out, _ = run(capsys, server, "node", "deregister", "node-a")
    assert rc == 0 and out == {"deregistered": "node-a"}
    rc, _, err = run(capsys, server, "status", "node-a")
    assert rc == 1 and "NOT_FOUND" in err


def test_status_wait_times_out_on_a_down_node(capsys, policyd, fake_node):
    server = policyd()
    run(capsys, server, "node", "register", "node-x", fake_node("x").address)
    rc, status, err = run(capsys, server, "status", "--wait", "--timeout", "0.5")
    assert rc == 1
    assert status["nodes"][0]["state"] in ("SYNC_STATE_ERROR", "SYNC_STATE_PENDING")
    assert "not synced" in err


def test_unreachable_server(capsys, sockdir):
    rc = cli.main(["--server", f"unix:{sockdir}/none.sock", "--rpc-timeout", "1", "node", "list"])
    assert rc == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_apply_file_and_delete_several(capsys, policyd, tmp_path):
    server = policyd()
    services = [
        {"name": "web", "vip": "198.19.0.10", "port": 80, "protocol": "PROTOCOL_TCP",
         "endpoints": [{"address": "198.18.1.3", "port": 8080, "weight": 2},
                       {"address": "198.18.1.2", "port": 8080}]},
        {"name": "dns", "vip": "198.19.0.53", "port": 53, "protocol": "PROTOCOL_UDP",
         "endpoints": [{"address": "198.18.1.53", "port": 53}]},
    ]  # fmt: skip
    path = tmp_path / "services.json"
    path.write_text(json.dumps(services))
    rc, out, _ = run(capsys, server, "service", "apply-file", str(path))
    assert rc == 0 and out == {"generation": "1", "services": 2}

    # what `service list` prints can be applied again: nothing changes
    _, listed, _ = run(capsys, server, "service", "list")
    assert [s["name"] for s in listed] == ["dns", "web"]
    path.write_text(json.dumps({"services": listed}))
    rc, out, _ = run(capsys, server, "service", "apply-file", "--full", str(path))
    assert rc == 0 and out["generation"] == "1"
    assert [s["name"] for s in out["services"]] == ["dns", "web"]

    rc, out, _ = run(capsys, server, "service", "delete", "web", "dns")
    assert rc == 0 and out == {"deleted": ["web", "dns"], "generation": "2"}


def test_apply_file_errors(capsys, policyd, tmp_path):
    server = policyd()
    path = tmp_path / "bad.json"
    for text, words in [
        ("{", "not JSON"),
        ('{"name": "x"}', "expected a list"),
        ('[{"name": "x", "colour": "red"}]', "services[0]"),
    ]:
        path.write_text(text)
        with pytest.raises(SystemExit) as info:
            cli.main(["--server", server.address, "service", "apply-file", str(path)])
        assert info.value.code == 2
        assert words in capsys.readouterr().err
    path.write_text('[{"name": "x", "vip": "198.19.0.1", "port": 80, "protocol": 1}]')
    rc, _, err = run(capsys, server, "service", "apply-file", str(path))
    assert rc == 1 and "INVALID_ARGUMENT: services[0].endpoints" in err
