"""BASELINE, for comparison only: the hot path of the PUBLISHED ES fine-tuning code (Qiu et al. 2025).

A re-implementation of what the paper's public scripts do each iteration, written from their description
so that tools/bench.py can time it on the same model, population, prompts and token budget as hpc_es.
It is not used by hpc_es and is not a correct ES engine (see hpc_es/es.py for why):

* perturb: for every tensor, a generator is reseeded with the member's seed (the same seed for every
  tensor, so same-shape tensors get the same noise), noise is drawn in the model dtype with the tensor's
  shape, and ``sigma * noise`` is added in place;
* rollout: one ``model.generate`` call over all prompts (greedy, left padding), full rows decoded;
* restore: the noise is drawn again and ``sigma * noise`` subtracted in place (drifts in bf16);
* update: for every tensor, for every member, the noise is drawn again in the model dtype, scaled by the
  normalised reward and summed in the model dtype; the sum / N, times alpha, is added in place.

Members run one after another on one model.  The published script also calls ``gc.collect()`` and
``torch.cuda.empty_cache()`` around every member; those calls are left out here (they would only make the
baseline slower).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch


def _noise(p: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=p.device)
    gen.manual_seed(int(seed))
    return torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, sigma: float) -> None:
    for _, p in model.named_parameters():
        p.data.add_(sigma * _noise(p, seed))


@torch.no_grad()
def restore(model: torch.nn.Module, seed: int, sigma: float) -> None:
    for _, p in model.named_parameters():
        p.data.add_(-sigma * _noise(p, seed))


@torch.no_grad()
def update(model: torch.nn.Module, seeds: Sequence[int], normalized: Sequence[float], alpha: float) -> None:
    n = len(seeds)
    for _, p in model.named_parameters():
        acc = torch.zeros_like(p)
        for seed, r in zip(seeds, normalized):
            noise = _noise(p, seed)
            noise.mul_(float(r))
            acc.add_(noise)
            del noise
        acc.div_(n)
        p.data.add_(alpha * acc)


def normalize(rewards: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float32)
    return (r - r.mean()) / (r.std() + 1e-8)


def rollout(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def iteration(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
              score: Callable[[int, str], float], n: int, sigma: float, alpha: float, rng: np.random.Generator,
              sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """One ES iteration as the published code runs it; returns seconds per phase (summed over members).

    ``score(i, text)`` is the reward of prompt i's decoded row.
    """
    times = {"perturb": 0.0, "rollout": 0.0, "reward": 0.0, "restore": 0.0, "update": 0.0}
    seeds = rng.integers(0, 2**30, size=n).tolist()
    rewards = np.zeros(n)
    for k, seed in enumerate(seeds):
        a = time.perf_counter()
        perturb(model, seed, sigma)
        sync()
        b = time.perf_counter()
        texts = rollout(model, tokenizer, prompts, max_new_tokens)
        c = time.perf_counter()
        rewards[k] = float(np.mean([score(i, t) for i, t in enumerate(texts)]))
        d = time.perf_counter()
        restore(model, seed, sigma)
        sync()
        e = time.perf_counter()
        times["perturb"] += b - a
        times["rollout"] += c - b
        times["reward"] += d - c
        times["restore"] += e - d
    a = time.perf_counter()
    update(model, seeds, normalize(rewards).tolist(), alpha)
    sync()
    times["update"] = time.perf_counter() - a
    return times

