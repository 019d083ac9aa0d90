"""KL divergence of a fine-tuned model to its base model on the fine-tuned model's own completions.

The paper reports conciseness as reward and KL to the base model.  Its published evaluation computes, for
each completion the fine-tuned model generated, the exact full-vocabulary KL(fine-tuned || base) of the
next-token distributions at every completion position (teacher forcing on prompt + completion):

    KL_t = sum_v p_ft(v | x, y_<t) * (log p_ft(v | x, y_<t) - log p_base(v | x, y_<t))

summed over the completion's tokens (per completion), and reported as the mean of those sums over the
completions and as the total over all completions divided by their total token count (per token, a
micro-average).  This module computes the same estimator, in float32 from each model's logits, with two
clean-ups: each sequence is scored alone (no padding tokens inside it), and a completion's positions are its
own tokens up to and including the first EOS (the published script also counted the padding that follows a
shorter completion in its batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def completion_kl(model: torch.nn.Module, base_model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                  completions: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
    """Per completion: (KL summed over its tokens, its token count); an empty completion gives (0.0, 0).

    ``completions[i]`` holds the token ids ``model`` generated after ``prompts[i]`` (see
    :func:`hpc_es.rollout.generate_ids`).  ``base_model`` must share the tokenizer's vocabulary.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    device = next(model.parameters()).device
    base_device = next(base_model.parameters()).device
    out: list[tuple[float, int]] = []
    for prompt, completion in zip(prompts, completions):
        n = len(completion)
        if n == 0:
            out.append((0.0, 0))
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
        out.append((float(per_position.sum()), n))
    return out


def summarize(per_completion: Sequence[tuple[float, int]]) -> dict[str, float]:
    """``kl_per_completion`` (mean of the sums) and ``kl_per_token`` (total KL / total tokens)."""
    if not per_completion:
        return {"kl_per_completion": float("nan"), "kl_per_token": float("nan")}
    total = sum(kl for kl, _ in per_completion)
    tokens = sum(n for _, n in per_completion)
    return {"kl_per_completion": total / len(per_completion),
            "kl_per_token": total / tokens if tokens else float("nan")}
