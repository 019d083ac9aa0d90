"""Exact perturb/restore in every dtype, the fp32 update against a reference, and reward shaping."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, fingerprint_of, run_hpc_es
from hpc_es.es import Engine, Replica, centered_ranks, shape_rewards, zscore
from hpc_es.models import fingerprint, load_model, named_params
from hpc_es import noise as N
from hpc_es import noise_kernels as K
from hpc_es.noise import KeyedNoise, default_chunk
from hpc_es.noise_kernels import NoiseKernels
from hpc_es.seeds import trajectory_keys


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(33, 17, generator=g).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(17, 33, generator=g).to(dtype))  # same numel as a
        self.c = torch.nn.Parameter((1 + torch.randn(5000, generator=g) * 1e-3).to(dtype))  # weights near 1
        self.d = torch.nn.Parameter((torch.randn(64, generator=g) * 1e-6).to(dtype))  # tiny weights


def snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturb_then_restore_is_bit_exact(dtype: torch.dtype) -> None:
    net = Net(dtype)
    before = snapshot(net)
    rep, eng = Replica.wrap(net), Engine(chunk=1024)
    for seed in range(5):
        eng.perturb(rep, seed, 1 if seed % 2 else -1, 1e-3)
        assert any(not torch.equal(p, before[n]) for n, p in net.named_parameters())
        eng.restore(rep)
        for n, p in net.named_parameters():
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbation_is_base_plus_sigma_eps_rounded_once(dtype: torch.dtype) -> None:
    net = Net(dtype)
    base = snapshot(net)
    rep, eng = Replica.wrap(net), Engine(chunk=1000)
    eng.perturb(rep, 11, -1, 0.01)
    ns = KeyedNoise(1000)
    for n, p in net.named_parameters():
        want = (base[n].float() + (-0.01) * ns.tensor(11, n, p.shape)).to(dtype)
        assert torch.equal(p, want), n


def test_bf16_weights_near_one_do_move() -> None:
    """The paper's bf16 add-in-place could not move weights near 1.0; rounding base+sigma*eps once can."""
    net = Net(torch.bfloat16)
    before = net.c.detach().clone()
    rep, eng = Replica.wrap(net), Engine(chunk=1024)
    eng.perturb(rep, 3, 1, 0.01)
    assert (net.c != before).float().mean() > 0.5


def reference_update(base: dict[str, torch.Tensor], seeds, signs, shaped, alpha, chunk) -> dict:
    """theta + alpha * (1/N) * sum_n Z_n eps_n, member by member, in float64."""
    ns = KeyedNoise(chunk)
    out = {}
    for n, w in base.items():
        acc = torch.zeros(w.shape, dtype=torch.float64)
        for s, sg, z in zip(seeds, signs, shaped):
            acc += float(sg * z) * ns.tensor(int(s), n, w.shape).double()
        out[n] = w.double() + alpha * acc / len(shaped)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_matches_a_straightforward_reference(dtype: torch.dtype) -> None:
    net = Net(dtype)
    base = snapshot(net)
    seeds = np.array([5, 6, 7, 8], dtype=np.int64)
    signs = np.ones(4, dtype=np.int8)
    shaped = zscore(np.array([0.1, 0.5, 0.2, 0.9]))
    rep, eng = Replica.wrap(net), Engine(chunk=1024)
    eng.perturb(rep, 99, 1, 0.1)  # the update starts from the base, whatever the working weights hold
    eng.update([rep], seeds, signs, shaped, 0.05)
    want = reference_update(base, seeds, signs, shaped, 0.05, 1024)
    for n, p in net.named_parameters():
        # fp32 accumulation, one rounding to the model dtype: within one ulp of the float64 reference,
        # and equal to the correctly rounded value almost everywhere (a bf16 accumulator fails this).
        if dtype == torch.float32:
            torch.testing.assert_close(p.double(), want[n], rtol=2e-7, atol=4e-9)  # atol: one ulp of the update itself
        else:
            ulp = torch.finfo(dtype).eps * want[n].abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((p.double() - want[n]).abs() <= ulp).all(), n
            assert (p == want[n].to(dtype)).double().mean() > 0.99, n
        assert torch.equal(rep.master[n], p)
    assert not torch.equal(net.a, base["a"])


