"""The ES engine: exact perturb/restore and an fp32-accumulated update, tensor by tensor.

The base weights are kept apart from the weights the model runs with.  A perturbation writes
round(base + sign*sigma*eps) into the working weights, so "restore" is a copy of the base and is exact
in every dtype (the paper's add-then-subtract in bf16 drifts).  The update sums all members' noise
in fp32 per chunk and rounds once: base <- round(base + (alpha/N) * sum_n Z_n * eps_n).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from hpc_es.models import named_params
from hpc_es.noise import NoiseSource, chunks

log = logging.getLogger("hpc_es")


def zscore(rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / std with the population std (ddof=0), as the paper; all-equal rewards give zeros."""
    r = np.asarray(rewards, dtype=np.float64)
    std = r.std()
    if not np.isfinite(std) or std == 0.0:
        return np.zeros_like(r)
    return (r - r.mean()) / std


def centered_ranks(rewards: np.ndarray) -> np.ndarray:
    """Ranks mapped to [-0.5, 0.5]; ties share their mean rank, so all-equal rewards give zeros."""
    r = np.asarray(rewards, dtype=np.float64)
    n = len(r)
    if n == 1:
        return np.zeros(1)
    order = np.argsort(r, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    for v in np.unique(r):  # average ranks of ties
        mask = r == v
        ranks[mask] = ranks[mask].mean()
    return ranks / (n - 1) - 0.5


def shape_rewards(rewards: np.ndarray, method: str) -> np.ndarray:
    shaped = zscore(rewards) if method == "zscore" else centered_ranks(rewards)
    if len(rewards) > 1 and np.all(shaped == 0.0):
        log.warning("all %d rewards are equal (%r): this iteration's update is zero", len(rewards), rewards[0])
    return shaped


@dataclass
class Replica:
    """One model copy on one device, with its base weights (on the device, or on the host when
    memory is short)."""

    model: torch.nn.Module
    device: torch.device
    params: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    base: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def wrap(cls, model: torch.nn.Module, base_on: str = "device") -> "Replica":
        params = [(n, p.data) for n, p in named_params(model)]
        device = params[0][1].device
        pin = base_on == "host" and device.type == "cuda"
        base = {}
        for n, p in params:
            b = p.detach().to("cpu", copy=True) if base_on == "host" else p.detach().clone()
            base[n] = b.pin_memory() if pin else b
        return cls(model=model, device=device, params=params, base=base)

    def param(self, name: str) -> torch.Tensor:
        if not hasattr(self, "_by_name"):
            self._by_name = dict(self.params)
        return self._by_name[name]


class Engine:
    """Perturb, restore and update a set of replicas that must stay bit-identical."""

    def __init__(self, chunk: int) -> None:
        self.noise = NoiseSource(chunk)
        self.chunk = chunk
        self._scratch: dict[torch.device, torch.Tensor] = {}

    def _buf(self, device: torch.device, n: int, slot: int = 0) -> torch.Tensor:
        key = (device, slot)
        b = self._scratch.get(key)
        if b is None or b.numel() < n:
            b = self._scratch[key] = torch.empty(max(n, 1), dtype=torch.float32, device=device)
        return b[:n]

    @torch.no_grad()
    def perturb(self, rep: Replica, seed: int, sign: int, sigma: float) -> None:
        """Working weights <- round(base + sign*sigma*eps(seed)); the base is untouched."""
        scale = float(sign) * sigma
        for name, p in rep.params:
            flat, base = p.view(-1), rep.base[name].view(-1)
            for i, s, e in chunks(flat.numel(), self.chunk):
                eps = self.noise.fill(self._buf(p.device, e - s, id(rep)), seed, name, i)
                eps.mul_(scale).add_(base[s:e].to(p.device, non_blocking=True))
                flat[s:e].copy_(eps)

    @torch.no_grad()
    def restore(self, rep: Replica) -> None:
        """Working weights <- base: a copy, so bit-exact in any dtype."""
        for name, p in rep.params:
            p.copy_(rep.base[name], non_blocking=True)

    @torch.no_grad()
    def update(self, replicas: list[Replica], seeds: np.ndarray, signs: np.ndarray,
               shaped: np.ndarray, alpha: float) -> None:
        """base <- round(base + (alpha/N) * sum_n shaped_n*sign_n*eps(seed_n)), fp32 accumulation.

        Members sharing a seed (antithetic pairs) are folded into one coefficient first.  The sum runs
        over members in a fixed order, so every rank computes identical bits.  The first replica
        computes; the others receive copies of its new base (a copy is exact).
        """
        n = len(shaped)
        coef: dict[int, float] = {}
        for s, sg, z in zip(seeds.tolist(), signs.tolist(), shaped.tolist()):
            coef[s] = coef.get(s, 0.0) + float(sg) * float(z)
        terms = [(s, c) for s, c in coef.items() if c != 0.0]
        scale = alpha / n
        lead = replicas[0]
        for name, p in lead.params:
            base = lead.base[name].view(-1)
            if terms and scale != 0.0:
                for i, s, e in chunks(base.numel(), self.chunk):
                    acc = self._buf(p.device, e - s, "acc")
                    acc.zero_()
                    eps = self._buf(p.device, e - s, "eps")
                    for seed, c in terms:
                        acc.add_(self.noise.fill(eps, seed, name, i), alpha=c)
                    acc.mul_(scale).add_(base[s:e].to(p.device, non_blocking=True))
                    base[s:e].copy_(acc)
            p.copy_(lead.base[name])
            for rep in replicas[1:]:
                rep.base[name].copy_(lead.base[name])
                rep.param(name).copy_(lead.base[name])
