"""The search distribution: how a member's weights differ from θ, and how the update folds rewards into θ.

The loop holds one ``Search`` and never asks which kind it is.  ``es.noise`` picks the class (``MODES``):

* ``full`` (``FullRank``, the paper's Gaussian ES): member n runs on round(θ + σ s_n ε_n), written into the
  replica's working weights before its rollout; one member per pass.
* ``lowrank`` (``LowRank``, EGGROLL): the weights are never written; a pass holds several members side by
  side, whose rank-r terms σ s_n A_n B_nᵀ/√r the decoder adds per batch row (hpc_es/lowrank.py).

A new mode is one class with these methods (and its entry in ``MODES``) plus its name in ``ESConfig.NOISES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ContextManager, Protocol

import numpy as np
import torch

from hpc_es.config import ESConfig, RolloutConfig
from hpc_es.es import Engine, Replica, master_torch_dtype
from hpc_es.lowrank import LowRankEngine, LowRankModel, plan_passes, wrap


class Search(Protocol):
    """What the loop needs from a search distribution (Population, replay and resume call these)."""

    def replica(self, model: torch.nn.Module, share: Sequence[Replica] = ()) -> Replica:
        """``model`` (just loaded) with its master θ; ``share``: replicas already made, whose master a
        replica on the same device may use."""
        ...

    def per_pass(self, rep: Replica, rollout: RolloutConfig, tokenizer: Any, task: Any, members: int, engine: str,
                 sharing: int) -> tuple[int, str]:
        """How many of a replica's ``members`` one pass generates for, fixed for the run, and the words the
        start-up line says about it ("" when there is nothing to say); ``sharing``: replicas on its device."""
        ...

    def passes(self, members: list[int], per_pass: int) -> list[list[int]]:
        """``members`` in the groups that are generated for together, ``per_pass`` at a time."""
        ...

    def members(self, rep: Replica, seeds: Sequence[int], signs: Sequence[int], sigma: float,
                engine: str) -> ContextManager[Any]:
        """Within the block, ``rep``'s model generates as the members (seed, sign), batch rows member-major;
        it yields what the rollout passes to the decoder (``generate(lowrank=...)``), or None."""
        ...

    def update(self, replicas: list[Replica], seeds: np.ndarray, signs: np.ndarray, shaped: np.ndarray,
               alpha: float) -> None:
        """θ ← θ + (α/N)·Σ_n Z_n s_n ε_n on every replica, bit-identically; working weights end at round(θ)."""
        ...

    def restore(self, rep: Replica) -> None:
        """Working weights ← round(θ) (after a failed iteration)."""
        ...

    def ledger_attrs(self) -> dict[str, Any]:
        """Ledger attributes naming the distribution (for readers; the config attribute holds it too)."""
        ...


class FullRank(Engine):
    """The paper's Gaussian ES: each member's weights written out, one member per pass."""

    def __init__(self, es: ESConfig) -> None:
        super().__init__(es.noise_chunk, scheme=es.noise_scheme)
        self.master_on, self.master_dtype = es.master_on, es.master_dtype

    def replica(self, model: torch.nn.Module, share: Sequence[Replica] = ()) -> Replica:
        return Replica.wrap(model, self.master_on, self.master_dtype, share=list(share))

    def per_pass(self, rep: Replica, rollout: RolloutConfig, tokenizer: Any, task: Any, members: int, engine: str,
                 sharing: int) -> tuple[int, str]:
        return 1, ""

    def passes(self, members: list[int], per_pass: int) -> list[list[int]]:
        return [[n] for n in members]

    @contextlib.contextmanager
    def members(self, rep: Replica, seeds: Sequence[int], signs: Sequence[int], sigma: float,
                engine: str) -> Iterator[None]:
        # No restore afterwards: the next perturb overwrites every working weight from θ, and update reads
        # only θ and leaves the working weights equal to the new θ.
        (seed,), (sign,) = seeds, signs
        self.perturb(rep, seed, sign, sigma)
        yield None

    def ledger_attrs(self) -> dict[str, Any]:
        return {"noise": ESConfig.FULL}


class LowRank(LowRankEngine):
    """EGGROLL: members side by side in one batch over one weight copy, which is also the master."""

    def __init__(self, es: ESConfig) -> None:
        super().__init__(es.noise_chunk, es.rank, es.lowrank_scope, scheme=es.noise_scheme)
        self.master_dtype = es.master_dtype
        self._models: dict[int, LowRankModel] = {}  # id(model) -> its members (factors, hooks)

    def replica(self, model: torch.nn.Module, share: Sequence[Replica] = ()) -> Replica:
        """The model's own parameters are θ (an fp32 copy under es.master_dtype=float32); its members are
        planned here, so a parameter the low-rank mode cannot perturb is refused before the first iteration."""
        rep = wrap(model, master_torch_dtype(self.master_dtype, next(model.parameters()).dtype))
        self._models[id(model)] = LowRankModel(model, self.scope, self.rank, self.noise)
        return rep

    def per_pass(self, rep: Replica, rollout: RolloutConfig, tokenizer: Any, task: Any, members: int, engine: str,
                 sharing: int) -> tuple[int, str]:
        """``rollout.members_per_pass``, or with 0 as many as fit in the device's free memory (lowrank.plan_passes)."""
        train = list(task.train_examples()) if not rollout.members_per_pass else []
        return plan_passes(self._models[id(rep.model)], rollout, tokenizer, train, members, engine, sharing)

    def passes(self, members: list[int], per_pass: int) -> list[list[int]]:
        per = per_pass or len(members)
        return [members[s:s + per] for s in range(0, len(members), per)]

    @contextlib.contextmanager
    def members(self, rep: Replica, seeds: Sequence[int], signs: Sequence[int], sigma: float,
                engine: str) -> Iterator[Any]:
        # The fast engine takes the pass's factors itself; hf runs the model's own modules with hooks on.
        with self._models[id(rep.model)].members(seeds, signs, sigma, hooks=engine != "fast") as lp:
            yield lp if engine == "fast" else None

    def ledger_attrs(self) -> dict[str, Any]:
        return {"noise": ESConfig.LOWRANK, "noise_rank": int(self.rank), "noise_scope": self.scope}


MODES: dict[str, type[FullRank] | type[LowRank]] = {ESConfig.FULL: FullRank, ESConfig.LOWRANK: LowRank}


def make(es: ESConfig) -> Search:
    """The search distribution ``es.noise`` names, set up from its section."""
    return MODES[es.noise](es)