def test_update_is_bitwise_deterministic_and_shared_by_replicas() -> None:
    nets = [Net(torch.bfloat16) for _ in range(3)]
    reps = [Replica.wrap(n) for n in nets]
    eng = Engine(chunk=1024)
    seeds, signs = np.array([1, 1, 2, 2]), np.array([1, -1, 1, -1], dtype=np.int8)
    shaped = zscore(np.array([1.0, 0.0, 0.5, 2.0]))
    eng.update(reps[:2], seeds, signs, shaped, 0.1)
    Engine(chunk=1024).update(reps[2:], seeds, signs, shaped, 0.1)
    assert fingerprint(nets[0]) == fingerprint(nets[1]) == fingerprint(nets[2])


def test_antithetic_pair_update_folds_into_one_coefficient() -> None:
    a, b = Net(torch.float32), Net(torch.float32)
    eng = Engine(chunk=1024)
    eng.update([Replica.wrap(a)], np.array([4, 4]), np.array([1, -1], dtype=np.int8), np.array([1.0, -1.0]), 0.1)
    eng.update([Replica.wrap(b)], np.array([4]), np.array([1], dtype=np.int8), np.array([2.0]), 0.05)
    assert fingerprint(a) == fingerprint(b)  # (0.1/2)*(1*1 + -1*-1) == (0.05/1)*2


def test_zero_shaped_rewards_leave_weights_unchanged() -> None:
    net = Net(torch.float16)
    before = fingerprint(net)
    Engine(1024).update([Replica.wrap(net)], np.array([1, 2]), np.ones(2, dtype=np.int8), np.zeros(2), 0.5)
    assert fingerprint(net) == before


def test_low_memory_mode_keeps_the_master_on_the_host_and_matches() -> None:
    a, b = Net(torch.bfloat16), Net(torch.bfloat16)
    ra, rb = Replica.wrap(a, "device"), Replica.wrap(b, "host")
    assert all(t.device.type == "cpu" for t in rb.master.values())
    for rep in (ra, rb):
        eng = Engine(1024)
        eng.perturb(rep, 1, 1, 0.01)
        eng.update([rep], np.array([1, 2]), np.ones(2, dtype=np.int8), np.array([1.0, -1.0]), 0.01)
    assert fingerprint(a) == fingerprint(b)


def test_zscore_uses_population_std() -> None:
    r = np.array([1.0, 2.0, 3.0, 6.0])
    z = zscore(r)
    np.testing.assert_allclose(z, (r - 3.0) / np.sqrt(((r - 3.0) ** 2).mean()))
    assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)


def test_centered_ranks() -> None:
    np.testing.assert_array_equal(centered_ranks(np.array([10.0, -1.0, 3.0])), [0.5, -0.5, 0.0])
    np.testing.assert_array_equal(centered_ranks(np.array([1.0, 1.0, 2.0])), [-0.25, -0.25, 0.5])


@pytest.mark.parametrize("method", ["zscore", "rank"])
def test_equal_rewards_give_zero_update_and_a_warning(method: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="hpc_es"):
        shaped = shape_rewards(np.array([0.3, 0.3, 0.3]), method)
    assert np.array_equal(shaped, np.zeros(3)) and not np.isnan(shaped).any()
    assert "rewards are equal" in caplog.text


def test_replica_on_a_real_tiny_model_restores_exactly(tiny_model_dir: str) -> None:
    net = load_model(tiny_model_dir, torch.bfloat16)
    before = fingerprint(net)
    rep, eng = Replica.wrap(net), Engine(4096)
    eng.perturb(rep, 123, 1, 1e-3)
    assert fingerprint(net) != before
    eng.restore(rep)
    assert fingerprint(net) == before


# ---- es.master_dtype: the fp32 master ----------------------------------------------------------------
PAPER_SIGMA, PAPER_ALPHA, PAPER_N = 1e-3, 5e-4, 30


def paper_update(eng: Engine, reps: list[Replica], t: int) -> None:
    """One update at the paper's alpha and N, with fixed shaped rewards (a z-score of fixed rewards)."""
    seeds = np.arange(100 * t, 100 * t + PAPER_N, dtype=np.int64)
    shaped = zscore(np.linspace(0.0, 1.0, PAPER_N) ** 2)
    eng.update(reps, seeds, np.ones(PAPER_N, dtype=np.int8), shaped, PAPER_ALPHA)


def norm_names(net: torch.nn.Module) -> list[str]:
    names = [n for n, _ in named_params(net) if "norm" in n]
    assert names and all(torch.all(p == 1.0) for n, p in named_params(net) if n in names)  # RMSNorm starts at 1
    return names


