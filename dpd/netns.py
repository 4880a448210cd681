"""dpd's --netns: run in a named network namespace, and open the API's TCP listener in
the namespace dpd was started from (where policyd and operators are), or inside.

setns(2) moves the calling thread only, and a thread starts in the namespace of the
thread that made it: dpd enters the namespace first, before any thread exists, so that
every later thread (health probes, netlink, the gRPC handlers) works inside it. A
socket keeps the namespace it was created in, whichever thread uses it later; gRPC
creates and binds a TCP listener when the port is added (``add_insecure_port``,
``add_secure_port``: they return the bound port), so the main thread steps back to the
starting namespace for that one call and returns at once (``Netns.caller``). The
gRPC threads that accept and serve were started before, inside.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

log = structlog.get_logger("dpd.netns")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"  # where `ip netns add` puts named namespaces

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


class Netns:
    """The named network namespace dpd runs in and the one it was started from."""

    def __init__(self, name: str) -> None:
        self.name = name
        path = name if "/" in name else os.path.join(NETNS_RUN_DIR, name)
        self._inside = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._caller = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self._inside)
            raise

    def enter(self) -> None:
        """Move this thread (call it before any thread exists) into the namespace."""
        _setns(self._inside, f"network namespace {self.name}")

    @contextmanager
    def caller(self) -> Iterator[None]:
        """This thread in the starting namespace for the block (make no thread in it),
        then back inside."""
        _setns(self._caller, "the starting network namespace")
        try:
            yield
        finally:
            _setns(self._inside, f"network namespace {self.name}")

    def close(self) -> None:
        os.close(self._inside)
        os.close(self._caller)
