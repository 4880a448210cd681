"""`make run`: a local xlb cluster on network namespaces, end to end.

client --- lb node (xlb-dpd: TC eBPF) --- backends be1..beN
                 ^ gRPC xlb.dpd.v1
             xlb-policyd (SQLite) <- ApplyService over gRPC xlb.policy.v1

A TCP service on a VIP is applied to policyd, which reconciles it onto the node; the
client then opens connections to the VIP and the result is shown: which backend answered
each request, and the datapath's per-endpoint counters. Then two firewall rules go
through policyd: the client network is blocked from the web service except one client (a
higher priority allow); the allowed and the blocked client are shown with the rules'
counters. Then a Blocklist object stops a third client address in XDP (native, on the
lb's client side) and a Mirror object copies the client side's traffic to a veth where a
capture socket reads it (lab.demo_xdp). Then a policer on the client side limits a UDP
stream at twice its rate, and a TRAP firewall rule's packet comes back as an event through
policyd's WatchEvents (lab.demo_events). Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc

from lab.client import run_tcp_who, run_udp_who
from lab.daemons import Dpd, Policyd
from lab.demo_events import events_step
from lab.demo_xdp import xdp_step
from lab.servers import start_backends
from lab.topology import Topology
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.dpd.v1 import datapath_pb2_grpc as dgrpc
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.policy.v1 import policy_pb2_grpc as pgrpc
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.logs import configure_logging

VIP = "198.19.0.10"


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_synced(policy: pgrpc.PolicyStub, node: str, timeout: float = 30.0) -> ppb.NodeSyncStatus:
    end = time.monotonic() + timeout
    while True:
        st = policy.GetSyncStatus(ppb.GetSyncStatusRequest(node=node), timeout=5).nodes[0]
        if st.state == ppb.SYNC_STATE_SYNCED and st.observed_generation == st.desired_generation:
            return st
        if time.monotonic() > end:
            raise TimeoutError(f"node {node} not synced: {st}")
        time.sleep(0.1)


GUEST = "198.18.0.3"  # a second client address, blocked by the demo's firewall rules


def firewall_step(topo: Topology, policy: pgrpc.PolicyStub, datapath: dgrpc.DatapathStub,
                  requests: int) -> bool:
    """Two firewall rules through policyd: the client network may not reach the web
    service, except the client 198.18.0.2 (a higher priority allow). Shows the allowed
    and the blocked client, and the rules' counters on the node."""
    topo.run(topo.client_ns, ["ip", "addr", "add", f"{GUEST}/24", "dev", topo.client_iface])

    def rule(name: str, priority: int, src: str,
             action: tpb.FirewallAction) -> ppb.FirewallRule:
        return ppb.FirewallRule(name=name, spec=tpb.FirewallRuleSpec(
            priority=priority, action=action, match=tpb.FirewallMatch(
                src=src, dst=f"{VIP}/32", protocol=tpb.PROTOCOL_TCP,
                dst_ports=tpb.PortRange(first=80, last=80))))

    applied = policy.ApplyFirewallRules(ppb.ApplyFirewallRulesRequest(rules=[
        rule("web-clients-drop", 10, "198.18.0.0/24", tpb.FIREWALL_ACTION_DROP),
        rule("web-admin-allow", 20, f"{topo.client_ip}/32", tpb.FIREWALL_ACTION_ALLOW),
    ]), timeout=5)
    out(f"applied firewall rules at generation {applied.generation}: web-clients-drop "
        f"(priority 10: TCP from 198.18.0.0/24 to {VIP}:80), web-admin-allow (priority 20: "
        f"from {topo.client_ip})")
    t0 = time.monotonic()
    wait_synced(policy, "node1")
    out(f"node1 SYNCED in {1000 * (time.monotonic() - t0):.0f} ms")
    count = min(requests, 20)
    allowed = run_tcp_who(topo, VIP, 80, count=count, source=topo.client_ip)
    blocked = run_tcp_who(topo, VIP, 80, count=5, timeout=0.5, source=GUEST)
    answered = sum(v for k, v in allowed.items() if k != "errors")
    out(f"  from {topo.client_ip}: {answered} of {count} connections answered")
    out(f"  from {GUEST}: {5 - blocked.get('errors', 0)} of 5 answered "
        f"({blocked.get('errors', 0)} timed out: dropped)")
    stats = datapath.GetStats(dpb.GetStatsRequest(), timeout=5)
    for r in stats.rules:
        out(f"  rule {r.name}: {r.counters.packets} packets")
    out(f"  datapath drop_firewall: {stats.global_counters.get('drop_firewall', 0)} packets")
    return answered == count and blocked.get("errors", 0) == 5


