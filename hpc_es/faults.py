"""Deterministic fault injection, so that kill/resume, signal and divergence paths are tested for real.

``HPC_ES_FAULT=point:iteration[:rank][,...]`` arms a point at an iteration (on one rank, or on every rank).
Points that SIGKILL the process: ``rollout``, ``update``, ``after_ledger``, ``checkpoint_write``, ``tensorboard``
(after the ledger save, before the TensorBoard event of that iteration).
``signal`` sends this process a real SIGTERM at the start of the iteration (as a scheduler would);
``raise`` injects an error into member scoring and ``nudge`` a weight divergence (see ``wants``).
Nothing is armed unless the variable is set.
"""

from __future__ import annotations

import os
import signal
import sys


class Fault:
    """The armed points of this rank; ``fault(point)`` fires the point if it is armed for ``iteration``."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.points: set[tuple[str, int]] = set()
        for spec in filter(None, os.environ.get("HPC_ES_FAULT", "").split(",")):
            parts = spec.split(":")
            if len(parts) < 3 or int(parts[2]) == rank:
                self.points.add((parts[0], int(parts[1]) if len(parts) > 1 else 0))
        self.iteration = -1

    def __call__(self, point: str) -> None:
        if (point, self.iteration) not in self.points:
            return
        if point == "raise":
            raise RuntimeError(f"injected failure at iteration {self.iteration}")
        if point == "nudge":
            return
        if point == "signal":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
            return
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def wants(self, point: str) -> bool:
        """Whether a point that the caller acts out itself (``nudge``) is armed for this iteration."""
        return (point, self.iteration) in self.points
