"""Seed table and legacy noise: pure functions of (run seed, iteration) and (member seed, name, chunk).

The keyed scheme (the default) is tested in test_noise_keyed.py."""

from __future__ import annotations

import numpy as np
import torch

from hpc_es.noise import LegacyNoise as NoiseSource
from hpc_es.noise import chunk_key, chunks
from hpc_es.seeds import member_seeds


def test_seed_table_is_a_pure_function_of_seed_and_iteration() -> None:
    a, sa = member_seeds(7, 3, 6)
    b, sb = member_seeds(7, 3, 6)
    assert a.dtype == np.int64 and np.array_equal(a, b) and np.array_equal(sa, sb)
    assert len(set(a.tolist())) == 6 and (a >= 0).all()
    assert not np.array_equal(a, member_seeds(7, 4, 6)[0])
    assert not np.array_equal(a, member_seeds(8, 3, 6)[0])
    # A larger population extends the table without changing the first members.
    assert np.array_equal(member_seeds(7, 3, 8)[0][:6], a)


def test_antithetic_pairs_share_a_seed_with_opposite_signs() -> None:
    seeds, signs = member_seeds(1, 0, 6, antithetic=True)
    assert np.array_equal(seeds[0::2], seeds[1::2])
    assert signs.tolist() == [1, -1, 1, -1, 1, -1]
    assert len(set(seeds.tolist())) == 3


def test_same_shape_tensors_get_independent_noise() -> None:
    ns = NoiseSource(1024)
    a = ns.tensor(42, "layers.0.q.weight", (16, 16))
    b = ns.tensor(42, "layers.1.q.weight", (16, 16))
    assert not torch.equal(a, b)
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.2


def test_noise_is_independent_of_generation_order_and_chunk_slicing() -> None:
    ns = NoiseSource(1024)
    names = [f"p{i}" for i in range(5)]
    forward = {n: ns.tensor(9, n, (40, 70)) for n in names}
    backward = {n: ns.tensor(9, n, (40, 70)) for n in reversed(names)}
    for n in names:
        assert torch.equal(forward[n], backward[n])
    # A shard that generates only its own chunk gets exactly the slice of the whole tensor.
    flat = forward["p3"].flatten()
    idx, s, e = list(chunks(flat.numel(), 1024))[2]
    part = torch.empty(e - s)
    ns.fill(part, 9, "p3", s)
    assert torch.equal(part, flat[s:e])
    assert idx == 2 and s == 2048


def test_noise_is_standard_normal_fp32() -> None:
    x = NoiseSource(1 << 16).tensor(3, "w", (200_000,))
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


def test_chunk_keys_differ_by_every_component() -> None:
    k = chunk_key(1, "a", 0)
    assert len({k, chunk_key(2, "a", 0), chunk_key(1, "b", 0), chunk_key(1, "a", 1)}) == 4
    assert 0 <= k < 2**63
