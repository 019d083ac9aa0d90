"""Mean reward and accuracy on a task's test split (greedy or sampled, completions only): `python -m hpc_es eval`,
and the trainer's periodic evaluation (``eval.every``).

:func:`score_items` returns the metrics by name; each name maps onto a ledger column by an ``eval_`` prefix
(``mean_reward`` -> ``eval_reward``, kept from before), so the trainer copies the dict into its row:
``accuracy`` (hpc_es's: the answer is right by value), ``accuracy_paper`` (the published evaluation's rule,
for tasks that define it), ``kl_per_token`` / ``kl_per_completion`` (the exact KL to the base model) and
``kl_k3_per_token`` / ``kl_k3_per_completion`` (the paper's k3 estimate of it on the sampled tokens, see hpc_es.kl).
With ``eval.samples`` > 1 every metric is over ``samples`` sampled responses per item.

Under mpirun/torchrun whole batches of test items are dealt round-robin to the ranks (each on its own
device) and the per-item scores are summed into one vector: every item is scored once, the batches and
so the result are the same for any number of ranks, and rank 0 reports.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hpc_es.comm import Comm, agree, attempt
from hpc_es.config import Config
from hpc_es.errors import ConfigError, HpcEsError
from hpc_es.kl import CompletionKL, completion_kl, summarize
from hpc_es.models import load_model, load_tokenizer, resolve_dtype
from hpc_es.placement import local_devices, resolve_model_path
from hpc_es.prompts import prompt_format
from hpc_es.rollout import generate_ids, resolve_engine, resolve_repetition_penalty
from hpc_es.sampling import item_seed, sample_ids
from hpc_es.schedule import Every
from hpc_es.tasks import DEFAULT_REWARD_TIMEOUT_S, Example, Task, load_task, safe_score

log = logging.getLogger("hpc_es")

# score_items' names and the ledger's test-split columns; a name missing from a result is NaN in the row
METRICS = ("mean_reward", "accuracy", "accuracy_paper", "kl_per_token", "kl_per_completion", "kl_k3_per_token",
           "kl_k3_per_completion")


def column(name: str) -> str:
    """The ledger column of a score_items metric."""
    return "eval_reward" if name == "mean_reward" else f"eval_{name}"


EVAL_COLUMNS = tuple(column(m) for m in METRICS)


def ledger_columns(scores: dict[str, float] | None) -> dict[str, float]:
    """Every test-split ledger column from a score_items result (None: an iteration without evaluation)."""
    scores = scores or {}
    return {column(m): float(scores.get(m, float("nan"))) for m in METRICS}


def kl_enabled(cfg: Config) -> bool:
    """eval.kl: auto is on for the conciseness task, whose paper results report KL to the base model."""
    return cfg.eval.kl == "true" or (cfg.eval.kl == "auto" and cfg.task == "conciseness")


def eval_options(cfg: Config, base_model: str) -> dict[str, Any]:
    """score_items' keyword arguments for ``cfg``; ``base_model`` is the run's base model folder (θ_0, the
    reference of the KL; empty: no KL)."""
    return {"repetition_penalty": cfg.rollout.repetition_penalty,
            "kl_base": base_model if base_model and kl_enabled(cfg) else None,
            "samples": cfg.eval.samples, "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
            "sample_seed": cfg.seed, "reward_timeout_s": cfg.rollout.reward_timeout_s}


def eval_batch_size(cfg: Config) -> int:
    """Prompts per generate() call on the test split: rollout.batch_size, or 64 (a test split is large)."""
    return cfg.rollout.batch_size or 64


def my_items(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The items of the batches ``rank, rank + world, ...`` (batches of ``batch_size`` consecutive items)."""
    return [i for b in range(rank, -(-n // batch_size), world)
            for i in range(b * batch_size, min((b + 1) * batch_size, n))]


def score_items(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], max_new_tokens: int,
                batch_size: int, comm: Comm, on_batch: Callable[[int, int], None] | None = None, *,
                repetition_penalty: str | float = 1.0, kl_base: str | None = None,
                engine: str = "hf", samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                sample_seed: int = 0,
                reward_timeout_s: float = DEFAULT_REWARD_TIMEOUT_S) -> dict[str, float]:
    """The test metrics over ``examples`` (see :data:`METRICS`), this rank generating its share; a
    collective: every rank calls it.  ``on_batch(done, mine)`` reports progress.

    ``repetition_penalty`` is ``rollout.repetition_penalty`` (a number or ``model``); ``kl_base`` a base model
    folder: when given, the KL of ``model`` to it on the completions (loaded for the call, then freed);
    ``engine`` the rollout engine (rollout.resolve_engine).  ``samples`` > 1: that many sampled responses per
    item (``temperature``, ``top_p``; item i's draws seeded from ``sample_seed`` and i, hpc_es.sampling), every
    metric averaged over all of them; 1: the greedy completion."""
    n = len(examples)
    mine = my_items(n, batch_size, comm.rank, comm.world_size)
    penalty = resolve_repetition_penalty(str(repetition_penalty), model)
    if samples == 1:
        prompts = [examples[i].prompt for i in mine]
        ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size,
                           on_batch=None if on_batch is None else lambda done: on_batch(done, len(mine)),
                           repetition_penalty=penalty, engine=engine)
    else:
        prompts, ids = [], []
        for k, i in enumerate(mine):
            prompts += [examples[i].prompt] * samples
            ids += sample_ids(model, tokenizer, examples[i].prompt, samples, max_new_tokens,
                              seed=item_seed(sample_seed, i), temperature=temperature, top_p=top_p,
                              repetition_penalty=penalty)
            if on_batch is not None:
                on_batch(k + 1, len(mine))
    owner = [i for i in mine for _ in range(samples)]  # the item of each completion
    completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
    correct = getattr(task, "is_correct", None)
    paper = getattr(task, "is_correct_paper", None)
    # [scores | correct | correct by the paper's rule | exact KL sums | k3 sums | completion tokens], each a
    # sum over the item's samples: each item has one owner, so the sum over ranks is exact
    local = np.zeros(6 * n)
    for i, text in zip(owner, completions):
        local[i] += safe_score(task, text, examples[i], reward_timeout_s)
        if callable(correct):
            local[n + i] += float(bool(correct(text, examples[i])))
        if callable(paper):
            local[2 * n + i] += float(bool(paper(text, examples[i])))
    if kl_base is not None:
        param = next(model.parameters())
        base = load_model(kl_base, param.dtype, str(param.device))
        try:
            for i, got in zip(owner, completion_kl(model, base, tokenizer, prompts, ids)):
                local[3 * n + i] += got.exact
                local[4 * n + i] += got.k3
                local[5 * n + i] += got.tokens
        finally:
            del base
    total = comm.allreduce_sum(local)
    nan = float("nan")
    out = {"mean_reward": float(np.mean(total[:n])) / samples if n else nan}
    if callable(correct):
        out["accuracy"] = float(np.mean(total[n:2 * n])) / samples if n else nan
    if callable(paper):
        out["accuracy_paper"] = float(np.mean(total[2 * n:3 * n])) / samples if n else nan
    if kl_base is not None:
        out.update(summarize([CompletionKL(kl, k3, int(tokens)) for kl, k3, tokens in
                              zip(total[3 * n:4 * n].tolist(), total[4 * n:5 * n].tolist(),
                                  total[5 * n:].tolist())], samples))
    return out


