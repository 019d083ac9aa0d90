"""The one schedule rule of a run: "every k iterations, and the last" (k = 0: never).

Checkpoints, test-split evaluation and the cross-rank weight check all follow it, each with its own k,
so the last iteration is always checkpointed, evaluated and checked before the final model is saved.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    k: int  # iterations between events; 0 = never
    total: int  # the run's es.iterations

    def due(self, done: int) -> bool:
        """Whether the event happens once ``done`` iterations are complete."""
        return self.k > 0 and (done % self.k == 0 or done == self.total)
