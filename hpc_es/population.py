"""This rank's share of the population: its model replicas and the members they evaluate.

The paper's inner loop lives here: for each member n, perturb the weights to θ + σ·ε_n, generate for the
iteration's prompts, score.  A rank holds one replica per device slot (``dist.devices_per_rank`` x
``dist.replicas_per_device``); member n goes to the rank and replica ``placement.slot_owner`` names, and
the replicas of a rank run side by side (threads; on a GPU each replica on its own CUDA stream).  The
update keeps every replica bit-identical (``Search.update``, hpc_es/search.py).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hpc_es import fastgen
from hpc_es.config import ESConfig, RolloutConfig
from hpc_es.es import Replica
from hpc_es.faults import Fault
from hpc_es.models import fingerprint, load_model, load_tokenizer
from hpc_es.placement import device_scope, slot_owner
from hpc_es.rollout import generate, resolve_engine, resolve_repetition_penalty
from hpc_es.search import make as make_search
from hpc_es.tasks import Example, Task, mean_reward, safe_score


@dataclass
class Scores:
    """One iteration's scoring on this rank."""

    rewards: np.ndarray  # float64[N]: this rank's members' mean rewards, zeros for the others' members
    times: dict[str, float]  # seconds in perturb, rollout and reward (replica 0's share)
    error: BaseException | None = None  # what stopped this rank's scoring; every rank learns of it
    members: list[int] = field(default_factory=list)


