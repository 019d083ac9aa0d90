"""Tensor parallelism: the sharding plan, per-shard noise equal to slices of the whole, and the sharded decoder.

Shards are built in one process by cutting a copy of a tiny model (hpc_es.tp.shard_model); the sharded
decoder's shards run in threads that exchange their partial sums through a ThreadExchange.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings

import numpy as np
import pytest
import torch

from hpc_es import fastgen, tp
from hpc_es.errors import ConfigError
from hpc_es.es import Engine, Replica
from hpc_es.models import fingerprint_named
from hpc_es.noise import KeyedNoise
from hpc_es.seeds import member_seeds

VOCAB, PAD = 96, 1


def build(kind: str, heads: int, kv_heads: int, dtype: torch.dtype = torch.float32, seed: int = 0,
          inter: int = 48) -> torch.nn.Module:
    """A tiny model (head_dim 8) with random biases and sharpened logits, as tests/test_fastgen.py's."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=inter, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  initializer_range=0.1, eos_token_id=0, pad_token_id=PAD, bos_token_id=0)
    if kind == "qwen2":  # tied embeddings, q/k/v biases
        cfg = Qwen2Config(tie_word_embeddings=True, **common)
    else:  # untied, biases on every attention projection (o_proj's is replicated) and on the MLP
        cfg = LlamaConfig(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
            model.model.norm.weight.mul_(6.0)
    model.requires_grad_(False)
    return model.to(dtype)


# ------------------------------------------------------------------------------------------------ plan

def test_plan_splits_whole_heads_and_replicates_the_rest() -> None:
    model = build("llama", heads=6, kv_heads=3)
    plan = tp.plan_for(model.config, 3)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    views = plan.views(shapes, 1)
    L = "model.layers.0."
    want = {
        L + "self_attn.q_proj.weight": (0, 16, 32), L + "self_attn.q_proj.bias": (0, 16, 32),
        L + "self_attn.k_proj.weight": (0, 8, 16), L + "self_attn.v_proj.bias": (0, 8, 16),
        L + "self_attn.o_proj.weight": (1, 16, 32), L + "self_attn.o_proj.bias": (None, 0, 48),
        L + "mlp.gate_proj.weight": (0, 16, 32), L + "mlp.up_proj.bias": (0, 16, 32),
        L + "mlp.down_proj.weight": (1, 16, 32), L + "mlp.down_proj.bias": (None, 0, 48),
        "model.embed_tokens.weight": (None, 0, VOCAB), "lm_head.weight": (None, 0, VOCAB),
        L + "input_layernorm.weight": (None, 0, 48), "model.norm.weight": (None, 0, 48),
    }
    for name, (dim, lo, hi) in want.items():
        v = views[name]
        assert (v.dim, v.lo, v.hi) == (dim, lo, hi), name
    assert views[L + "self_attn.o_proj.weight"].local_shape == (48, 16)
    assert not views[L + "mlp.down_proj.weight"].contiguous
    assert views[L + "mlp.gate_proj.weight"].contiguous


@pytest.mark.parametrize("K", [1, 2, 3])
def test_views_index_the_global_elements_of_the_slice(K: int) -> None:
    model = build("llama", heads=6, kv_heads=6)
    plan = tp.plan_for(model.config, K)
    for rank in range(K):
        for name, v in plan.views({n: tuple(p.shape) for n, p in model.named_parameters()}, rank).items():
            numel = int(np.prod(v.shape))
            want = v.take(torch.arange(numel).view(v.shape)).reshape(-1)
            assert torch.equal(v.index(0, want.numel()), want), name
            assert torch.equal(v.index(5, 7), want[5:12]), name  # a range starting mid-row


@pytest.mark.parametrize(("heads", "kv", "inter", "bad"), [
    (4, 1, 48, "num_key_value_heads = 1"), (6, 6, 48, "num_attention_heads = 6, num_key_value_heads = 6"),
    (4, 4, 50, "intermediate_size = 50")])
def test_plan_refuses_what_does_not_split_into_whole_heads(heads: int, kv: int, inter: int, bad: str) -> None:
    model = build("qwen2", heads=heads, kv_heads=kv, inter=inter)
    with pytest.raises(ConfigError, match=f"dist.tensor_parallel = 4 must divide .*does not divide {bad}$"):
        tp.plan_for(model.config, 4)


def test_plan_refuses_other_architectures() -> None:
    class Cfg:
        model_type = "gpt2"

    with pytest.raises(ConfigError, match="supports qwen2, llama models, not 'gpt2'"):
        tp.plan_for(Cfg(), 2)


# ------------------------------------------------------------------------------------------------ noise

def shard(model: torch.nn.Module, K: int, rank: int) -> tuple[torch.nn.Module, dict[str, tp.ShardView]]:
    part = copy.deepcopy(model)
    return part, tp.shard_model(part, tp.plan_for(model.config, K), rank)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (equal iff bit-identical; NaN-safe)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_slices(full: Replica, part: Replica, views: dict[str, tp.ShardView]) -> None:
    """Each of the shard's working weights and masters is the same bits as its slice of the whole's."""
    fw = dict(full.params)
    for name, p in part.params:
        v = views[name]
        assert tuple(p.shape) == v.local_shape
        assert p.dtype == fw[name].dtype and torch.equal(bits(p), bits(v.take(fw[name]))), name
        m = part.master[name]
        assert m.dtype == full.master[name].dtype and torch.equal(bits(m), bits(v.take(full.master[name]))), name


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize(("dtype", "master"), [(torch.float32, "model"), (torch.bfloat16, "model"),
                                               (torch.bfloat16, "float32")])
def test_shard_perturb_and_update_are_slices_of_the_whole(kind: str, dtype: torch.dtype, master: str) -> None:
    """Bit for bit, for K = 2 and 3, with chunks that start mid-row and a thread pool drawing them."""
    check_slices(kind, dtype, master)


@pytest.mark.skipif(os.environ.get("HPC_ES_TEST_COMPILE") != "1", reason="compiles (slow); HPC_ES_TEST_COMPILE=1")
def test_shard_slices_with_the_compiled_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shards that are one range (rows, replicated) run the fused kernels at their global offset."""
    monkeypatch.setenv("HPC_ES_NOISE_COMPILE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel refused (eager instead) would test nothing
        check_slices("qwen2", torch.bfloat16, "model")


def check_slices(kind: str, dtype: torch.dtype, master: str) -> None:
    model = build(kind, heads=6, kv_heads=6, dtype=dtype)
    chunk = 301  # not a multiple of any row length: chunks start mid-row
    full = Replica.wrap(copy.deepcopy(model), master_dtype=master)
    eng = Engine(chunk, workers=2)
    seeds, signs = member_seeds(7, 0, 6, antithetic=True)
    shaped = np.array([0.9, -1.3, 0.2, 0.7, -0.4, 1.1])
    parts = {K: [shard(model, K, r) for r in range(K)] for K in (2, 3)}
    reps = {K: [(Replica.wrap(m, master_dtype=master), tp.ShardEngine(v, chunk, workers=2), v) for m, v in ps]
            for K, ps in parts.items()}

    eng.perturb(full, int(seeds[2]), int(signs[2]), 0.05)
    for rs in reps.values():
        for rep, seng, views in rs:
            seng.perturb(rep, int(seeds[2]), int(signs[2]), 0.05)
            assert_slices(full, rep, views)
    for _ in range(2):
        eng.update([full], seeds, signs, shaped, alpha=0.02)
        for rs in reps.values():
            for rep, seng, views in rs:
                seng.update([rep], seeds, signs, shaped, alpha=0.02)
                assert_slices(full, rep, views)
    for rs in reps.values():  # the shards' masters put together: the unsharded master's fingerprint
        whole = [(n, tp.assemble([v[n] for _, _, v in rs], [r.master[n] for r, _, _ in rs])) for n in full.master]
        assert fingerprint_named(sorted(whole)) == full.master_fingerprint()
    assert not torch.equal(full.master["model.norm.weight"].float(), model.model.norm.weight.float())


def test_assemble_refuses_parts_out_of_order() -> None:
    plan = tp.Plan(shards=2, heads=4, kv_heads=4, head_dim=8, intermediate=48)
    name = "model.layers.0.mlp.down_proj.weight"
    views = [plan.view(name, (32, 48), r) for r in range(2)]
    full = torch.arange(32 * 48.0).view(32, 48)
    assert torch.equal(tp.assemble(views, [v.take(full) for v in views]), full)
    with pytest.raises(ValueError, match="do not tile it in rank order"):
        tp.assemble(views[::-1], [v.take(full) for v in views[::-1]])


def test_shard_noise_of_a_column_block_is_the_slice_of_the_whole() -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    plan = tp.Plan(shards=3, heads=6, kv_heads=6, head_dim=8, intermediate=48)
    whole = KeyedNoise(chunk=64).tensor(12345, name, (48, 48))
    for rank in range(3):
        v = plan.view(name, (48, 48), rank)
        got = torch.empty(v.rows * v.cols)
        tp.ShardNoise({name: v}).fill(got[:50], 12345, name, 0)
        tp.ShardNoise({name: v}).fill(got[50:], 12345, name, 50)
        assert torch.equal(got.view(v.local_shape), v.take(whole))


# ------------------------------------------------------------------------------------------------ decoder

def batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 1..24 tokens (ids >= 2: no pad or EOS inside a prompt)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 25, (rows,), generator=g)
    lens[0] = 24
    ids = torch.randint(2, VOCAB, (rows, 24), generator=g)
    mask = torch.zeros(rows, 24, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, 24 - n:] = 1
        ids[i, : 24 - n] = PAD
    return ids, mask


def sharded_generate(model: torch.nn.Module, K: int, ids: torch.Tensor, mask: torch.Tensor,
                     new: int) -> list[torch.Tensor]:
    """Every shard's generated ids, the K shards decoding in K threads."""
    group = tp.ThreadExchange(K)
    shards = [shard(model, K, r)[0] for r in range(K)]
    out: list[torch.Tensor | BaseException | None] = [None] * K

    def run(r: int) -> None:
        try:
            fastgen.set_linears(shards[r], tp.ShardLinears(group.member(r)))
            out[r] = fastgen.generate_ids(shards[r], ids, mask, new, 0, PAD)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out[r] = e
            group._barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(K)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return [o for o in out if isinstance(o, torch.Tensor)]


@pytest.mark.parametrize(("kind", "heads", "kv"), [("qwen2", 4, 2), ("qwen2", 4, 4), ("llama", 4, 2),
                                                  ("llama", 6, 6)])
def test_sharded_decoder_gives_the_unsharded_tokens(kind: str, heads: int, kv: int) -> None:
    """fp32: K = 2 (and 3 where the heads split so) pick the K = 1 tokens on padded batches, every shard alike."""
    model = build(kind, heads=heads, kv_heads=kv, seed=3)
    ids, mask = batch(6, seed=heads + kv)
    want = fastgen.generate_ids(model, ids, mask, 20, 0, PAD)
    assert want.shape[1] > 5
    for K in (2, 3):
        if heads % K or kv % K:
            continue
        got = sharded_generate(model, K, ids, mask, 20)
        for g in got:
            assert torch.equal(g, want), (K, g, want)


def test_sharded_decoder_sums_partials_in_rank_order() -> None:
    """The row-parallel sum is partial 0 + partial 1 (+ the bias after), the same bits on every shard."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 1, 8), torch.randn(5, 8), torch.randn(5)
    group = tp.ThreadExchange(2)
    res: list[torch.Tensor | None] = [None, None]

    def run(r: int) -> None:
        res[r] = tp.ShardLinears(group.member(r)).out(x[..., 4 * r:4 * r + 4], w[:, 4 * r:4 * r + 4], b)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = (torch.nn.functional.linear(x[..., :4], w[:, :4]) + torch.nn.functional.linear(x[..., 4:], w[:, 4:])) + b
    assert res[0] is not None and res[1] is not None
    assert torch.equal(res[0], want) and torch.equal(res[1], want)


def test_a_shard_takes_no_low_rank_pass() -> None:
    model = build("qwen2", heads=4, kv_heads=2)
    part, _ = shard(model, 2, 0)
    fastgen.set_linears(part, tp.ShardLinears(tp.ThreadExchange(1).member(0)))
    ids, mask = batch(2, 0)

    class Members:
        groups = 1

    with pytest.raises(ValueError, match="takes no low-rank pass"):
        fastgen.generate_ids(part, ids, mask, 4, 0, PAD, lowrank=Members())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize(("overrides", "words"), [
    (["dist.tensor_parallel=0"], "'dist.tensor_parallel' = 0 is out of range; it must be an integer >= 1"),
    (["dist.tensor_parallel=2", "es.noise_scheme=legacy"], "needs es.noise_scheme=keyed"),
    (["dist.tensor_parallel=2", "es.noise=lowrank"], "does not combine with es.noise=lowrank"),
    (["dist.tensor_parallel=2", "rollout.engine=hf"], "needs the fast engine"),
    (["dist.tensor_parallel=2"], "not wired into the trainer yet"),
])
def test_tensor_parallel_config_refusals(overrides: list[str], words: str) -> None:
    from hpc_es.config import load_config

    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)
    assert load_config(None, ["dist.tensor_parallel=1"]).dist.tensor_parallel == 1


# ------------------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize(("kind", "dtype"), [("qwen2", torch.bfloat16), ("llama", torch.float32)])
def test_load_shard_reads_the_slices_of_the_files(tmp_path, kind: str, dtype: torch.dtype) -> None:
    from hpc_es.models import load_model

    build(kind, heads=4, kv_heads=2, dtype=dtype).save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))  # the whole model as hpc_es loads it, then cut
    for rank in range(2):
        want, views = shard(model, 2, rank)
        got, got_views = tp.load_shard(str(tmp_path / "m"), 2, rank)
        assert got_views == views
        g, w = dict(got.named_parameters()), dict(want.named_parameters())
        assert sorted(g) == sorted(w)
        for name in w:
            assert g[name].dtype == dtype and torch.equal(bits(g[name]), bits(w[name])), name
            # its own storage, the slice's size: no whole tensor behind a view
            assert g[name].untyped_storage().nbytes() == g[name].numel() * g[name].element_size(), name
        assert torch.equal(got.model.rotary_emb.inv_freq, want.model.rotary_emb.inv_freq)
        if kind == "qwen2":
            assert got.lm_head.weight is got.model.embed_tokens.weight


def test_load_shard_refuses_a_folder_without_safetensors(tmp_path) -> None:
    from hpc_es.errors import ModelError

    build("qwen2", heads=4, kv_heads=2).config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="has no model.safetensors"):
        tp.load_shard(str(tmp_path), 2, 0)


# ------------------------------------------------------------------------------------------------ processes

def _gloo_shard(rank: int, size: int, folder: str, init: str, out: str) -> None:
    """One process of a gloo group: load shard ``rank`` from the files, decode, write the ids."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        model, _ = tp.load_shard(folder, size, rank)
        fastgen.set_linears(model, tp.ShardLinears(tp.DistExchange()))
        ids, mask = batch(4, seed=11)
        torch.save(fastgen.generate_ids(model, ids, mask, 12, 0, PAD), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_gloo_processes_decode_the_unsharded_tokens(tmp_path) -> None:
    """K = 2 over torch.distributed (gloo, two processes, each loading its shard from the files) in fp32."""
    import torch.multiprocessing as mp

    from hpc_es.models import load_model

    build("llama", heads=4, kv_heads=2, seed=5).save_pretrained(tmp_path / "m")
    ids, mask = batch(4, seed=11)
    want = fastgen.generate_ids(load_model(str(tmp_path / "m")), ids, mask, 12, 0, PAD)
    out = str(tmp_path / "ids")
    mp.spawn(_gloo_shard, args=(2, str(tmp_path / "m"), f"file://{tmp_path / 'init'}", out), nprocs=2)
    for rank in range(2):
        assert torch.equal(torch.load(f"{out}.{rank}"), want)
