"""Capture a few frames on an interface with an AF_PACKET socket (run it inside the
interface's namespace: ``ip netns exec NS python -m lab.capture IFACE``): prints
``ready`` once the socket is bound, then each IPv4 frame received as hex, one per line,
until --count frames or --timeout seconds. The demo reads a mirror interface's copies
this way (lab.demo_xdp)."""

from __future__ import annotations

import argparse
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.capture")
    p.add_argument("iface")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((args.iface, 0))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    end = time.monotonic() + args.timeout
    got = 0
    while got < args.count:
        left = end - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            frame, addr = s.recvfrom(65535)
        except TimeoutError:
            break
        if addr[2] == PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
            continue  # what this end sent, or not IPv4 (neighbour discovery...)
        sys.stdout.write(frame.hex() + "\n")
        sys.stdout.flush()
        got += 1
    s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
