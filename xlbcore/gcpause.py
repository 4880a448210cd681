"""Pausing Python's cyclic garbage collector around bulk work.

A bulk write (tens of thousands of services) makes hundreds of thousands of objects that
either live on (the table) or die by reference counting; the cyclic collector has
nothing to find in them, but the allocations trigger its passes, and every full pass
walks the whole heap: about half the time of a 10,000 service put. ``paused()`` turns
it off for the duration of the work; nested and concurrent users (threads, simulated
nodes sharing a process) are counted, and the last one out restores the collector as
it found it (after freezing the heap when a user asked: else the young generation's
next pass walks everything the work made).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0
_was_enabled = False


_freeze = False


@contextmanager
def paused(active: bool = True, freeze: bool = False) -> Iterator[None]:
    """No cyclic collection inside the block (when `active`). With `freeze`, what the
    block made is long-lived (a table): when the last holder leaves, every object is
    moved out of the collector's sight (gc.freeze) before it is turned back on, so
    neither the young generations' next passes nor later full passes walk it again
    (the objects are still freed by reference counting when dropped)."""
    global _holders, _was_enabled, _freeze
    if not active:
        yield
        return
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            _freeze = False
            gc.disable()
        _holders += 1
        _freeze = _freeze or freeze
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                if _freeze:
                    gc.freeze()
                if _was_enabled:
                    gc.enable()
