"""The ES training loop.  Read ``Trainer.run`` first: it is the algorithm.

Every rank derives the same seed table, scores the population members it owns, all-reduces the scalar
rewards (N floats and two control counts), and applies the identical update to its own weights.  The
components own their parts: ``Population`` (perturb, generate, score), ``resume`` (what run_dir holds),
``Checkpointer``, ``TestSplit`` and ``DivergenceCheck`` (each with its own "every k, and the last").
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from hpc_es import lowrank, resume, runlock
from hpc_es.checkpoint import Checkpointer, save_model_folder
from hpc_es.checks import DivergenceCheck
from hpc_es.comm import Comm, agree, attempt, exchange_rewards, make_comm
from hpc_es.config import Config
from hpc_es.errors import DistributedError, HpcEsError
from hpc_es.es import check_finite, shape_rewards
from hpc_es.evaluate import TestSplit
from hpc_es.faults import Fault
from hpc_es.fsio import check_writable_dir
from hpc_es.ledger import Ledger
from hpc_es.models import load_model, named_params, resolve_dtype
from hpc_es.noise import _hash64, member_seeds
from hpc_es.placement import local_devices, resolve_model_path
from hpc_es.population import Population, Scores
from hpc_es.progress import Progress, announce
from hpc_es.prompts import prompt_format
from hpc_es.tasks import Example, load_task
from hpc_es.tboard import TensorBoardLog  # issue 15
from hpc_es.watchdog import watchdog

log = logging.getLogger("hpc_es")


@dataclass
class TrainResult:
    run_dir: str
    final_dir: str
    iterations: int
    fingerprint: str
    reward_mean_first: float
    reward_mean_last: float


class Stop(Exception):
    """A signal asked the run to checkpoint and leave."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def iteration_examples(train: Sequence[Example], t: int, per_iter: int, seed: int) -> list[Example]:
    """The prompts of iteration t: all of them, or a window over seeded per-epoch permutations.

    A pure function of (seed, t), so resume needs no data cursor.
    """
    n = len(train)
    if per_iter >= n:
        return list(train)
    out = []
    for k in range(t * per_iter, (t + 1) * per_iter):
        epoch, pos = divmod(k, n)
        perm = np.random.default_rng(_hash64("data", seed, epoch)).permutation(n)
        out.append(train[int(perm[pos])])
    return out


