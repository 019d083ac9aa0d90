"""Exact perturb/restore in every dtype, the fp32 update against a reference, and reward shaping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc_es.es import Engine, Replica, centered_ranks, shape_rewards, zscore
from hpc_es.models import fingerprint, load_model
from hpc_es.noise import KeyedNoise


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
        assert torch.equal(rep.base[n], p)
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


def test_low_memory_mode_keeps_the_base_on_the_host_and_matches() -> None:
    a, b = Net(torch.bfloat16), Net(torch.bfloat16)
    ra, rb = Replica.wrap(a, "device"), Replica.wrap(b, "host")
    assert all(t.device.type == "cpu" for t in rb.base.values())
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
