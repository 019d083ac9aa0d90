"""Mean reward and accuracy of a model folder on a task's test split (greedy, completions only).

Under mpirun/torchrun the batches of test items are dealt round-robin over the ranks (each on its own
device) and the per-item scores are summed into one vector, so every item is scored once, the result
does not depend on the number of ranks, and rank 0 reports.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from hpc_es.comm import Comm, agree, attempt
from hpc_es.config import Config
from hpc_es.models import load_model, load_tokenizer, resolve_dtype
from hpc_es.rollout import generate
from hpc_es.tasks import load_task, safe_score


def evaluate(cfg: Config, limit: int = 0, comm: Comm | None = None) -> dict[str, Any]:
    from hpc_es.trainer import local_devices, resolve_model_path

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
    task = state["task"]
    examples = list(task.test_examples())[: limit or None]
    # Whole batches are dealt to the ranks, so every batch (and so every completion) is the same
    # whatever the number of ranks.
    size = cfg.rollout.batch_size or 64
    mine = [i for b in range(comm.rank, -(-len(examples) // size), comm.world_size)
            for i in range(b * size, min((b + 1) * size, len(examples)))]
    t0 = time.perf_counter()

    def progress(done: int) -> None:  # a long evaluation (thousands of prompts x 1024 tokens) says where it is
        if cfg.progress and comm.is_main:
            share = "" if comm.world_size == 1 else f" (rank 0's share of {len(examples)})"
            print(f"hpc_es: eval {done}/{len(mine)} prompts{share}, {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)

    completions = generate(state["model"], state["tok"], [examples[i].prompt for i in mine],
                           cfg.rollout.max_new_tokens, size, on_batch=progress)
    correct = getattr(task, "is_correct", None)
    local = np.zeros(2 * len(examples))  # [scores | correct]: each item has one owner, so the sum is exact
    for i, text in zip(mine, completions):
        local[i] = safe_score(task, text, examples[i])
        if callable(correct):
            local[len(examples) + i] = float(bool(correct(text, examples[i])))
    total = comm.allreduce_sum(local)
    scores = total[: len(examples)]
    out: dict[str, Any] = {"model": state["path"], "task": cfg.task, "examples": len(examples),
                           "mean_reward": float(np.mean(scores)) if len(examples) else float("nan")}
    if callable(correct):
        out["accuracy"] = float(np.mean(total[len(examples):])) if len(examples) else float("nan")
    if comm.world_size > 1:
        out["world_size"] = comm.world_size
    return out