def test_bf16_norm_weights_move_only_with_an_fp32_master(tiny_model_dir: str) -> None:
    """At the paper's sigma, alpha, N an update is ~1e-4 per element while half a bf16 step at 1.0 is
    >= 2e-3: a bf16 master rounds every update of a norm weight away, an fp32 master keeps them all."""
    moved = {}
    for master_dtype in ("model", "float32"):
        net = load_model(tiny_model_dir, torch.bfloat16)
        names = norm_names(net)
        rep, eng = Replica.wrap(net, master_dtype=master_dtype), Engine(4096)
        assert all(t.dtype == (torch.float32 if master_dtype == "float32" else torch.bfloat16)
                   for t in rep.master.values())
        for t in range(3):
            eng.perturb(rep, 7 + t, 1, PAPER_SIGMA)
            paper_update(eng, [rep], t)
        moved[master_dtype] = np.mean([(rep.master[n] != 1.0).float().mean().item() for n in names])
        for n, p in rep.params:  # the working weights are the rounded master
            assert torch.equal(p, rep.master[n].to(torch.bfloat16)), n
    assert moved["model"] == 0.0
    assert moved["float32"] > 0.99


def test_fp32_master_update_is_the_fp32_sum_with_no_rounding_to_the_model_dtype() -> None:
    net = Net(torch.bfloat16)
    start = {n: p.detach().float() for n, p in net.named_parameters()}
    rep, eng = Replica.wrap(net, master_dtype="float32"), Engine(chunk=1024)
    seeds, signs = np.array([5, 6, 7, 8], dtype=np.int64), np.ones(4, dtype=np.int8)
    shaped = zscore(np.array([0.1, 0.5, 0.2, 0.9]))
    eng.update([rep], seeds, signs, shaped, 1e-4)
    want = reference_update(start, seeds, signs, shaped, 1e-4, 1024)
    for n, p in net.named_parameters():
        m = rep.master[n]
        assert m.dtype == torch.float32
        # fp32 accumulation, one fp32 rounding: within fp32 ulps of the float64 reference (atol: of the update)
        torch.testing.assert_close(m.double(), want[n], rtol=2e-7, atol=1e-11)
        assert torch.equal(p, m.to(torch.bfloat16)), n
    assert (rep.master["c"] != start["c"]).float().mean() > 0.99  # near 1.0, in fp32: every weight moved


def test_fp32_master_with_many_small_updates_moves_the_working_weights() -> None:
    """Repeating one update: each step is far below half a bf16 step at 1.0, yet the fp32 master adds them
    up until the working weights round differently; a bf16 master never gets there."""
    changed = {}
    for master_dtype in ("model", "float32"):
        net = Net(torch.bfloat16)
        before = net.c.detach().clone()
        rep, eng = Replica.wrap(net, master_dtype=master_dtype), Engine(chunk=1024)
        for _ in range(40):
            paper_update(eng, [rep], 0)
        changed[master_dtype] = (net.c != before).float().mean().item()
    assert changed["model"] == 0.0
    assert changed["float32"] > 0.1


@pytest.mark.parametrize("master_on", ["device", "host"])
def test_fp32_master_perturb_is_round_of_master_plus_sigma_eps(master_on: str) -> None:
    net = Net(torch.bfloat16)
    rep, eng = Replica.wrap(net, master_on, "float32"), Engine(chunk=1000)
    paper_update(eng, [rep], 0)
    master = {n: t.clone() for n, t in rep.master.items()}
    eng.perturb(rep, 11, -1, 0.01)
    ns = KeyedNoise(1000)
    for n, p in net.named_parameters():
        want = (master[n] + (-0.01) * ns.tensor(11, n, p.shape)).to(torch.bfloat16)
        assert torch.equal(p, want), n
        assert torch.equal(rep.master[n], master[n]), n  # untouched
    eng.restore(rep)
    for n, p in net.named_parameters():
        assert torch.equal(p, master[n].to(torch.bfloat16)), n


def test_fp32_master_on_host_and_on_device_agree() -> None:
    a, b = Net(torch.float16), Net(torch.float16)
    ra, rb = Replica.wrap(a, "device", "float32"), Replica.wrap(b, "host", "float32")
    for rep in (ra, rb):
        eng = Engine(1024, workers=2)
        for t in range(2):
            eng.perturb(rep, t, 1, 0.01)
            paper_update(eng, [rep], t)
    assert ra.master_fingerprint() == rb.master_fingerprint() and fingerprint(a) == fingerprint(b)


