"""Stop signals for the xlb daemons: received synchronously, and a stop bounded in time.

Why no Python signal handler (``signal.signal(SIGTERM, handler)``):

1. The kernel delivers a process-directed signal (``kill PID``) to any thread that does not
   block it, often one of grpc's C-core threads. CPython's C-level handler then only sets
   a flag; the Python handler runs later, in the main thread, when that thread next
   executes bytecode. A main thread asleep in an untimed lock wait (``Event.wait()``) is
   not woken, so the handler never runs and the daemon ignores SIGTERM.
2. A handler runs between two bytecodes of whatever the main thread was doing, including
   a write to stderr inside structlog's PrintLogger, which holds a non-reentrant lock: if
   the write blocks (stderr pipe full) and the signal interrupts it, PEP 475 runs the
   handler before retrying the write, the handler logs, takes the same lock, and the
   process deadlocks.

So `StopSignals` blocks SIGINT and SIGTERM in the main thread before any other thread
exists (threads, grpc's C threads included, inherit the mask), leaving them pending at
the process until the main thread takes one with ``sigwait`` as ordinary code, where
logging is safe. Their disposition is set to SIG_DFL: a signal that is ignored (SIG_IGN,
as a shell gives background jobs for SIGINT) would be discarded and never seen by
``sigwait``, and a stray thread that unblocks them gets the process killed, not hung.
Importing grpc, structlog, pyroute2, bcc or the daemons' modules starts no thread
(checked with /proc/self/task), so blocking as the first statement of ``main()`` is early
enough; `unblocked_threads` checks it at run time.

A stop must end the process within `STOP_LIMIT` (2 s) of the signal, always. The steps of
an orderly stop have bounded waits; behind them a watchdog thread (`StopSignals.watch`)
notices a pending stop signal without consuming it (``sigpending``, every 0.1 s), even
while the main thread is stuck in a start-up step or a log write, and if the process
still exists shortly before the limit it logs the step that overran (`StopSignals.step`)
and calls ``os._exit(EXIT_STOP_OVERRAN)``. Start-up steps ask `StopSignals.requested`
(it consumes nothing) and skip the rest of the start-up.

Only process-directed signals (kill(2): ``kill``, systemd, a terminal's Ctrl-C) are
covered: one sent with tgkill/pthread_kill to a thread other than the main one stays
pending on that thread, which neither ``sigwait`` in the main thread nor the watchdog sees.

Children: a blocked signal mask survives fork and exec, so a child would ignore SIGTERM
and SIGINT. ``subprocess``'s ``restore_signals=True`` only resets the dispositions of
SIGPIPE, SIGXFZ and SIGXFSZ, not the mask (checked on Python 3.11), so start a child with
``preexec_fn=unblocked_preexec`` (it only calls ``pthread_sigmask`` between fork and exec,
about as little as Python can do there; the documented risk of preexec_fn in a threaded
process is code that needs a lock another thread held at the fork), or, for a Python child
of ours, unblock first thing in it, as ``dpd.compile`` does. Short children that are
waited for (``mount``) may keep the mask.

Use::

    def main() -> int:
        stop = StopSignals()            # the first statement: before any thread exists
        ...configure logging...
        stop.watch(log, prefix="d.")    # from here a stop always ends within STOP_LIMIT
        stop.step("load")
        ...a start-up step...
        if not stop.requested():
            ...the next one...
        sig = stop.wait()               # sigwait in the main thread
        log.info("signal", signal=sig.name)
        stop.step("server")
        server.stop(1.0)
        stop.step("exit")
        return 0
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any, overload

STOP_SIGNALS: frozenset[signal.Signals] = frozenset({signal.SIGINT, signal.SIGTERM})
STOP_LIMIT = 2.0  # seconds from the stop signal to the end of the process
EXIT_STOP_OVERRAN = 3  # exit code when the watchdog ends a stop that overran

_POLL = 0.1  # how often the watchdog looks for a pending stop signal
_LOG_WAIT = 0.1  # how long the watchdog lets its last log line take (stderr may be stuck)
# When the watchdog acts, counted from when it noticed the stop: noticing takes up to
# _POLL and logging up to _LOG_WAIT, so the process is gone within STOP_LIMIT.
_WATCHDOG_AT = STOP_LIMIT - _POLL - _LOG_WAIT - 0.05


def unblocked_preexec() -> None:
    """``preexec_fn`` for subprocess: the child gets SIGINT and SIGTERM unblocked (their
    disposition is already SIG_DFL), as if the daemon had never blocked them."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def unblocked_threads(
    pid: int | str = "self", signals: Iterable[int] = STOP_SIGNALS
) -> list[tuple[int, str]]:
    """(tid, name) of every thread of `pid` that does not block all of `signals`. A thread
    inside ``sigwait`` for them is listed too: the kernel unblocks them while it waits."""
    bits = 0
    for sig in signals:
        bits |= 1 << (int(sig) - 1)
    found = []
    task_dir = f"/proc/{pid}/task"
    for tid in sorted(os.listdir(task_dir), key=int):
        try:
            with open(f"{task_dir}/{tid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        if int(fields["SigBlk"], 16) & bits != bits:
            found.append((int(tid), fields["Name"].strip()))
    return found


class StopSignals:
    """SIGINT and SIGTERM blocked in every thread, taken synchronously by `wait`.

    Create it in the main thread before any other thread exists."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = frozenset(signals)
        # Block first: a signal arriving before SIG_DFL is set stays pending.
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        self._old_handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in self.signals}
        self.received: signal.Signals | None = None  # the first signal `wait` took
        self._stopping = threading.Event()  # a stop signal was seen (pending or taken)
        self._stop_seen_at = 0.0  # time.monotonic() of that
        self._step = "start"
        self._step_started = time.monotonic()
        self._watchdog: threading.Thread | None = None
        self._log: Any = None  # set by watch()
        self._prefix = ""
        self._threads_checked = False

    def requested(self) -> bool:
        """Whether a stop signal came (pending or already taken). Consumes nothing."""
        if self._stopping.is_set():
            return True
        if signal.sigpending() & self.signals:
            self._seen()
            return True
        return False

    @overload
    def wait(self, timeout: None = None) -> signal.Signals: ...
    @overload
    def wait(self, timeout: float) -> signal.Signals | None: ...

    def wait(self, timeout: float | None = None) -> signal.Signals | None:
        """Take the next stop signal (the main thread, ordinary code); None on timeout.
        A signal that came while the daemon was busy is pending and returned at once."""
        if not self._threads_checked:  # once, when start-up has created the threads
            self._threads_checked = True
            stray = unblocked_threads(signals=self.signals)
            if stray and self._log is not None:
                self._log.warning(f"{self._prefix}signals_unblocked", threads=stray)
        if timeout is None:
            signum = signal.sigwait(self.signals)
        else:
            info = signal.sigtimedwait(self.signals, max(0.0, timeout))
            if info is None:
                return None
            signum = info.si_signo
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
        self._seen()
        return sig

    def step(self, name: str) -> None:
        """Name what the main thread does now, for the watchdog's report."""
        self._step = name
        self._step_started = time.monotonic()

    def watch(self, log: Any, prefix: str = "", limit: float = STOP_LIMIT) -> None:
        """Start the watchdog: once a stop signal is pending or taken, the process ends
        within `limit` seconds, by os._exit(EXIT_STOP_OVERRAN) if the orderly stop (or
        the start-up step it interrupted) has not ended it. It logs through `log`
        (``<prefix>stop_overran``, ``<prefix>signals_unblocked``)."""
        if self._watchdog is not None:
            return
        self._log = log
        self._prefix = prefix
        act_after = max(0.0, limit - (STOP_LIMIT - _WATCHDOG_AT))
        self._watchdog = threading.Thread(
            target=self._watch, args=(act_after,), name="stop-watchdog", daemon=True
        )
        self._watchdog.start()

    def release(self) -> None:
        """Undo the blocking (main thread): old mask and handlers; for a run that does
        not wait for a stop signal (dpd --cleanup). A pending signal is delivered now."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def _seen(self) -> None:
        if not self._stopping.is_set():
            self._stop_seen_at = time.monotonic()
            self._stopping.set()

    def _watch(self, act_after: float) -> None:
        while not self._stopping.wait(_POLL):
            if signal.sigpending() & self.signals:
                self._seen()
        time.sleep(max(0.0, self._stop_seen_at + act_after - time.monotonic()))
        # Still here: the main thread has not finished the stop (or the interpreter is
        # still waiting for a thread at exit). Log from a helper thread, as stderr may be
        # what is stuck, and end the process regardless.
        now = time.monotonic()
        fields = {
            "step": self._step,
            "step_s": round(now - self._step_started, 3),
            "since_signal_s": round(now - self._stop_seen_at, 3),
            "signal": self.received.name if self.received else "pending",
            "exit_code": EXIT_STOP_OVERRAN,
        }
        logger = threading.Thread(
            target=self._log.error, args=(f"{self._prefix}stop_overran",), kwargs=fields,
            name="stop-watchdog-log", daemon=True,
        )
        logger.start()
        logger.join(_LOG_WAIT)
        os._exit(EXIT_STOP_OVERRAN)
