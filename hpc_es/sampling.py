"""Sampled completions for evaluation (``eval.samples`` > 1): several responses per prompt, reproducible.

HF ``generate`` does the sampling (the fast engine decodes greedily only); it draws from torch's global
generator, so each prompt's draws run under a forked generator seeded from (``seed``, the item's index in
the test split).  One prompt's samples are one batch of identical rows (no padding), so what a prompt gets
depends on neither the batch around it nor the number of ranks evaluating.
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

import torch

from hpc_es.rollout import clean_generation_defaults, eos_ids


def item_seed(seed: int, index: int) -> int:
    """The sampling seed of test item ``index`` under run seed ``seed``."""
    digest = hashlib.sha256(f"hpc_es-eval-sample:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sampling_config(model: Any, tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float,
                    repetition_penalty: float) -> Any:
    """Plain ancestral sampling at ``temperature`` with nucleus ``top_p``: top-k off, nothing from the folder."""
    from transformers import GenerationConfig

    eos = eos_ids(model, tokenizer)
    return GenerationConfig(
        do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0, num_beams=1,
        max_new_tokens=max_new_tokens, repetition_penalty=float(repetition_penalty), no_repeat_ngram_size=0,
        renormalize_logits=False, use_cache=True, eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def sample_ids(model: Any, tokenizer: Any, prompt: str, samples: int, max_new_tokens: int, *, seed: int,
               temperature: float = 1.0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> list[list[int]]:
    """``samples`` completions of ``prompt`` (new token ids up to and including the first EOS)."""
    device = next(model.parameters()).device
    enc = tokenizer([prompt] * samples, return_tensors="pt").to(device)
    gen_cfg = sampling_config(model, tokenizer, max_new_tokens, temperature, top_p, repetition_penalty)
    stop = set(eos_ids(model, tokenizer))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with clean_generation_defaults(model):
            ids = cast(Any, model).generate(**enc, generation_config=gen_cfg)
    out = []
    for row in ids[:, enc["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in stop), len(row))
        out.append(row[:end])
    return out
