"""Low-rank population mode (es.noise=lowrank): the batched forward, the update, and the config keys.

In-process tests; the launches (replay, mpiexec, torchrun, kill -9 and resume) are in
tests/test_lowrank_runs.py.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from hpc_es import fastgen, lowrank
from hpc_es.config import load_config
from hpc_es.errors import ConfigError
from hpc_es.models import load_model, load_tokenizer, named_params
from hpc_es.noise import KeyedNoise
from hpc_es.seeds import member_seeds
from hpc_es.rollout import eos_ids, generate, generate_ids

PROMPTS = ["Q: what is 3 plus 4?\nA:", "What colour is the sky?", "Using the numbers [44 19 35]"]


def perturbed_weights(model: torch.nn.Module, scope: str, rank: int, noise: KeyedNoise, seed: int, sign: int,
                      sigma: float) -> dict[str, torch.Tensor]:
    """Member (seed, sign)'s weights written out explicitly: W + σ s A Bᵀ/√r (1-D: W + σ s ε), rounded
    once to the weights' dtype.  The reference the batched forward is checked against (a run never needs it)."""
    out = {}
    for name, p in named_params(model):
        kind = lowrank.plan(model, scope).get(name)
        w = p.detach().float()
        if kind == lowrank.LOWRANK:
            a, b = lowrank.factors(noise, seed, name, p.shape, rank, p.device)
            w = w + (sign * sigma / math.sqrt(rank)) * (a @ b.T)
        elif kind == lowrank.FULLRANK:
            w = w + (sign * sigma) * noise.tensor(seed, name, p.shape, p.device)
        out[name] = w.to(p.dtype)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: str) -> tuple[torch.nn.Module, object]:
    return load_model(tiny_model_dir, torch.float32, "cpu"), load_tokenizer(tiny_model_dir)


def explicit(model: torch.nn.Module, scope: str, rank: int, noise: KeyedNoise, seed: int, sign: int,
             sigma: float) -> torch.nn.Module:
    """A copy of ``model`` whose weights are member (seed, sign)'s, written out."""
    ref = copy.deepcopy(model)
    weights = perturbed_weights(model, scope, rank, noise, seed, sign, sigma)
    with torch.no_grad():
        for name, p in named_params(ref):
            p.copy_(weights[name])
    return ref


@pytest.mark.parametrize("scope,rank", [("frozen", 1), ("frozen", 3), ("full", 2)])
def test_batched_forward_equals_explicit_weights_per_member(tiny, scope: str, rank: int) -> None:
    model, tok = tiny
    model = copy.deepcopy(model)
    noise = KeyedNoise(4096)
    seeds, signs = member_seeds(7, 0, 4, antithetic=True)  # 2 pairs: +/- the same factors
    sigma = 0.05  # the demo's: perturbations larger than the weights, yet not chaotic (fp32 error ~1e-6)
    lm = lowrank.LowRankModel(model, scope, rank, noise)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    g = len(seeds)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with lm.members(seeds.tolist(), signs.tolist(), sigma):
            batched = model(input_ids=ids.repeat(g, 1), attention_mask=mask.repeat(g, 1)).logits
            texts = generate(model, tok, [p for _ in range(g) for p in PROMPTS], 12)
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # hooks are inert outside members()
    n = len(PROMPTS)
    for k in range(g):
        ref = explicit(model, scope, rank, noise, int(seeds[k]), int(signs[k]), sigma)
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits
        got = batched[k * n:(k + 1) * n]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - plain).abs().max() > 1e-2  # the member really is perturbed
        assert texts[k * n:(k + 1) * n] == generate(ref, tok, PROMPTS, 12)
    assert texts[:n] != texts[n:2 * n]  # antithetic members differ


