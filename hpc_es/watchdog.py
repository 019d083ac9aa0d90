"""Time limits on reward calls that hold even when user code never returns.

A reward function may loop forever or block (``while True: pass``, a ``sleep``, a dead network call), in
the main thread or in a replica's worker thread.  Python cannot kill a thread, and a SIGALRM timer works
only in the main thread, so one watchdog thread per process keeps the deadlines:

1. When a reward call overruns ``rollout.reward_timeout_s``, the watchdog raises ``RewardTimeout`` inside
   the stuck thread (an asynchronous exception; for the main thread also a signal, which wakes a blocking
   sleep).  Pure-Python rewards stop at their next bytecode and the error takes the ordinary path: every
   rank learns of it, the run ends with one line naming the task, prompt and limit, exit 2.
2. If the call still has not returned ``HARD_EXIT_AFTER_S`` later (a reward blocked inside C code, or one
   that swallows every exception), the watchdog prints the same line and ends the process (exit 2).  The
   iteration in flight is lost; everything saved before it (ledger, checkpoint) is intact, since every
   write is atomic.

The stop after a signal has its own deadline (``checkpoint.stop_grace_s``), kept by hpc_es/stopping.py.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hpc_es.stopping import EXIT_USER_ERROR

HARD_EXIT_AFTER_S = 5.0  # after the asynchronous exception, how long a stuck call gets before the process ends


class RewardTimeout(BaseException):
    """Raised inside a reward call that overran its limit.  A BaseException, so that a reward's own
    ``except Exception`` cannot swallow it."""


class _Guard:
    __slots__ = ("deadline", "describe", "fired_at", "thread_id")

    def __init__(self, thread_id: int, deadline: float, describe: Callable[[], str]) -> None:
        self.thread_id, self.deadline, self.describe = thread_id, deadline, describe
        self.fired_at = 0.0


class Watchdog:
    """The process's deadline keeper (see the module docstring); get it with ``watchdog()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guards: dict[int, _Guard] = {}
        self._thread: threading.Thread | None = None
        self._main_id = threading.main_thread().ident
        self._main_expired = False
        self._alarm_installed = False
        self.exit: Callable[[int], None] = os._exit  # tests may replace it

    # ---- reward calls ------------------------------------------------------------------------------
    @contextmanager
    def guard(self, limit_s: float, describe: Callable[[], str]) -> Iterator[None]:
        """Run the body under a deadline; ``describe()`` is the error line if it overruns."""
        if limit_s <= 0:
            yield
            return
        self._start()
        tid = threading.get_ident()
        g = _Guard(tid, time.monotonic() + limit_s, describe)
        with self._lock:
            self._guards[tid] = g
        try:
            yield
        finally:
            # Interrupts are only ever sent under the lock while the guard is listed, so once it is removed
            # (and anything pending dropped) none can follow; one that lands here, before the lock is taken,
            # came after the call had already ended and is dropped.
            while True:
                try:
                    with self._lock:
                        self._guards.pop(tid, None)
                        if g.fired_at:
                            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
                        if tid == self._main_id:
                            self._main_expired = False
                    break
                except RewardTimeout:
                    continue

    # ---- the watchdog thread -----------------------------------------------------------------------
    def _start(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._alarm_installed:
            # Lets the watchdog wake the main thread out of a blocking call (time.sleep, select, ...).
            try:
                signal.signal(signal.SIGALRM, self._on_alarm)
                self._alarm_installed = True
            except ValueError:
                pass
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="hpc_es-watchdog", daemon=True)
                self._thread.start()

    def _on_alarm(self, _signum: int, _frame: object) -> None:
        if self._main_expired:
            self._main_expired = False
            raise RewardTimeout()

    def _loop(self) -> None:
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            stuck = None
            with self._lock:  # under the lock: a call that returns meanwhile is never interrupted afterwards
                for g in self._guards.values():
                    if now < g.deadline:
                        continue
                    if not g.fired_at:
                        g.fired_at = now
                        self._interrupt(g.thread_id)
                    elif now - g.fired_at >= HARD_EXIT_AFTER_S:
                        stuck = g
            if stuck is not None:
                self._leave(f"hpc_es: error: {stuck.describe()} (it did not stop when interrupted; exiting)",
                            EXIT_USER_ERROR)  # a reward that never returns is the task's bug

    def _interrupt(self, thread_id: int) -> None:
        if thread_id == self._main_id and self._alarm_installed:  # a signal also wakes a blocking call
            self._main_expired = True
            signal.pthread_kill(thread_id, signal.SIGALRM)
        else:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(RewardTimeout))

    def _leave(self, message: str, code: int) -> None:
        try:
            print(message, file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            self.exit(code)
            with self._lock:  # only reached when a test replaced ``exit``
                self._guards.clear()


_WATCHDOG: Watchdog | None = None


def watchdog() -> Watchdog:
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog()
    return _WATCHDOG
