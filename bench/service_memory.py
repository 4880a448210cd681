"""Kernel memory of the service maps holding many services (root).

    .venv/bin/python -m bench.service_memory                 # 10,000 services x 4 endpoints
    .venv/bin/python -m bench.service_memory --services 10000 --endpoints 4,64

The datapath is loaded on a private bpffs mount (nothing attached), ServiceTable.put
writes `services` round-robin services of `endpoints` endpoints each (bench.services'
fillers), and each service map's kernel memory is read from bpftool (bytes_memlock, the
kernel's own accounting: for a hash map without preallocation it follows the entries
held; an array is allocated whole when it is made). The pinned maps and the mount are
removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from bench.services import filler_services
from xlbcore.service import EndpointSpec, Proto, ServiceSpec

# the maps a service's endpoints and selection tables live in (those that exist)
SERVICE_MAPS = ("nat_v4_map", "ep_map", "slot_map", "ep6_map", "maglev_v4_map", "svc_cfg_map")


def map_bytes(path: str) -> int:
    out = subprocess.run(["bpftool", "-j", "map", "show", "pinned", path],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out).get("bytes_memlock", 0))


def measure(services: int, endpoints: int, max_services: int) -> dict[str, Any]:
    from dpd.loader import KernelDatapath, Settings, remove_pins
    from dpd.node import cleanup
    from dpd.services import ServiceTable

    root = tempfile.mkdtemp(prefix="xlb-mem-", dir="/tmp")
    settings = Settings(name="mem", bpf_root=root, max_services=max_services,
                        ct_size=1024, redirect=False)
    dp = None
    try:
        remove_pins(settings)
        dp = KernelDatapath(settings)
        table = ServiceTable(dp)
        specs = [ServiceSpec(s.vip, s.port, Proto.TCP,
                             endpoints=tuple(EndpointSpec(e.ip, e.port) for e in s.endpoints))
                 for s in filler_services(services, endpoints)]
        for i in range(0, len(specs), 1000):
            table.put(specs[i:i + 1000])
        row: dict[str, Any] = {"services": services, "endpoints": endpoints}
        total = 0
        for name in SERVICE_MAPS:
            path = os.path.join(settings.pin_dir, name)
            if os.path.exists(path):
                row[name] = map_bytes(path)
                total += row[name]
        row["total"] = total
        return row
    finally:
        if dp is not None:
            dp.close()
        cleanup(settings)
        os.rmdir(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.service_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--endpoints", default="4", help="endpoints per service, comma-separated")
    p.add_argument("--max-services", type=int, default=10000,
                   help="the datapath's XLB_MAX_SERVICES")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = [measure(args.services, int(n), max(args.max_services, args.services))
            for n in args.endpoints.split(",")]
    names = [n for n in SERVICE_MAPS if any(n in r for r in rows)]
    sys.stdout.write("| services | endpoints | " + " | ".join(names) + " | total |\n")
    sys.stdout.write("|---:|---:|" + "---:|" * (len(names) + 1) + "\n")
    for r in rows:
        cells = [f"{r[n] / 2**20:.2f} MiB" if n in r else "-" for n in names]
        sys.stdout.write(f"| {r['services']:,} | {r['endpoints']} | " + " | ".join(cells)
                         + f" | {r['total'] / 2**20:.2f} MiB |\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