def run(backends: int, requests: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="xlb-demo-"))
    with Topology(backends=backends, vip=VIP) as topo:
        out(f"topology: client {topo.client_ip} -> lb node ({topo.lb_ns}) -> "
            + ", ".join(f"be{i + 1} {ip}" for i, ip in enumerate(topo.backend_ips)))
        start_backends(topo, port=8080)
        policyd = Policyd(workdir).start()
        dpd = Dpd("node1", topo.lb_ns, topo.lb_ifaces, workdir)
        try:
            dpd.start()
            out(f"policyd on {policyd.address}, dpd node1 on {dpd.address} "
                f"(pins under {dpd.bpf_root}/node1)")
            with grpc.insecure_channel(policyd.address) as pch, \
                    grpc.insecure_channel(dpd.address) as dch:
                policy = pgrpc.PolicyStub(pch)
                datapath = dgrpc.DatapathStub(dch)
                policy.RegisterNode(ppb.RegisterNodeRequest(
                    node=ppb.Node(name="node1", address=dpd.address)), timeout=5)
                weights = [2] + [1] * (backends - 1)
                for name, proto, port in (("web", tpb.PROTOCOL_TCP, 80),
                                          ("dns", tpb.PROTOCOL_UDP, 53)):
                    svc = policy.ApplyService(ppb.ApplyServiceRequest(service=ppb.Service(
                        name=name, vip=VIP, port=port, protocol=proto,
                        algorithm=tpb.ALGORITHM_ROUND_ROBIN,
                        endpoints=[tpb.Endpoint(address=ip, port=8080, weight=w)
                                   for ip, w in zip(topo.backend_ips, weights, strict=True)],
                    )), timeout=5)
                    out(f"applied service {svc.name}: {VIP}:{port}/"
                        f"{'tcp' if proto == tpb.PROTOCOL_TCP else 'udp'} -> "
                        f"{len(svc.endpoints)} endpoints, weights {weights}, "
                        f"revision {svc.revision}")
                t0 = time.monotonic()
                st = wait_synced(policy, "node1")
                out(f"node1 SYNCED at generation {st.observed_generation} "
                    f"in {1000 * (time.monotonic() - t0):.0f} ms")

                tcp = run_tcp_who(topo, VIP, 80, count=requests)
                udp = run_udp_who(topo, VIP, 53, count=requests)
                out()
                out(f"{requests} TCP connections and {requests} UDP datagrams to {VIP}:")
                out(f"  {'backend':<8} {'weight':>6} {'tcp':>6} {'udp':>6}")
                for i, w in enumerate(weights, start=1):
                    out(f"  be{i:<6} {w:>6} {tcp.get(f'be{i}', 0):>6} {udp.get(f'be{i}', 0):>6}")
                out(f"  {'errors':<8} {'':>6} {tcp.get('errors', 0):>6} {udp.get('errors', 0):>6}")

                stats = datapath.GetStats(dpb.GetStatsRequest(), timeout=5)
                out()
                out("datapath counters (both directions, from per-CPU maps):")
                for s in stats.services:
                    pname = "tcp" if s.service.protocol == tpb.PROTOCOL_TCP else "udp"
                    out(f"  {s.service.vip}:{s.service.port}/{pname}: "
                        f"{s.counters.packets} packets, {s.counters.bytes} bytes")
                    for e in s.endpoints:
                        out(f"    {e.endpoint.address}:{e.endpoint.port} "
                            f"{e.counters.packets} packets, {e.counters.bytes} bytes")
                flows = list(datapath.ListConntrack(dpb.ListConntrackRequest(), timeout=5))
                out(f"conntrack entries: {len(flows)} (two per flow)")
                ok = tcp.get("errors", 0) == 0 and udp.get("errors", 0) == 0
                out()
                ok = firewall_step(topo, policy, datapath, requests) and ok
                out()
                ok = xdp_step(topo, policy, datapath, VIP, wait_synced, out) and ok
                out()
                ok = events_step(topo, policy, datapath, VIP, wait_synced, out) and ok
        finally:
            dpd.cleanup()
            policyd.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    out()
    out("cleaned up: namespaces, dpd pins and bpffs mount, processes"
        if ok else "FAILED: some requests got no answer")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", type=int, default=3)
    p.add_argument("--requests", type=int, default=100)
    args = p.parse_args(argv)
    configure_logging("kv", "warning")
    return run(args.backends, args.requests)


if __name__ == "__main__":
    sys.exit(main())