@pytest.mark.parametrize("scope,rank", [("frozen", 1), ("frozen", 3), ("full", 2)])
def test_fast_engine_pass_equals_explicit_weights_and_the_hooks(tiny, scope: str, rank: int) -> None:
    """The fast engine's native low-rank pass, rows leaving the batch at different steps (so the batch
    compacts and each row must keep its member): per member, every step's logits within 1e-5 of the
    explicit weights', and the same tokens as the explicit model and as the hf engine with the hooks."""
    model, tok = tiny
    model = copy.deepcopy(model)
    noise = KeyedNoise(4096)
    seeds, signs = member_seeds(11, 0, 4, antithetic=True)
    sigma, new = 0.05, 12
    lm = lowrank.LowRankModel(model, scope, rank, noise)
    g, n = len(seeds), len(PROMPTS)
    rows = [p for _ in range(g) for p in PROMPTS]
    sched = [3 + (5 * i) % 10 for i in range(g * n)]
    enc = tok(rows, return_tensors="pt", padding=True)
    eos, pad = eos_ids(model, tok), tok.pad_token_id
    log: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    with lm.members(seeds.tolist(), signs.tolist(), sigma, hooks=False) as lp:
        assert fastgen.unsupported(model) is None  # no hook on the model: the fast engine runs it
        fast = generate_ids(model, tok, rows, new, engine="fast", lowrank=lp, observer=fastgen.Observer(sched))
        fastgen.generate_ids(model, enc["input_ids"], enc["attention_mask"], new, eos, pad, lowrank=lp,
                             observer=fastgen.Observer(sched, log))
    with lm.members(seeds.tolist(), signs.tolist(), sigma):
        hooked = generate_ids(model, tok, rows, new, engine="hf", observer=fastgen.Observer(sched))
    assert not any(m._forward_hooks for m in model.modules())  # the block took its hooks off
    assert fast == hooked
    assert len({tuple(r) for r in fast}) > n  # members differ
    assert min(map(len, fast)) < max(map(len, fast))  # rows did leave early
    for k in range(g):
        ref = explicit(model, scope, rank, noise, int(seeds[k]), int(signs[k]), sigma)
        part = sched[k * n:(k + 1) * n]
        assert fast[k * n:(k + 1) * n] == generate_ids(ref, tok, PROMPTS, new, engine="fast",
                                                       observer=fastgen.Observer(part))
        ref_log: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        sub = slice(k * n, (k + 1) * n)
        fastgen.generate_ids(ref, enc["input_ids"][sub], enc["attention_mask"][sub], new, eos, pad,
                             observer=fastgen.Observer(part, ref_log))
        want = {(step, int(r)): lg[i] for step, rr, lg in ref_log for i, r in enumerate(rr.tolist()) if r >= 0}
        got = {(step, int(r) - k * n): lg[i] for step, rr, lg in log for i, r in enumerate(rr.tolist())
               if k * n <= r < (k + 1) * n}
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


def test_scope_decides_which_parameters_take_part(tiny) -> None:
    model, _ = tiny
    frozen, full = lowrank.plan(model, "frozen"), lowrank.plan(model, "full")
    assert set(frozen.values()) == {lowrank.LOWRANK}
    assert "model.embed_tokens.weight" not in frozen  # tied with lm_head: frozen as an embedding
    assert "model.layers.0.self_attn.q_proj.weight" in frozen
    assert "model.layers.0.self_attn.q_proj.bias" not in frozen
    assert full["model.embed_tokens.weight"] == lowrank.LOWRANK
    assert full["model.layers.0.self_attn.q_proj.bias"] == lowrank.FULLRANK
    assert full["model.norm.weight"] == lowrank.FULLRANK
    assert len(full) == len(named_params(model))


def direct_update(model: torch.nn.Module, scope: str, rank: int, noise: KeyedNoise, seeds: np.ndarray,
                  signs: np.ndarray, shaped: np.ndarray, alpha: float) -> dict[str, torch.Tensor]:
    """W + (α/N)/√r Σ Z s A Bᵀ (1-D: (α/N) Σ Z s ε), in float64, member by member."""
    p = lowrank.plan(model, scope)
    out = {}
    for name, w in named_params(model):
        acc = w.detach().double().clone()
        for s, sg, z in zip(seeds.tolist(), signs.tolist(), shaped.tolist()):
            c = alpha / len(shaped) * sg * z
            if p.get(name) == lowrank.LOWRANK:
                a, b = lowrank.factors(noise, s, name, w.shape, rank)
                acc += c / math.sqrt(rank) * (a.double() @ b.double().T)
            elif p.get(name) == lowrank.FULLRANK:
                acc += c * noise.tensor(s, name, w.shape).double()
        out[name] = acc
    return out


@pytest.mark.parametrize("scope,rank,antithetic", [("frozen", 1, False), ("full", 2, True)])
def test_update_equals_direct_computation_and_is_block_independent(tiny, scope: str, rank: int,
                                                                     antithetic: bool) -> None:
    model, _ = tiny
    seeds, signs = member_seeds(3, 5, 6, antithetic)
    shaped = np.array([0.9, -1.3, 0.2, 1.1, -0.4, -0.5])
    alpha = 0.7
    want = direct_update(model, scope, rank, KeyedNoise(4096), seeds, signs, shaped, alpha)
    results = []
    for block, threads in ((1 << 16, 1), (100, 2)):  # block rows and thread count must not change a bit
        m = copy.deepcopy(model)
        rep = lowrank.wrap(m)
        eng = lowrank.LowRankEngine(4096, rank, scope, block=block, workers=threads)
        eng.update([rep], seeds, signs, shaped, alpha)
        results.append({n: p.detach().clone() for n, p in named_params(m)})
    frozen = set(want) - set(lowrank.plan(model, scope))
    orig = dict(named_params(model))
    for name, w in want.items():
        assert torch.equal(results[0][name], results[1][name]), name
        if name in frozen:
            assert torch.equal(results[0][name], orig[name]), name
        else:
            torch.testing.assert_close(results[0][name].double(), w, rtol=1e-6, atol=1e-7)  # fp32 sums
            assert not torch.equal(results[0][name], orig[name]), name