def kl_base_for_eval(cfg: Config, model_path: str) -> str | None:
    """The base model folder ``eval`` measures KL against, or None when there is no KL to compute.

    eval.base_model when set; else, for a run's ``final/`` folder (its parent holds log.h5), the base model
    the run's ledger names.  Without either, ``eval.kl=true`` is an error and ``auto`` computes no KL (so that
    e.g. the base model itself can be evaluated on conciseness without saying eval.kl=false)."""
    if not kl_enabled(cfg):
        return None
    if cfg.eval.base_model:
        return cfg.eval.base_model
    run_dir = os.path.dirname(os.path.normpath(os.path.abspath(model_path)))
    ledger_path = os.path.join(run_dir, "log.h5")
    if os.path.basename(os.path.normpath(model_path)) == "final" and os.path.isfile(ledger_path):
        from hpc_es.ledger import Ledger

        base = Ledger.load(ledger_path).attrs.get("base_model")
        if base:
            return str(base)
    if cfg.eval.kl == "auto":
        return None
    raise ConfigError(f"eval.kl is on (eval.kl={cfg.eval.kl}, task {cfg.task}) but no base model is known for "
                      f"'{model_path}'; set eval.base_model=FOLDER (the model it was fine-tuned from), or "
                      "eval.kl=false")


