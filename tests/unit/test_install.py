"""`pip install .` (not editable) gives working commands run from any directory, with
the eBPF sources shipped inside the package: what a container image relies on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """A fresh venv holding xlb installed from the checkout; its dependencies come from
    the development venv through a .pth file, so no registry is needed."""
    where = Path(tempfile.mkdtemp(prefix="xlb-install-"))
    try:
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages",
                        str(where / "venv")], check=True)
        site = subprocess.run([str(where / "venv/bin/python"), "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        deps = subprocess.run([sys.executable, "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "xlb_test_deps.pth").write_text(deps + "\n")
        build = where / "src"
        shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.egg-info", "build", ".pytest_cache",
            ".mypy_cache", ".ruff_cache"))
        subprocess.run([str(where / "venv/bin/pip"), "install", "-q", "--no-deps",
                        "--no-build-isolation", str(build)], check=True,
                       capture_output=True, text=True)
        shutil.rmtree(build)
        yield where / "venv"
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd="/", env=env,
                          capture_output=True, text=True, timeout=60)


def test_commands_work_outside_the_checkout(installed):
    for cmd in ("xlb-dpd", "xlb-policyd", "xlbctl"):
        res = _run(installed, cmd, "--help")
        assert res.returncode == 0, res.stderr
        assert "usage:" in res.stdout
    res = _run(installed, "python", "-c",
               "import dpd, dpd.abi, dpd.loader, xlbcore, policyd.cli;"
               "print(dpd.__file__); print(len(dpd.loader.source_text()));"
               "print(dpd.abi.load().const('XLB_MAX_EPS'))")
    assert res.returncode == 0, res.stderr
    module, source_len, max_eps = res.stdout.split()
    assert "site-packages" in module and str(ROOT) not in module
    assert int(source_len) > 1000 and int(max_eps) > 0


@pytest.mark.root
def test_installed_dpd_loads_the_datapath_and_serves(installed, tmp_path):
    root = tempfile.mkdtemp(prefix="xlb-inst-bpf-")
    sock = tmp_path / "d.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen([str(installed / "bin/xlb-dpd"), "--name", "inst", "--bpf-root",
                             root, "--listen", f"unix:{sock}", "--ct-aging-interval", "0"],
                            cwd="/", env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "installed dpd did not serve"
                time.sleep(0.1)
        proc.terminate()
        proc.communicate(timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        subprocess.run([str(installed / "bin/xlb-dpd"), "--name", "inst", "--bpf-root", root,
                        "--cleanup"], cwd="/", env=env, capture_output=True, timeout=60)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
