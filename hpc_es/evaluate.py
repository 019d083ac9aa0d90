"""Mean reward and accuracy on a task's test split (greedy, completions only): `python -m hpc_es eval`,
and the trainer's periodic evaluation (``eval.every``).

Under mpirun/torchrun whole batches of test items are dealt round-robin to the ranks (each on its own
device) and the per-item scores are summed into one vector: every item is scored once, the batches and
so the result are the same for any number of ranks, and rank 0 reports.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from hpc_es.comm import Comm, agree, attempt
from hpc_es.config import Config
from hpc_es.errors import HpcEsError
from hpc_es.models import load_model, load_tokenizer, resolve_dtype
from hpc_es.placement import local_devices, resolve_model_path
from hpc_es.rollout import generate
from hpc_es.schedule import Every
from hpc_es.tasks import Example, Task, load_task, safe_score

log = logging.getLogger("hpc_es")


def eval_batch_size(cfg: Config) -> int:
    """Prompts per generate() call on the test split: rollout.batch_size, or 64 (a test split is large)."""
    return cfg.rollout.batch_size or 64


def my_items(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The items of the batches ``rank, rank + world, ...`` (batches of ``batch_size`` consecutive items)."""
    return [i for b in range(rank, -(-n // batch_size), world)
            for i in range(b * batch_size, min((b + 1) * batch_size, n))]


def score_items(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], max_new_tokens: int,
                batch_size: int, comm: Comm, on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """``mean_reward`` (and ``accuracy`` for tasks with ``is_correct``) over ``examples``, this rank
    generating its share; a collective: every rank calls it.  ``on_batch(done, mine)`` reports progress."""
    n = len(examples)
    mine = my_items(n, batch_size, comm.rank, comm.world_size)
    completions = generate(model, tokenizer, [examples[i].prompt for i in mine], max_new_tokens, batch_size,
                           on_batch=None if on_batch is None else lambda done: on_batch(done, len(mine)))
    correct = getattr(task, "is_correct", None)
    local = np.zeros(2 * n)  # [scores | correct]: each item has one owner, so the sum is exact
    for i, text in zip(mine, completions):
        local[i] = safe_score(task, text, examples[i])
        if callable(correct):
            local[n + i] = float(bool(correct(text, examples[i])))
    total = comm.allreduce_sum(local)
    out = {"mean_reward": float(np.mean(total[:n])) if n else float("nan")}
    if callable(correct):
        out["accuracy"] = float(np.mean(total[n:])) if n else float("nan")
    return out


class TestSplit:
    """The trainer's test-split evaluation of the updated weights: every ``eval.every`` iterations and
    after the last, ``eval.limit`` items, split over the ranks; its results become ledger columns."""

    COLUMNS = ("eval_reward", "eval_accuracy")

    def __init__(self, cfg: Config, task: Task, comm: Comm) -> None:
        self.cfg, self.task, self.comm = cfg, task, comm
        self.schedule = Every(cfg.eval.every, cfg.es.iterations)
        self.examples = list(task.test_examples())[: cfg.eval.limit or None] if cfg.eval.every else []
        if cfg.eval.every and not self.examples:
            raise HpcEsError(f"eval.every={cfg.eval.every} but task '{cfg.task}' has no test examples "
                             "(see data.train_size, data.test_size)")

    def skipped(self) -> dict[str, float]:
        return {**{c: float("nan") for c in self.COLUMNS}, "time_eval": 0.0}

    def run(self, done: int, model: Any, tokenizer: Any) -> dict[str, float]:
        """The ledger's test-split columns after ``done`` iterations (NaN when not due); a collective."""
        if not self.schedule.due(done):
            return self.skipped()
        a = time.perf_counter()
        got = score_items(model, tokenizer, self.task, self.examples, self.cfg.rollout.max_new_tokens,
                          eval_batch_size(self.cfg), self.comm)
        seconds = time.perf_counter() - a
        if self.comm.is_main:
            acc = f", accuracy {got['accuracy']:.4f}" if "accuracy" in got else ""
            log.info("test split after iteration %d: mean reward %.4f%s (%d items, %.1f s)", done,
                     got["mean_reward"], acc, len(self.examples), seconds)
        return {"eval_reward": got["mean_reward"], "eval_accuracy": got.get("accuracy", float("nan")),
                "time_eval": seconds}


def evaluate(cfg: Config, comm: Comm | None = None) -> dict[str, Any]:
    """Load ``cfg.model`` on every rank and score it on the test split (rank 0's dict is the answer)."""
    comm = comm or Comm()
    state: dict[str, Any] = {}

    def build() -> None:  # rank 0 first: it may build the tiny model into the cache
        state["path"] = resolve_model_path(cfg)

    def load() -> None:
        path = state.get("path") or resolve_model_path(cfg)
        device = local_devices(cfg, comm)[0]
        state.update(path=path, model=load_model(path, resolve_dtype(cfg.dtype, device.type), str(device)),
                     tok=load_tokenizer(path), task=load_task(cfg))

    agree(comm, attempt(build) if comm.is_main else None)
    agree(comm, attempt(load))
    examples = list(state["task"].test_examples())[: cfg.eval.limit or None]
    t0 = time.perf_counter()

    def progress(done: int, mine: int) -> None:  # thousands of prompts x 1024 tokens take a while
        if cfg.progress and comm.is_main:
            share = "" if comm.world_size == 1 else f" (rank 0's share of {len(examples)})"
            print(f"hpc_es: eval {done}/{mine} prompts{share}, {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)

    scores = score_items(state["model"], state["tok"], state["task"], examples, cfg.rollout.max_new_tokens,
                         eval_batch_size(cfg), comm, progress)
    out: dict[str, Any] = {"model": state["path"], "task": cfg.task, "examples": len(examples), **scores}
    if comm.world_size > 1:
        out["world_size"] = comm.world_size
    return out
