"""xlb-policyd as a process: starts, serves health, stops cleanly on SIGTERM/SIGINT within
STOP_LIMIT (looped, under load and with a stalled stderr: tests/unit/test_daemon_stop.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policyd.client import PolicyClient
from xlbcore.daemon import STOP_LIMIT

ROOT = Path(__file__).resolve().parents[2]


def start(sockdir: Path, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "policyd.main", "--listen", f"unix:{sockdir}/p.sock",
         "--db", str(tmp_path / "p.db"), "--resync-interval", "0.5", *extra],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def wait_serving(address: str, proc: subprocess.Popen[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    pytest.fail("policyd did not become SERVING")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_then_stops_cleanly(sockdir, tmp_path, sig):
    proc = start(sockdir, tmp_path, "--log-format", "json")
    try:
        address = f"unix:{sockdir}/p.sock"
        wait_serving(address, proc)
        with PolicyClient(address) as client:
            client.apply_service("web", "198.19.0.10", 80, "tcp", ["198.18.1.2:80"])
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=STOP_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert not (sockdir / "p.sock").exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), err  # one JSON event a line
    assert '"event": "policyd.stopped"' in lines[-1]


def test_grace_is_capped_to_fit_the_stop_limit(sockdir, tmp_path):
    proc = start(sockdir, tmp_path, "--grace", "5")
    try:
        wait_serving(f"unix:{sockdir}/p.sock", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "event=policyd.grace_capped requested=5.0 grace=1.0" in err, err


def test_bad_listen_address_fails_fast(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "policyd.main", "--listen", "nohost",
         "--db", str(tmp_path / "p.db")],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 1
    assert "policyd.start_failed" in proc.stderr
    assert "listen" in proc.stderr
