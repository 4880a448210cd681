"""The XDP stage on a real node: client, lb and two backend namespaces (named xd*), dpd
attached to the lb's interfaces with xdp_packet_func native on the client side veth;
real TCP and UDP sockets from two client addresses, one of them blocked."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.e2e.conftest import (
    CLIENT,
    CLIENT2,
    VIP,
    Lab,
    add_client_address,
    doc_grpcurl_commands,
    open_lab,
    put_vip_services,
    reach,
)
from xlb.dpd.v1 import datapath_pb2 as pb

pytestmark = pytest.mark.root

ALLOWED, BLOCKED = CLIENT, CLIENT2  # the client's address, and its second one


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(prefix="xd", before_dpd=lambda topo: add_client_address(topo, BLOCKED)) as lab:
        put_vip_services(lab)
        yield lab


def xdp_of(lab: Any, ifname: str) -> str:
    """`ip link` as the kernel reports the interface's XDP attachment."""
    out = subprocess.run(["ip", "-n", lab.topo.lb_ns, "-d", "link", "show", ifname],
                         capture_output=True, text=True, check=True).stdout
    for word in ("xdpgeneric", "xdpdrv", "xdpoffload", "xdp"):
        if f"{word}/" in out or f" {word} " in out:
            return word
    return ""


NONE = {"tcp-vip": 0, "udp-vip": 0, "tcp-be": 0, "udp-be": 0}
ALL = {"tcp-vip": 3, "udp-vip": 3, "tcp-be": 3, "udp-be": 3}


def test_blocked_client_is_dropped_in_xdp_while_another_client_works(lab):
    intf = lab.stub.AttachInterface(pb.AttachInterfaceRequest(
        name="c0", xdp_mode=pb.XDP_MODE_AUTO), timeout=10)
    assert intf.xdp_mode == pb.XDP_MODE_NATIVE  # veth has native XDP
    assert intf.xdp_program_tag and intf.attached
    assert xdp_of(lab, "c0") == "xdp"  # driver mode
    assert reach(lab, BLOCKED) == NONE  # nothing blocked yet: XDP passes to TC
    stub = lab.stub
    r = stub.PutBlocklist(pb.PutBlocklistRequest(prefixes=[f"{BLOCKED}/32",
                                                           "198.18.200.0/24"]), timeout=10)
    assert r.written == 2
    assert reach(lab, ALLOWED) == NONE
    assert reach(lab, BLOCKED) == ALL

    listed = {b.prefix: b.counters.packets
              for b in stub.ListBlocklist(pb.ListBlocklistRequest(), timeout=10)}
    assert listed[f"{BLOCKED}/32"] >= 12 and listed["198.18.200.0/24"] == 0
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters
    assert stats["drop_blocklist"] == listed[f"{BLOCKED}/32"]
    assert stats["xdp_pass"] > 0
    assert stats["drop_firewall"] == 0  # TC never saw them
    c0 = next(i for i in stub.ListInterfaces(pb.ListInterfacesRequest(), timeout=10)
              if i.name == "c0")
    assert c0.counters.drops["drop_blocklist"] == stats["drop_blocklist"]
    assert c0.xdp_mode == pb.XDP_MODE_NATIVE
    b1 = next(i for i in stub.ListInterfaces(pb.ListInterfacesRequest(), timeout=10)
              if i.name == "b1")
    assert b1.xdp_mode == pb.XDP_MODE_OFF and not b1.xdp_program_tag

    # deleted, the address gets through again
    assert stub.DeleteBlocklist(pb.DeleteBlocklistRequest(prefixes=[BLOCKED]),
                                timeout=10).deleted == 1
    assert reach(lab, BLOCKED) == NONE


