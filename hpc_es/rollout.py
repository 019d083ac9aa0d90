"""Greedy batched generation: left padding, stop at EOS, decode the completion only.

Decoding is greedy with an optional repetition penalty (``rollout.repetition_penalty``) and nothing else: a
model folder's generation defaults (temperature, top_p, top_k, do_sample, repetition_penalty, no_repeat_ngram
...) never apply.  transformers fills every field a caller leaves unset from ``model.generation_config``, so
setting fields is not enough; :func:`clean_generation_defaults` also swaps in a default-free config for the call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch

from hpc_es.errors import ConfigError


def resolve_repetition_penalty(value: str, model: torch.nn.Module) -> float:
    """``rollout.repetition_penalty`` as a number: a number > 0, or ``model`` = the model folder's value.

    The paper's HF runs called ``generate(do_sample=False)`` with the folder's generation config, so e.g.
    Qwen2.5-Instruct's 1.05 applied to their greedy decoding; ``model`` reproduces that, and a folder without
    the field gives 1.0 (no penalty) as transformers would.
    """
    text = str(value).strip()
    if text == "model":
        found = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
        return 1.0 if found is None else float(found)
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"config key 'rollout.repetition_penalty' = {value!r} is not allowed; "
                          "give a number > 0 (1.0 = none) or 'model' (the model folder's value)") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"config key 'rollout.repetition_penalty' = {value!r} is out of range; "
                          "it must be a number > 0 (1.0 = none) or 'model'")
    return number


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The token ids that end a completion: the model folder's (Qwen lists two), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def generation_config(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int,
                      repetition_penalty: float = 1.0) -> Any:
    """Greedy decoding, stop at EOS, with ``repetition_penalty`` (1.0 = none); every other knob neutral."""
    from transformers import GenerationConfig

    eos = eos_ids(model, tokenizer)
    # Sampling knobs (temperature, top_p, ...) are left unset: they do nothing without do_sample, and setting
    # them makes transformers warn; clean_generation_defaults keeps the folder's values out of every unset field.
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, repetition_penalty=float(repetition_penalty),
        no_repeat_ngram_size=0, renormalize_logits=False, use_cache=True,
        eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=tokenizer.pad_token_id)


@contextlib.contextmanager
def clean_generation_defaults(model: torch.nn.Module) -> Iterator[None]:
    """Within the block ``model.generation_config`` is an empty GenerationConfig, so transformers has no folder
    defaults to fill unset fields from; the folder's config is put back afterwards (``final/`` keeps it).

    Each replica is its own model object, driven by one thread at a time, so the swap is not shared."""
    from transformers import GenerationConfig

    hf = cast(Any, model)
    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


@torch.no_grad()
def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                 batch_size: int = 0, on_batch: Callable[[int], None] | None = None,
                 repetition_penalty: float = 1.0) -> list[list[int]]:
    """The completions' token ids (new tokens only, up to and including the first EOS), for ``prompts`` in order.

    ``on_batch(done)`` is called after each generate() call with the number of prompts done so far.
    """
    gen_cfg = generation_config(model, tokenizer, max_new_tokens, repetition_penalty)
    stop = set(eos_ids(model, tokenizer))
    device = next(model.parameters()).device
    size = batch_size or len(prompts)
    out: list[list[int]] = []
    for start in range(0, len(prompts), size):
        batch = list(prompts[start:start + size])
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        with clean_generation_defaults(model):
            ids = cast(Any, model).generate(**enc, generation_config=gen_cfg)
        for row in ids[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i + 1 for i, tok in enumerate(row) if tok in stop), len(row))
            out.append(row[:end])  # what follows the first EOS is padding
        if on_batch is not None:
            on_batch(len(out))
    return out


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 0, on_batch: Callable[[int], None] | None = None,
             repetition_penalty: float = 1.0) -> list[str]:
    """Completions (new tokens only, special tokens dropped) for ``prompts``, in order.

    ``on_batch(done)`` is called after each generate() call with the number of prompts done so far.
    """
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch, repetition_penalty)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