class Population:
    """Replicas, tokenizers, the search distribution and the threads that evaluate this rank's members."""

    def __init__(self, es: ESConfig, rollout: RolloutConfig, models: list[torch.nn.Module], tokenizers: list[Any],
                 task: Task, rank: int = 0, world: int = 1, fault: Fault | None = None) -> None:
        self.es, self.rollout, self.task = es, rollout, task
        self.search = make_search(es)  # thread-safe: replicas share it
        self.replicas: list[Replica] = []
        for model in models:
            self.replicas.append(self.search.replica(model, share=self.replicas))
        self.tokenizers = tokenizers
        self.N = es.population_size
        self.fault = fault or Fault(rank)
        self.rollout_engine = resolve_engine(rollout.engine, models[0], rank == 0)  # fast or hf; rank 0 notices
        per = len(models)
        # members[j]: the members replica j evaluates, in order
        self.members = [[n for n in range(self.N) if slot_owner(n, world, per) == (rank, j)] for j in range(per)]
        # each replica's members per pass (several side by side under es.noise=lowrank), fixed for the run, and
        # what the start-up line says about it
        self.passes = [self.search.per_pass(rep, rollout, tokenizers[j], task, len(self.members[j]),
                                            self.rollout_engine, sum(r.device == rep.device for r in self.replicas))
                       for j, rep in enumerate(self.replicas)]
        self.pool = ThreadPoolExecutor(per) if per > 1 else None
        self._streams: dict[int, Any] = {}  # replica index -> its CUDA stream (replicas that share a GPU)
        # Benchmarks and tests only (fastgen.Observer: e.g. EOS forced at set completion lengths, so that speed
        # is measured on ragged completions with a random-weight model).  None in training.
        self.observer: fastgen.Observer | None = None
        for model in models:
            fastgen.set_compile(model, rollout.compile)

    @classmethod
    def load(cls, es: ESConfig, rollout: RolloutConfig, model_path: str, devices: Sequence[torch.device],
             dtype: torch.dtype, task: Task, rank: int = 0, world: int = 1,
             fault: Fault | None = None) -> "Population":
        """One replica per entry of ``devices``, each loaded from ``model_path``; the replicas on one device
        share one master (θ), so ``dist.replicas_per_device`` adds working weights only (with
        es.noise=lowrank, each model's own weights are its master: no copy, unless es.master_dtype=float32)."""
        models = [load_model(model_path, dtype, str(dev)) for dev in devices]
        return cls(es, rollout, models, [load_tokenizer(model_path) for _ in devices], task, rank, world, fault)

    # ---- the inner loop of the algorithm -----------------------------------------------------------
    def score(self, seeds: np.ndarray, signs: np.ndarray, examples: Sequence[Example]) -> Scores:
        """For each of this rank's members: perturb to θ + σ·ε_n, generate, mean reward over ``examples``.

        A pass holds one member (full rank) or several side by side (low rank, ``rollout.members_per_pass``).
        An error does not propagate: it is returned, so that the rank still takes part in the iteration's
        exchange and every rank stops together.  The working weights are then left equal to θ.
        """
        self.fault("signal")
        out = Scores(np.zeros(self.N, dtype=np.float64), {"perturb": 0.0, "rollout": 0.0, "reward": 0.0})
        prompts = [ex.prompt for ex in examples]
        limit = self.rollout.reward_timeout_s

        def members(j: int) -> None:
            rep = self.replicas[j]
            for group in self.search.passes(self.members[j], self.passes[j][0]):
                a = time.perf_counter()
                with self.search.members(rep, [int(seeds[n]) for n in group], [int(signs[n]) for n in group],
                                         self.es.sigma, self.rollout_engine) as lowrank:
                    b = time.perf_counter()
                    self.fault("rollout")
                    self.fault("hang")
                    completions = self.complete(j, prompts, len(group), lowrank)
                c = time.perf_counter()
                for n, texts in zip(group, completions):
                    out.rewards[n] = mean_reward(self.task, [safe_score(self.task, text, ex, limit)
                                                             for text, ex in zip(texts, examples)], examples)
                d = time.perf_counter()
                if j == 0:
                    out.times["perturb"] += b - a
                    out.times["rollout"] += c - b
                    out.times["reward"] += d - c

        try:
            self.fault("raise")
            if self.pool is None:
                self._on_stream(0, members)
            else:
                list(self.pool.map(lambda j: self._on_stream(j, members), range(len(self.replicas))))
        except Exception as e:  # noqa: BLE001 - reported to every rank by the exchange, then the job stops
            out.error = e
            self.restore()  # no update follows: leave θ in the working weights (a copy, exact)
        out.members = [n for ms in self.members for n in ms]
        return out

    def complete(self, j: int, prompts: list[str], members: int = 1, lowrank: Any = None) -> list[list[str]]:
        """Replica j's greedy completions of ``prompts`` (new tokens only) for each of ``members`` members
        side by side: each generate call holds one batch of prompts (``rollout.batch_size``) once per member,
        member-major, as a low-rank pass lays out its rows."""
        model = self.replicas[j].model
        penalty = resolve_repetition_penalty(self.rollout.repetition_penalty, model)  # 1.0, a number, the folder's
        size = self.rollout.batch_size or len(prompts)
        starts = range(0, len(prompts), size)
        rows = [p for s in starts for _ in range(members) for p in prompts[s:s + size]]
        obs = self.observer
        if obs is not None and obs.stop_at is not None:
            sched = obs.stop_at
            obs = fastgen.Observer([n for s in starts for _ in range(members) for n in sched[s:s + size]], obs.logits)
        got = generate(model, self.tokenizers[j], rows, self.rollout.max_new_tokens, size * members,
                       repetition_penalty=penalty, engine=self.rollout_engine, observer=obs, lowrank=lowrank)
        out: list[list[str]] = [[] for _ in range(members)]
        for s in starts:
            for texts in out:
                texts.extend(got[:len(prompts[s:s + size])])
                del got[:len(prompts[s:s + size])]
        return out

    def _on_stream(self, j: int, fn: Callable[[int], None]) -> None:
        with device_scope(self.replicas[j].device):  # a pool thread's current CUDA device: its replica's
            self._stream_of(j, fn)

    def _stream_of(self, j: int, fn: Callable[[int], None]) -> None:
        rep = self.replicas[j]
        if rep.device.type == "cuda" and len(self.replicas) > 1:  # replicas sharing a GPU overlap on streams
            stream = self._streams.setdefault(j, torch.cuda.Stream(rep.device))
            stream.wait_stream(torch.cuda.current_stream(rep.device))  # after the last update
            with torch.cuda.stream(stream):
                fn(j)
            torch.cuda.current_stream(rep.device).wait_stream(stream)  # before the next update
        else:
            fn(j)

    def update(self, seeds: np.ndarray, signs: np.ndarray, shaped: np.ndarray, alpha: float) -> None:
        """θ ← θ + (α/N)·Σ_n Z_n·ε_n on every replica, bit-identically."""
        self.search.update(self.replicas, seeds, signs, shaped, alpha)

    def restore(self) -> None:
        for rep in self.replicas:
            self.search.restore(rep)

    # ---- weights -----------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """Replica 0's model: after an update it holds θ, as every replica does."""
        return self.replicas[0].model

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    def parameter_count(self) -> int:
        return sum(p.numel() for _, p in self.replicas[0].params)

    def weights(self) -> dict[str, torch.Tensor]:
        """θ by parameter name (what a checkpoint stores): the master, fp32 with es.master_dtype=float32."""
        return dict(self.replicas[0].master)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """θ <- ``weights`` (a checkpoint's master, or the base model's weights), working weights <- round(θ)."""
        from hpc_es.checkpoint import CheckpointError

        for rep in self.replicas:
            for name, _ in rep.params:
                if name not in weights:
                    raise CheckpointError(f"checkpoint lacks parameter '{name}'")
            rep.load_master(weights)

    def fingerprint(self) -> str:
        """The master's fingerprint: what checkpoints record and resume checks.  With a master in the
        model's dtype it is the model's (``model_fingerprint``); an fp32 master's covers its fp32 bits."""
        return self.replicas[0].master_fingerprint()

    def model_fingerprint(self) -> str:
        """The working weights' fingerprint: the base model's at load, final/'s at the end."""
        return fingerprint(self.replicas[0].model)

    def fingerprints(self) -> list[str]:
        """Per replica, a digest of its master and working weights, computed on the device (the cross-rank
        check's input: only one number per tensor reaches the host)."""
        return [rep.digest() for rep in self.replicas]

    def nudge(self) -> None:
        """Move one weight of every replica and of every master (fault injection: a divergence the checks
        must catch); a master shared by replicas moves once."""
        with torch.no_grad():
            name = self.replicas[0].params[0][0]
            for master in {id(rep.master): rep.master for rep in self.replicas}.values():
                master[name].view(-1)[0] += 1.0
            for rep in self.replicas:
                rep.params[0][1].view(-1)[0] += 1.0
