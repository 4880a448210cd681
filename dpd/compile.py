"""The compile step of dpd's loader, run as a child process (``python -m dpd.compile``).

bcc and LLVM load here only: compiling takes seconds of CPU and ~150 MiB, which the
serving dpd process never pays. The child runs at low CPU priority so that compiling
does not take CPU from traffic; it compiles dpd/bpf with bcc (which creates any map
that is not pinned yet, and reuses the pinned ones), loads the programs (TC and XDP)
and pins them as <pin-dir>/<program><suffix> for the parent to install. It exits 0 on
success; on failure the compiler's message goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from dpd import bpfsys
from dpd.loader import PROGRAM_TYPES, PROGRAMS, source_text


def main(argv: list[str] | None = None) -> int:
    # The parent blocks its stop signals in every thread (xlbcore.daemon) and the mask
    # survives exec: take the default dispositions back, so the parent can stop us.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    p = argparse.ArgumentParser(prog="python -m dpd.compile")
    p.add_argument("--pin-dir", required=True)
    p.add_argument("--suffix", default="_new")
    p.add_argument("cflags", nargs="*", help="-D flags for the compiler")
    args = p.parse_args(argv)
    os.nice(10)
    from bcc import BPF

    bpf = BPF(text=source_text().encode(), cflags=args.cflags)
    for name in PROGRAMS:
        fn = bpf.load_func(name.encode(), getattr(BPF, PROGRAM_TYPES.get(name, "SCHED_CLS")))
        path = os.path.join(args.pin_dir, name + args.suffix)
        if os.path.exists(path):
            os.unlink(path)
        bpfsys.obj_pin(fn.fd, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