def test_xdp_survives_a_dpd_restart_and_goes_with_cleanup(lab):
    stub = lab.stub
    stub.AttachInterface(pb.AttachInterfaceRequest(name="c0", xdp_mode=pb.XDP_MODE_GENERIC),
                         timeout=10)
    assert xdp_of(lab, "c0") == "xdpgeneric"
    stub.PutBlocklist(pb.PutBlocklistRequest(prefixes=["198.18.0.0/30"]), timeout=10)
    stub.PutMirrors(pb.PutMirrorsRequest(mirrors=[pb.Mirror(interface="c0",
                                                            mirror_interface="b2")]), timeout=10)
    lab.dpd.stop()
    assert reach(lab, BLOCKED) == ALL  # no dpd: the datapath goes on
    assert reach(lab, "198.18.0.2") == ALL
    lab.dpd.start()
    assert [b.prefix for b in stub.ListBlocklist(pb.ListBlocklistRequest(), timeout=10)] == [
        "198.18.0.0/30"]
    assert [(m.interface, m.mirror_interface) for m in stub.ListMirrors(
        pb.ListMirrorsRequest(), timeout=10)] == [("c0", "b2")]
    # switching to native, then off (TC stays)
    intf = stub.AttachInterface(pb.AttachInterfaceRequest(
        name="c0", xdp_mode=pb.XDP_MODE_NATIVE), timeout=10)
    assert intf.xdp_mode == pb.XDP_MODE_NATIVE and xdp_of(lab, "c0") == "xdp"
    intf = stub.AttachInterface(pb.AttachInterfaceRequest(name="c0",
                                                          xdp_mode=pb.XDP_MODE_OFF), timeout=10)
    assert intf.xdp_mode == pb.XDP_MODE_OFF and intf.attached and xdp_of(lab, "c0") == ""
    assert reach(lab, BLOCKED) == NONE
    stub.AttachInterface(pb.AttachInterfaceRequest(name="c0", xdp_mode=pb.XDP_MODE_AUTO),
                         timeout=10)
    assert xdp_of(lab, "c0") == "xdp"
    lab.dpd.cleanup()
    assert xdp_of(lab, "c0") == ""
    filters = subprocess.run(["tc", "-n", lab.topo.lb_ns, "filter", "show", "dev", "c0",
                              "ingress"], capture_output=True, text=True).stdout
    assert "xlb_" not in filters  # TC and the mirror filter gone too


