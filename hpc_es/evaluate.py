"""Mean reward and accuracy of a model folder on a task's test split (greedy, completions only)."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from hpc_es.config import Config
from hpc_es.models import load_model, load_tokenizer, resolve_dtype
from hpc_es.rollout import generate
from hpc_es.tasks import load_task, safe_score


def evaluate(cfg: Config, limit: int = 0) -> dict[str, Any]:
    import torch

    from hpc_es.trainer import resolve_model_path

    path = resolve_model_path(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(path, resolve_dtype(cfg.dtype, device), device)
    tok = load_tokenizer(path)
    task = load_task(cfg)
    examples = list(task.test_examples())[: limit or None]
    t0 = time.perf_counter()

    def progress(done: int) -> None:  # a long evaluation (thousands of prompts x 1024 tokens) says where it is
        if cfg.progress:
            print(f"hpc_es: eval {done}/{len(examples)} prompts, {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                  flush=True)

    completions = generate(model, tok, [e.prompt for e in examples], cfg.rollout.max_new_tokens,
                           cfg.rollout.batch_size or 64, on_batch=progress)
    scores = [safe_score(task, c, e) for c, e in zip(completions, examples)]
    out: dict[str, Any] = {"model": path, "task": cfg.task, "examples": len(examples),
                           "mean_reward": float(np.mean(scores)) if scores else float("nan")}
    correct = getattr(task, "is_correct", None)
    if callable(correct):
        out["accuracy"] = float(np.mean([bool(correct(c, e)) for c, e in zip(completions, examples)]))
    return out
