"""Greedy batched generation: left padding, stop at EOS, decode the completion only.

Two engines produce the same token ids: ``hf`` (``model.generate``, the reference) and ``fast``
(hpc_es.fastgen, for Qwen2/Llama).  ``rollout.engine: auto`` runs ``fast`` where the model allows it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

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
    """HF logits processor for a per-row length schedule: row i must emit EOS as its ``lengths[i]``-th
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
             batch_size: int = 0, on_batch: Callable[[int], None] | None = None, *, engine: str = "hf",
             repetition_penalty: float = 1.0, length_schedule: Sequence[int] | None = None) -> list[str]:
    """Completions (new tokens only, special tokens dropped) for ``prompts``, in order.

    ``on_batch(done)`` is called after each generate() call with the number of prompts done so far.
    ``engine``: ``hf``, ``fast`` or ``auto`` (see resolve_engine); the token ids are the same.
    ``length_schedule`` (benchmarks, tests): prompt i's completion ends with EOS by its
    ``length_schedule[i]``-th new token.
    """
    engine = resolve_engine(engine, model)
    gen_cfg = generation_config(model, tokenizer, max_new_tokens)
    if repetition_penalty != 1.0:
        gen_cfg.repetition_penalty = float(repetition_penalty)
    device = next(model.parameters()).device
    size = batch_size or len(prompts)
    out: list[str] = []
    for start in range(0, len(prompts), size):
        batch = list(prompts[start:start + size])
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        sched = None if length_schedule is None else list(length_schedule[start:start + size])
        if engine == "fast":
            eos = gen_cfg.eos_token_id
            new = fastgen.generate_ids(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, eos,
                                       _pad_id(gen_cfg), repetition_penalty=repetition_penalty,
                                       length_schedule=sched)
        else:
            procs = None
            if sched is not None:
                eos0 = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, int) else gen_cfg.eos_token_id[0]
                procs = [_ForceEOS(sched, enc["input_ids"].shape[1], eos0)]
            ids = model.generate(**enc, generation_config=gen_cfg, logits_processor=procs)
            new = ids[:, enc["input_ids"].shape[1]:]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        if on_batch is not None:
            on_batch(len(out))
    return out


def _pad_id(gen_cfg: Any) -> int:
    """The id HF writes after a row's EOS: pad_token_id, else the first EOS id (as HF falls back)."""
    if gen_cfg.pad_token_id is not None:
        return int(gen_cfg.pad_token_id)
    eos = gen_cfg.eos_token_id
    return int(eos if isinstance(eos, int) else eos[0])