def test_bad_prefixes_are_refused_naming_the_field(lab):
    with pytest.raises(grpc.RpcError) as err:
        lab.stub.PutBlocklist(pb.PutBlocklistRequest(prefixes=["198.18.0.0/24",
                                                               "198.18.0.3/24"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefixes[1]" in err.value.details() and "198.18.0.0/24" in err.value.details()
    assert list(lab.stub.ListBlocklist(pb.ListBlocklistRequest(), timeout=10)) == []


def test_the_grpcurl_examples_of_the_docs_work_as_written(lab):
    from tests.unit.test_policyd_grpcurl import GRPCURL

    if GRPCURL is None:
        pytest.skip("grpcurl is missing")
    commands = doc_grpcurl_commands("xdp.md")
    assert len(commands) >= 9
    sock = lab.dpd.socket
    for argv in commands:
        argv = [GRPCURL if a == "grpcurl" else sock if a == "/run/xlb/dpd.sock" else a
                for a in argv]
        if "-d" in argv:  # the docs' interface is eth0, the lab's c0
            i = argv.index("-d") + 1
            argv[i] = argv[i].replace('"eth0"', '"c0"').replace('"eth1"', '"b2"')
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{argv}: {res.stderr}"
        if argv[-1].endswith("/ListBlocklist"):
            assert '"prefix": "198.18.66.0/24"' in res.stdout
            assert '"prefix": "2001:db8:66::/48"' in res.stdout
        if argv[-1].endswith("/ListMirrors"):
            assert '"mirror_interface": "b2"' in res.stdout
        if argv[-1].endswith("/AttachInterface") and "XDP_MODE_AUTO" in " ".join(argv):
            assert '"xdp_mode": "XDP_MODE_NATIVE"' in res.stdout
    assert xdp_of(lab, "c0") == ""  # the last example turns it off
    assert [b.prefix for b in lab.stub.ListBlocklist(pb.ListBlocklistRequest(), timeout=10)] == [
        "198.18.66.0/24", "2001:db8:66::/48"]


CAPTURE = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.bind((sys.argv[1], 0))
s.settimeout(0.1)
print("ready", flush=True)
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        data = s.recv(65535)
    except socket.timeout:
        continue
    print(data.hex(), flush=True)
"""

SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    s.send(bytes.fromhex(frame))
"""


def test_mirror_copies_each_packet_byte_for_byte_before_nat(lab):
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    from lab import netns
    from lab.client import run_tcp_who

    topo = lab.topo
    cap_ns = f"{topo.prefix}-mi"
    subprocess.run(["ip", "netns", "add", cap_ns], check=True)
    proc = None
    try:
        subprocess.run(["ip", "-n", topo.lb_ns, "link", "add", "xdm0", "type", "veth",
                        "peer", "name", "eth0", "netns", cap_ns], check=True)
        subprocess.run(["ip", "-n", topo.lb_ns, "link", "set", "xdm0", "up"], check=True)
        subprocess.run(["ip", "-n", cap_ns, "link", "set", "eth0", "up"], check=True)
        r = lab.stub.PutMirrors(pb.PutMirrorsRequest(mirrors=[
            pb.Mirror(interface="c0", mirror_interface="xdm0")]), timeout=10)
        assert r.written == 1
        proc = subprocess.Popen(["ip", "netns", "exec", cap_ns, sys.executable, "-c", CAPTURE,
                                 "eth0", "8"], stdout=subprocess.PIPE, text=True,
                                env=netns.python_env())
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        mac_c, mac_l = topo.mac(topo.client_ns, topo.client_iface), topo.mac(topo.lb_ns, "c0")
        frames = [
            bytes(Ether(src=mac_c, dst=mac_l) / IP(src=ALLOWED, dst=VIP, ttl=61, id=4242)
                  / UDP(sport=40001, dport=53) / b"mirror me, as I am"),
            bytes(Ether(src=mac_c, dst=mac_l) / IP(src=ALLOWED, dst=VIP, id=4243)
                  / TCP(sport=40002, dport=80, flags="S", seq=7, options=[("MSS", 1400)])),
            bytes(Ether(src=mac_c, dst=mac_l, type=0x88B5) / (b"\x00" * 50)),  # not IP
        ]
        topo.run(topo.client_ns, [sys.executable, "-c", SEND, topo.client_iface,
                                  *(f.hex() for f in frames)])
        assert run_tcp_who(topo, VIP, 80, count=3, timeout=1.0)["errors"] == 0
        out, _ = proc.communicate(timeout=30)
        seen = [bytes.fromhex(line) for line in out.split()]
        for f in frames:
            assert f in seen  # byte for byte, as it arrived
        # the real connections were copied before NAT: to the VIP, not to a backend
        to_vip = [Ether(x) for x in seen if IP in Ether(x) and Ether(x)[IP].dst == VIP
                  and TCP in Ether(x) and Ether(x)[TCP].dport == 80]
        assert len(to_vip) >= 3 * 3  # SYN, ACK, data ... of three connections
        stats = lab.stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters
        listed = list(lab.stub.ListMirrors(pb.ListMirrorsRequest(), timeout=10))
        assert [(m.interface, m.mirror_interface) for m in listed] == [("c0", "xdm0")]
        assert listed[0].counters.packets == stats["mirrored"] >= len(frames) + 9
        assert stats["mirror_fail"] == 0
        # deleted: no more copies, and the filter is gone
        assert lab.stub.DeleteMirrors(pb.DeleteMirrorsRequest(interfaces=["c0"]),
                                      timeout=10).deleted == 1
        filters = subprocess.run(["tc", "-n", topo.lb_ns, "filter", "show", "dev", "c0",
                                  "ingress"], capture_output=True, text=True).stdout
        assert "xlb_tc_mirror_func" not in filters and "xlb_tc_packet_func" in filters
        assert run_tcp_who(topo, VIP, 80, count=2, timeout=1.0)["errors"] == 0
        assert lab.stub.GetStats(pb.GetStatsRequest(), timeout=10).global_counters[
            "mirrored"] == stats["mirrored"]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", cap_ns], check=False)
