"""Traffic clients that run inside a namespace, plus wrappers that run them there.

In the namespace (``python -m lab.client MODE ...``; each prints one JSON object):

- ``tcp-who --vip V --port P --count N``: N separate TCP connections, each sends ``WHO``;
  prints ``{"be1": n, "be2": m, "errors": k}``.
- ``udp-who --vip V --port P --count N``: N datagrams, each from a fresh socket (so a
  distinct source port); same output.
- ``long --vip V --port P --interval-ms I --duration S``: one TCP connection exchanging a
  line every I ms for S seconds; prints ``{"sent", "received", "errors", "peer", "local",
  "names", "broken", "first_error"}``; ``peer`` is getpeername(), i.e. must be the VIP.

From the test process: :func:`run_tcp_who`, :func:`run_udp_who`, :func:`run_tcp_long`
and :func:`start_tcp_long` run those in ``topo.client_ns`` (or another namespace).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import structlog

from lab import netns

if TYPE_CHECKING:
    from lab.topology import Topology

log = structlog.get_logger(__name__)

_MAX_ERR_LOGS = 5


# -- in-namespace side ------------------------------------------------------------------


def _recv_line(sock: socket.socket, buf: bytearray, deadline: float) -> bytes:
    """One line (without newline) from ``sock``; raises TimeoutError past ``deadline``."""
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            return line
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply line before deadline")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed by peer")
        buf += chunk


def _note_error(counts: Counter[str], n_logged: list[int], kind: str, exc: BaseException) -> None:
    counts["errors"] += 1
    if n_logged[0] < _MAX_ERR_LOGS:
        n_logged[0] += 1
        log.warning("client.error", mode=kind, error=f"{type(exc).__name__}: {exc}")


def tcp_who(vip: str, port: int, count: int, timeout: float = 2.0,
            source: str = "") -> dict[str, int]:
    """``count`` TCP connections to vip:port, each asking ``WHO``; names -> counts.
    ``source``: the local address to connect from (default: the kernel's choice)."""
    counts: Counter[str] = Counter()
    counts["errors"] = 0
    logged = [0]
    for _ in range(count):
        try:
            with socket.create_connection((vip, port), timeout=timeout,
                                          source_address=(source, 0) if source else None) as s:
                s.sendall(b"WHO\n")
                name = _recv_line(s, bytearray(), time.monotonic() + timeout).decode()
                counts[name.split(" ", 1)[0]] += 1
        except (OSError, ValueError) as exc:
            _note_error(counts, logged, "tcp-who", exc)
    return dict(counts)


def udp_who(vip: str, port: int, count: int, timeout: float = 2.0,
            source: str = "") -> dict[str, int]:
    """``count`` datagrams to vip:port, each from a new socket; names -> counts."""
    counts: Counter[str] = Counter()
    counts["errors"] = 0
    logged = [0]
    for _ in range(count):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                if source:
                    s.bind((source, 0))
                s.connect((vip, port))  # only accept replies from vip:port
                s.send(b"WHO")
                data = s.recv(65535).decode()
                counts[data.split(" ", 1)[0]] += 1
        except (OSError, ValueError) as exc:
            _note_error(counts, logged, "udp-who", exc)
    return dict(counts)


def tcp_long(
    vip: str, port: int, interval_ms: float, duration: float, timeout: float = 2.0
) -> dict[str, Any]:
    """One TCP connection, one line every ``interval_ms`` for ``duration`` s."""
    res: dict[str, Any] = {
        "sent": 0, "received": 0, "errors": 0, "peer": None, "local": None,
        "names": {}, "broken": False, "first_error": None,
    }
    names: Counter[str] = Counter()

    def fail(exc: BaseException) -> None:
        res["errors"] += 1
        if res["first_error"] is None:
            res["first_error"] = f"{type(exc).__name__}: {exc}"

    try:
        s = socket.create_connection((vip, port), timeout=timeout)
    except OSError as exc:
        fail(exc)
        res["broken"] = True
        return res
    with s:
        res["peer"] = "{}:{}".format(*s.getpeername()[:2])
        res["local"] = "{}:{}".format(*s.getsockname()[:2])
        buf = bytearray()
        end = time.monotonic() + duration
        seq = 0
        next_at = time.monotonic()
        while time.monotonic() < end:
            seq += 1
            payload = f"seq {seq}".encode()
            try:
                s.sendall(payload + b"\n")
                res["sent"] += 1
                deadline = time.monotonic() + timeout
                while True:  # skip late replies to earlier lines
                    line = _recv_line(s, buf, deadline)
                    name, _, echoed = line.partition(b" ")
                    if echoed == payload:
                        res["received"] += 1
                        names[name.decode()] += 1
                        break
            except TimeoutError as exc:
                fail(exc)
            except OSError as exc:  # reset / closed: the connection is gone
                fail(exc)
                res["broken"] = True
                break
            next_at += interval_ms / 1000.0
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    res["names"] = dict(names)
    return res


def main(argv: list[str] | None = None) -> int:
    from xlbcore.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m lab.client")
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("tcp-who", "udp-who", "long"):
        sp = sub.add_parser(mode)
        sp.add_argument("--vip", required=True)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--timeout", type=float, default=2.0)
        if mode == "long":
            sp.add_argument("--interval-ms", type=float, default=100.0)
            sp.add_argument("--duration", type=float, default=5.0)
        else:
            sp.add_argument("--count", type=int, default=10)
            sp.add_argument("--source", default="", help="local address to send from")
    args = p.parse_args(argv)
    configure_logging("kv", "info")
    out: dict[str, Any]
    if args.mode == "tcp-who":
        out = dict(tcp_who(args.vip, args.port, args.count, args.timeout, args.source))
    elif args.mode == "udp-who":
        out = dict(udp_who(args.vip, args.port, args.count, args.timeout, args.source))
    else:
        out = tcp_long(args.vip, args.port, args.interval_ms, args.duration, args.timeout)
    sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


# -- test-process side ------------------------------------------------------------------


def _argv(mode: str, vip: str, port: int, timeout: float, **extra: Any) -> list[str]:
    argv = [sys.executable, "-m", "lab.client", mode, "--vip", vip, "--port", str(port),
            "--timeout", str(timeout)]
    for key, val in extra.items():
        if val == "":
            continue  # an unset option
        argv += [f"--{key.replace('_', '-')}", str(val)]
    return argv


def _parse(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    if proc.stderr.strip():
        log.debug("client.stderr", stderr=proc.stderr.strip()[-2000:])
    try:
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise netns.NetnsError(
            f"lab.client gave no JSON (rc={proc.returncode}): {proc.stderr.strip()[-2000:]}"
        ) from exc
    return out


def run_tcp_who(
    topo: Topology, vip: str, port: int, count: int = 10, timeout: float = 2.0,
    ns: str | None = None, source: str = "",
) -> dict[str, int]:
    """``tcp_who`` in ``ns`` (default the client namespace): ``{"be1": n, ..., "errors": k}``."""
    argv = _argv("tcp-who", vip, port, timeout, count=count, source=source)
    proc = topo.run(ns or topo.client_ns, argv, env=netns.python_env(),
                    timeout=30 + count * (timeout + 0.5))
    return _parse(proc)


def run_udp_who(
    topo: Topology, vip: str, port: int, count: int = 10, timeout: float = 2.0,
    ns: str | None = None, source: str = "",
) -> dict[str, int]:
    """``udp_who`` in ``ns`` (default the client namespace)."""
    argv = _argv("udp-who", vip, port, timeout, count=count, source=source)
    proc = topo.run(ns or topo.client_ns, argv, env=netns.python_env(),
                    timeout=30 + count * (timeout + 0.5))
    return _parse(proc)


def run_tcp_long(
    topo: Topology, vip: str, port: int, duration: float = 5.0, interval_ms: float = 100.0,
    timeout: float = 2.0, ns: str | None = None,
) -> dict[str, Any]:
    """``tcp_long`` in ``ns``, waiting for it to finish."""
    return start_tcp_long(topo, vip, port, duration, interval_ms, timeout, ns).result()


class LongConn:
    """A running ``long`` client (see :func:`start_tcp_long`)."""

    def __init__(self, topo: Topology, proc: subprocess.Popen[str], duration: float) -> None:
        self._topo = topo
        self.proc = proc
        self.duration = duration

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the client to finish and return its JSON report."""
        wait = timeout if timeout is not None else self.duration + 30.0
        try:
            out, err = self.proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired as exc:
            self._topo.stop(self.proc)
            raise netns.NetnsError(f"long client did not finish within {wait}s") from exc
        return _parse(subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                                  out, err))


def start_tcp_long(
    topo: Topology, vip: str, port: int, duration: float = 5.0, interval_ms: float = 100.0,
    timeout: float = 2.0, ns: str | None = None,
) -> LongConn:
    """Start a ``long`` client in the background (e.g. across a dpd restart); call
    ``.result()`` on the returned handle for its report."""
    argv = _argv("long", vip, port, timeout, interval_ms=interval_ms, duration=duration)
    proc = topo.popen(ns or topo.client_ns, argv, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, env=netns.python_env())
    return LongConn(topo, proc, duration)


if __name__ == "__main__":
    sys.exit(main())
