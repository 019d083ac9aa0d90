"""The engine's speed-ups change no bit: thread-pooled chunks, fused stores, no restore before the update.

Each test compares the Engine with a plain chunk-by-chunk reference that spells out the documented
arithmetic (noise keyed by seed/name/element, or by seed/name/chunk under legacy, in fp32; perturb =
round(base + sign*sigma*eps); update = round(base + (alpha/N) * fp32 sum of c_n*eps_n)), under both noise
schemes, or two Engine configurations with each other.
No timings are asserted here (tools/bench.py measures speed).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hpc_es.es import Engine, Replica
from hpc_es.models import fingerprint
from hpc_es.noise import KeyedNoise, chunk_key, chunks

CHUNK = 1000


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(60, 70, generator=g).to(dtype))  # 4200: several chunks
        self.v = torch.nn.Parameter(torch.randn(2500, generator=g).to(dtype))  # a short last chunk
        self.s = torch.nn.Parameter((1 + 1e-3 * torch.randn(7, generator=g)).to(dtype))
        self.z = torch.nn.Parameter(torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=dtype))


def eps(seed: int, name: str, i: int, start: int, n: int, scheme: str) -> torch.Tensor:
    if scheme == "keyed":
        return KeyedNoise(compile=False).fill(torch.empty(n), seed, name, start)
    g = torch.Generator().manual_seed(chunk_key(seed, name, i))
    return torch.randn(n, generator=g, dtype=torch.float32)


def ref_perturb(base: dict[str, torch.Tensor], seed: int, sign: int, sigma: float,
                scheme: str = "keyed") -> dict[str, torch.Tensor]:
    out = {}
    for name, b in base.items():
        flat = b.reshape(-1)
        parts = []
        for i, s, e in chunks(flat.numel(), CHUNK):
            x = eps(seed, name, i, s, e - s, scheme)
            x.mul_(float(sign) * sigma).add_(flat[s:e])
            parts.append(x.to(b.dtype))
        out[name] = torch.cat(parts).view(b.shape)
    return out


def ref_update(base: dict[str, torch.Tensor], seeds, signs, shaped, alpha: float,
               scheme: str = "keyed") -> dict[str, torch.Tensor]:
    coef: dict[int, float] = {}
    for s, sg, z in zip(seeds.tolist(), signs.tolist(), shaped.tolist()):
        coef[s] = coef.get(s, 0.0) + float(sg) * float(z)
    terms = [(s, c) for s, c in coef.items() if c != 0.0]
    out = {}
    for name, b in base.items():
        flat = b.reshape(-1)
        parts = []
        for i, s, e in chunks(flat.numel(), CHUNK):
            acc = torch.zeros(e - s)
            for seed, c in terms:
                x = eps(seed, name, i, s, e - s, scheme)
                if scheme == "keyed":  # c*eps rounded, then added: no fused multiply-add
                    acc.add_(x.mul_(c))
                else:
                    acc.add_(x, alpha=c)
            acc.mul_(alpha / len(shaped)).add_(flat[s:e])
            parts.append(acc.to(b.dtype))
        out[name] = torch.cat(parts).view(b.shape)
    return out


def params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("scheme", ["keyed", "legacy"])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_is_bitwise_the_reference(dtype: torch.dtype, workers: int, scheme: str) -> None:
    net = Net(dtype)
    base = params(net)
    rep, eng = Replica.wrap(net), Engine(CHUNK, workers=workers, scheme=scheme)
    for seed, sign in ((3, 1), (4, -1), (3, -1)):
        eng.perturb(rep, seed, sign, 0.01)
        want = ref_perturb(base, seed, sign, 0.01, scheme)
        for n, p in net.named_parameters():
            assert same_bits(p.detach(), want[n]), (n, seed, sign)
        for n, b in rep.master.items():
            assert same_bits(b, base[n]), n  # the master is never touched by a perturbation


@pytest.mark.parametrize("scheme", ["keyed", "legacy"])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_after_a_perturb_is_bitwise_the_reference(dtype: torch.dtype, workers: int, scheme: str) -> None:
    """No restore before the update: it reads the base only and leaves every replica's weights at the new base."""
    nets = [Net(dtype) for _ in range(3)]
    reps = [Replica.wrap(n) for n in nets]
    base = params(nets[0])
    eng = Engine(CHUNK, workers=workers, scheme=scheme)
    eng.perturb(reps[0], 9, 1, 0.05)
    eng.perturb(reps[2], 10, -1, 0.05)
    seeds, signs = np.array([5, 5, 6, 7]), np.array([1, -1, 1, 1], dtype=np.int8)
    shaped = np.array([1.2, -0.3, 0.0, -0.9])
    eng.update(reps, seeds, signs, shaped, 0.02)
    want = ref_update(base, seeds, signs, shaped, 0.02, scheme)
    for net, rep in zip(nets, reps):
        for n, p in net.named_parameters():
            assert same_bits(p.detach(), want[n]), n
            assert same_bits(rep.master[n], want[n]), n


def test_host_master_matches_device_master_with_the_pool() -> None:
    a, b = Net(torch.bfloat16), Net(torch.bfloat16)
    ra, rb = Replica.wrap(a, "device"), Replica.wrap(b, "host")
    for rep in (ra, rb):
        eng = Engine(CHUNK, workers=2)
        eng.perturb(rep, 1, 1, 0.01)
        eng.update([rep], np.array([1, 2]), np.ones(2, dtype=np.int8), np.array([1.0, -1.0]), 0.01)
    assert fingerprint(a) == fingerprint(b)


def test_one_engine_perturbing_two_replicas_from_two_threads() -> None:
    """Generators and scratch buffers are per thread: concurrent callers cannot mix their seeds."""
    nets = [Net(torch.float32) for _ in range(2)]
    reps = [Replica.wrap(n) for n in nets]
    eng = Engine(CHUNK, workers=1)
    wants = [ref_perturb(params(n), 20 + k, 1, 0.1) for k, n in enumerate(nets)]
    errors: list[str] = []

    def work(k: int) -> None:
        for _ in range(20):
            eng.perturb(reps[k], 20 + k, 1, 0.1)
            if not all(same_bits(p.detach(), wants[k][n]) for n, p in nets[k].named_parameters()):
                errors.append(f"replica {k}")
                return

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_zero_update_still_writes_the_base_into_the_working_weights() -> None:
    net = Net(torch.float16)
    base = params(net)
    rep, eng = Replica.wrap(net), Engine(CHUNK, workers=2)
    eng.perturb(rep, 1, 1, 0.1)
    eng.update([rep], np.array([1, 2]), np.ones(2, dtype=np.int8), np.zeros(2), 0.5)
    for n, p in net.named_parameters():
        assert same_bits(p.detach(), base[n]), n


def test_the_noise_pool_leaves_the_callers_thread_count_alone() -> None:
    before = torch.get_num_threads()
    net = Net(torch.float32)
    Engine(CHUNK, workers=2).perturb(Replica.wrap(net), 1, 1, 0.1)
    assert torch.get_num_threads() == before
