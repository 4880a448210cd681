"""nginx backends for the benchmark: one per backend namespace, config in a temp dir."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import structlog

from lab import netns
from lab.servers import wait_listening
from lab.topology import Topology

log = structlog.get_logger(__name__)

NGINX = "nginx"

_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 8192;
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    server {{
        listen {ip}:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
"""


def start_nginx(
    topo: Topology, port: int = 80, deadline: float = 15.0
) -> list[subprocess.Popen[str]]:
    """Start nginx in every backend namespace, listening on the backend's ip:port."""
    if shutil.which(NGINX) is None:
        raise netns.NetnsError("nginx not found (Debian package nginx-light)")
    procs: list[subprocess.Popen[str]] = []
    for i, (ns, ip) in enumerate(zip(topo.backend_ns, topo.backend_ips, strict=True), start=1):
        d = Path(topo.workdir) / f"nginx-be{i}"
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(_CONF.format(d=d, ip=ip, port=port))
        netns.sysctl(ns, {"net.core.somaxconn": 4096, "net.ipv4.tcp_max_syn_backlog": 4096})
        # -e: error log before the config is read (else /var/log/nginx/error.log)
        argv = [NGINX, "-e", str(d / "error.log"), "-p", str(d), "-c", str(conf)]
        procs.append(topo.popen(ns, argv, stderr=subprocess.DEVNULL))
    for i, (ns, proc) in enumerate(zip(topo.backend_ns, procs, strict=True), start=1):
        try:
            wait_listening(topo, ns, port, "tcp", proc, deadline, f"nginx be{i}")
        except netns.NetnsError as exc:
            err = (Path(topo.workdir) / f"nginx-be{i}" / "error.log").read_text()[-2000:]
            raise netns.NetnsError(f"{exc}; error.log: {err}") from exc
    log.info("bench.nginx_ready", backends=len(procs), port=port)
    return procs
