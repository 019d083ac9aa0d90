"""Greedy batched generation: left padding, stop at EOS, decode the completion only.

Decoding is greedy with an optional repetition penalty (``rollout.repetition_penalty``) and nothing else: a
model folder's generation defaults (temperature, top_p, top_k, do_sample, repetition_penalty, no_repeat_ngram
...) never apply.  transformers fills every field a caller leaves unset from ``model.generation_config``, so
setting fields is not enough; :func:`clean_generation_defaults` also swaps in a default-free config for the call.

Two engines produce the same token ids (issue 11): ``hf`` (``model.generate``, the reference) and ``fast``
(hpc_es.fastgen, for Qwen2/Llama); ``rollout.engine: auto`` runs ``fast`` where the model allows it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch

from hpc_es import fastgen
from hpc_es.errors import ConfigError

log = logging.getLogger("hpc_es")
ENGINES = ("auto", "fast", "hf")
_NOTICED: set[str] = set()


def resolve_engine(requested: str, model: torch.nn.Module, notice: bool = True) -> str:
    """``fast`` or ``hf`` for ``model``: ``auto`` falls back to ``hf`` (one notice per reason and process,
    when ``notice``: rank 0 says it for all); an explicit ``fast`` that cannot run is a config error."""
    if requested == "hf":
        return "hf"
    if requested not in ENGINES:
        raise ConfigError(f"rollout.engine = {requested!r} is not allowed; choose one of {', '.join(ENGINES)}")
    why = fastgen.unsupported(model)
    if why is None:
        return "fast"
    if requested == "fast":
        raise ConfigError(f"rollout.engine=fast cannot run this model: unsupported {why} "
                          "(use rollout.engine=auto or hf)")
    if notice and why not in _NOTICED:
        _NOTICED.add(why)
        log.warning("rollout engine: fast does not support %s; using hf", why)
    return "hf"


class _ForceEOS:
    """HF logits processor for an observer's stop schedule: row i must emit EOS as its ``lengths[i]``-th
    new token (benchmarks and tests; the fast engine honours the same schedule)."""

    def __init__(self, lengths: Sequence[int], prompt_len: int, eos: int) -> None:
        self.last = torch.tensor([int(n) - 1 for n in lengths])
        self.prompt_len, self.eos = prompt_len, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        force = (self.last.to(scores.device) == step)[:, None]
        row = torch.full_like(scores[0], float("-inf"))
        row[self.eos] = 0.0
        return torch.where(force, row, scores)


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
                 repetition_penalty: float = 1.0, *, engine: str = "hf", lowrank: fastgen.Members | None = None,
                 observer: fastgen.Observer | None = None) -> list[list[int]]:
    """The completions' token ids (new tokens only, up to and including the first EOS), for ``prompts`` in order.

    ``on_batch(done)`` is called after each generate() call with the number of prompts done so far.
    ``engine``: ``hf``, ``fast`` or ``auto`` (see resolve_engine); the token ids are the same.
    ``observer`` (benchmarks, tests; see fastgen.Observer): its stop schedule applies to either engine.
    """
    engine = resolve_engine(engine, model)
    gen_cfg = generation_config(model, tokenizer, max_new_tokens, repetition_penalty)
    eos = eos_ids(model, tokenizer)
    stop = set(eos)
    pad = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    size = batch_size or len(prompts)
    out: list[list[int]] = []
    for start in range(0, len(prompts), size):
        batch = list(prompts[start:start + size])
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        obs = None if observer is None else observer.part(start, start + size)
        if engine == "fast":  # the same ids as the hf branch
            new = fastgen.generate_ids(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, eos, pad,
                                       repetition_penalty=repetition_penalty, lowrank=lowrank, observer=obs)
        else:
            sched = None if obs is None else obs.stop_at
            procs = [_ForceEOS(sched, enc["input_ids"].shape[1], eos[0])] if sched is not None else None
            with clean_generation_defaults(model):
                ids = cast(Any, model).generate(**enc, generation_config=gen_cfg, logits_processor=procs)
            new = ids[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():
            end = next((i + 1 for i, tok in enumerate(row) if tok in stop), len(row))
            out.append(row[:end])  # what follows the first EOS is padding
        if on_batch is not None:
            on_batch(len(out))
    return out


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 0, on_batch: Callable[[int], None] | None = None,
             repetition_penalty: float = 1.0, *, engine: str = "hf", lowrank: fastgen.Members | None = None,
             observer: fastgen.Observer | None = None) -> list[str]:
    """Completions (new tokens only, special tokens dropped) for ``prompts``, in order (see generate_ids).

    ``on_batch(done)`` is called after each generate() call with the number of prompts done so far.
    """
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch, repetition_penalty,
                       engine=engine, lowrank=lowrank, observer=observer)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