def test_master_fingerprint_equals_the_model_fingerprint_with_a_model_dtype_master() -> None:
    """Checkpoints record the master's fingerprint: unchanged from the model's for es.master_dtype=model."""
    net = Net(torch.bfloat16)
    rep, eng = Replica.wrap(net), Engine(1024)
    paper_update(eng, [rep], 0)
    assert rep.master_fingerprint() == fingerprint(net)
    fp32 = Replica.wrap(Net(torch.bfloat16), master_dtype="float32")
    paper_update(eng, [fp32], 0)
    assert fp32.master_fingerprint() != fingerprint(fp32.model)  # it covers the fp32 bits


def test_load_master_restores_fp32_bits_and_rounds_the_working_weights() -> None:
    net = Net(torch.bfloat16)
    rep, eng = Replica.wrap(net, master_dtype="float32"), Engine(1024)
    paper_update(eng, [rep], 0)
    saved = {n: t.clone() for n, t in rep.master.items()}
    other = Replica.wrap(Net(torch.bfloat16), master_dtype="float32")
    other.load_master(saved)
    assert other.master_fingerprint() == rep.master_fingerprint()
    assert fingerprint(other.model) == fingerprint(net)


# ---- replicas on one device share one master ----------------------------------------------------------
@pytest.mark.parametrize("master_dtype", ["model", "float32"])
def test_replicas_on_one_device_share_one_master_and_match_one_replica(master_dtype: str) -> None:
    nets = [Net(torch.bfloat16) for _ in range(3)]
    reps: list[Replica] = []
    for net in nets[:2]:
        reps.append(Replica.wrap(net, master_dtype=master_dtype, share=reps))
    assert reps[1].master is reps[0].master
    assert all(reps[1].master[n] is reps[0].master[n] for n in reps[0].master)
    alone = Replica.wrap(nets[2], master_dtype=master_dtype)
    assert alone.master is not reps[0].master
    for eng_reps in (reps, [alone]):
        eng = Engine(1000, workers=2)
        for t in range(2):
            eng.perturb(eng_reps[0], 40 + t, 1, 0.05)
            eng.perturb(eng_reps[-1], 50 + t, -1, 0.05)  # a replica sharing the master holds another member
            paper_update(eng, eng_reps, t)
    assert fingerprint(nets[0]) == fingerprint(nets[1]) == fingerprint(nets[2])
    assert reps[0].master_fingerprint() == alone.master_fingerprint()
    assert reps[0].digest() == reps[1].digest() == alone.digest()


# ---- the compiled fused perturb/update (keyed noise) against the eager ops, bit for bit ----------------

needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                               reason="torch.compile on the CPU needs a C++ compiler")


def _odd_replica(wdtype: torch.dtype, mdtype: torch.dtype) -> Replica:
    """Odd sizes: several compiled blocks with a ragged end, a tail under MIN_COMPILED, a tiny tensor."""
    g = torch.Generator().manual_seed(3)
    shapes = {"w.a": (2500 + 7,), "w.b": (33, 17), "w.c": (1500 + 1024 + 5,), "w.d": (7,), "w.e": (3001,)}
    params = [(n, (torch.randn(s, generator=g) * 10.0 ** torch.randint(-4, 2, s, generator=g)).to(wdtype))
              for n, s in shapes.items()]
    return Replica(model=torch.nn.Module(), device=torch.device("cpu"), params=params,
                   master={n: p.to(mdtype) for n, p in params})


