"""KL divergence of a fine-tuned model to its base model on the fine-tuned model's own completions.

Two estimates of the same KL(fine-tuned || base) over a completion y of prompt x, each summed over y's tokens
(teacher forcing on prompt + completion, float32 from each model's logits):

- **exact** (``kl_*``): the full-vocabulary KL of the next-token distributions at every completion position,
  ``KL_t = sum_v p_ft(v | x, y_<t) * (log p_ft(v | x, y_<t) - log p_base(v | x, y_<t))``.  hpc_es's own
  choice: it has no sampling noise at a position, only in which positions are visited.
- **k3** (``kl_k3_*``): the paper's estimator (§4.2, after Schulman's "Approximating KL divergence"), on the
  sampled tokens alone: ``k3_t = r - log r - 1`` with ``r = p_base(y_t | ...) / p_ft(y_t | ...)``.  Each term
  is >= 0, and its mean over y ~ p_ft is the KL; it is unbiased only when the tokens are drawn from the
  model's own distribution (``eval.samples`` > 1, ``eval.temperature=1``, ``eval.top_p=1``, no repetition
  penalty); on greedy completions it is a number of its own.

Per completion: the mean over completions of the per-completion sums; per token: their total over the total
token count (a micro-average).  Each sequence is scored alone (no padding tokens inside it), and a
completion's positions are its own tokens up to and including the first EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch


class CompletionKL(NamedTuple):
    exact: float  # full-vocabulary KL summed over the completion's positions
    k3: float  # Schulman's k3 on the completion's own tokens, summed
    tokens: int


def k3_terms(log_p_ft: torch.Tensor, log_p_base: torch.Tensor) -> torch.Tensor:
    """``r - log r - 1`` with ``log r = log p_base - log p_ft``, per token (the log-probabilities of the tokens
    that were generated)."""
    log_r = log_p_base - log_p_ft
    return torch.expm1(log_r) - log_r


@torch.no_grad()
def completion_kl(model: torch.nn.Module, base_model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                  completions: Sequence[Sequence[int]]) -> list[CompletionKL]:
    """Per completion: the exact KL and k3 summed over its tokens, and its token count (empty: zeros).

    ``completions[i]`` holds the token ids ``model`` generated after ``prompts[i]`` (see
    :func:`hpc_es.rollout.generate_ids`).  ``base_model`` must share the tokenizer's vocabulary.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    device = next(model.parameters()).device
    base_device = next(base_model.parameters()).device
    out: list[CompletionKL] = []
    for prompt, completion in zip(prompts, completions):
        n = len(completion)
        if n == 0:
            out.append(CompletionKL(0.0, 0.0, 0))
            continue
        prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
        ids = torch.tensor([prompt_ids + list(completion)], dtype=torch.long)
        # the logits at positions len(prompt)-1 ... end-1 predict the completion's n tokens
        start = len(prompt_ids) - 1
        ft = model(input_ids=ids.to(device)).logits[0, start:start + n].float()
        base = base_model(input_ids=ids.to(base_device)).logits[0, start:start + n].float().to(ft.device)
        log_p = torch.log_softmax(ft, dim=-1)
        log_q = torch.log_softmax(base, dim=-1)
        per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        taken = torch.tensor(list(completion), device=ft.device)[:, None]
        k3 = k3_terms(log_p.gather(1, taken)[:, 0], log_q.gather(1, taken)[:, 0])
        out.append(CompletionKL(float(per_position.sum()), float(k3.sum()), n))
    return out


def summarize(sums: Sequence[CompletionKL], samples: int = 1) -> dict[str, float]:
    """``kl_per_completion`` / ``kl_k3_per_completion`` (mean of the per-completion sums) and ``kl_per_token`` /
    ``kl_k3_per_token`` (total / total tokens), from entries that each sum ``samples`` completions (one item's)."""
    nan = float("nan")
    if not sums:
        return {"kl_per_completion": nan, "kl_per_token": nan, "kl_k3_per_completion": nan, "kl_k3_per_token": nan}
    total = sum(c.exact for c in sums)
    total_k3 = sum(c.k3 for c in sums)
    tokens = sum(c.tokens for c in sums)
    return {"kl_per_completion": total / (len(sums) * samples),
            "kl_per_token": total / tokens if tokens else nan,
            "kl_k3_per_completion": total_k3 / (len(sums) * samples),
            "kl_k3_per_token": total_k3 / tokens if tokens else nan}
