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


# SCTP (RFC 9260): a common header (ports, verification tag, CRC32c) and chunks.
SCTP_INIT, SCTP_INIT_ACK, SCTP_ABORT, SCTP_SHUTDOWN_COMPLETE = 1, 2, 6, 14
SCTP_DATA, SCTP_COOKIE_ECHO = 0, 10
CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def crc32c(data: bytes) -> int:
    """CRC32c computed bit by bit: independent of the datapath's incremental update."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (CRC32C_POLY & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def sctp_chunk(ctype: int, value: bytes = b"", flags: int = 0) -> bytes:
    """One chunk, padded to 4 bytes (the length field counts the unpadded chunk)."""
    raw = struct.pack("!BBH", ctype, flags, 4 + len(value)) + value
    return raw + b"\0" * (-len(raw) % 4)


def sctp_init(tag: int = 0x1234ABCD) -> bytes:
    """An INIT chunk: initiate tag, a_rwnd, outbound and inbound streams, initial TSN."""
    return sctp_chunk(SCTP_INIT, struct.pack("!IIHHI", tag, 65536, 10, 10, 1))


def sctp(src: str, dst: str, sport: int, dport: int, chunks: bytes, vtag: int = 0,
         crc: int | None = None) -> bytes:
    """An SCTP packet with its CRC32c right (or `crc`, to send a wrong one)."""
    common = struct.pack("!HHI", sport, dport, vtag)
    if crc is None:
        crc = crc32c(common + b"\0\0\0\0" + chunks)
    l4 = common + struct.pack("<I", crc) + chunks
    return bytes(Ether(src=MAC_C, dst=MAC_L) / IP(src=src, dst=dst, proto=132) / l4)


def sctp_fields(pkt: bytes) -> tuple[int, int, int, int, bytes]:
    """(sport, dport, vtag, crc, chunks) of an SCTP packet in an Ethernet frame (IPv4,
    no options), the CRC as the field holds it (little-endian)."""
    ip = IP(pkt[14:])
    l4 = pkt[34:14 + ip.len]
    sport, dport, vtag = struct.unpack("!HHI", l4[:8])
    return sport, dport, vtag, struct.unpack("<I", l4[8:12])[0], l4[12:]


def sctp_crc_ok(pkt: bytes) -> bool:
    """The packet's CRC32c, recomputed in full over its SCTP packet, is what it holds."""
    ip = IP(pkt[14:])
    l4 = pkt[34:14 + ip.len]
    return crc32c(l4[:8] + b"\0\0\0\0" + l4[12:]) == struct.unpack("<I", l4[8:12])[0]