def _perturb_and_update(compile_: bool, wdtype: torch.dtype, mdtype: torch.dtype, nterms: int,
                        kernels: NoiseKernels | None = None) -> list[torch.Tensor]:
    rep = _odd_replica(wdtype, mdtype)
    eng = Engine(chunk=1500, workers=2)  # pieces start inside compiled blocks; two threads
    eng.noise = KeyedNoise(compile=compile_, kernels=kernels)
    out = []
    for seed, sign, sigma in ((11, 1, 1e-3), (12, -1, 0.37), (13, 1, 2.5e-5)):
        eng.perturb(rep, seed, sign, sigma)
        out += [p.clone() for _, p in rep.params]
    rng = np.random.default_rng(nterms)
    seeds = rng.integers(0, 2**62, nterms)
    other = _odd_replica(wdtype, mdtype)  # a second replica with its own master: receives copies
    eng.perturb(other, 14, 1, 0.01)
    eng.update([rep, other], seeds, np.ones(nterms, dtype=np.int8), rng.standard_normal(nterms), 0.05)
    return out + [t.clone() for r in (rep, other) for t in [*r.master.values(), *(p for _, p in r.params)]]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def small_block_kernels() -> NoiseKernels:
    """Kernels with 1024-element fused blocks (several per tensor in a tiny test), built and checked
    afresh, shared by the dtype cases (their torch.compile wrappers are traced once)."""
    return NoiseKernels(fused_block={"cpu": 1024})


