"""The daemons stop within xlbcore.daemon.STOP_LIMIT (2 s) of SIGTERM/SIGINT, always.

The daemons run as subprocesses. What is checked: every thread blocks the stop signals
(so the kernel cannot hand one to a grpc thread, where a Python handler would never run),
a looped stop under CPU load, a stop while the main thread is blocked writing a log line
to a full stderr pipe (a Python handler that logs deadlocks there), the watchdog that
ends a stop that overran, and children that get the signals unblocked. dpd's variants
need root (they load eBPF).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xlbcore.daemon import EXIT_STOP_OVERRAN, STOP_LIMIT, unblocked_threads

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def is_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_serving(proc: subprocess.Popen[Any], address: str, log: Path | None,
                 timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before serving: "
                        f"{log.read_text() if log else ''}")
        if is_serving(address):
            return
        time.sleep(0.05)
    pytest.fail(f"{address} not SERVING after {timeout} s: {log.read_text() if log else ''}")


def stop_within_limit(proc: subprocess.Popen[Any], sig: int, log: Path | None) -> float:
    """Send `sig`; assert exit code 0 within STOP_LIMIT. Returns the seconds taken."""
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=STOP_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{signal.Signals(sig).name}: still running after {STOP_LIMIT} s: "
                    f"{log.read_text() if log else ''}")
    took = time.monotonic() - sent
    assert rc == 0, f"{signal.Signals(sig).name}: exit {rc}: {log.read_text() if log else ''}"
    return took


def wchan(pid: int, tid: int | None = None) -> str:
    """Where the thread sleeps in the kernel ("0" when the kernel does not say)."""
    return Path(f"/proc/{pid}/task/{tid or pid}/wchan").read_text().strip()


def assert_signals_blocked(pid: int) -> None:
    """No thread but the main one can take a stop signal, and the main one waits for it
    in sigwait (which unblocks the signals it waits for while it waits)."""
    deadline = time.monotonic() + 5
    while (where := wchan(pid)) not in ("0",) and "sigtimedwait" not in where:
        assert time.monotonic() < deadline, f"main thread in {where}, not in sigwait"
        time.sleep(0.02)
    assert [t for t in unblocked_threads(pid) if t[0] != pid] == [], \
        "a thread could take the signal"


def policyd(sockdir: Path, tag: str, stderr: int | IO[Any]) -> subprocess.Popen[Any]:
    return subprocess.Popen(
        [sys.executable, "-m", "policyd.main", "--listen", f"unix:{sockdir}/{tag}.sock",
         "--db", str(sockdir / f"{tag}.db"), "--resync-interval", "0.5"],
        cwd=ROOT, stderr=stderr, env=ENV,
    )  # fmt: skip


def kill(procs: list[subprocess.Popen[Any]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def cpu_load() -> Iterator[None]:
    """A busy process for the duration of the test."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    busy.kill()
    busy.wait()


