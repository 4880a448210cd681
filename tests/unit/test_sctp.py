"""SCTP services without root: the datapath's incremental CRC32c update (dpd/bpf/sctp.h),
modelled step for step in Python and checked against a full recomputation, its constants
read from the C header; PROTOCOL_SCTP through dpd's API; SCTP flows' ageing."""

from __future__ import annotations

import contextlib
import random
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dpd import abi
from dpd.conntrack import SECOND, States, Timeouts, expired
from tests.datapath.packets import CRC32C_POLY, crc32c
from tests.unit.conftest import MemoryDatapathServicer, serve_datapath
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.service import Proto

SCTP_H = Path(__file__).resolve().parents[2] / "dpd" / "bpf" / "sctp.h"


def mulmod(a: int, b: int) -> int:
    """xlb_gf2_mulmod: a * b mod P, reflected (bit 31 is x^0)."""
    r = 0
    for i in range(32):
        if (a >> (31 - i)) & 1:
            r ^= b
        b = (b >> 1) ^ (CRC32C_POLY & -(b & 1))
    return r


def header_constants() -> dict[int, int]:
    """k -> K_k as written in sctp.h's XLB_CRC_STEP(k, K) lines."""
    steps = re.findall(r"XLB_CRC_STEP\((\d+), (0x[0-9a-f]+)\)", SCTP_H.read_text())
    return {int(k): int(v, 16) for k, v in steps}


def shift(d: int, n: int) -> int:
    """xlb_crc32c_shift with the header's constants."""
    for k, const in header_constants().items():
        if n >> k & 1:
            d = mulmod(d, const)
    return d


def test_header_constants_are_x_to_the_8_times_2_to_the_k():
    consts = header_constants()
    assert sorted(consts) == list(range(16))  # every length under 64 KiB
    x8 = 1 << (31 - 8)  # x^8, reflected
    power = x8
    for k in range(16):
        assert consts[k] == power, k
        power = mulmod(power, power)


def test_port_change_delta_matches_a_full_recomputation():
    """The datapath's update (new CRC = old XOR shift(D, n)) against CRC32c computed in
    full, for lengths up to a jumbo frame and either port or both changing."""
    rng = random.Random(4)
    for n in [16, 17, 20, 255, 256, 1500, 9000, 65515] + [rng.randrange(16, 9000)
                                                           for _ in range(200)]:
        body = bytearray(rng.randbytes(n))
        body[8:12] = b"\0\0\0\0"
        old_crc = crc32c(bytes(body))
        new = bytearray(body)
        which = rng.randrange(3)
        if which != 1:
            new[0:2] = rng.randbytes(2)
        if which != 0:
            new[2:4] = rng.randbytes(2)
        d = struct.unpack("<I", bytes(a ^ b for a, b in zip(body[:4], new[:4], strict=True)))[0]
        assert old_crc ^ shift(d, n) == crc32c(bytes(new)), (n, which)


@pytest.fixture
def dpd(sockdir: Path) -> Iterator[tuple[MemoryDatapathServicer, object]]:
    servicer = MemoryDatapathServicer()
    with contextlib.closing(servicer), serve_datapath(sockdir, servicer) as stub:
        yield servicer, stub


def test_dpd_takes_an_sctp_service_and_lists_it_back(dpd):
    _, stub = dpd
    svc = pb.Service(vip="198.19.0.10", port=38412, protocol=tpb.PROTOCOL_SCTP,
                     endpoints=[tpb.Endpoint(address="198.18.1.2", port=9000)])
    stub.PutServices(pb.PutServicesRequest(services=[svc]), timeout=5)
    got = list(stub.ListServices(pb.ListServicesRequest(), timeout=5))
    assert [(s.vip, s.port, s.protocol) for s in got] == [("198.19.0.10", 38412,
                                                           tpb.PROTOCOL_SCTP)]


def test_an_unknown_protocol_is_refused_naming_the_three(dpd):
    servicer, stub = dpd
    svc = pb.Service(vip="198.19.0.10", port=1, protocol=9,
                     endpoints=[tpb.Endpoint(address="198.18.1.2", port=9000)])
    with pytest.raises(grpc.RpcError) as err:
        stub.PutServices(pb.PutServicesRequest(services=[svc]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PROTOCOL_SCTP" in err.value.details()
    assert servicer.snapshot() == {}


def test_sctp_flows_age_by_the_tcp_timeouts():
    """An ABORT or SHUTDOWN COMPLETE leaves a flow CLOSED: gone in tcp_closed (10 s), not
    in the hour an established association gets."""
    s = States.of(abi.load())
    t = Timeouts()
    assert expired(Proto.SCTP, s.closed, 11 * SECOND, s, t)
    assert not expired(Proto.SCTP, s.est, 600 * SECOND, s, t)
    assert expired(Proto.SCTP, s.est, 3601 * SECOND, s, t)
    new = abi.load().const("XLB_CT_NEW")
    assert expired(Proto.SCTP, new, 31 * SECOND, s, t)  # an INIT never answered


def test_the_examples_in_docs_sctp_work_as_written(capsys, policyd, fake_node):
    """docs/sctp.md's grpcurl body is what dpd takes, and its xlbctl line applies through
    policyd onto a node."""
    import shlex

    from google.protobuf import json_format

    from policyd import cli
    from xlbcore.service import parse_services

    text = (Path(__file__).resolve().parents[2] / "docs" / "sctp.md").read_text()
    body, fw_body = re.findall(r"-d '(\{.*?\})' \\", text, re.S)
    from xlbcore.firewall import RuleProto, parse_rule
    (fw_rule,) = json_format.Parse(fw_body, pb.PutFirewallRulesRequest()).rules
    fw_spec = parse_rule(fw_rule.spec)
    assert (fw_spec.match.protocol, str(fw_spec.match.dst_ports)) == (RuleProto.SCTP, "38412")
    (fw_line,) = re.findall(r"^xlbctl firewall apply .*?(?<!\\)\n", text, re.S | re.M)
    specs = parse_services(json_format.Parse(body, pb.PutServicesRequest()).services)
    assert [(s.port, s.proto, len(s.endpoints)) for s in specs] == [(38412, Proto.SCTP, 2)]
    (line,) = re.findall(r"^xlbctl service apply .*?(?<!\\)\n", text, re.S | re.M)
    argv = shlex.split(line.replace("\\\n", " "))
    node = fake_node("a").start()
    server = policyd()
    assert cli.main(["--server", server.address, "node", "register", "a", node.address]) == 0
    assert cli.main(["--server", server.address, *argv[1:]]) == 0
    assert cli.main(["--server", server.address, "status", "a", "--wait",
                     "--timeout", "10"]) == 0
    capsys.readouterr()
    got = list(node.datapath.ListServices(pb.ListServicesRequest(), None))
    assert [(s.port, s.protocol, len(s.endpoints)) for s in got] == [
        (38412, tpb.PROTOCOL_SCTP, 2)]
    fw_argv = shlex.split(fw_line.replace("\\\n", " "))
    assert cli.main(["--server", server.address, *fw_argv[1:]]) == 0
    assert cli.main(["--server", server.address, "status", "a", "--wait",
                     "--timeout", "10"]) == 0
    rules = node.datapath.node.firewall.rules()
    assert [(r.name, r.spec.match.protocol) for r in rules] == [
        ("ngap-only-from-ran", RuleProto.SCTP)]
