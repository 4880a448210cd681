"""Run wrk in a namespace and parse its summary."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from lab.topology import Topology

_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(\w+),", re.M)
_SOCKERR = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_LAT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse(out: str) -> WrkResult:
    m = _RPS.search(out)
    if not m:
        raise ValueError(f"no Requests/sec in wrk output: {out[-1000:]}")
    total = _TOTAL.search(out)
    errors = 0
    se = _SOCKERR.search(out)
    if se:
        errors += sum(int(x) for x in se.groups())
    n2 = _NON2XX.search(out)
    if n2:
        errors += int(n2.group(1))
    lat: dict[str, float] = {}
    for pct, val, unit in _LAT.findall(out):
        lat[pct] = float(val) * _UNIT[unit] * 1000.0
    return WrkResult(
        rps=float(m.group(1)),
        requests=int(total.group(1)) if total else 0,
        errors=errors,
        p50_ms=lat.get("50"),
        p99_ms=lat.get("99"),
    )


def _argv(url: str, duration: float, connections: int, threads: int, close: bool,
          timeout: str) -> list[str]:
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", timeout, "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    return argv


def run_wrk(
    topo: Topology,
    url: str,
    duration: float,
    connections: int = 32,
    threads: int = 1,
    close: bool = False,
    timeout: str = "2s",
) -> WrkResult:
    """wrk in the client namespace; ``close`` sends ``Connection: close`` (CRR)."""
    argv = _argv(url, duration, connections, threads, close, timeout)
    proc = topo.run(topo.client_ns, argv, timeout=duration + 30)
    return parse(proc.stdout)


def run_wrk_multi(
    topo: Topology,
    urls: list[str],
    duration: float,
    connections: int = 32,
    close: bool = False,
    timeout: str = "2s",
) -> WrkResult:
    """One single-threaded wrk per URL at the same time (``connections`` split between
    them); rates and errors are summed, latencies are the worst of the streams."""
    per = max(1, connections // len(urls))
    procs = [topo.popen(topo.client_ns, _argv(u, duration, per, 1, close, timeout),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for u in urls]
    results: list[WrkResult] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=duration + 30)
            if proc.returncode != 0:
                raise RuntimeError(f"wrk exited {proc.returncode}: {err.strip()[-500:]}")
            results.append(parse(out))
    finally:
        for proc in procs:
            topo.stop(proc)
    p50 = [r.p50_ms for r in results if r.p50_ms is not None]
    p99 = [r.p99_ms for r in results if r.p99_ms is not None]
    return WrkResult(
        rps=sum(r.rps for r in results),
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
        p50_ms=max(p50) if p50 else None,
        p99_ms=max(p99) if p99 else None,
    )
