"""Run xlb's daemons for tests, benchmarks and the demo: xlb-dpd inside a topology's
load-balancer namespace (network namespace only, via --netns, so its bpffs mount stays in
the host's mount namespace) and xlb-policyd, each as a real subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lab import netns

log = structlog.get_logger("lab.daemons")


def wait_serving(address: str, timeout: float = 60.0, proc: subprocess.Popen[Any] | None = None,
                 logfile: Path | None = None) -> None:
    """Wait until the gRPC health service at `address` says SERVING."""
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text()[-3000:] if logfile and logfile.exists() else ""
            raise RuntimeError(f"daemon exited with {proc.returncode} before serving: {tail}")
        try:
            with grpc.insecure_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as e:
            last = str(e.code())
        time.sleep(0.1)
    raise TimeoutError(f"{address} not serving after {timeout}s ({last})")


class Daemon:
    """A daemon subprocess with its log file; stop() ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], address: str, logfile: Path) -> None:
        self.argv = argv
        self.address = address
        self.logfile = logfile
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 60.0) -> Self:
        with open(self.logfile, "a") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                         env=netns.python_env(), start_new_session=True)
        wait_serving(self.address, timeout, self.proc, self.logfile)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log_text(self) -> str:
        return self.logfile.read_text() if self.logfile.exists() else ""


class Dpd(Daemon):
    """xlb-dpd for node `name` in network namespace `ns`; pins under its own bpffs root."""

    def __init__(self, name: str, ns: str, attach: list[str], workdir: Path,
                 bpf_root: str | None = None, extra: list[str] | None = None) -> None:
        self.name = name
        self.ns = ns
        self.bpf_root = bpf_root or tempfile.mkdtemp(prefix="xlb-bpf-")
        self.socket = str(workdir / f"dpd-{name}.sock")
        self.base = [sys.executable, "-m", "dpd.main", "--name", name, "--netns", ns,
                     "--bpf-root", self.bpf_root]
        argv = [*self.base, "--listen", f"unix:{self.socket}", "--attach", ",".join(attach),
                *(extra or [])]
        super().__init__(argv, f"unix:{self.socket}", workdir / f"dpd-{name}.log")

    def wipe_pins(self) -> None:
        """Remove this node's pins (as a node rebuilt from scratch would have none)."""
        pin_dir = os.path.join(self.bpf_root, self.name)
        for entry in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, entry))

    def cleanup(self) -> None:
        """Stop dpd, then `xlb-dpd --cleanup`: detach, unpin, unmount; remove the root."""
        self.stop()
        res = subprocess.run([*self.base, "--cleanup"], capture_output=True, text=True,
                             env=netns.python_env(), timeout=60)
        if res.returncode != 0 and netns.exists(self.ns):
            log.warning("dpd_cleanup_failed", node=self.name, stderr=res.stderr[-2000:])
        if os.path.ismount(self.bpf_root):
            subprocess.run(["umount", self.bpf_root], check=False)
        shutil.rmtree(self.bpf_root, ignore_errors=True)


class Policyd(Daemon):
    def __init__(self, workdir: Path, db: Path | None = None,
                 resync_interval: float = 1.0, extra: list[str] | None = None) -> None:
        self.socket = str(workdir / "policyd.sock")
        self.db = db or workdir / "policyd.db"
        argv = [sys.executable, "-m", "policyd.main", "--listen", f"unix:{self.socket}",
                "--db", str(self.db), "--resync-interval", str(resync_interval), *(extra or [])]
        super().__init__(argv, f"unix:{self.socket}", workdir / "policyd.log")