class Trainer:
    def __init__(self, cfg: Config, comm: Comm) -> None:
        self.cfg, self.comm = cfg, comm
        self.fault = Fault(comm.rank)
        self.stop_signal = 0  # set by the signal handler of this rank
        self.stop_now = False  # every rank agrees (through the reward exchange) to stop after this iteration
        self.N = cfg.es.population_size
        self.log_path = os.path.join(cfg.run_dir, "log.h5")
        self.lock: runlock.RunLock | None = None  # rank 0's hold on run_dir (issue 16)
        # Two set-up steps, each closed by an agreement that every rank reaches, failed or not: a rank whose
        # set-up fails never leaves the others in a collective, and an error that every rank hits alike is
        # reported once, without an abort.
        try:
            agree(comm, attempt(self._setup_devices))
            agree(comm, attempt(self._setup_model))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of run_dir (the process's exit does too; this is for runs in a longer-lived process)."""
        if self.lock is not None:
            self.lock.release()

    def _setup_devices(self) -> None:
        """World size against N, the task and its data, this rank's devices; rank 0 takes run_dir (a
        writable folder, locked against a second run) and builds the tiny model (once, into the cache).
        Everything that can be wrong with the input is found here, before minutes of model loading."""
        cfg, comm = self.cfg, self.comm
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if comm.world_size > self.N:
            if not cfg.dist.allow_idle_ranks:
                raise DistributedError(
                    f"{comm.world_size} ranks but only {self.N} population members: every rank needs at least "
                    "one (lower the rank count, raise es.population_size, or set dist.allow_idle_ranks=true)")
            if comm.is_main:
                log.warning("%d ranks but only %d population members: ranks %d..%d idle (dist.allow_idle_ranks)",
                            comm.world_size, self.N, self.N, comm.world_size - 1)
        self.task = load_task(cfg)  # data and task errors before the model loads (issue 16)
        self.train_set = list(self.task.train_examples())
        if not self.train_set:
            raise HpcEsError(f"task '{cfg.task}' has no training examples")
        self.devices = local_devices(cfg, comm)
        if comm.is_main:
            check_writable_dir(cfg.run_dir)  # a file, read-only or not creatable: one line, before the model
            self.lock = runlock.acquire(cfg.run_dir)  # one run per run_dir; other ranks learn through agree()
        # issue 15: rank 0's TensorBoard writer (checks that the extra is installed, before the model load)
        self.tboard = TensorBoardLog(cfg.run_dir) if cfg.log.tensorboard and comm.is_main else None
        if comm.is_main:
            self.model_path = resolve_model_path(cfg)

    def _setup_model(self) -> None:
        """Every rank: its population share, the task, and what run_dir holds (``self.start``)."""
        cfg, comm = self.cfg, self.comm
        if not comm.is_main:
            self.model_path = resolve_model_path(cfg)  # rank 0 has built it: now a cache hit
        self.dtype = resolve_dtype(cfg.dtype, self.devices[0].type)
        if comm.is_main:  # loading a 7B model on every rank takes a while: say what is happening
            log.info("loading %s (%s, %d replica(s) per rank on %s)", self.model_path,
                     str(self.dtype).removeprefix("torch."), len(self.devices), self.devices[0].type)
        self.fault("signal")  # signal:-1 arrives while the model loads
        self.population = Population.load(cfg, self.model_path, self.devices, self.dtype, self.task, comm.rank,
                                          comm.world_size, self.fault)
        self.base_fingerprint = self.population.model_fingerprint()  # issue 12: the model's, not the master's
        self.prompt = prompt_format(cfg, self.task)  # raw text, or the folder's chat template around it
        self.train_set = self.prompt.examples(self.population.tokenizer, self.train_set)
        self.test_split = TestSplit(cfg, self.task, comm, os.path.abspath(self.model_path))  # issue 13: KL reference
        self.divergence = DivergenceCheck(comm, cfg.dist.check_every, cfg.es.iterations,
                                          comm.world_size * len(self.devices))
        base_model = os.path.abspath(self.model_path)
        self.checkpointer = Checkpointer(cfg.run_dir, cfg.checkpoint.every, cfg.es.iterations, cfg.checkpoint.weights,
                                         base_model, self.base_fingerprint, cfg.to_json(), comm.is_main, self.fault)
        self.ledger = Ledger(self.N, {
            "config": cfg.to_json(), "base_model": base_model, "base_fingerprint": self.base_fingerprint,
            "noise_device": self.devices[0].type, "model_dtype": str(self.dtype).removeprefix("torch."),
            **lowrank.ledger_attrs(cfg),  # issue 14: noise kind, rank, scope
            "rollout_engine": self.population.rollout_engine,  # issue 11: the engine that ran (auto resolved)
            "noise_scheme": cfg.es.noise_scheme, **self.prompt.ledger_attrs()})  # issue 12
        self.plan = resume.plan(cfg, self.base_fingerprint, self.model_path, self.devices[0].type)
        if self.plan is not None:
            resume.apply(self.plan, self.population, self.base_weights, cfg.run_dir, self.devices[0].type)
            self.ledger.rows, self.ledger.events = list(self.plan.rows), list(self.plan.events)
        self.start = len(self.ledger)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The base model's parameters, read again from its folder (to undo a partial load)."""
        return {n: p.data for n, p in named_params(load_model(self.model_path, self.dtype, "cpu"))}

    # ---- the algorithm ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, N = self.cfg, self.N
        self.before_first_iteration()
        for t in range(self.start, cfg.es.iterations):
            self.fault.iteration, t0 = t, time.perf_counter()
            seeds, signs = member_seeds(cfg.seed, t, N, cfg.es.antithetic)        # the seed table, alike everywhere
            examples = iteration_examples(self.train_set, t, cfg.rollout.prompts_per_iteration, cfg.seed)
            scores = self.population.score(seeds, signs, examples)               # perturb, generate, score mine
            rewards = self.exchange(scores, t)                                     # N floats cross ranks
            shaped = shape_rewards(rewards, cfg.es.shaping)                        # Z_n
            t1 = time.perf_counter()
            self.fault("update")
            self.population.update(seeds, signs, shaped, cfg.es.alpha)             # θ += α/N Σ Z_n ε_n
            check_finite(self.population.replicas[0], t, cfg.es.alpha, cfg.es.sigma)  # before anything is saved
            scores.times["update"] = time.perf_counter() - t1
            self.after_iteration(t, seeds, signs, rewards, shaped, scores.times, t0)
        self.bar.close()
        return self.finish()

    # ---- steps -----------------------------------------------------------------------------------
    def before_first_iteration(self) -> None:
        """Rank 0 repairs run_dir and says what runs; the ledger's bytes_sent excludes set-up traffic."""
        if self.comm.is_main:
            if self.plan is not None:
                resume.repair(self.plan, self.cfg.run_dir, self.ledger)
            if self.tboard is not None:  # issue 15: the event files rebuilt from the ledger rows already done
                self.tboard.start(self.ledger.rows)
            announce(os.path.basename(os.path.normpath(self.model_path)), self.population.parameter_count(),
                     self.comm.world_size, len(self.devices), self.comm.name, self.cfg.task, self.N,
                     self.cfg.es.sigma, self.cfg.es.alpha, self.start, self.cfg.es.iterations, self.log_path,
                     engine=self.population.rollout_engine)  # issue 11
        self.comm.bytes_sent = 0
        self.bar = Progress(self.cfg.es.iterations, self.start, enabled=self.comm.is_main and self.cfg.progress)

    def exchange(self, scores: Scores, t: int) -> np.ndarray:
        """All-reduce the rewards; a failure or a signal on any rank reaches every rank here."""
        got = exchange_rewards(self.comm, scores.rewards, scores.error is not None, bool(self.stop_signal))
        if got.failed:
            error = scores.error
            msg = "" if error is None else f"{type(error).__name__}: {error}"
            failed = [(r, m.decode()) for r, m in enumerate(self.comm.allgather(msg.encode())) if m]
            if self.comm.world_size == 1 and isinstance(error, HpcEsError):
                raise error
            where = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise DistributedError(f"iteration {t} failed on {len(failed)} rank(s) — {where}")
        if got.stopping:
            self.stop_now = True  # some rank was signalled: all stop after this iteration
            self.stop_signal = self.stop_signal or int(signal.SIGTERM)
        return got.rewards

    def after_iteration(self, t: int, seeds: np.ndarray, signs: np.ndarray, rewards: np.ndarray,
                        shaped: np.ndarray, times: dict[str, float], t0: float) -> None:
        """Test split, ledger row, weight check, then a checkpoint when due or when a signal asks to stop."""
        done = t + 1
        tested = self.test_split.run(done, self.population.model, self.population.tokenizer)
        times["eval"] = tested.pop("time_eval")
        self.record(t, seeds, signs, rewards, shaped, times, time.perf_counter() - t0, tested)
        self.fault("after_ledger")
        self.check_weights(t)
        self.bar.update(t, rewards, time.perf_counter() - t0)
        stop = self.stop_now or (self.comm.world_size == 1 and self.stop_signal)
        if stop:
            watchdog().disarm_stop()  # the iteration ended within checkpoint.stop_grace_s: checkpoint and leave
        if (stop or self.checkpointer.due(done)) and done < self.cfg.es.iterations:
            self.save_checkpoint(done)
        if stop and done < self.cfg.es.iterations:
            raise Stop(self.stop_signal)

    def record(self, t: int, seeds: np.ndarray, signs: np.ndarray, rewards: np.ndarray, shaped: np.ndarray,
               times: dict[str, float], elapsed: float, tested: dict[str, float]) -> None:
        row = {"iteration": t, "seeds": seeds, "signs": signs, "rewards": rewards, "shaped": shaped, **tested,
               "sigma": self.cfg.es.sigma, "alpha": self.cfg.es.alpha,
               "reward_mean": float(rewards.mean()), "reward_max": float(rewards.max()),
               "reward_min": float(rewards.min()), "bytes_sent": self.comm.bytes_sent,
               "world_size": self.comm.world_size, "slots": self.comm.world_size * len(self.devices),
               "time_iteration": elapsed, **{f"time_{k}": v for k, v in times.items()}}
        self.comm.bytes_sent = 0
        self.ledger.append(row)
        if self.comm.is_main:
            self.ledger.save(self.log_path)
        if self.tboard is not None:  # issue 15: after the ledger holds the row (fault point for the tests)
            self.fault("tensorboard")
            self.tboard.write(row)

    def check_weights(self, t: int) -> None:
        """Every dist.check_every iterations (and the last, before final/ is saved): same weights everywhere."""
        if self.fault.wants("nudge"):
            self.population.nudge()
        if not self.divergence.due(t + 1):
            return
        try:
            self.divergence.compare(t, self.population.fingerprints())
        except DistributedError as e:
            if self.comm.is_main:
                self.ledger.events.append({"iteration": t, "event": "divergence", "detail": str(e)})
                self.ledger.save(self.log_path)
            raise

    def save_checkpoint(self, done: int) -> None:
        self.checkpointer.save(done, self.population.weights, self.population.fingerprint(), self.ledger)

    def finish(self) -> TrainResult:
        final = os.path.join(self.cfg.run_dir, "final")
        fp = self.population.model_fingerprint()  # issue 12: final/'s (the master may be fp32)
        if self.comm.is_main:
            save_model_folder(self.population.model, self.population.tokenizer, final)
            self.save_checkpoint(len(self.ledger))
        if self.tboard is not None:  # issue 15
            self.tboard.close()
        self.comm.barrier()
        means = self.ledger.column("reward_mean") if len(self.ledger) else np.array([np.nan])
        return TrainResult(self.cfg.run_dir, final, len(self.ledger), fp, float(means[0]), float(means[-1]))


def train(cfg: Config, comm: Comm | None = None,
          on_signal: Callable[[Trainer], None] | None = None) -> TrainResult:
    """Train with ``cfg`` on the ranks of ``comm`` (detected from the environment when None).

    ``on_signal(trainer)`` installs signal handlers once the trainer exists (the CLI's; submitit keeps
    its own).
    """
    own = comm is None
    comm = comm or make_comm(cfg.dist.backend, cfg.dist.timeout_s)
    trainer = None
    try:
        trainer = Trainer(cfg, comm)
        if on_signal is not None:
            on_signal(trainer)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.release()
        if own:
            comm.close()

