"""The keyed noise scheme: eps(seed, name, i) is a pure function, whatever the chunking, threads or offsets,
and is standard normal (moments, a KS test, no correlation between neighbours, tensors or members).

Golden vectors (tests/golden/noise_vectors.json) pin the bits of both schemes; a missing file fails unless
HPC_ES_UPDATE_GOLDEN=1 (which rewrites it).  The legacy vector was written by the code before the keyed
scheme existed.  HPC_ES_TEST_COMPILE=1 also checks the torch.compile'd path (slow: it compiles).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_es import exact
from hpc_es import noise as N
from hpc_es._noise_table import QUANTILES
from hpc_es.noise import KeyedNoise, LegacyNoise, noise_source

GOLDEN = Path(__file__).parent / "golden" / "noise_vectors.json"
UPDATE = os.environ.get("HPC_ES_UPDATE_GOLDEN") == "1"
SEED, NAME = 1234567890123, "model.layers.0.mlp.down_proj.weight"
STARTS = (0, 1_000_003, 3 * 2**32 + 5)  # the last: past any 32-bit counter


def keyed(seed: int, name: str, start: int, n: int) -> torch.Tensor:
    return KeyedNoise(compile=False).fill(torch.empty(n), seed, name, start)


def bits(x: torch.Tensor) -> list[int]:
    return x.contiguous().view(torch.int32).tolist()


def test_golden_vectors_pin_the_bits_of_both_schemes() -> None:
    got = {"keyed": {str(s): bits(keyed(SEED, NAME, s, 24)) for s in STARTS},
           "legacy": {"chunk=1024": bits(LegacyNoise(1024).tensor(SEED, NAME, (3000,))[1000:1100:4])}}
    if UPDATE:
        GOLDEN.write_text(json.dumps({"seed": SEED, "name": NAME, **got}, indent=1) + "\n")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; HPC_ES_UPDATE_GOLDEN=1 writes it"
    want = json.loads(GOLDEN.read_text())
    assert (want["seed"], want["name"]) == (SEED, NAME)
    assert got["keyed"] == want["keyed"], "the keyed noise bits changed"
    assert got["legacy"] == want["legacy"], "the legacy noise bits changed: legacy runs would no longer replay"


def test_any_chunking_and_any_offset_give_the_same_bits() -> None:
    whole = KeyedNoise(1 << 20, compile=False).tensor(7, "w", (123_457,)).flatten()
    for chunk in (1024, 1031, 8192, 50_000, 1 << 17):
        assert torch.equal(KeyedNoise(chunk, compile=False).tensor(7, "w", (123_457,)).flatten(), whole), chunk
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = int(rng.integers(0, whole.numel() - 1))
        e = int(rng.integers(s + 1, min(whole.numel(), s + 40_000) + 1))
        assert torch.equal(keyed(7, "w", s, e - s), whole[s:e]), (s, e)
    # far offsets: element 2**40 + k is the same whether the slice starts before or at it
    far = keyed(7, "w", 2**40 - 3, 20)
    assert torch.equal(far[3:], keyed(7, "w", 2**40, 17))


def test_identical_across_threads() -> None:
    n, piece = 200_000, 7_919
    want = keyed(11, "layers.3.w", 0, n)
    out = torch.empty(n)
    ns = KeyedNoise(compile=False)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: ns.fill(out[s:s + piece], 11, "layers.3.w", s), range(0, n, piece)))
    assert torch.equal(out, want)


def test_noise_source_by_scheme_name() -> None:
    assert isinstance(noise_source("keyed", 64), KeyedNoise)
    assert isinstance(noise_source("legacy", 64), LegacyNoise)
    with pytest.raises(ValueError, match="unknown noise scheme 'philox'"):
        noise_source("philox", 64)
    with pytest.raises(ValueError, match="chunk boundaries"):
        LegacyNoise(1024).fill(torch.empty(10), 1, "w", 5)


def test_the_shipped_table_is_the_float64_quantiles_rounded() -> None:
    ref = N.keyed_table_float64()
    assert len(QUANTILES) == len(ref) == exact.OCTAVES * 2**exact.SUB_BITS + 1
    assert all(abs(q - x * 2**exact.FRAC_BITS) <= 0.5 + 1e-3 for q, x in zip(QUANTILES, ref))
    assert all(a > b for a, b in itertools.pairwise(QUANTILES))  # |x| falls as the tail probability grows
    assert QUANTILES[-1] == 0


def test_the_transform_is_the_tail_quantile_of_its_bits() -> None:
    """Counters whose hash lands on a table edge give that quantile exactly (checked on the hash itself)."""
    z = torch.arange(1, 4097, dtype=torch.int64) * 0x2545F4914F6CDD1D
    x = N.keyed_transform(z.clone(), *exact.keyed_table(torch.device("cpu"))).double()
    h = z.clone()  # the same hash, by Python integers: logical shifts and wrapping products spelled out
    m64 = (1 << 64) - 1
    for k in range(0, 4096, 37):
        v = int(h[k]) & m64
        v ^= v >> 30
        v = (v * exact.MUL1) & m64
        v ^= v >> 27
        v = (v * exact.MUL2) & m64
        v ^= v >> 31
        r = v & ((1 << 52) - 1)
        p = max(r, 1) / 2**52
        mag = -N.NormalDist().inv_cdf(p / 2)
        want = -mag if v >> 63 else mag
        assert abs(float(x[k]) - want) < 2e-5, (k, float(x[k]), want)  # linear in p inside a 1/64-octave cell


def _moments(x: np.ndarray) -> tuple[float, float, float, float]:
    m = x.mean()
    c = x - m
    var = (c * c).mean()
    return m, var, (c**3).mean() / var**1.5, (c**4).mean() / var**2 - 3.0


def _ks_normal(x: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of the sample to N(0, 1) (scipy when present, else by hand)."""
    try:
        from scipy import stats  # type: ignore[import-untyped]

        return float(stats.kstest(x, "norm").statistic)
    except ImportError:
        s = np.sort(x)
        cdf = 0.5 * (1.0 + torch.special.erf(torch.from_numpy(s) / math.sqrt(2.0)).numpy())
        n = len(s)
        i = np.arange(1, n + 1)
        return float(max((i / n - cdf).max(), (cdf - (i - 1) / n).max()))


