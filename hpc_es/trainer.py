"""The ES training loop.  Read ``Trainer.run`` first: it is the algorithm.

Every rank derives the same seed table, evaluates the population members it owns, all-reduces the
scalar rewards (one float per member), and applies the identical update to its own weights.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hpc_es import checkpoint as ckpt
from hpc_es.comm import Comm, agree, attempt, make_comm
from hpc_es.evaluate import eval_batch_size, score_items
from hpc_es.placement import local_devices, resolve_model_path
from hpc_es.config import Config
from hpc_es.errors import DistributedError, HpcEsError
from hpc_es.es import Engine, Replica, shape_rewards
from hpc_es.ledger import Ledger, LedgerError
from hpc_es.models import fingerprint, load_model, load_tokenizer, named_params, resolve_dtype
from hpc_es.noise import _hash64, member_seeds, scheme_of, trajectory_keys
from hpc_es.rollout import generate
from hpc_es.tasks import Example, load_task, safe_score

log = logging.getLogger("hpc_es")

# Config keys that define the trajectory: a resumed run must agree on all of them.
TRAJECTORY_KEYS = ("model", "task", "seed", "dtype", "es.population_size", "es.sigma", "es.alpha",
                   "es.antithetic", "es.shaping", "rollout", "data", "tiny")  # issue 12: + trajectory_keys()


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


def slot_owner(member: int, world: int, per_rank: int) -> tuple[int, int]:
    """(rank, replica) that evaluates ``member``: round-robin over ranks, then over the rank's replicas.

    Every rank gets floor(N/world) or ceil(N/world) members (so none idles while N >= world), and a
    rank's replicas differ by at most one member.
    """
    return member % world, (member // world) % per_rank


class Fault:
    """Deterministic fault injection for tests: HPC_ES_FAULT=point:iteration[:rank][,...].

    Points that SIGKILL the process: rollout, update, after_ledger, checkpoint_write.  ``signal`` sends
    this process a real SIGTERM at the start of iteration T (as a scheduler would); ``raise`` and
    ``nudge`` inject an error and a weight divergence.
    """

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
        return (point, self.iteration) in self.points


def _trajectory(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in TRAJECTORY_KEYS:
        v: Any = cfg_dict
        for part in key.split("."):
            v = v[part]
        out[key] = v
    out.update(trajectory_keys(cfg_dict))  # issue 12: es.noise_scheme (absent = legacy); es.noise_chunk under legacy
    return out


class Trainer:
    def __init__(self, cfg: Config, comm: Comm) -> None:
        self.cfg, self.comm = cfg, comm
        self.fault = Fault(comm.rank)
        self.stop_signal = 0  # set by the signal handler of this rank
        self.stop_now = False  # every rank agrees (through the reward all-reduce) to stop after this iteration
        self.N = cfg.es.population_size
        self.log_path = os.path.join(cfg.run_dir, "log.h5")
        # Two setup steps, each closed by an agreement that every rank reaches, failed or not: a rank whose
        # setup fails never leaves the others in a collective, and an error that every rank hits alike is
        # reported once, without an abort.
        agree(comm, attempt(self._setup_devices))
        agree(comm, attempt(self._setup_model))

    def _setup_devices(self) -> None:
        """World size against N, this rank's devices; rank 0 builds the tiny model (once, into the cache)."""
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
        self.devices = local_devices(cfg, comm)
        self.per_rank = len(self.devices)
        if comm.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            self.model_path = resolve_model_path(cfg)

    def _setup_model(self) -> None:
        """Every rank: its replicas, tokenizers, the task, and what run_dir holds (``self.start``)."""
        cfg, comm = self.cfg, self.comm
        if not comm.is_main:
            self.model_path = resolve_model_path(cfg)  # rank 0 has built it: now a cache hit
        self.dtype = resolve_dtype(cfg.dtype, self.devices[0].type)
        if comm.is_main:  # loading a 7B model on every rank takes a while: say what is happening
            log.info("loading %s (%s, %d replica(s) per rank on %s)", self.model_path,
                     str(self.dtype).removeprefix("torch."), len(self.devices), self.devices[0].type)
        self.replicas: list[Replica] = []
        self.tokenizers = []
        for dev in self.devices:
            model = load_model(self.model_path, self.dtype, str(dev))
            self.replicas.append(Replica.wrap(model, cfg.es.base_on))
            self.tokenizers.append(load_tokenizer(self.model_path))
        self.base_fingerprint = fingerprint(self.replicas[0].model)
        # thread-safe: replicas perturbed side by side share it; issue 12: the noise scheme
        self.engine = Engine(cfg.es.noise_chunk, scheme=cfg.es.noise_scheme)
        self.task = load_task(cfg)
        self.train_set = list(self.task.train_examples())
        if not self.train_set:
            raise HpcEsError(f"task '{cfg.task}' has no training examples")
        self.test_set = list(self.task.test_examples())[: cfg.eval.limit or None] if cfg.eval.every else []
        if cfg.eval.every and not self.test_set:
            raise HpcEsError(f"eval.every={cfg.eval.every} but task '{cfg.task}' has no test examples "
                             "(see data.train_size, data.test_size)")
        self.mine = [n for n in range(self.N) if slot_owner(n, comm.world_size, self.per_rank)[0] == comm.rank]
        self.pool = ThreadPoolExecutor(self.per_rank) if self.per_rank > 1 else None
        self._streams: dict[int, Any] = {}  # replica index -> its CUDA stream (replicas that share a GPU)
        self.ledger = Ledger(self.N, {
            "config": cfg.to_json(), "base_model": os.path.abspath(self.model_path),
            "base_fingerprint": self.base_fingerprint, "noise_device": self.devices[0].type,
            "noise_scheme": cfg.es.noise_scheme,  # issue 12
            "model_dtype": str(self.dtype).removeprefix("torch.")})
        self.start, self._resume_report = self.read_run_dir()

    # ---- the algorithm ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, N = self.cfg, self.N
        start = self.start
        self.report_resume()
        self.announce()
        self.comm.bytes_sent = 0  # the ledger's bytes_sent counts each iteration's traffic, setup excluded
        bar = Progress(cfg.es.iterations, start, enabled=self.comm.is_main and cfg.progress)
        for t in range(start, cfg.es.iterations):
            self.fault.iteration = t
            t0 = time.perf_counter()
            seeds, signs = member_seeds(cfg.seed, t, N, cfg.es.antithetic)
            examples = iteration_examples(self.train_set, t, cfg.rollout.prompts_per_iteration, cfg.seed)
            local, times = self.evaluate(seeds, signs, examples)      # perturb, generate, score my members
            rewards = self.allreduce_rewards(local, t)                 # N floats cross ranks, nothing else
            shaped = shape_rewards(rewards, cfg.es.shaping)
            t1 = time.perf_counter()
            self.fault("update")
            self.engine.update(self.replicas, seeds, signs, shaped, cfg.es.alpha)
            times["update"] = time.perf_counter() - t1
            tested = self.test(t, times)                               # every eval.every iterations
            self.record(t, seeds, signs, rewards, shaped, times, time.perf_counter() - t0, tested)
            self.fault("after_ledger")
            self.check_divergence(t)
            bar.update(t, rewards, time.perf_counter() - t0)
            done = t + 1
            # Ranks stop together: a signal counts once the all-reduce has carried it to every rank.
            stop = self.stop_now or (self.comm.world_size == 1 and self.stop_signal)
            if stop and done < cfg.es.iterations:
                self.save_checkpoint(done)
                raise Stop(self.stop_signal)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.es.iterations:
                self.save_checkpoint(done)
        bar.close()
        return self.finish()

    # ---- steps -----------------------------------------------------------------------------------
    def evaluate(self, seeds: np.ndarray, signs: np.ndarray,
                 examples: list[Example]) -> tuple[np.ndarray, dict[str, float]]:
        """Rewards of this rank's members (zeros elsewhere, so the sum over ranks is exact)."""
        self.fault("signal")
        local = np.zeros(self.N + 2, dtype=np.float64)  # + count of failed ranks, of ranks asked to stop
        local[self.N + 1] = 1.0 if self.stop_signal else 0.0
        times = {"perturb": 0.0, "rollout": 0.0, "reward": 0.0, "restore": 0.0}
        prompts = [ex.prompt for ex in examples]

        def work(j: int) -> None:
            rep = self.replicas[j]
            if rep.device.type == "cuda" and self.per_rank > 1:  # replicas sharing a GPU overlap on streams
                stream = self._streams.setdefault(j, torch.cuda.Stream(rep.device))
                stream.wait_stream(torch.cuda.current_stream(rep.device))  # after the last update
                with torch.cuda.stream(stream):
                    members(j)
                torch.cuda.current_stream(rep.device).wait_stream(stream)  # before the next update
            else:
                members(j)

        def members(j: int) -> None:
            rep, tok = self.replicas[j], self.tokenizers[j]
            for n in self.mine:
                if slot_owner(n, self.comm.world_size, self.per_rank)[1] != j:
                    continue
                a = time.perf_counter()
                self.engine.perturb(rep, int(seeds[n]), int(signs[n]), self.cfg.es.sigma)
                b = time.perf_counter()
                self.fault("rollout")
                completions = generate(rep.model, tok, prompts, self.cfg.rollout.max_new_tokens,
                                       self.cfg.rollout.batch_size)
                c = time.perf_counter()
                local[n] = float(np.mean([safe_score(self.task, comp, ex) for comp, ex in zip(completions, examples)]))
                d = time.perf_counter()
                if j == 0:
                    times["perturb"] += b - a
                    times["rollout"] += c - b
                    times["reward"] += d - c
            # No restore pass: each perturb overwrites every working weight from the base, and
            # Engine.update reads only the base and ends with every replica's weights equal to the new one.

        self.error: BaseException | None = None
        try:
            self.fault("raise")
            if self.pool is None:
                work(0)
            else:
                list(self.pool.map(work, range(self.per_rank)))
        except HpcEsError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - reported to every rank, then the job stops
            self.error = e
        if self.error is not None:
            local[self.N] = 1.0
            for rep in self.replicas:
                self.engine.restore(rep)  # no update follows: leave the base in the working weights (a copy, exact)
        return local, times

    def allreduce_rewards(self, local: np.ndarray, t: int) -> np.ndarray:
        total = self.comm.allreduce_sum(local)
        if total[self.N] > 0:
            msg = "" if self.error is None else f"{type(self.error).__name__}: {self.error}"
            gathered = self.comm.allgather(msg.encode())
            failed = [(r, m.decode()) for r, m in enumerate(gathered) if m]
            where = "; ".join(f"rank {r}: {m}" for r, m in failed)
            if self.comm.world_size == 1 and isinstance(self.error, HpcEsError):
                raise self.error
            raise DistributedError(f"iteration {t} failed on {len(failed)} rank(s) — {where}")
        if total[self.N + 1] > 0:
            self.stop_now = True  # some rank was signalled: all stop after this iteration
            if not self.stop_signal:
                self.stop_signal = int(signal.SIGTERM)
        return total[: self.N]

    def test(self, t: int, times: dict[str, float]) -> dict[str, float]:
        """The updated weights on the test split, when iteration t is due (eval.every, and the last)."""
        every, last = self.cfg.eval.every, t + 1 == self.cfg.es.iterations
        if not every or ((t + 1) % every and not last):
            times["eval"] = 0.0
            return {"eval_reward": float("nan"), "eval_accuracy": float("nan")}
        a = time.perf_counter()
        got = score_items(self.replicas[0].model, self.tokenizers[0], self.task, self.test_set,
                          self.cfg.rollout.max_new_tokens, eval_batch_size(self.cfg), self.comm)
        times["eval"] = time.perf_counter() - a
        if self.comm.is_main:
            acc = f", accuracy {got['accuracy']:.4f}" if "accuracy" in got else ""
            log.info("test split after iteration %d: mean reward %.4f%s (%d items, %.1f s)", t + 1,
                     got["mean_reward"], acc, len(self.test_set), times["eval"])
        return {"eval_reward": got["mean_reward"], "eval_accuracy": got.get("accuracy", float("nan"))}

    def record(self, t: int, seeds: np.ndarray, signs: np.ndarray, rewards: np.ndarray, shaped: np.ndarray,
               times: dict[str, float], elapsed: float, tested: dict[str, float]) -> None:
        row = {"iteration": t, "seeds": seeds, "signs": signs, "rewards": rewards, "shaped": shaped, **tested,
               "sigma": self.cfg.es.sigma, "alpha": self.cfg.es.alpha,
               "reward_mean": float(rewards.mean()), "reward_max": float(rewards.max()),
               "reward_min": float(rewards.min()), "bytes_sent": self.comm.bytes_sent,
               "world_size": self.comm.world_size, "slots": self.comm.world_size * self.per_rank,
               "time_iteration": elapsed, **{f"time_{k}": v for k, v in times.items()}}
        self.comm.bytes_sent = 0
        self.ledger.append(row)
        if self.comm.is_main:
            self.ledger.save(self.log_path)

    def check_divergence(self, t: int) -> None:
        every = self.cfg.dist.check_every
        if self.fault.wants("nudge"):
            with torch.no_grad():
                for rep in self.replicas:
                    p = rep.params[0][1]
                    p.view(-1)[0] += 1.0
                    rep.base[rep.params[0][0]].view(-1)[0] += 1.0
        last = t + 1 == self.cfg.es.iterations  # always compare before rank 0 saves final/
        if not every or ((t + 1) % every and not last) or self.comm.world_size * self.per_rank == 1:
            return
        prints = [fingerprint(rep.model) for rep in self.replicas]
        # 16 bytes cross: a flag (1 = this rank's own replicas differ) and 15 bytes of the weights' SHA-256.
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
        msg = f"weights diverged after iteration {t}: {'; '.join(parts)}"
        if self.comm.is_main:
            self.ledger.events.append({"iteration": t, "event": "divergence", "detail": msg})
            self.ledger.save(self.log_path)
        raise DistributedError(msg)

    # ---- durability ------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.replicas[0].base)

    def save_checkpoint(self, done: int) -> None:
        if not self.comm.is_main:
            return
        state = ckpt.CheckpointState(
            iteration=done, base_model=os.path.abspath(self.model_path), base_fingerprint=self.base_fingerprint,
            fingerprint=fingerprint(self.replicas[0].model), has_weights=self.cfg.checkpoint.weights,
            config=self.cfg.to_json())
        ckpt.save(self.cfg.run_dir, state, self.weights() if self.cfg.checkpoint.weights else None, self.fault,
                  ledger=self.ledger)
        log.info("checkpoint saved after iteration %d", done)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for rep in self.replicas:
                for name, p in rep.params:
                    if name not in weights:
                        raise ckpt.CheckpointError(f"checkpoint lacks parameter '{name}'")
                    rep.base[name].copy_(weights[name])
                    p.copy_(weights[name])

    def replay_rows(self, rows: list[dict[str, Any]]) -> None:
        """Apply recorded updates without a rollout: weights depend on seeds, signs, shaped, alpha only."""
        for row in rows:
            self.engine.update(self.replicas, np.asarray(row["seeds"]), np.asarray(row["signs"]),
                               np.asarray(row["shaped"]), float(row["alpha"]))

    def read_run_dir(self) -> tuple[int, dict[str, Any] | None]:
        """What run_dir holds: checkpointed weights, then the ledger rows written after the checkpoint.

        Returns the iteration to start at and what ``report_resume`` must repair and say (None: a fresh
        run_dir).  Damage is worked around where the remaining files allow it (a damaged log.h5: the
        checkpoint's copy of the ledger; damaged checkpoint weights: the base model plus the ledger).  A
        run_dir that holds a run is never silently restarted from zero.  Reads only: every rank calls it.
        """
        run_dir = self.cfg.run_dir
        notes: list[str] = []
        try:
            found, ckpt_damage = ckpt.load(run_dir), None
        except ckpt.CheckpointError as e:
            found, ckpt_damage = None, e
        state, folder = found if found is not None else (None, None)
        old: Ledger | None = None
        log_damage: LedgerError | None = None
        if os.path.exists(self.log_path):
            try:
                old = Ledger.load(self.log_path)
            except LedgerError as e:
                log_damage = e
        if found is None and ckpt_damage is None and old is None and log_damage is None:
            return 0, None
        if state is not None:
            self.check_checkpoint(state)
        done = state.iteration if state is not None else 0
        keep_damaged = False
        if old is None or len(old) < done:
            why = (f"{log_damage}" if log_damage is not None else "log.h5 is missing" if old is None else
                   f"log.h5 holds {len(old)} iterations but the checkpoint is at {done}")
            copy = ckpt.ledger_copy(folder) if folder is not None else None
            if copy is None:
                extra = (f"and the checkpoint is damaged too ({ckpt_damage})" if ckpt_damage is not None else
                         "and there is no checkpoint to recover from" if state is None else
                         "and the checkpoint holds no copy of the ledger")
                raise ckpt.CheckpointError(f"cannot resume run_dir '{run_dir}': {why}, {extra}; nothing was "
                                           "changed (use a new run_dir to start afresh)")
            try:
                old = Ledger.load(copy)
            except LedgerError as e:
                raise ckpt.CheckpointError(f"cannot resume run_dir '{run_dir}': {why}, and the checkpoint's "
                                           f"copy of the ledger is damaged too ({e})") from None
            if len(old) != done:
                raise ckpt.CheckpointError(f"cannot resume run_dir '{run_dir}': {why}, and the checkpoint's copy "
                                           f"of the ledger holds {len(old)} iterations, not {done}")
            keep_damaged = os.path.exists(self.log_path)
            notes.append(f"{why}; continuing from the checkpoint's copy of the ledger ({done} iterations)"
                         + ("; the damaged file is kept as log.h5.damaged" if keep_damaged else ""))
        if ckpt_damage is not None:
            notes.append(f"{ckpt_damage}; rebuilding the weights from the base model and the ledger")
        self.check_same_run(old)
        if len(old) > self.cfg.es.iterations:
            raise ckpt.CheckpointError(
                f"run_dir '{run_dir}' holds {len(old)} completed iterations, more than es.iterations="
                f"{self.cfg.es.iterations}; raise es.iterations to continue it, or get earlier weights with "
                f"`python -m hpc_es replay {run_dir} --iteration T --out DIR`")
        rows_from = 0  # the ledger rows not covered by loaded weights
        from_weights = False
        if state is not None and state.has_weights:
            try:
                self.load_weights(ckpt.load_weights(folder))
                got = fingerprint(self.replicas[0].model)
                if got != state.fingerprint:
                    raise ckpt.CheckpointError(f"checkpoint weights in '{folder}' have fingerprint {got[:16]} but "
                                               f"state.json records {state.fingerprint[:16]}")
                rows_from, from_weights = done, True
            except (ckpt.CheckpointError, RuntimeError) as e:
                notes.append(f"{e}; rebuilding the weights from the base model and the ledger")
                self.load_weights(self.base_weights())
        if len(old) > rows_from and scheme_of(old.attrs) == "legacy":  # issue 12: keyed noise is device-free
            dev = old.attrs.get("noise_device", self.devices[0].type)
            if dev != self.devices[0].type:
                raise ckpt.CheckpointError(
                    f"run_dir '{run_dir}' drew its noise on {dev} but this run is on {self.devices[0].type}; "
                    "replaying its ledger needs the same device type (CPU and CUDA generators differ)")
        if state is not None and rows_from == 0 and done > 0:
            # Rebuilding from the base: the checkpoint's fingerprint checks the ledger on the way.
            self.replay_rows(old.rows[:done])
            got = fingerprint(self.replicas[0].model)
            if got != state.fingerprint:
                raise ckpt.CheckpointError(
                    f"replaying the first {done} ledger iterations of '{run_dir}' gives weights {got[:16]}, but "
                    f"the checkpoint recorded {state.fingerprint[:16]}: the ledger and the checkpoint disagree")
            rows_from = done
        self.replay_rows(old.rows[rows_from:])
        self.ledger.rows = list(old.rows)
        self.ledger.events = list(old.events)
        start = len(old)
        return start, {"notes": notes, "keep_damaged": keep_damaged, "done": done, "from_weights": from_weights}

    def announce(self) -> None:
        """Rank 0 says what runs, before the first iteration (a big model takes a while to get there)."""
        if not self.comm.is_main:
            return
        cfg, start = self.cfg, self.start
        params = sum(p.numel() for _, p in self.replicas[0].params)
        backend = "one process" if self.comm.name == "none" else self.comm.name
        todo = (f"iterations {start + 1}..{cfg.es.iterations}" if start < cfg.es.iterations else
                f"all {cfg.es.iterations} iterations already done")
        log.info("%s: %.1fM parameters, %d rank(s) x %d replica(s) (%s); task %s, N=%d, sigma=%g, alpha=%g; "
                 "%s; ledger %s", os.path.basename(os.path.normpath(self.model_path)), params / 1e6,
                 self.comm.world_size, self.per_rank, backend, cfg.task, self.N, cfg.es.sigma, cfg.es.alpha, todo,
                 self.log_path)

    def report_resume(self) -> None:
        """Rank 0 repairs run_dir and says where the run continues (after every rank has read it)."""
        info = self._resume_report
        if info is None or not self.comm.is_main:
            return
        run_dir, done, start = self.cfg.run_dir, info["done"], self.start
        if info["keep_damaged"]:
            os.replace(self.log_path, self.log_path + ".damaged")
            self.ledger.save(self.log_path)
        ckpt.clean_stale(run_dir)
        for note in info["notes"]:
            print(f"hpc_es: warning: {note}", file=sys.stderr, flush=True)
        source = f"checkpoint weights after iteration {done}" if info["from_weights"] else "the base model"
        print(f"hpc_es: resuming {run_dir} at iteration {start} (from {source} + "
              f"{start - done if info['from_weights'] else start} ledger rows replayed)", file=sys.stderr, flush=True)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The base model's parameters, read again from its folder (to undo a partial load)."""
        return {n: p.data for n, p in named_params(load_model(self.model_path, self.dtype, "cpu"))}

    def _trajectory_diff(self, cfg_json: str | dict[str, Any]) -> list[str]:
        was = json.loads(cfg_json) if isinstance(cfg_json, str) else cfg_json
        now = _trajectory(json.loads(self.cfg.to_json()))
        try:
            was = _trajectory(was)
        except (KeyError, TypeError):
            return ["config (unreadable)"]
        return [k for k in was if was[k] != now[k] and k != "model"]

    def check_checkpoint(self, state: ckpt.CheckpointState) -> None:
        if state.base_fingerprint != self.base_fingerprint:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{self.cfg.run_dir}' was made from a base model with fingerprint "
                f"{state.base_fingerprint[:16]}, but '{self.model_path}' has {self.base_fingerprint[:16]}; "
                "refusing to resume onto a different model")
        if state.config:
            try:
                diff = self._trajectory_diff(state.config)
            except ValueError:
                diff = ["config (unreadable)"]
            if diff:
                raise ckpt.CheckpointError(
                    f"the checkpoint in '{self.cfg.run_dir}' belongs to a run with different {', '.join(diff)}; "
                    "use a new run_dir or the same settings")

    def check_same_run(self, old: Ledger) -> None:
        if old.attrs.get("base_fingerprint") != self.base_fingerprint:
            raise ckpt.CheckpointError(
                f"run_dir '{self.cfg.run_dir}' was trained from a base model with fingerprint "
                f"{str(old.attrs.get('base_fingerprint'))[:16]}, but '{self.model_path}' has "
                f"{self.base_fingerprint[:16]}; refusing to resume onto a different model")
        diff = self._trajectory_diff(old.config)
        if diff:
            raise ckpt.CheckpointError(
                f"run_dir '{self.cfg.run_dir}' holds a run with different {', '.join(diff)}; "
                "use a new run_dir or the same settings")

    def finish(self) -> TrainResult:
        final = os.path.join(self.cfg.run_dir, "final")
        fp = fingerprint(self.replicas[0].model)
        if self.comm.is_main:
            save_pretrained_atomic(self.replicas[0].model, self.tokenizers[0], final)
            self.save_checkpoint(len(self.ledger))
        self.comm.barrier()
        means = self.ledger.column("reward_mean") if len(self.ledger) else np.array([np.nan])
        return TrainResult(self.cfg.run_dir, final, len(self.ledger), fp, float(means[0]), float(means[-1]))


def save_pretrained_atomic(model: torch.nn.Module, tokenizer: Any, out: str) -> None:
    """save_pretrained into a temp folder, then rename over ``out``."""
    import shutil

    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = f"{out}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


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


def train(cfg: Config, comm: Comm | None = None,
          on_signal: Callable[[int], None] | None = None) -> TrainResult:
    """Train with ``cfg`` on the ranks of ``comm`` (detected from the environment when None)."""
    own = comm is None
    comm = comm or make_comm(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        trainer = Trainer(cfg, comm)
        if on_signal is not None:
            on_signal(trainer)
        return trainer.run()
    finally:
        if own:
            comm.close()