def test_policyd_stops_within_limit_looped(sockdir, cpu_load, record_property):
    """20 stops per signal, 4 daemons at a time, beside a busy process."""
    per_signal, batch = 20, 4
    took: list[float] = []
    for round_ in range(per_signal * len(SIGNALS) // batch):
        sig = SIGNALS[round_ % len(SIGNALS)]
        procs: list[subprocess.Popen[Any]] = []
        logs = [sockdir / f"r{round_}-{i}.log" for i in range(batch)]
        try:
            for i, log in enumerate(logs):
                with open(log, "w") as f:
                    procs.append(policyd(sockdir, f"r{round_}-{i}", f))
            for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
                wait_serving(proc, f"unix:{sockdir}/r{round_}-{i}.sock", log, timeout=30)
                assert_signals_blocked(proc.pid)
            for proc, log in zip(procs, logs, strict=True):
                took.append(stop_within_limit(proc, sig, log))
        finally:
            kill(procs)
        for log in logs:
            assert "policyd.stopped" in log.read_text()
    assert len(took) == per_signal * len(SIGNALS)
    record_property("slowest_stop_s", round(max(took), 3))


def full_pipe() -> tuple[int, int]:
    """A pipe whose write end is full: the next write to it blocks."""
    r, w = os.pipe()
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(w, fcntl.F_SETFL, flags)
    return r, w


def wait_blocked_in_write(pid: int, timeout: float = 10.0) -> None:
    """Until the main thread sleeps in pipe_write (the log line it cannot write)."""
    deadline = time.monotonic() + timeout
    where = ""
    while time.monotonic() < deadline:
        where = wchan(pid)
        if where.endswith("pipe_write"):  # pipe_write, anon_pipe_write (6.16+)
            return
        if where == "0":  # the kernel does not say; give the log line time to block
            time.sleep(1.0)
            return
        time.sleep(0.02)
    pytest.fail(f"main thread not blocked writing stderr (wchan {where})")


def drain(fd: int, out: list[bytes]) -> threading.Thread:
    def run() -> None:
        while chunk := os.read(fd, 65536):
            out.append(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_policyd_stops_when_signalled_while_stderr_is_full(sockdir, sig):
    """The signal comes while the main thread is blocked writing its first log line; once
    stderr drains, the daemon stops within the limit. (A Python handler that logs
    deadlocks here on structlog's non-reentrant lock, every time.)"""
    r, w = full_pipe()
    proc = policyd(sockdir, "p", w)
    os.close(w)
    out: list[bytes] = []
    try:
        wait_serving(proc, f"unix:{sockdir}/p.sock", None, timeout=30)
        wait_blocked_in_write(proc.pid)
        proc.send_signal(sig)
        time.sleep(0.3)  # the signal lands while the write is blocked
        assert proc.poll() is None
        drained = time.monotonic()
        reader = drain(r, out)
        try:
            rc = proc.wait(timeout=STOP_LIMIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_LIMIT} s after stderr drained")
        assert time.monotonic() - drained < STOP_LIMIT
        reader.join(5)
    finally:
        kill([proc])
        os.close(r)
    text = b"".join(out).decode(errors="replace")
    assert rc == 0, text[-2000:]
    assert "event=policyd.stopped" in text, text[-2000:]


def test_policyd_stuck_stderr_ends_by_watchdog(sockdir):
    """stderr never drains: the stop cannot go on, so the watchdog ends the process."""
    r, w = full_pipe()
    proc = policyd(sockdir, "p", w)
    os.close(w)
    try:
        wait_serving(proc, f"unix:{sockdir}/p.sock", None, timeout=30)
        wait_blocked_in_write(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # The watchdog acts ~1.9 s after the signal; 0.5 s more for scheduling under load.
        rc = proc.wait(timeout=STOP_LIMIT + 0.5)
        took = time.monotonic() - sent
    finally:
        kill([proc])
        os.close(r)
    assert rc == EXIT_STOP_OVERRAN
    assert took > STOP_LIMIT / 2  # it waited for the orderly stop first


# A stand-alone use of StopSignals, run as a process: prints what it sees, one per line.
SCRIPT = r"""
import os, signal, subprocess, sys, threading, time
import structlog
from xlbcore.daemon import StopSignals, unblocked_preexec, unblocked_threads
from xlbcore.logs import configure_logging

stop = StopSignals()
configure_logging("kv", "info")
log = structlog.get_logger()
t = threading.Thread(target=time.sleep, args=(30,), daemon=True)
t.start()
print("unblocked", unblocked_threads(), flush=True)
blk = ["grep", "SigBlk", "/proc/self/status"]
print("child", subprocess.run(blk, capture_output=True, text=True).stdout.split()[1])
print("child_unblocked", subprocess.run(blk, capture_output=True, text=True,
      preexec_fn=unblocked_preexec).stdout.split()[1], flush=True)
stop.watch(log, prefix="t_")
print("requested", stop.requested(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("requested", stop.requested(), stop.requested(), flush=True)
print("got", stop.wait().name, flush=True)
print("again", stop.wait(0), flush=True)
stop.step("slow_step")
time.sleep(10)
print("not reached", flush=True)
"""


def test_stop_signals_in_a_process():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=30)
    lines = proc.stdout.splitlines()
    assert lines[0] == "unblocked []"
    bits = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    # subprocess's restore_signals does not touch the mask: the child inherits it ...
    assert int(lines[1].split()[1], 16) & bits == bits
    # ... unless it starts with unblocked_preexec.
    assert int(lines[2].split()[1], 16) & bits == 0
    assert lines[3:] == ["requested False", "requested True True", "got SIGTERM",
                         "again None"], proc.stdout
    assert proc.returncode == EXIT_STOP_OVERRAN, proc.stderr
    assert "event=t_stop_overran" in proc.stderr and "step=slow_step" in proc.stderr


# dpd: root, eBPF. The first start compiles (seconds); later ones reuse the pins.


@pytest.fixture
def dpd_instance(sockdir: Path) -> Iterator[list[str]]:
    """argv of a dpd with its own node name and bpffs root under /tmp; afterwards
    --cleanup, umount and rmdir, whatever happened."""
    bpf_root = tempfile.mkdtemp(prefix="xlbt-stop-bpf-", dir="/tmp")
    base = [sys.executable, "-m", "dpd.main", "--name", f"stop{os.getpid()}",
            "--bpf-root", bpf_root]
    try:
        yield [*base, "--listen", f"unix:{sockdir}/d.sock"]
    finally:
        subprocess.run([*base, "--cleanup"], cwd=ROOT, env=ENV, capture_output=True,
                       timeout=60)
        if os.path.ismount(bpf_root):
            subprocess.run(["umount", bpf_root], check=False)
        shutil.rmtree(bpf_root, ignore_errors=True)


@pytest.mark.root
def test_dpd_stops_within_limit_looped(dpd_instance, sockdir):
    runs = 5  # per signal
    for i in range(runs * len(SIGNALS)):
        sig = SIGNALS[i % len(SIGNALS)]
        log = sockdir / f"d{i}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(dpd_instance, cwd=ROOT, env=ENV, stderr=f)
        try:
            wait_serving(proc, f"unix:{sockdir}/d.sock", log, timeout=180 if i == 0 else 60)
            assert_signals_blocked(proc.pid)
            stop_within_limit(proc, sig, log)
        finally:
            kill([proc])
        assert "dpd_stopped" in log.read_text()


@pytest.mark.root
def test_dpd_stops_during_start_up(dpd_instance, sockdir):
    """A stop while compiling (a fresh bpffs root: nothing to reuse) cancels it."""
    log = sockdir / "d.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(dpd_instance, cwd=ROOT, env=ENV, stderr=f)
    try:
        deadline = time.monotonic() + 30
        while not compiling(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        stop_within_limit(proc, signal.SIGTERM, log)
    finally:
        kill([proc])
    text = log.read_text()
    assert "during=start-up" in text and "dpd_started" not in text, text


def compiling(pid: int) -> bool:
    """Whether dpd runs its compiler child (python -m dpd.compile) now."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        try:
            if b"dpd.compile" in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
        except FileNotFoundError:
            pass
    return False