def test_standard_normal_moments_and_ks() -> None:
    n = 1 << 20
    x = keyed(3, "w", 0, n).double().numpy()
    m, var, skew, kurt = _moments(x)
    # five standard errors of each estimate at n = 2**20
    assert abs(m) < 5 / math.sqrt(n)
    assert abs(var - 1) < 5 * math.sqrt(2 / n)
    assert abs(skew) < 5 * math.sqrt(6 / n)
    assert abs(kurt) < 5 * math.sqrt(24 / n)
    assert _ks_normal(x) < 1.95 / math.sqrt(n)  # the 0.1 % critical value
    assert np.abs(x).max() > 4.0  # the tails are there
    assert x.dtype == np.float64 and keyed(3, "w", 0, 4).dtype == torch.float32


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_no_correlation_between_neighbours_tensors_members() -> None:
    n = 1 << 19
    bound = 5 / math.sqrt(n)
    a = keyed(5, "layers.0.q.weight", 0, n)
    for lag in (1, 2, 3, 64, 4096):
        assert abs(_corr(a[:-lag], a[lag:])) < bound, lag
    assert abs(_corr(a[0::2], a[1::2])) < 5 / math.sqrt(n // 2)
    b = keyed(5, "layers.1.q.weight", 0, n)  # same seed and shape, another tensor
    c = keyed(6, "layers.0.q.weight", 0, n)  # another member
    d = keyed(5 + 2**32, "layers.0.q.weight", 0, n)  # seeds that differ only in high bits
    for other in (b, c, d):
        assert abs(_corr(a, other)) < bound
        for lag in (1, 7, 1000):  # no member is a shifted copy of another
            assert abs(_corr(a[:-lag], other[lag:])) < bound
            assert abs(_corr(a[lag:], other[:-lag])) < bound
    # sign and magnitude are independent bits: |x| of positive and negative values look alike
    pos, neg = a[a > 0], -a[a < 0]
    assert abs(float(pos.double().mean() - neg.double().mean())) < 5 * math.sqrt(2 * 0.36 / (n / 2))


@pytest.mark.skipif(os.environ.get("HPC_ES_TEST_COMPILE") != "1", reason="compiles (slow); HPC_ES_TEST_COMPILE=1")
def test_compiled_path_gives_the_eager_bits() -> None:
    n = (1 << 17) + 12_345  # whole compiled blocks and an eager tail
    got = KeyedNoise(compile=True).fill(torch.empty(n), 9, "w", 77)
    assert torch.equal(got, keyed(9, "w", 77, n))
