"""Packet builders and checks for datapath tests (scapy)."""

from __future__ import annotations

import struct

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from dpd import bpfsys

CLIENT = "198.18.0.2"
VIP = "198.19.0.10"
VIP2 = "198.19.0.11"
EP1 = "198.18.1.2"
EP2 = "198.18.2.2"
MAC_C = "02:00:00:00:00:01"
# BPF_PROG_TEST_RUN classifies a frame against the loopback device (MAC 00:..:00) unless
# an ingress ifindex is given: frames to any other MAC are PACKET_OTHERHOST, which the
# datapath leaves alone (not for this node). Test frames are addressed to the node.
MAC_L = "00:00:00:00:00:00"

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
FORWARDED = (TC_ACT_OK, TC_ACT_REDIRECT)  # handed to the stack, or redirected


# Initial sequence numbers of the handshakes the tests play: the client's SYN carries
# C_ISN, the endpoint's SYN-ACK S_ISN; later packets default to the next numbers.
C_ISN = 1000
S_ISN = 5000
ENDPOINTS = ("198.18.1.2", "198.18.2.2")


def tcp(
    src: str, dst: str, sport: int, dport: int, flags: str = "S", payload: bytes = b"",
    seq: int | None = None, ack: int | None = None,
) -> bytes:
    """A TCP packet; seq/ack default to what a client (or, from an endpoint address,
    the endpoint) sends right after the handshake."""
    from_ep = src in ENDPOINTS
    if seq is None:
        seq = {"S": C_ISN, "SA": S_ISN}.get(flags, (S_ISN if from_ep else C_ISN) + 1)
    if ack is None:
        ack = 0 if flags == "S" else (C_ISN if from_ep or flags == "SA" else S_ISN) + 1
    return bytes(
        Ether(src=MAC_C, dst=MAC_L) / IP(src=src, dst=dst, ttl=64)
        / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
        / payload
    )


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"hello") -> bytes:
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport)
                 / payload)


def run(node: object, packet: bytes) -> tuple[int, Ether]:
    res = bpfsys.prog_test_run(node.dp.fast_fd, packet)  # type: ignore[attr-defined]
    return res.retval, Ether(res.data)


def checksums_valid(pkt: Ether) -> bool:
    """Recompute IP and L4 checksums with scapy and compare with what the datapath wrote."""
    fresh = Ether(bytes(pkt))
    ip = fresh[IP]
    got_ip = ip.chksum
    l4 = fresh[TCP] if TCP in fresh else fresh[UDP]
    got_l4 = l4.chksum
    del ip.chksum
    del l4.chksum
    rebuilt = Ether(bytes(fresh))
    want_l4 = (rebuilt[TCP] if TCP in rebuilt else rebuilt[UDP]).chksum
    return got_ip == rebuilt[IP].chksum and got_l4 == want_l4


def sum16(data: bytes) -> int:
    """The one's-complement sum of 16-bit words (0xffff over a region whose checksum
    field is right)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return s
