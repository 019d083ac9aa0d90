"""The cross-rank weight check: every ``dist.check_every`` iterations (and the last) the ranks compare
digests of their weights (master and working weights, computed on the device: ``Population.fingerprints``),
so a divergence is found while it is one iteration old and named.

Only 16 bytes per rank cross: a flag (1 = this rank's own replicas differ) and 15 bytes of the digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from hpc_es.comm import Comm
from hpc_es.errors import ConfigError, DistributedError
from hpc_es.schedule import Every


def data_digest(examples: Iterable[Any]) -> str:
    """SHA-256 of the examples' prompts and infos, in order (what the ranks must agree on)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.info], sort_keys=True, default=repr).encode())
    return h.hexdigest()


def check_context(tokenizer: Any, model_config: Any, prompts: list[str], max_new_tokens: int) -> None:
    """Set-up, once the model is loaded: the longest prompt plus ``max_new_tokens`` fits the model's
    positions (past them a model computes garbage, or the KV cache asks for gigabytes)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or not prompts:
        return
    longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
    if longest + max_new_tokens > limit:
        raise ConfigError(
            f"the longest training prompt is {longest} tokens and rollout.max_new_tokens={max_new_tokens}: "
            f"{longest + max_new_tokens} positions, more than the model's max_position_embeddings={limit}; "
            "lower rollout.max_new_tokens or shorten the prompts")


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


def check_same_setup(comm: Comm, config_json: str, data: str) -> None:
    """A collective at set-up: every rank resolved the same config and read the same data, or every rank
    raises one ``DistributedError`` naming the keys that differ (ranks that disagree on the population,
    the iterations or a check's schedule would otherwise fail in a collective, or finish with a wrong model)."""
    if comm.world_size == 1:
        return
    mine = json.dumps({"config": json.loads(config_json), "data": data}, sort_keys=True).encode()
    gathered = comm.allgather(mine)
    if len(set(gathered)) == 1:
        return
    first = _leaves(json.loads(gathered[0]))
    for r, g in enumerate(gathered):
        other = _leaves(json.loads(g))
        keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if keys:
            names = [k.removeprefix("config.") if k != "data" else "the data (train examples)" for k in keys]
            raise DistributedError(f"rank {r} was started with a different {', '.join(names)} than rank 0; every rank "
                                   "must be given the same config and data")


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
