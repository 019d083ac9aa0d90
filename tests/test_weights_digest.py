"""The cross-rank weight check's digest: exact integer arithmetic, so the same on any device and for any
chunking, and it sees a one-ulp change anywhere."""

from __future__ import annotations

import pytest
import torch

from hpc_es.models import _M1, _M2, _M3, _mix_sum, tensor_digest, weights_digest


def _wrap64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >> 63 else x


def reference_mix_sum(words: list[int], start: int) -> int:
    """The digest's arithmetic in Python integers, reduced mod 2**64 after every step."""
    total = 0
    for i, w in enumerate(words):
        x = _wrap64(w * _M1 + (start + i + 1) * _M2)
        x = _wrap64(x ^ ((x >> 31) & 0x1FFFFFFFF))
        x = _wrap64(x * _M3)
        x = _wrap64(x ^ ((x >> 29) & 0x7FFFFFFFF))
        x = _wrap64(x * _M1)
        x = _wrap64(x ^ ((x >> 32) & 0xFFFFFFFF))
        total = _wrap64(total + x)
    return total


@pytest.mark.parametrize("dtype, view", [(torch.float32, torch.int32), (torch.bfloat16, torch.int16),
                                         (torch.float16, torch.int16)])
def test_torch_wrapping_arithmetic_is_the_python_reference(dtype: torch.dtype, view: torch.dtype) -> None:
    t = (torch.randn(777, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    words = t.view(view)
    assert int(_mix_sum(words, 12345)) == reference_mix_sum(words.tolist(), 12345)


_INTS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_ulp_anywhere_changes_the_digest(dtype: torch.dtype) -> None:
    t = torch.randn(4099, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = tensor_digest(t)
    seen = {want}
    for i in (0, 1, 2047, 4098):
        for step in (1, -1):
            u = t.clone()
            u.view(_INTS[dtype])[i] += step  # the neighbouring value, one ulp away
            assert not torch.equal(u, t) and torch.isfinite(u).all()
            d = tensor_digest(u)
            assert d not in seen, (i, step)
            seen.add(d)
    assert tensor_digest(t.clone()) == want  # deterministic


def test_swapped_elements_and_negative_zero_change_the_digest() -> None:
    t = torch.arange(1, 101, dtype=torch.float32)
    u = t.clone()
    u[[3, 70]] = u[[70, 3]]
    assert tensor_digest(u) != tensor_digest(t)
    z = torch.zeros(8)
    nz = z.clone()
    nz[5] = -0.0
    assert tensor_digest(nz) != tensor_digest(z)  # bits, not values


def test_digest_does_not_depend_on_the_chunking() -> None:
    t = torch.randn(10_007, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert len({tensor_digest(t, c) for c in (1, 100, 4096, 10_007, 1 << 24)}) == 1


def test_weights_digest_covers_names_dtypes_and_shapes() -> None:
    a = torch.zeros(6)
    base = weights_digest([("w", a)])
    assert weights_digest([("w", a.clone())]) == base
    assert weights_digest([("v", a)]) != base
    assert weights_digest([("w", a.view(2, 3))]) != base
    assert weights_digest([("w", a.double())]) != base
    assert weights_digest([("w", a), ("x", torch.ones(1))]) != base
