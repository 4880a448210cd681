"""The lab topology: namespaces, routing through the lb node, test servers, cleanup.

Needs root and network namespaces: skipped without them on a developer machine, but
under CI=true a missing capability fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from lab import Topology, cleanup_leftovers, netns
from lab.client import run_tcp_long, run_tcp_who, run_udp_who
from lab.servers import start_backends

pytestmark = pytest.mark.root


def _why_unusable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"xlbprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "del", probe], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        return f"cannot create network namespaces: {exc.stderr!r}"
    return None


@pytest.fixture(scope="module")
def root_ok() -> None:
    why = _why_unusable()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"root test cannot run under CI=true: {why}")
    pytest.skip(why)


@pytest.fixture
def topo(root_ok: None) -> Iterator[Topology]:
    t = Topology(backends=2)
    try:
        yield t
    finally:
        t.cleanup()
        cleanup_leftovers(t.prefix)  # safety net, only our own prefix


def test_routing_through_lb_reaches_each_backend(topo: Topology) -> None:
    assert topo.lb_ifaces == ["c0", "b1", "b2"]
    assert topo.backend_ips == ["198.18.1.2", "198.18.2.2"]
    assert netns.sysctl_get(topo.lb_ns, "net.ipv4.ip_forward") == "1"
    for iface in ["all", "default", *topo.lb_ifaces]:
        assert netns.sysctl_get(topo.lb_ns, f"net.ipv4.conf.{iface}.rp_filter") == "0"
    procs = start_backends(topo, port=8080)
    assert all(p.poll() is None for p in procs)

    for i, ip in enumerate(topo.backend_ips, start=1):
        res = run_tcp_who(topo, ip, 8080, count=3)
        assert res == {f"be{i}": 3, "errors": 0}
        res = run_udp_who(topo, ip, 8080, count=3)
        assert res == {f"be{i}": 3, "errors": 0}

    long = run_tcp_long(topo, topo.backend_ips[1], 8080, duration=0.5, interval_ms=50)
    assert long["errors"] == 0 and not long["broken"]
    assert long["sent"] == long["received"] >= 5
    assert long["peer"] == f"{topo.backend_ips[1]}:8080"
    assert long["names"] == {"be2": long["received"]}


def test_cleanup_removes_everything(root_ok: None) -> None:
    topo = Topology(backends=2)
    names = topo.namespaces
    workdir = topo.workdir
    try:
        assert set(names) <= set(netns.list_namespaces())
        procs = start_backends(topo, port=8080)
    finally:
        topo.cleanup()
    assert not set(names) & set(netns.list_namespaces())
    assert all(p.poll() is not None for p in procs)
    assert not workdir.exists()
    topo.cleanup()  # idempotent


def test_cleanup_on_exception(root_ok: None) -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        with Topology(backends=1) as topo:
            names = topo.namespaces
            topo.popen(topo.backend_ns[0], ["sleep", "60"])
            raise RuntimeError("boom")
    assert names and not set(names) & set(netns.list_namespaces())


def test_cleanup_leftovers_matches_prefix_only(root_ok: None) -> None:
    topo = Topology(backends=1)
    bystander = f"xlbkeep{os.getpid()}-cl"
    netns.create(bystander)
    try:
        gone = cleanup_leftovers(topo.prefix + "-")
        assert sorted(gone) == sorted(topo.namespaces)
        assert netns.exists(bystander)
    finally:
        topo.cleanup()
        netns.delete(bystander)
    assert not ({bystander, *topo.namespaces} & set(netns.list_namespaces()))
