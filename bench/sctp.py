"""Cost of an established SCTP flow's packet (BPF_PROG_TEST_RUN through tc_packet_func, ns),
against TCP's, by packet size: the SCTP CRC32c update when NAT changes a port costs one
32-step carry-less multiplication per set bit of the SCTP packet's length (dpd/bpf/sctp.h),
nothing when only addresses change.

Rows: TCP DNAT 80 -> 8080; SCTP DNAT to the same port (addresses only, CRC untouched);
SCTP DNAT to another port (CRC updated); SCTP full-NAT (both ports, CRC updated). Each
flow is opened (INIT, INIT ACK or SYN, SYN-ACK, ACK) and its client packets are timed,
each a run with repeat=1 on a fresh copy, as in bench.datapath_ns.

Run: python -m bench.sctp [--runs N]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bench.datapath_ns import CLIENT, SNAT, loaded_node, mean_ns
from dpd import bpfsys
from xlbcore.service import EndpointSpec, Mode, Proto, ServiceSpec

VIP = "198.19.0.10"
EP = "198.18.1.2"
SIZES = (64, 512, 1400)  # payload bytes


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def sctp(src: str, dst: str, sport: int, dport: int, chunk_type: int, value: bytes,
         vtag: int) -> bytes:
    chunk = struct.pack("!BBH", chunk_type, 3 if chunk_type == 0 else 0, 4 + len(value)) + value
    chunk += b"\0" * (-len(chunk) % 4)
    common = struct.pack("!HHI", sport, dport, vtag)
    crc = _crc32c(common + b"\0\0\0\0" + chunk)
    return bytes(Ether(dst="00:00:00:00:00:00") / IP(src=src, dst=dst, proto=132)
                 / (common + struct.pack("<I", crc) + chunk))


def _sctp_ns(node: object, fd: int, port: int, runs: int) -> list[float]:
    sport = 40000 + port % 1000
    bpfsys.prog_test_run(fd, sctp(CLIENT, VIP, sport, port, 1,
                                  struct.pack("!IIHHI", 7, 65536, 1, 1, 1), 0))
    flows = [e for e in node.list_conntrack()  # type: ignore[attr-defined]
             if e.src_port == sport and e.direction == 1]
    (orig,) = flows
    to = orig.nat2_address or CLIENT
    to_port = orig.nat2_port or sport
    bpfsys.prog_test_run(fd, sctp(orig.nat_address, to, orig.nat_port, to_port, 2,
                                  struct.pack("!IIHHI", 9, 65536, 1, 1, 1), 7))
    states = {e.state for e in node.list_conntrack()  # type: ignore[attr-defined]
              if sport in (e.src_port, e.dst_port, e.nat2_port)}
    if states != {3}:
        raise RuntimeError(f"the SCTP flow to port {port} did not become established: {states}")
    return [mean_ns(fd, [sctp(CLIENT, VIP, sport, port, 0, struct.pack("!IHHI", 1, 0, 0, 46)
                              + b"x" * size, 9)], runs) for size in SIZES]


def _tcp_ns(fd: int, runs: int) -> list[float]:
    def pkt(flags: str, src: str = CLIENT, dst: str = VIP, sp: int = 41000, dp: int = 80,
            seq: int = 1, ack: int = 1, size: int = 0) -> bytes:
        return bytes(Ether(dst="00:00:00:00:00:00") / IP(src=src, dst=dst)
                     / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack) / (b"x" * size))

    bpfsys.prog_test_run(fd, pkt("S", seq=0, ack=0))
    bpfsys.prog_test_run(fd, pkt("SA", src=EP, dst=CLIENT, sp=8080, dp=41000, seq=0, ack=1))
    bpfsys.prog_test_run(fd, pkt("A"))
    return [mean_ns(fd, [pkt("PA", size=size)], runs) for size in SIZES]


def measure(runs: int) -> list[tuple[str, list[float]]]:
    ep = (EndpointSpec(EP, 8080),)
    with loaded_node("xlb-bench-sctp-", name="bench", max_services=16, max_backends=64,
                     ct_size=1 << 16, redirect=False) as node:
        node.put_services([
            ServiceSpec(VIP, 80, Proto.TCP, endpoints=ep),
            ServiceSpec(VIP, 38412, Proto.SCTP, endpoints=(EndpointSpec(EP, 38412),)),
            ServiceSpec(VIP, 38413, Proto.SCTP, endpoints=(EndpointSpec(EP, 9000),)),
            ServiceSpec(VIP, 38414, Proto.SCTP, mode=Mode.FULLNAT, snat_addr=SNAT,
                        endpoints=(EndpointSpec(EP, 9000),)),
        ])
        fd = node.dp.fast_fd
        return [("TCP DNAT, port changed", _tcp_ns(fd, runs)),
                ("SCTP DNAT, same port (CRC untouched)", _sctp_ns(node, fd, 38412, runs)),
                ("SCTP DNAT, port changed (CRC updated)", _sctp_ns(node, fd, 38413, runs)),
                ("SCTP full-NAT (CRC updated)", _sctp_ns(node, fd, 38414, runs))]


def table(rows: list[tuple[str, list[float]]]) -> str:
    head = " | ".join(f"{s} B payload" for s in SIZES)
    lines = [f"| established flow | {head} |", "|---|" + "---:|" * len(SIZES)]
    lines += [f"| {name} | " + " | ".join(f"{v:.0f}" for v in ns) + " |" for name, ns in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sctp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200_000)
    args = p.parse_args(argv)
    rows = measure(args.runs)
    sys.stdout.write(f"ns per packet (BPF_PROG_TEST_RUN, mean of {args.runs:,} runs, "
                     f"kernel {os.uname().release})\n{table(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
