"""Byte-order conversions between API values and datapath map fields (pure Python).

Map fields holding addresses and ports are in network byte order; ctypes reads them as
host-order integers, so conversions go through the raw bytes."""

from __future__ import annotations

import socket
import struct

from dpd.model import Proto, ServiceKey


def ip_to_be32(ip: str) -> int:
    return int(struct.unpack("=I", socket.inet_aton(ip))[0])


def be32_to_ip(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def port_to_be16(port: int) -> int:
    return socket.htons(port)


def be16_to_port(value: int) -> int:
    return socket.ntohs(value)


def nat_key_fields(key: ServiceKey) -> tuple[int, int, int, int]:
    return ip_to_be32(key.vip), port_to_be16(key.port), int(key.proto), 0


def service_key_of(vip: int, port: int, proto: int) -> ServiceKey:
    return ServiceKey(be32_to_ip(vip), be16_to_port(port), Proto(proto))