def test_update_in_bfloat16_rounds_once_and_copies_to_other_replicas(tiny) -> None:
    model, _ = tiny
    seeds, signs = member_seeds(1, 0, 4)
    shaped = np.array([1.0, -1.0, 0.5, -0.5])
    m1 = copy.deepcopy(model).to(torch.bfloat16)
    m2 = copy.deepcopy(m1)
    m32 = copy.deepcopy(m1).to(torch.float32)  # the same values, exactly
    reps = [lowrank.wrap(m1), lowrank.wrap(m2)]
    lowrank.LowRankEngine(4096, 1, "frozen").update(reps, seeds, signs, shaped, 0.5)
    lowrank.LowRankEngine(4096, 1, "frozen").update([lowrank.wrap(m32)], seeds, signs, shaped, 0.5)
    changed = 0
    for (name, p), (_, p2), (_, p32), (_, p0) in zip(named_params(m1), named_params(m2), named_params(m32),
                                                     named_params(model)):
        assert torch.equal(p, p32.to(torch.bfloat16)), name  # the fp32 sum, rounded once to bf16
        assert torch.equal(p, p2), name  # the other replica got a copy
        changed += not torch.equal(p, p0.to(torch.bfloat16))
    assert changed == len(lowrank.plan(model, "frozen"))


def test_fp32_master_for_a_bf16_model(tiny) -> None:
    """es.master_dtype=float32: the master accumulates in fp32 and the model holds its bf16 rounding."""
    model, _ = tiny
    seeds, signs = member_seeds(2, 0, 4)
    shaped = np.array([1.0, -1.0, 0.5, -0.5])
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    m32 = copy.deepcopy(m16).to(torch.float32)
    rep = lowrank.wrap(m16, torch.float32)
    ref = lowrank.wrap(m32)
    eng = lowrank.LowRankEngine(4096, 1, "frozen")
    for _ in range(3):  # small steps that bf16 alone would round away accumulate in the fp32 master
        eng.update([rep], seeds, signs, shaped * 1e-3, 0.5)
        eng.update([ref], seeds, signs, shaped * 1e-3, 0.5)
    for name, p in named_params(m16):
        assert rep.master[name].dtype == torch.float32
        assert torch.equal(rep.master[name], dict(named_params(m32))[name]), name
        assert torch.equal(p, rep.master[name].to(torch.bfloat16)), name


def test_config_keys_are_checked() -> None:
    cfg = load_config(None, ["es.noise=lowrank", "es.rank=4", "es.lowrank_scope=full", "rollout.members_per_pass=8"])
    assert (cfg.es.noise, cfg.es.rank, cfg.es.lowrank_scope, cfg.rollout.members_per_pass) == \
        ("lowrank", 4, "full", 8)
    for bad, needle in (("es.noise=lowrnk", "es.noise"), ("es.rank=0", "es.rank"),
                        ("es.lowrank_scope=all", "es.lowrank_scope"), ("rollout.members_per_pass=-1", "members")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="'es.master_on' = 'host' does not apply with es.noise=lowrank"):
        load_config(None, ["es.noise=lowrank", "es.master_on=host"])
    assert load_config(None, ["es.master_on=host"]).es.master_on == "host"  # full rank: fine


def test_score_members_passes_give_the_same_rewards(tiny) -> None:
    """Members scored two or three at a time, or all at once, or prompt batch by prompt batch, on either
    rollout engine: the same rewards."""
    from hpc_es.population import Population
    from hpc_es.tasks import load_task

    model, tok = tiny
    model = copy.deepcopy(model)
    seeds, signs = member_seeds(0, 0, 4)
    got = []
    for engine, over in (("hf", ["rollout.members_per_pass=2"]), ("hf", []), ("hf", ["rollout.batch_size=2"]),
                         ("fast", []), ("fast", ["rollout.members_per_pass=3"]), ("fast", ["rollout.batch_size=2"])):
        cfg = load_config(None, ["es.noise=lowrank", "es.sigma=0.3", "rollout.max_new_tokens=8",
                                 "es.population_size=4", f"rollout.engine={engine}", *over])
        task = load_task(cfg)
        examples = list(task.train_examples())[:4]
        scores = Population(cfg.es, cfg.rollout, [model], [tok], task).score(seeds, signs, examples)
        assert scores.error is None
        got.append(scores.rewards)
    for other in got[1:]:
        np.testing.assert_array_equal(got[0], other)
    assert len(set(got[0].tolist())) > 1


