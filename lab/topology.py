"""A client -> load-balancer node -> backends topology made of network namespaces.

::

    {p}-cl                       {p}-lb                        {p}-b1 .. {p}-bN
    eth0 198.18.0.2/24 <-veth-> c0 198.18.0.1/24
                                b1 198.18.1.1/24 <-veth-> eth0 198.18.1.2/24  ({p}-b1)
                                bN 198.18.N.1/24 <-veth-> eth0 198.18.N.2/24  ({p}-bN)

The client and the backends route everything via the lb namespace (default routes), the
lb namespace forwards (ip_forward=1, rp_filter=0). The VIP (198.19.0.10 by default) is on
no interface: whatever load balancer runs in the lb namespace translates it.

Options for the modes (docs/modes.md):

- ``backend_routes="none"``: the backends have no default route (the lb is not on their
  return path: DNAT's replies cannot reach the client, full-NAT's can);
- ``backend_routes="direct"``: each backend also has a link straight to the client
  (eth1 198.18.(100+i).2/24 <-> d{i} in the client, 198.18.(100+i).1/24) and its default
  route goes there, so its replies bypass the lb (DSR); rp_filter is off on both ends;
- ``one_arm=True``: client, lb and backends on one bridge (namespace {p}-sw): the lb has
  one interface (c0 198.18.0.1/24), backends are 198.18.0.11.. with no default route.
"""

from __future__ import annotations

import fnmatch
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from lab import netns

log = structlog.get_logger(__name__)

DEFAULT_PREFIX = "xlb"
DEFAULT_VIP = "198.19.0.10"
MAX_BACKENDS = 200


def _new_prefix() -> str:
    return DEFAULT_PREFIX + secrets.token_hex(2)


