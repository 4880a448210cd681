"""A real etcd-server (Debian's ``etcd-server``) for tests: one member on loopback, its data
in a temporary directory; stopped (killed if need be) and the directory removed after."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.etcd import Etcd, EtcdError
from tests.conftest import IN_CI

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def require_etcd() -> None:
    if Path(ETCD).exists():
        return
    if IN_CI:
        pytest.fail("etcd is missing: scripts/setup.sh installs Debian's etcd-server")
    pytest.skip("needs etcd (apt-get install etcd-server)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_etcd(name: str = "xlbtest") -> Iterator[str]:
    """Start etcd; yields its client URL (http://127.0.0.1:PORT)."""
    require_etcd()
    workdir = Path(tempfile.mkdtemp(prefix="xlb-etcd-"))
    client, peer = _free_port(), _free_port()
    url = f"http://127.0.0.1:{client}"
    log = open(workdir / "etcd.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [ETCD, "--name", name, "--data-dir", str(workdir / "data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"{name}=http://127.0.0.1:{peer}",
         "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        probe = Etcd(url, timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                probe.get(b"/probe")
                break
            except EtcdError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("etcd did not start: "
                                       + (workdir / "etcd.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        probe.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