class TestSplit:
    """The trainer's test-split evaluation of the updated weights: every ``eval.every`` iterations and
    after the last, ``eval.limit`` items, split over the ranks; its results become ledger columns."""

    COLUMNS = EVAL_COLUMNS

    def __init__(self, cfg: Config, task: Task, comm: Comm, base_model: str = "") -> None:
        """``base_model``: the run's base model folder (θ_0), the reference of the KL (eval.kl)."""
        self.cfg, self.task, self.comm = cfg, task, comm
        self.options = eval_options(cfg, base_model)
        self.schedule = Every(cfg.eval.every, cfg.es.iterations)
        self.examples = list(task.test_examples())[: cfg.eval.limit or None] if cfg.eval.every else []
        self.prompt = prompt_format(cfg, task)
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
        engine = resolve_engine(self.cfg.rollout.engine, model, notice=False)  # issue 11: as the rollouts
        examples = self.prompt.examples(tokenizer, self.examples)
        got = score_items(model, tokenizer, self.task, examples, self.cfg.rollout.max_new_tokens,
                          eval_batch_size(self.cfg), self.comm, engine=engine, **self.options)
        seconds = time.perf_counter() - a
        if self.comm.is_main:
            acc = f", accuracy {got['accuracy']:.4f}" if "accuracy" in got else ""
            log.info("test split after iteration %d: mean reward %.4f%s (%d items, %.1f s)", done,
                     got["mean_reward"], acc, len(self.examples), seconds)
        return {**ledger_columns(got), "time_eval": seconds}


def evaluate(cfg: Config, comm: Comm | None = None) -> dict[str, Any]:
    """Load ``cfg.model`` on every rank and score it on the test split (rank 0's dict is the answer)."""
    comm = comm or Comm()
    state: dict[str, Any] = {}

    def build() -> None:  # rank 0 first: it may build the tiny model into the cache
        state["path"] = resolve_model_path(cfg)
        state["kl_base"] = kl_base_for_eval(cfg, state["path"])

    def load() -> None:
        path = state.get("path") or resolve_model_path(cfg)
        kl_base = state["kl_base"] if "kl_base" in state else kl_base_for_eval(cfg, path)
        device = local_devices(cfg, comm)[0]
        model = load_model(path, resolve_dtype(cfg.dtype, device.type), str(device))
        state.update(path=path, kl_base=kl_base, model=model, tok=load_tokenizer(path), task=load_task(cfg))
        state["engine"] = resolve_engine(cfg.rollout.engine, model, comm.is_main)  # issue 11: fast, or hf

    agree(comm, attempt(build) if comm.is_main else None)
    agree(comm, attempt(load))
    prompt = prompt_format(cfg, state["task"])
    examples = prompt.examples(state["tok"], list(state["task"].test_examples())[: cfg.eval.limit or None])
    t0 = time.perf_counter()

    def progress(done: int, mine: int) -> None:  # thousands of prompts x 1024 tokens take a while
        if cfg.progress and comm.is_main:
            share = "" if comm.world_size == 1 else f" (rank 0's share of {len(examples)})"
            print(f"hpc_es: eval {done}/{mine} prompts{share}, {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)

    options = {**eval_options(cfg, ""), "kl_base": state["kl_base"]}
    scores = score_items(state["model"], state["tok"], state["task"], examples, cfg.rollout.max_new_tokens,
                         eval_batch_size(cfg), comm, progress, engine=state["engine"], **options)
    out: dict[str, Any] = {"model": state["path"], "task": cfg.task, "examples": len(examples),
                           "samples": cfg.eval.samples, **prompt.ledger_attrs(), **scores}
    if state["kl_base"] is not None:
        out["kl_base_model"] = state["kl_base"]
    elif kl_enabled(cfg) and comm.is_main:
        print(f"hpc_es: note: no KL to the base model: '{state['path']}' is not a run's final/ folder; set "
              "eval.base_model=FOLDER to measure it", file=sys.stderr, flush=True)
    if comm.world_size > 1:
        out["world_size"] = comm.world_size
    return out
