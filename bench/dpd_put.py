"""What dpd does with one large PutServices, phase by phase, beside the kernel's write.

    .venv/bin/python -m bench.dpd_put                      # 10,000 x 4, memory and kernel
    .venv/bin/python -m bench.dpd_put --services 1000 --datapath memory

For each datapath (``memory``: in-memory maps; ``kernel``: the real maps, loaded on a
private bpffs mount, nothing attached; root) and each round, on new maps:

- decode: ``PutServicesRequest.FromString`` of the serialized request (grpc does this);
- parse: the servicer's validation of the request: into columns (dpd/bulkput.py
  parse_bulk) when every service is a plain one, else into ServiceSpecs;
- put: ``ServiceTable.put_bulk`` (else ``put``) of every service into the empty table
  (ids, counter slots, value encoding, index, VIP counts, the map writes); parse and put
  run as dpd's PutServices runs them for a bulk write (cyclic GC paused, the heap
  frozen after);
- write: the map writes alone: the same keys and values (read back from nat_v4_map
  and vip_v4_map, and from the ep_map and slot_map runs the services hold), written
  with one ``put_batch_raw`` each (nat_v4_map and vip_v4_map emptied first; the arrays
  are written over: the same copy as into unused entries), keys and values already
  joined into the arrays the kernel takes;
- bookkeeping: put - write (dpd's own Python per service);
- first_list: the first read of the table after the put (``specs()``, as ListServices):
  a bulk put's ServiceSpecs and entries are made here, not in put;
- re-put: the same services again (nothing changes), then with 1 % of them changed;
- restore: a new ServiceTable over the same maps (what a restarted dpd reads back).

Times are the CPU time of this process (user and system, so the kernel's part of a
map write counts; other jobs on the machine do not), the median over ``--rounds``.
Results go to stdout and, with ``--out``, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.services import filler_services
from dpd.bulkput import parse_bulk
from dpd.loader import Datapath, Settings
from dpd.services import ServiceTable
from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.types.v1 import types_pb2
from xlbcore import gcpause
from xlbcore.logs import configure_logging
from xlbcore.service import parse_services


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def request(count: int, endpoints: int) -> bytes:
    msg = pb.PutServicesRequest()
    for s in filler_services(count, endpoints):
        msg.services.add(vip=s.vip, port=s.port, protocol=types_pb2.PROTOCOL_TCP,
                         endpoints=[types_pb2.Endpoint(address=e.ip, port=e.port, weight=1)
                                    for e in s.endpoints])
    return msg.SerializeToString()


class Datapaths:
    """Datapaths of one kind: ``fresh()`` makes new, empty maps; ``reopen()`` opens the
    current ones again, as a restarted dpd does."""

    def __init__(self, kind: str, count: int) -> None:
        self.kind = kind
        self.settings = Settings(name="bench-put", max_services=max(16384, count * 2),
                                 max_backends=max(65536, count * 8), ct_size=1024,
                                 redirect=False)
        self.root = ""
        self.current: Datapath | None = None
        if kind == "kernel":
            self.root = tempfile.mkdtemp(prefix="xlb-bp-", dir="/tmp")
            self.settings = replace(self.settings, bpf_root=self.root)

    def _close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def fresh(self) -> Datapath:
        self._close()
        if self.kind == "memory":
            from dpd.memory import MemoryDatapath

            self.current = MemoryDatapath(self.settings)
            return self.current
        from dpd.loader import KernelDatapath, remove_pins

        remove_pins(self.settings)
        self.current = KernelDatapath(self.settings)
        return self.current

    def reopen(self) -> Datapath:
        assert self.current is not None
        if self.kind == "memory":
            self.current.reused = True
            return self.current
        from dpd.loader import KernelDatapath

        self._close()
        self.current = KernelDatapath(self.settings)
        return self.current

    def close(self) -> None:
        self._close()
        if self.kind == "kernel":
            from dpd.node import cleanup

            cleanup(self.settings)
            os.rmdir(self.root)


@contextmanager
def datapaths(kind: str, count: int) -> Iterator[Datapaths]:
    d = Datapaths(kind, count)
    try:
        yield d
    finally:
        d.close()


def ms(t0: float) -> float:
    return (time.process_time() - t0) * 1000


def one_round(dps: Datapaths, raw: bytes) -> dict[str, float]:
    out: dict[str, float] = {}
    table = ServiceTable(dps.fresh())
    t0 = time.process_time()
    msg = pb.PutServicesRequest.FromString(raw)
    out["decode"] = ms(t0)
    with gcpause.paused(True, freeze=True):  # as dpd's PutServices does for a bulk write
        t0 = time.process_time()
        bulk = parse_bulk(msg.services)  # plain new services: columns (dpd/bulkput.py)
        specs = parse_services(msg.services, "services") if bulk is None else []
        out["parse"] = ms(t0)
        t0 = time.process_time()
        if bulk is None or table.put_bulk(bulk) is None:
            table.put(specs or parse_services(msg.services, "services"))
        out["put"] = ms(t0)
    # what a bulk put left for later: the services' ServiceSpecs and entries, made by
    # the first read of the table (ListServices); 0 when put made them
    t0 = time.process_time()
    table.specs()
    out["first_list"] = ms(t0)
    specs = parse_services(msg.services, "services")  # for the re-puts
    # the map writes alone: the same entries into the emptied maps, each map's keys
    # and values already laid out back to back (as put hands them over)
    written = []
    for m in (table.nat, table.vips):
        keys, values = zip(*m.items(), strict=True)
        m.delete_batch(list(keys))
        written.append((m, b"".join(keys), b"".join(values)))
    entries = [e for _, e in table.entries()]
    ep_runs = [(e.ep_base, len(e.ep_ids)) for e in entries]
    slot_runs = [(e.slot_base, table._rows.chunks(e.n_slots)) for e in entries]
    for m, held in ((table.ep_map, ep_runs), (table.slot_map, slot_runs)):
        index = [i.to_bytes(4, "little") for base, n in held for i in range(base, base + n)]
        rows = [m.get(k) or b"" for k in index]
        written.append((m, b"".join(index), b"".join(rows)))
    t0 = time.process_time()
    for m, raw_keys, raw_values in written:
        m.put_batch_raw(raw_keys, raw_values)
    out["write"] = ms(t0)
    out["bookkeeping"] = out["put"] - out["write"]
    t0 = time.process_time()
    table.put(specs)
    out["reput_same"] = ms(t0)
    changed = list(specs)
    for i in range(0, len(changed), 100):
        s = changed[i]
        changed[i] = replace(s, endpoints=(replace(s.endpoints[0], weight=7),
                                           *s.endpoints[1:]))
    t0 = time.process_time()
    table.put(changed)
    out["reput_1pct"] = ms(t0)
    t0 = time.process_time()
    restored = ServiceTable(dps.reopen())
    out["restore"] = ms(t0)
    assert restored.count() == len(specs), (restored.count(), len(specs))
    return out


PHASES = ["decode", "parse", "put", "write", "bookkeeping", "first_list", "reput_same",
          "reput_1pct", "restore"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.dpd_put", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--endpoints", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--datapath", nargs="+", choices=("memory", "kernel"), default=None,
                   help="default: memory, and kernel when root")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    configure_logging(level="warning", stream=sys.stderr)
    kinds = args.datapath or (["memory", "kernel"] if os.geteuid() == 0 else ["memory"])
    raw = request(args.services, args.endpoints)
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        rounds = []
        with datapaths(kind, args.services) as dps:
            for _ in range(args.rounds):
                rounds.append(one_round(dps, raw))
        med = {ph: round(statistics.median(r[ph] for r in rounds), 1) for ph in PHASES}
        results[kind] = {"median_ms": med, "rounds": rounds}
    n = args.services
    say(f"dpd: one PutServices of {n:,} services x {args.endpoints} endpoints into an empty "
        f"table (CPU ms, median of {args.rounds} rounds; us/service in brackets)")
    say("| phase | " + " | ".join(kinds) + " |")
    say("|---|" + "---:|" * len(kinds))
    for ph in PHASES:
        cells = [f"{results[k]['median_ms'][ph]:.1f} "
                 f"({1000 * results[k]['median_ms'][ph] / n:.1f})" for k in kinds]
        say(f"| {ph} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data = {"argv": sys.argv[1:], "cpus": os.cpu_count(), "services": n,
                "endpoints": args.endpoints, "results": results,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
