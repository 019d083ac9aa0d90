"""The cross-rank weight check: every ``dist.check_every`` iterations (and the last) the ranks compare
digests of their weights (master and working weights, computed on the device: ``Population.fingerprints``),
so a divergence is found while it is one iteration old and named.

Only 16 bytes per rank cross: a flag (1 = this rank's own replicas differ) and 15 bytes of the digest.
"""

from __future__ import annotations

from hpc_es.comm import Comm
from hpc_es.errors import DistributedError
from hpc_es.schedule import Every


class DivergenceCheck:
    def __init__(self, comm: Comm, every: int, total: int, slots: int) -> None:
        self.comm, self.schedule = comm, Every(every, total)
        self.enabled = slots > 1  # one replica in one process cannot diverge from anything

    def due(self, done: int) -> bool:
        return self.enabled and self.schedule.due(done)

    def compare(self, t: int, prints: list[str]) -> None:
        """A collective: raise ``DistributedError`` on every rank, naming the ranks, if weights differ."""
        mine = bytes([0 if len(set(prints)) == 1 else 1]) + bytes.fromhex(prints[0])[:15]
        gathered = self.comm.allgather(mine)
        if len(set(gathered)) == 1 and gathered[0][0] == 0:
            return
        groups: dict[str, list[int]] = {}
        for r, g in enumerate(gathered):
            groups.setdefault(g[1:].hex()[:16], []).append(r)
        parts = []
        off = [r for r, g in enumerate(gathered) if g[1:] != gathered[0][1:]]
        if off:
            parts.append(f"rank(s) {', '.join(map(str, off))} differ from rank 0 ("
                         + "; ".join(f"ranks {rs}: {fp}" for fp, rs in groups.items()) + ")")
        split = [r for r, g in enumerate(gathered) if g[0]]
        if split:
            parts.append(f"rank(s) {', '.join(map(str, split))} hold replicas that differ from each other")
        raise DistributedError(f"weights diverged after iteration {t}: {'; '.join(parts)}")
