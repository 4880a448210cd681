"""Run in the client namespace: wait for `go` on stdin, then try TCP connects to
VIP:PORT until one succeeds; print the CLOCK_MONOTONIC time (ns) of that success.

CLOCK_MONOTONIC is one clock for the whole machine, whatever the network namespace, so
the caller compares it with the time it made its API call."""

from __future__ import annotations

import socket
import sys
import time


def main() -> int:
    vip, port, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.002)
            try:
                s.connect((vip, port))
            except OSError:
                time.sleep(0.0001)
                continue
            sys.stdout.write(f"{time.monotonic_ns()}\n")
            return 0
    sys.stdout.write("timeout\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
