"""Seed table and Gaussian noise keyed by (member seed, parameter name, chunk).

Nothing here depends on loop order, rank or shard: any process regenerates any member's noise for any
tensor slice from three numbers and a name.  (The paper's code reseeded every tensor with the member
seed alone, so same-shape tensors got identical noise.)
"""

from __future__ import annotations

import hashlib
import threading
from typing import Iterator

import numpy as np
import torch

_MASK63 = (1 << 63) - 1


def _hash64(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK63


def member_seeds(run_seed: int, iteration: int, n: int, antithetic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Seeds (int64) and signs (+1/-1) of iteration ``iteration``'s ``n`` members: a pure function.

    Antithetic members 2k and 2k+1 share a seed with signs +1 and -1.
    """
    if antithetic:
        base = [_hash64("member", run_seed, iteration, k) for k in range(n // 2)]
        seeds = np.repeat(np.array(base, dtype=np.int64), 2)
        signs = np.tile(np.array([1, -1], dtype=np.int8), n // 2)
    else:
        seeds = np.array([_hash64("member", run_seed, iteration, k) for k in range(n)], dtype=np.int64)
        signs = np.ones(n, dtype=np.int8)
    return seeds, signs


def chunk_key(seed: int, name: str, chunk: int) -> int:
    """The generator seed of one chunk of one tensor's noise."""
    return _hash64("noise", int(seed), name, chunk)


def chunks(numel: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, end) of the fixed-size chunks of a flattened tensor; the boundaries are part of the key."""
    for i, start in enumerate(range(0, numel, chunk)):
        yield i, start, min(start + chunk, numel)


class NoiseSource:
    """Fills fp32 buffers with a chunk's noise, one torch.Generator per device and thread, reseeded per chunk.

    Noise is drawn in fp32 on the tensor's device; the stream is a function of the device type
    (CPU and CUDA generators differ), which the ledger records.  Every chunk reseeds its generator, so a
    generator carries nothing from one chunk to the next: threads may fill different chunks at once.
    """

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self._local = threading.local()

    def _gen(self, device: torch.device) -> torch.Generator:
        gens = getattr(self._local, "gens", None)
        if gens is None:
            gens = self._local.gens = {}
        g = gens.get(device)
        if g is None:
            g = gens[device] = torch.Generator(device=device)
        return g

    def fill(self, out: torch.Tensor, seed: int, name: str, chunk_index: int) -> torch.Tensor:
        g = self._gen(out.device)
        g.manual_seed(chunk_key(seed, name, chunk_index))
        return torch.randn(out.shape, generator=g, out=out, dtype=torch.float32, device=out.device)

    def tensor(self, seed: int, name: str, shape: torch.Size | tuple[int, ...],
               device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole fp32 noise tensor (for tests and references; the engine works chunk by chunk)."""
        numel = int(np.prod(shape)) if len(shape) else 1
        flat = torch.empty(numel, dtype=torch.float32, device=device)
        for i, s, e in chunks(numel, self.chunk):
            self.fill(flat[s:e], seed, name, i)
        return flat.view(shape)
