"""Greedy batched generation: left padding, stop at EOS, decode the completion only."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def generation_config(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int) -> Any:
    """A fresh greedy config: a model folder's sampling defaults (temperature, top_p) must not leak in."""
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 0, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Completions (new tokens only, special tokens dropped) for ``prompts``, in order.

    ``on_batch(done)`` is called after each generate() call with the number of prompts done so far.
    """
    gen_cfg = generation_config(model, tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    size = batch_size or len(prompts)
    out: list[str] = []
    for start in range(0, len(prompts), size):
        batch = list(prompts[start:start + size])
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        ids = model.generate(**enc, generation_config=gen_cfg)
        new = ids[:, enc["input_ids"].shape[1]:]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        if on_batch is not None:
            on_batch(len(out))
    return out
