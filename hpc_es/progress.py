"""What rank 0 tells the user: the start-up line, where a resumed run continues, one line per iteration.

Kept apart from the loop so that the loop shows the algorithm and the wording lives in one place.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

log = logging.getLogger("hpc_es")


def warn(message: str) -> None:
    print(f"hpc_es: warning: {message}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    print(f"hpc_es: {message}", file=sys.stderr, flush=True)


def announce(model_name: str, params: int, world: int, per_rank: int, backend: str, task: str, n: int,
             sigma: float, alpha: float, start: int, total: int, ledger_path: str, engine: str = "",
             passes: str = "") -> None:
    """The start-up line: a 7B model takes minutes to reach the first iteration, so say what will run."""
    todo = f"iterations {start + 1}..{total}" if start < total else f"all {total} iterations already done"
    backend = "one process" if backend == "none" else backend
    rollout = (f"; rollout engine {engine}" if engine else "") + (f"; low-rank: {passes}" if passes else "")
    log.info("%s: %.1fM parameters, %d rank(s) x %d replica(s) (%s); task %s, N=%d, sigma=%g, alpha=%g; "
             "%s; ledger %s%s", model_name, params / 1e6, world, per_rank, backend, task, n, sigma, alpha,
             todo, ledger_path, rollout)


class Progress:
    """Rank 0's progress line: iteration, mean/max reward, time; one line per iteration off a TTY."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.first = start

    def update(self, t: int, rewards: np.ndarray, dt: float) -> None:
        if not self.enabled:
            return
        done = t + 1 - self.first
        eta = (time.perf_counter() - self.start) / done * (self.total - t - 1)
        width = 20
        filled = int(width * (t + 1) / max(1, self.total))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] it {t + 1}/{self.total} "
                f"reward mean {rewards.mean():.4f} max {rewards.max():.4f} | {dt:.2f} s/it | eta {eta:.0f} s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)
