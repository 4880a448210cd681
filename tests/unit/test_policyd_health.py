"""Health checks through policyd (dpd's real servicer over in-memory maps): the check
is stored and reaches the node, a change of the check alone is pushed, and each node's
endpoint health shows in GetService and GetSyncStatus after its drift check."""

from __future__ import annotations

from policyd.client import PolicyClient
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2 as tpb

EPS = [tpb.Endpoint(address="198.18.1.2", port=8080), tpb.Endpoint(address="198.18.2.2",
                                                                   port=8080)]


def web(interval_ms: int = 500) -> policy_pb2.Service:
    return policy_pb2.Service(
        name="web", vip="198.19.0.10", port=80, protocol=tpb.PROTOCOL_TCP, endpoints=EPS,
        health=tpb.HealthCheck(kind=tpb.HEALTH_CHECK_KIND_HTTP, interval_ms=interval_ms,
                               http_path="/healthz"),
        conntrack_timeouts=tpb.ConntrackTimeouts(tcp_established=600))


def synced(client: PolicyClient, node: str) -> bool:
    (s,) = client.stub.GetSyncStatus(policy_pb2.GetSyncStatusRequest(node=node)).nodes
    return (s.state == policy_pb2.SYNC_STATE_SYNCED
            and s.observed_generation >= client.stub.GetSyncStatus(
                policy_pb2.GetSyncStatusRequest()).generation)


def test_health_config_reaches_the_node_and_health_comes_back(wait_for, policyd, fake_node,
                                                              client_for):
    node = fake_node("a").start()
    client = client_for(policyd())
    client.register_node("node-a", node.address)
    stored = client.apply(web())
    assert stored.health.http_status == 200 and stored.health.rise == 2  # canonical
    wait_for(lambda: synced(client, "node-a"), what="synced")
    (held,) = node.datapath.node.list_services()
    assert held.health.http_path == "/healthz" and held.ct_timeouts.tcp_established == 600

    client.apply(web(interval_ms=250))  # only the check changes: pushed
    wait_for(lambda: node.datapath.node.list_services()[0].health.interval_ms == 250,
             what="the new interval on the node")

    monitor = node.datapath.node.health
    target = next(t for k, t in monitor._targets.items() if k[0] == "198.18.2.2")
    for _ in range(3):
        monitor.record(target, False, "HTTP status 503")
    monitor._flush()

    def down_seen():
        req = policy_pb2.GetSyncStatusRequest(node="node-a", with_health=True)
        (s,) = client.stub.GetSyncStatus(req).nodes
        return s if s.endpoints_down == 1 else None

    s = wait_for(down_seen, what="the node's health in GetSyncStatus")
    assert (s.endpoints_up, s.endpoints_unknown) == (0, 1)
    (svc,) = s.service_health
    assert svc.service == "web"
    assert [(e.address, e.health, e.reason) for e in svc.endpoints] == [
        ("198.18.1.2", tpb.HEALTH_STATE_UNKNOWN, ""),
        ("198.18.2.2", tpb.HEALTH_STATE_DOWN, "HTTP status 503")]
    got = client.get_service("web")
    (nh,) = got.node_health
    assert nh.node == "node-a" and nh.endpoints[1].health == tpb.HEALTH_STATE_DOWN
    # health moves no service generation on the node: nothing is read back or repaired
    assert node.datapath.calls["ListServicesPage"] <= 1


def test_xlbctl_service_apply_with_a_health_check_and_timeouts(capsys, policyd):
    import json

    import pytest

    from policyd import cli

    server = policyd()
    rc = cli.main(["--server", server.address, "service", "apply", "--name", "dns",
                   "--vip", "198.19.0.10", "--port", "53", "--protocol", "udp",
                   "--endpoint", "198.18.1.2:53",
                   "--health", "udp,interval=250ms,timeout=0.1s,fall=2,request=WHO,expect=be",
                   "--ct-timeout", "udp_established=20"])
    out, _ = capsys.readouterr()
    assert rc == 0
    svc = json.loads(out)
    want = {"kind": "HEALTH_CHECK_KIND_UDP", "interval_ms": 250, "timeout_ms": 100,
            "rise": 2, "fall": 2, "udp_request": "V0hP", "udp_expect": "YmU="}
    assert {k: v for k, v in svc["health"].items() if k in want} == want
    assert svc["conntrack_timeouts"]["udp_established"] == 20
    rc = cli.main(["--server", server.address, "service", "apply", "--name", "x",
                   "--vip", "198.19.0.11", "--port", "80", "--endpoint", "198.18.1.2:80",
                   "--health", "icmp,port=80"])
    assert rc == 1 and "INVALID_ARGUMENT: service.health.port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["--server", server.address, "service", "apply", "--name", "x",
                  "--vip", "198.19.0.11", "--port", "80", "--endpoint", "198.18.1.2:80",
                  "--health", "smtp"])
    assert info.value.code == 2 and "use one of tcp, udp, http, icmp" in capsys.readouterr().err