def test_members_per_pass_zero_takes_as_many_as_fit(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """rollout.members_per_pass=0: as many members per pass as the free memory holds (a fake figure), said in
    the start-up words; the passes give the rewards of one pass of every member."""
    from hpc_es import population as rollout  # Population's own name for rollout.generate
    from hpc_es.population import Population
    from hpc_es.tasks import load_task

    model, tok = tiny
    cfg = load_config(None, ["es.noise=lowrank", "es.sigma=0.3", "es.population_size=8", "rollout.max_new_tokens=8",
                             "rollout.prompts_per_iteration=4"])
    task = load_task(cfg)
    train = list(task.train_examples())
    longest = max(len(tok(ex.prompt)["input_ids"]) for ex in train)
    from hpc_es.search import make

    probe = lowrank.LowRankModel(copy.deepcopy(model), cfg.es.lowrank_scope, cfg.es.rank, make(cfg.es).noise)
    each = {e: lowrank.member_bytes(probe, 4, longest, 8, e) for e in ("fast", "hf")}
    assert each["hf"] > each["fast"] > 4 * 2 * 2 * (longest + 8) * 4  # at least the KV cache of 4 rows, 2 layers
    seeds, signs = member_seeds(0, 0, 8)
    got, rows = {}, {}
    real = rollout.generate
    for free, want in ((int(3 * each["fast"] / lowrank.HEADROOM) + 1, 3), (1 << 50, 8), (0, 1)):
        monkeypatch.setattr(lowrank, "free_bytes", lambda dev, free=free: free)
        pop = Population(cfg.es, cfg.rollout, [copy.deepcopy(model)], [tok], task)
        assert pop.rollout_engine == "fast"
        assert pop.passes[0][0] == want
        assert pop.passes[0][1].startswith(f"{want} of 8 members per pass (as many as fit: ")
        rows[want] = []
        monkeypatch.setattr(rollout, "generate", lambda m, t, prompts, *a, calls=rows[want], **k:
                            calls.append(len(prompts)) or real(m, t, prompts, *a, **k))
        got[want] = pop.score(seeds, signs, train[:4]).rewards
        monkeypatch.setattr(rollout, "generate", real)
    assert rows == {3: [12, 12, 8], 8: [32], 1: [4] * 8}
    np.testing.assert_array_equal(got[3], got[8])
    np.testing.assert_array_equal(got[1], got[8])
    cfg.rollout.members_per_pass = 5
    assert Population(cfg.es, cfg.rollout, [copy.deepcopy(model)], [tok], task).passes[0] == \
        (5, "5 members per pass (rollout.members_per_pass)")


def test_trajectory_keys_name_the_mode_and_old_ledgers_read_as_full_rank() -> None:
    import json

    from hpc_es import resume
    from hpc_es.checkpoint import CheckpointError
    from hpc_es.config import Config

    old = Config().to_dict()  # a ledger written before the low-rank keys existed
    for key in ("noise", "rank", "lowrank_scope"):
        del old["es"][key]
    del old["rollout"]["members_per_pass"]
    assert resume.trajectory(old) == resume.trajectory(Config().to_dict())
    resume.check_same_run("the ledger", "fp", old, Config(), "fp", "tiny")  # resumes: the same run
    low = load_config(None, ["es.noise=lowrank", "es.rank=2"])
    with pytest.raises(CheckpointError, match="es.noise, es.rank"):
        resume.check_same_run("the ledger", "fp", json.dumps(old), low, "fp", "tiny")


@pytest.mark.parametrize("scheme", ["keyed", "legacy"])
def test_stacked_draws_are_the_per_member_bits(scheme: str) -> None:
    """One pass over many members' counters (KeyedNoise.stack, lowrank.side_by_side) gives each member the
    bits of its own draw, also when the members are split over several passes."""
    from hpc_es.noise import noise_source

    src = noise_source(scheme, 16)
    src.stack_block = 100  # (keyed) 3 members of 37 per pass: several passes
    seeds = member_seeds(4, 2, 7)[0].tolist()
    got = src.stack(seeds, "layer.w", (37,))
    for k, s in enumerate(seeds):
        assert torch.equal(got[k], src.tensor(s, "layer.w", (37,)))
    a, b = lowrank.side_by_side(src, seeds, "layer.w", (11, 5), 2)
    assert a.shape == (11, 14) and b.shape == (5, 14)
    for k, s in enumerate(seeds):
        a0, b0 = lowrank.factors(src, s, "layer.w", (11, 5), 2)
        assert torch.equal(a[:, 2 * k:2 * k + 2], a0) and torch.equal(b[:, 2 * k:2 * k + 2], b0)
