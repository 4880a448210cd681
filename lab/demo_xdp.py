"""`make run`'s XDP step: a Blocklist and a Mirror object through policyd.

The XDP stage is attached natively to the lb's client-side interface (AttachInterface
xdp_mode NATIVE on c0); a Blocklist object with one client address reaches the node and
that client's datagrams die in XDP (the drop counters move, the TC stage never sees
them) while the other client is answered. Then a Mirror object copies c0's traffic out
of a veth in the lb namespace; an AF_PACKET socket on its peer (lab.capture) reads the
copies, and one is printed decoded with the mirror's count.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from lab import netns
from lab.client import run_tcp_who, run_udp_who
from lab.topology import Topology
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.dpd.v1 import datapath_pb2_grpc as dgrpc
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.policy.v1 import policy_pb2_grpc as pgrpc

BLOCKED = "198.18.0.4"  # a third client address, in the demo's Blocklist
MIRROR, PEER = "bmmir0", "bmmir1"  # the mirror veth in the lb namespace, and its capture end
PROTOCOLS = {6: "TCP", 17: "UDP", 1: "ICMP"}


def decode(frame: bytes) -> str:
    """One IPv4 frame as 'TCP 198.18.0.2:40000 -> 198.19.0.10:80 (74 bytes)'."""
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    src = ipaddress.IPv4Address(frame[26:30])
    dst = ipaddress.IPv4Address(frame[30:34])
    name = PROTOCOLS.get(proto, f"proto {proto}")
    if proto in (6, 17):
        sport, dport = struct.unpack("!HH", frame[14 + ihl:18 + ihl])
        text = f"{name} {src}:{sport} -> {dst}:{dport}"
        if proto == 6:
            flags = frame[14 + ihl + 13]
            text += " [" + "".join(f for f, bit in zip("FSRPAU", range(6), strict=True)
                                   if flags & (1 << bit)) + "]"
    else:
        text = f"{name} {src} -> {dst}"
    return f"{text} ({len(frame)} bytes)"


def xdp_step(topo: Topology, policy: pgrpc.PolicyStub, datapath: dgrpc.DatapathStub,
             vip: str, wait_synced: Callable[[pgrpc.PolicyStub, str], Any],
             out: Callable[[str], None]) -> bool:
    ok = True
    topo.run(topo.client_ns, ["ip", "addr", "add", f"{BLOCKED}/24", "dev", topo.client_iface])
    datapath.AttachInterface(dpb.AttachInterfaceRequest(
        name="c0", xdp_mode=dpb.XDP_MODE_NATIVE), timeout=10)
    c0 = next(i for i in datapath.ListInterfaces(dpb.ListInterfacesRequest(), timeout=5)
              if i.name == "c0")
    mode = dpb.XdpMode.Name(c0.xdp_mode)
    out(f"XDP stage on the lb's client side (c0): {mode.removeprefix('XDP_MODE_')}")
    before = run_udp_who(topo, vip, 53, count=5, timeout=0.5, source=BLOCKED)
    applied = policy.ApplyBlocklist(ppb.ApplyBlocklistRequest(blocklist=ppb.Blocklist(
        name="demo-blocked", spec=ppb.BlocklistSpec(prefixes=[BLOCKED]))), timeout=5)
    t0 = time.monotonic()
    st = wait_synced(policy, "node1")
    out(f"applied blocklist demo-blocked ({', '.join(applied.spec.prefixes)}) at revision "
        f"{applied.revision}: node1 SYNCED in {1000 * (time.monotonic() - t0):.0f} ms, "
        f"holding {st.blocklist_prefixes} blocked prefix(es)")
    stats0 = datapath.GetStats(dpb.GetStatsRequest(), timeout=5).global_counters
    blocked = run_udp_who(topo, vip, 53, count=5, timeout=0.5, source=BLOCKED)
    others = run_udp_who(topo, vip, 53, count=5, timeout=1.0, source=topo.client_ip)
    stats = datapath.GetStats(dpb.GetStatsRequest(), timeout=5).global_counters
    listed = {b.prefix: b.counters.packets
              for b in datapath.ListBlocklist(dpb.ListBlocklistRequest(), timeout=5)}
    answered_before = 5 - before.get("errors", 0)
    answered_blocked = 5 - blocked.get("errors", 0)
    answered_others = 5 - others.get("errors", 0)
    dropped = stats.get("drop_blocklist", 0) - stats0.get("drop_blocklist", 0)
    out(f"  UDP from {BLOCKED}: {answered_before} of 5 answered before, {answered_blocked} "
        f"of 5 after; from {topo.client_ip}: {answered_others} of 5 answered")
    out(f"  dropped in XDP: drop_blocklist +{dropped} (total {stats.get('drop_blocklist', 0)}), "
        f"{BLOCKED}/32: {listed.get(f'{BLOCKED}/32', 0)} packets")
    ok = ok and answered_before == 5 and answered_blocked == 0 and answered_others == 5
    ok = ok and dropped >= 5

    # mirroring: c0's traffic copied out of bmmir0, captured on its peer bmmir1
    topo.run(topo.lb_ns, ["ip", "link", "add", MIRROR, "type", "veth", "peer", "name", PEER])
    for dev in (MIRROR, PEER):
        netns.sysctl(topo.lb_ns, {f"net.ipv6.conf.{dev}.disable_ipv6": 1})
        topo.run(topo.lb_ns, ["ip", "link", "set", dev, "up"])
    capture = netns.popen(topo.lb_ns, [sys.executable, "-m", "lab.capture", PEER,
                                       "--count", "6", "--timeout", "8"],
                          stdout=subprocess.PIPE, env=netns.python_env())
    try:
        assert capture.stdout is not None
        if capture.stdout.readline().strip() != "ready":
            raise RuntimeError("the capture did not start")
        applied_m = policy.ApplyMirror(ppb.ApplyMirrorRequest(mirror=ppb.Mirror(
            name="demo-tap", spec=ppb.MirrorSpec(interface="c0", mirror_interface=MIRROR))),
            timeout=5)
        t0 = time.monotonic()
        st = wait_synced(policy, "node1")
        out(f"applied mirror demo-tap (c0 -> {MIRROR}) at revision {applied_m.revision}: "
            f"node1 SYNCED in {1000 * (time.monotonic() - t0):.0f} ms, {st.mirrors} mirror(s)")
        tcp = run_tcp_who(topo, vip, 80, count=3, source=topo.client_ip)
        frames = [bytes.fromhex(line.strip()) for line in capture.stdout if line.strip()]
        capture.wait(timeout=10)
    finally:
        netns.kill_group(capture)
    copies = {m.interface: m.counters.packets
              for m in datapath.ListMirrors(dpb.ListMirrorsRequest(), timeout=5)}
    out(f"  3 TCP connections from {topo.client_ip}: {3 - tcp.get('errors', 0)} answered; "
        f"the first {len(frames)} copies captured on {PEER}; the mirror counted "
        f"{copies.get('c0', 0)}")
    if frames:
        out(f"  first copy: {decode(frames[0])}")
    ok = ok and tcp.get("errors", 0) == 0 and len(frames) > 0 and copies.get("c0", 0) > 0
    # the objects go through policyd too
    policy.DeleteMirror(ppb.DeleteMirrorRequest(name="demo-tap"), timeout=5)
    policy.DeleteBlocklist(ppb.DeleteBlocklistRequest(name="demo-blocked"), timeout=5)
    st = wait_synced(policy, "node1")
    out(f"deleted both through policyd: node1 holds {st.blocklist_prefixes} blocked "
        f"prefixes, {st.mirrors} mirrors")
    topo.run(topo.lb_ns, ["ip", "link", "del", MIRROR])
    return ok