class Topology:
    """Builds the namespaces and links on construction; ``cleanup()`` removes them.

    Use as a context manager::

        with Topology(backends=2) as topo:
            topo.run(topo.client_ns, ["ping", "-c1", topo.backend_ips[0]])
    """

    def __init__(
        self,
        backends: int = 2,
        prefix: str | None = None,
        vip: str = DEFAULT_VIP,
        disable_ipv6: bool = True,
        backend_routes: str = "lb",
        one_arm: bool = False,
    ) -> None:
        if backend_routes not in ("lb", "none", "direct"):
            raise ValueError(f"backend_routes must be lb, none or direct, got {backend_routes}")
        self.backend_routes = "none" if one_arm else backend_routes
        self.one_arm = one_arm
        if not 1 <= backends <= MAX_BACKENDS:
            raise ValueError(f"backends must be 1..{MAX_BACKENDS}, got {backends}")
        self.prefix = prefix or _new_prefix()
        self.vip = vip
        self.client_ns = f"{self.prefix}-cl"
        self.lb_ns = f"{self.prefix}-lb"
        self.backend_ns = [f"{self.prefix}-b{i}" for i in range(1, backends + 1)]
        self.client_ip = "198.18.0.2"
        self.client_gw = "198.18.0.1"
        self.client_iface = "eth0"
        self.backend_iface = "eth0"
        self.lb_ifaces = ["c0"] + [f"b{i}" for i in range(1, backends + 1)]
        self.backend_ips = [f"198.18.{i}.2" for i in range(1, backends + 1)]
        self.backend_gws = [f"198.18.{i}.1" for i in range(1, backends + 1)]
        self.switch_ns = f"{self.prefix}-sw" if one_arm else ""
        if one_arm:
            self.lb_ifaces = ["c0"]
            self.backend_ips = [f"198.18.0.{10 + i}" for i in range(1, backends + 1)]
            self.backend_gws = [self.client_gw] * backends
        self.disable_ipv6 = disable_ipv6
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._closed = False
        try:
            self._build()
        except BaseException:
            self.cleanup()
            raise

    # -- construction -------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return [self.client_ns, self.lb_ns, *self.backend_ns] + (
            [self.switch_ns] if self.switch_ns else [])

    def _create_ns(self, name: str) -> None:
        if netns.exists(name):
            raise netns.NetnsError(f"namespace {name} already exists (prefix collision?)")
        netns.create(name)
        self._created.append(name)

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        netns.run(None, ["ip", "link", "add", if_a, "netns", ns_a, "type", "veth",
                         "peer", "name", if_b, "netns", ns_b], timeout=15)

    def _addr_up(self, ns: str, ifname: str, cidr: str) -> None:
        netns.run(None, ["ip", "-n", ns, "addr", "add", cidr, "dev", ifname], timeout=15)
        netns.run(None, ["ip", "-n", ns, "link", "set", ifname, "up"], timeout=15)

    def _build(self) -> None:
        log.info("topology.build", prefix=self.prefix, backends=len(self.backend_ns))
        for ns in self.namespaces:
            self._create_ns(ns)
        if self.disable_ipv6:
            for ns in self.namespaces:
                netns.sysctl(ns, {"net.ipv6.conf.all.disable_ipv6": 1,
                                  "net.ipv6.conf.default.disable_ipv6": 1})
        if self.one_arm:
            self._build_one_arm()
            return
        # client <-> lb
        self._veth(self.client_ns, self.client_iface, self.lb_ns, "c0")
        self._addr_up(self.client_ns, self.client_iface, f"{self.client_ip}/24")
        self._addr_up(self.lb_ns, "c0", f"{self.client_gw}/24")
        netns.run(None, ["ip", "-n", self.client_ns, "route", "add", "default",
                         "via", self.client_gw], timeout=15)
        # backends <-> lb
        for i, ns in enumerate(self.backend_ns, start=1):
            lb_if = f"b{i}"
            self._veth(ns, self.backend_iface, self.lb_ns, lb_if)
            self._addr_up(ns, self.backend_iface, f"{self.backend_ips[i - 1]}/24")
            self._addr_up(self.lb_ns, lb_if, f"{self.backend_gws[i - 1]}/24")
            if self.backend_routes == "lb":
                netns.run(None, ["ip", "-n", ns, "route", "add", "default",
                                 "via", self.backend_gws[i - 1]], timeout=15)
            elif self.backend_routes == "direct":
                self._veth(ns, "eth1", self.client_ns, f"d{i}")
                self._addr_up(ns, "eth1", f"198.18.{100 + i}.2/24")
                self._addr_up(self.client_ns, f"d{i}", f"198.18.{100 + i}.1/24")
                netns.run(None, ["ip", "-n", ns, "route", "add", "default",
                                 "via", f"198.18.{100 + i}.1"], timeout=15)
                netns.sysctl(ns, {"net.ipv4.conf.all.rp_filter": 0,
                                  "net.ipv4.conf.default.rp_filter": 0,
                                  "net.ipv4.conf.eth0.rp_filter": 0,
                                  "net.ipv4.conf.eth1.rp_filter": 0})
                netns.sysctl(self.client_ns, {"net.ipv4.conf.all.rp_filter": 0,
                                              f"net.ipv4.conf.d{i}.rp_filter": 0})
        self._lb_sysctls()
        log.info("topology.ready", prefix=self.prefix, workdir=str(self.workdir))

    def _build_one_arm(self) -> None:
        sw = self.switch_ns
        netns.run(None, ["ip", "-n", sw, "link", "add", "br0", "type", "bridge"], timeout=15)
        netns.run(None, ["ip", "-n", sw, "link", "set", "br0", "up"], timeout=15)
        ports = [(self.client_ns, self.client_iface, "pc", f"{self.client_ip}/24"),
                 (self.lb_ns, "c0", "pl", f"{self.client_gw}/24")]
        ports += [(ns, self.backend_iface, f"p{i}", f"{ip}/24") for i, (ns, ip) in
                  enumerate(zip(self.backend_ns, self.backend_ips, strict=True), start=1)]
        for ns, ifname, port, cidr in ports:
            self._veth(ns, ifname, sw, port)
            netns.run(None, ["ip", "-n", sw, "link", "set", port, "master", "br0", "up"],
                      timeout=15)
            self._addr_up(ns, ifname, cidr)
        netns.run(None, ["ip", "-n", self.client_ns, "route", "add", "default",
                         "via", self.client_gw], timeout=15)
        self._lb_sysctls()
        netns.sysctl(self.lb_ns, {"net.ipv4.conf.all.send_redirects": 0,
                                  "net.ipv4.conf.c0.send_redirects": 0})
        log.info("topology.ready", prefix=self.prefix, workdir=str(self.workdir), one_arm=True)

    def _lb_sysctls(self) -> None:
        lb_sysctls: dict[str, str | int] = {
            "net.ipv4.ip_forward": 1,
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
        }
        for ifname in ["lo", *self.lb_ifaces]:
            lb_sysctls[f"net.ipv4.conf.{ifname}.rp_filter"] = 0
        netns.sysctl(self.lb_ns, lb_sysctls)

    # -- use -----------------------------------------------------------------------------

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        check: bool = True,
        timeout: float | None = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``ns`` and wait (see :func:`lab.netns.run`)."""
        self._check_open()
        return netns.run(ns, argv, check=check, timeout=timeout, input=input, env=env,
                         cwd=netns.REPO_ROOT)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` in ``ns``; the process (group) is ended by :meth:`cleanup`."""
        self._check_open()
        kwargs.setdefault("cwd", netns.REPO_ROOT)
        proc = netns.popen(ns, argv, **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
        """End one process started with :meth:`popen` (SIGTERM to its group, then SIGKILL)."""
        netns.kill_group(proc, grace=grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def dsr_backends(self, vip: str | None = None, ipip: bool = False) -> None:
        """Make every backend a DSR endpoint: the VIP on lo (/32), answering ARP only for
        the addresses of the interface asked on (arp_ignore=1, arp_announce=2, so the
        backends never claim the VIP on the link); with ``ipip``, an IP-in-IP device
        (mdipip, local: the backend's address) that decapsulates what the lb sends."""
        vip = vip or self.vip
        for ns in self.backend_ns:
            netns.sysctl(ns, {"net.ipv4.conf.all.arp_ignore": 1,
                              "net.ipv4.conf.all.arp_announce": 2,
                              "net.ipv4.conf.all.rp_filter": 0,
                              "net.ipv4.conf.default.rp_filter": 0})
            netns.run(None, ["ip", "-n", ns, "addr", "add", f"{vip}/32", "dev", "lo"],
                      timeout=15)
            netns.run(None, ["ip", "-n", ns, "link", "set", "lo", "up"], timeout=15)
        if not ipip:
            return
        # the kernel's ipip device where the kernel has one, else lab.decap's TC program
        decap = []
        for ns, ip in zip(self.backend_ns, self.backend_ips, strict=True):
            res = netns.run(None, ["ip", "-n", ns, "link", "add", "mdipip", "type", "ipip",
                                   "local", ip], check=False, timeout=15)
            if res.returncode != 0:
                decap.append(f"{ns}:{self.backend_iface}:{ip}")
                continue
            netns.run(None, ["ip", "-n", ns, "link", "set", "mdipip", "up"], timeout=15)
            netns.sysctl(ns, {"net.ipv4.conf.mdipip.rp_filter": 0})
        if decap:
            netns.run(None, [sys.executable, "-m", "lab.decap", *decap],
                      env=netns.python_env(), cwd=netns.REPO_ROOT, timeout=120)

    def ifindex(self, ns: str, ifname: str) -> int:
        out = self.run(ns, ["ip", "-j", "link", "show", "dev", ifname]).stdout
        return int(json.loads(out)[0]["ifindex"])

    def mac(self, ns: str, ifname: str) -> str:
        out = self.run(ns, ["ip", "-j", "link", "show", "dev", ifname]).stdout
        return str(json.loads(out)[0]["address"])

    def _check_open(self) -> None:
        if self._closed:
            raise netns.NetnsError(f"topology {self.prefix} is cleaned up")

    # -- teardown ------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop tracked processes, delete the namespaces (and so their links, nft and
        iptables state), remove the work directory. Idempotent; never raises for a
        resource that is already gone."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in reversed(self._procs):
            try:
                netns.kill_group(proc)
            except Exception as exc:  # keep going: everything else must still go
                errors.append(f"pid {proc.pid}: {exc}")
        self._procs.clear()
        for ns in reversed(self._created):
            try:
                netns.delete(ns)
            except Exception as exc:
                errors.append(f"{ns}: {exc}")
        self._created.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            log.error("topology.cleanup_errors", prefix=self.prefix, errors=errors)
        else:
            log.info("topology.cleaned", prefix=self.prefix)

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"Topology(prefix={self.prefix!r}, backends={len(self.backend_ns)})"


def cleanup_leftovers(prefix_glob: str = DEFAULT_PREFIX) -> list[str]:
    """Delete every namespace whose name matches ``prefix_glob + "*"`` (a prefix, or a
    glob such as ``"xlb????-*"``), ending the processes in it first. Returns the names.

    A safety net for a test session: call it with the prefix your own topologies use
    (another session on the same host may be using other ``xlb*`` namespaces right now).
    """
    pattern = prefix_glob + "*"
    gone: list[str] = []
    for name in netns.list_namespaces():
        if fnmatch.fnmatchcase(name, pattern):
            try:
                netns.delete(name)
                gone.append(name)
            except netns.NetnsError as exc:
                log.error("topology.leftover_not_deleted", ns=name, error=str(exc))
    if gone:
        log.warning("topology.leftovers_deleted", namespaces=gone)
    return gone