@needs_cxx
@pytest.mark.parametrize("wdtype,mdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)])
def test_compiled_fused_perturb_and_update_give_the_eager_bits(
        wdtype: torch.dtype, mdtype: torch.dtype, small_block_kernels: NoiseKernels) -> None:
    kernels = small_block_kernels
    nterms = K.FUSED_TERMS + 2 if mdtype == torch.float32 else 3  # full groups and a remainder; one group
    eager = _perturb_and_update(False, wdtype, mdtype, nterms, kernels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a refused kernel would warn: make it fail the test
        fused = _perturb_and_update(True, wdtype, mdtype, nterms, kernels)
    assert kernels.built[("cpu", "perturb", (wdtype, mdtype))] is not None
    assert kernels.built[("cpu", "apply", (mdtype, wdtype))] is not None
    assert all(kernels.built[("cpu", "accumulate", k)] is not None for k in {min(nterms, K.FUSED_TERMS),
                                                                             nterms % K.FUSED_TERMS or K.FUSED_TERMS})
    _same(eager, fused)


def test_a_fused_kernel_with_other_bits_is_refused_and_eager_runs() -> None:
    """What a compiler that contracts a*b + c into an FMA would produce: the build check refuses it."""
    def contracted_perturb(ramp, z0, cells, steps, scale, master, out) -> None:
        eps = N.keyed_transform(ramp + z0, cells, steps).double()  # product and sum rounded once, as an FMA
        out.copy_((eps * scale.double() + master.double()).float())

    def broken(*args: object) -> None:
        raise RuntimeError("no compiler here")

    kernels = NoiseKernels(compiler=lambda body, **_: contracted_perturb if body is K._perturb_block else broken)
    eager = _perturb_and_update(False, torch.float32, torch.float32, 3)
    with pytest.warns(RuntimeWarning, match="eager"):
        got = _perturb_and_update(True, torch.float32, torch.float32, 3, kernels)
    assert kernels.built[("cpu", "perturb", (torch.float32, torch.float32))] is None
    assert kernels.built.get(("cpu", "accumulate", 3)) is None
    _same(eager, got)


def test_a_kernel_that_fails_to_build_falls_back_to_eager_with_one_warning() -> None:
    """The plain fill as well as the fused ops: the first failure turns compiling off on the device type."""
    def no_compiler(body: object, **_: object) -> object:
        def fails(*args: object) -> None:
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler available")
        return fails

    kernels = NoiseKernels(compiler=no_compiler)
    eager = _perturb_and_update(False, torch.bfloat16, torch.float32, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _perturb_and_update(True, torch.bfloat16, torch.float32, 3, kernels)
        ns = KeyedNoise(compile=True, kernels=kernels)  # the plain fill alone: no new attempt, no new warning
        filled = ns.fill(torch.empty(5000), 3, "w", 7)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        "hpc_es: the compiled keyed-noise perturb (torch.bfloat16, torch.float32) on cpu failed to build "
        "(RuntimeError: InvalidCxxCompiler: no working C++ compiler available); the noise runs eagerly on cpu "
        "(the same bits, slower)"]
    assert "cpu" in kernels.failed and not any(kernels.built.values())
    _same(eager, got)
    assert torch.equal(filled, KeyedNoise(compile=False).fill(torch.empty(5000), 3, "w", 7))
    fill_only = NoiseKernels(compiler=no_compiler)
    with pytest.warns(RuntimeWarning, match="fill on cpu failed to build"):
        assert torch.equal(KeyedNoise(compile=True, kernels=fill_only).fill(torch.empty(5000), 3, "w", 7), filled)


@pytest.mark.integration
def test_a_run_without_a_working_compiler_finishes_eagerly_with_one_warning(reference_run: Path,
                                                                           tmp_path: Path) -> None:
    """HPC_ES_NOISE_COMPILE=1 while CC/CXX name no compiler (inductor takes its C++ compiler from CXX) and
    with an empty inductor cache (no earlier build to reuse): no kernel can be built, and the run gives the
    reference fingerprint with one warning."""
    missing = str(tmp_path / "no-such-compiler")
    env = {"HPC_ES_NOISE_COMPILE": "1", "CC": missing, "CXX": missing,
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    proc = run_hpc_es(TINY + [f"run_dir={tmp_path / 'run'}"], env=env, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["fingerprint"] == fingerprint_of(reference_run / "final")
    warned = [line for line in proc.stderr.splitlines() if "hpc_es: the compiled keyed-noise" in line]
    assert len(warned) == 1, proc.stderr
    assert "failed to build" in warned[0] and "InvalidCxxCompiler" in warned[0], warned[0]


def test_perturb_and_update_make_no_device_tensors_per_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scalars reach the kernels as host values: no ``torch.tensor(..., device=...)`` (a copy and a wait on
    a GPU) in perturb or update, eager or fused.  The kernels run uncompiled here (the bodies themselves),
    which the build check accepts: they are the eager ops' arithmetic."""
    kernels = NoiseKernels(compiler=lambda body, **_: body, fused_block={"cpu": 1024})
    made: list[object] = []
    real = torch.tensor

    def counting(*args: object, **kw: object) -> torch.Tensor:
        if kw.get("device") is not None:
            made.append(kw["device"])
        return real(*args, **kw)  # type: ignore[arg-type]

    want = _perturb_and_update(False, torch.float32, torch.float32, K.FUSED_TERMS + 1)
    monkeypatch.setattr(torch, "tensor", counting)
    for compile_ in (False, True):
        got = _perturb_and_update(compile_, torch.float32, torch.float32, K.FUSED_TERMS + 1, kernels)
        _same(want, got)
    assert made == []
    assert kernels.built[("cpu", "perturb", (torch.float32, torch.float32))] is K._perturb_block  # fused ran
    assert kernels.built[("cpu", "accumulate", K.FUSED_TERMS)] is K._accumulate_block


def test_the_default_chunk_is_large_on_a_gpu_unless_set() -> None:
    assert default_chunk(0, "keyed", "cuda") == 1 << 26
    assert default_chunk(0, "keyed", "cpu") == 1 << 20
    assert default_chunk(0, "legacy", "cuda") == 1 << 20  # part of a legacy run's trajectory: never by device
    assert default_chunk(4096, "keyed", "cuda") == 4096
    assert trajectory_keys({"es": {"noise_scheme": "legacy", "noise_chunk": 0}})["es.noise_chunk"] == 1 << 20
    big = torch.empty(3 << 25, device="meta")  # shapes only
    pieces = {kind: Engine(0)._pieces(Replica(model=torch.nn.Module(), device=torch.device(kind),
                                              params=[("w", big)], master={"w": big}))
              for kind in ("cpu", "cuda")}
    assert [(s, e) for *_, s, e in pieces["cuda"]] == [(0, 1 << 26), (1 << 26, 3 << 25)]
    assert len(pieces["cpu"]) == 96
    assert [(s, e) for *_, s, e in Engine(1 << 25)._pieces(Replica(
        model=torch.nn.Module(), device=torch.device("cuda"), params=[("w", big)], master={"w": big}))][-1] == (
        2 << 25, 3 << 25)


@needs_cxx
@pytest.mark.skipif(os.environ.get("HPC_ES_TEST_COMPILE") != "1", reason="compiles (slow); HPC_ES_TEST_COMPILE=1")
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="no FMA unit")
def test_the_build_check_catches_a_compiler_that_contracts_into_fma() -> None:
    """With inductor's C++ built under -ffp-contract=fast, the check data exposes the contraction."""
    fast = NoiseKernels(options={"cpp.enable_floating_point_contract_flag": "fast"}, fused_block={"cpu": 4099})
    cpu = torch.device("cpu")
    assert not fast.check(cpu, "perturb", (torch.float32, torch.float32))
    assert not fast.check(cpu, "accumulate", 2)
    assert NoiseKernels(fused_block={"cpu": 4099}).check(cpu, "perturb", (torch.float32, torch.float32))
