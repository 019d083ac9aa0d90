"""The fast engine against HF generate: identical token ids, per-step logits within 1e-5 (fp32, CPU).

The test models are tiny, built from a config alone, with sharpened logits (a scaled final norm) and random
biases; every comparison asserts a top-2 logit margin well above the tolerance, so that no token is
decided by a float near-tie.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc_es import fastgen
from hpc_es.errors import ConfigError
from hpc_es.es import Engine, Replica
from hpc_es.rollout import generate, resolve_engine

VOCAB, PAD = 96, 1
MARGIN = 4e-5  # top-2 gap of every compared step: > 2x the logits tolerance, so no token is decided by float noise


def build(kind: str, kv_heads: int, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=128, initializer_range=0.1,
                  eos_token_id=0, pad_token_id=PAD, bos_token_id=0)
    if kind == "qwen2":  # tied embeddings, q/k/v biases
        cfg = Qwen2Config(tie_word_embeddings=True, **common)
    else:  # untied, llama3 RoPE scaling, biases on every attention projection
        cfg = LlamaConfig(tie_word_embeddings=False, attention_bias=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)  # HF initialises biases to zero: make them matter
            model.model.norm.weight.mul_(6.0)  # sharpened logits
    model.requires_grad_(False)
    return model


MODELS = {(k, kv): build(k, kv) for k in ("qwen2", "llama") for kv in (1, 4)}  # kv 1: GQA 4:1, kv 4: 1:1


def batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 1..40 tokens (ids >= 2: no pad or EOS inside a prompt)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 41, (rows,), generator=g)
    lens[0] = 40 if rows > 1 else lens[0]
    P = int(lens.max())
    ids = torch.randint(2, VOCAB, (rows, P), generator=g)
    mask = torch.zeros(rows, P, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, P - n:] = 1
        ids[i, : P - n] = PAD
    return ids, mask


def hf(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int, eos: list[int],
       penalty: float = 1.0) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD,
                           repetition_penalty=penalty, output_logits=True, return_dict_in_generate=True)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    return out.sequences[:, ids.shape[1]:], out.logits


def check(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int, eos: list[int],
          penalty: float = 1.0) -> torch.Tensor:
    """Fast == HF: ids exactly, raw logits of every live row at every step within 1e-5; returns the ids."""
    want, want_logits = hf(model, ids, mask, new, eos, penalty)
    log: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    got = fastgen.generate_ids(model, ids, mask, new, eos, PAD, repetition_penalty=penalty,
                               observer=fastgen.Observer(logits=log))
    assert torch.equal(got, want)
    assert [s for s, _, _ in log] == list(range(len(want_logits)))
    for step, rows, logits in log:
        ref = want_logits[step][rows]
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
        # the margin that decides the token (after the penalty, as HF applies it)
        top2 = processed(ref, ids, want, rows, step, penalty).topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > MARGIN
    return got


def processed(logits: torch.Tensor, ids: torch.Tensor, new: torch.Tensor, rows: torch.Tensor, step: int,
              penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return logits
    seen = torch.cat([ids[rows], new[rows, :step]], dim=1)
    score = torch.gather(logits, 1, seen)
    return logits.scatter(1, seen, torch.where(score < 0, score * penalty, score / penalty))


def early_eos(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> list[int]:
    """EOS ids that stop about a third of the rows before ``new`` tokens and none of the others: tokens found
    (after the first few steps) only in the rows chosen so far, added while those rows stay a third."""
    free, _ = hf(model, ids, mask, new, [VOCAB + 5])  # an EOS no row can emit
    body = free[:, : new - 1]
    rows_of = {t: set(torch.nonzero((body == t).any(1)).flatten().tolist())
               for t in body[:, 3:].unique().tolist() if t != PAD}
    chosen: list[int] = []
    stopped: set[int] = set()
    for t, rs in sorted(rows_of.items(), key=lambda kv: (len(kv[1]), kv[0])):
        if len(stopped | rs) <= max(1, ids.shape[0] // 3):
            chosen.append(t)
            stopped |= rs
    return chosen


@pytest.mark.parametrize("key", list(MODELS), ids=lambda k: f"{k[0]}-kv{k[1]}")
@pytest.mark.parametrize("rows", [1, 7, 37])
def test_identical_to_hf_generate(key: tuple[str, int], rows: int) -> None:
    model = MODELS[key]
    ids, mask = batch(rows, seed=rows)
    for new in (1, 2, 48):
        eos = early_eos(model, ids, mask, new) if new > 2 else [0]
        got = check(model, ids, mask, new, eos)
        if new == 48:  # some rows stopped early, and (with several rows) some ran to the end
            ended = int(torch.isin(got, torch.tensor(eos)).any(1).sum())
            assert 1 <= ended <= max(1, rows // 3) and (rows == 1 or got.shape[1] == 48)
            if rows > 1:
                assert ended >= rows // 4


@pytest.mark.parametrize("key", [("qwen2", 1), ("llama", 4)], ids=lambda k: f"{k[0]}-kv{k[1]}")
def test_all_rows_stop_at_the_first_token(key: tuple[str, int]) -> None:
    model = MODELS[key]
    ids, mask = batch(7, seed=3)
    first, _ = hf(model, ids, mask, 1, [VOCAB + 5])
    got = check(model, ids, mask, 48, sorted(set(first[:, 0].tolist())))  # several EOS ids
    assert got.shape == (7, 1)


def test_repetition_penalty_matches_hf() -> None:
    model = MODELS[("qwen2", 1)]
    ids, mask = batch(7, seed=11)
    plain = check(model, ids, mask, 24, [0])
    penalised = check(model, ids, mask, 24, [0], penalty=1.3)
    assert not torch.equal(plain, penalised)  # the option does something, and the same as HF


def test_identical_after_in_place_perturb_and_update() -> None:
    """No stale weights: the engine reads the parameters at every call, so an in-place ES step shows at once."""
    model = build("llama", 1, seed=5)
    ids, mask = batch(7, seed=5)
    rep = Replica.wrap(model)
    engine = Engine(1024)
    before = check(model, ids, mask, 16, [0])
    engine.perturb(rep, seed=7, sign=1, sigma=0.05)
    perturbed = check(model, ids, mask, 16, [0])
    engine.update([rep], np.array([7, 9]), np.array([1, 1]), np.array([1.0, -1.0]), alpha=0.05)
    updated = check(model, ids, mask, 16, [0])
    assert not torch.equal(before, perturbed) and not torch.equal(perturbed, updated)


def test_length_schedule_is_honoured_alike_through_rollout_generate(tiny_model_dir: str) -> None:
    from hpc_es.models import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = [f"Q: what is {i} plus {i * 3}?\nA:" for i in range(9)]
    sched = [1, 3, 5, 30, 2, 40, 7, 12, 4]
    outs = {e: generate(model, tok, prompts, 20, batch_size=4, engine=e, observer=fastgen.Observer(stop_at=sched))
            for e in ("hf", "fast")}
    assert outs["hf"] == outs["fast"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in outs["fast"]]
    for n, s in zip(ids, sched):  # EOS (dropped by decoding) is the s-th token at the latest
        assert len(n) <= min(s - 1, 20)
    assert generate(model, tok, prompts, 20, engine="fast") == generate(model, tok, prompts, 20, engine="hf")


def test_engine_resolution() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    qwen = MODELS[("qwen2", 4)]
    assert resolve_engine("auto", qwen) == resolve_engine("fast", qwen) == "fast"
    assert resolve_engine("hf", qwen) == "hf"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert resolve_engine("auto", gpt2) == "hf"
    with pytest.raises(ConfigError, match="rollout.engine=fast cannot run this model: unsupported architecture "
                                          "'gpt2'"):
        resolve_engine("fast", gpt2)
