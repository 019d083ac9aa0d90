"""Gaussian noise keyed by (member seed, parameter name, element): the two noise schemes.

Nothing here depends on loop order, rank or shard: any process regenerates any member's noise for any
tensor slice from two numbers and a name.  (The paper's code reseeded every tensor with the member
seed alone, so same-shape tensors got identical noise.)  Member seeds come from seeds.py.

Two noise schemes (``es.noise_scheme``; the ledger attr ``noise_scheme`` records which one a run used, and a
ledger without it is ``legacy``):

* ``keyed`` (the default): eps of element i of tensor ``name`` for member seed s is a pure function of
  (s, name, i), the same bits for any chunking, any thread count and on CPU and CUDA.  A 64-bit counter
  hash (key(s, name) + (i+1)*golden, through a 64-bit finaliser with two multiplies) gives 64 random bits;
  the sign takes one, and 52 more give a tail probability p = r / 2**52 whose exponent (octave) and top six
  mantissa bits pick a cell of a quantile table of |x| = Phi^-1(1 - p/2) (64 cells per octave, 52 octaves,
  so |x| reaches 8.2).  The value is interpolated linearly in p inside the cell in 40-bit fixed point.
  Only integer operations, one exact int64 -> float64 conversion, an exact scaling by 2**-40 and one
  float64 -> float32 rounding are used (exact.keyed_transform): every one of them is exactly defined, so
  CPU vectorisation, CUDA kernels and compiled code (noise_kernels.py) give identical bits.  No log, cos
  or FMA is involved.
* ``legacy``: ``torch.randn`` from a generator reseeded per (seed, name, chunk index) of ``es.noise_chunk``
  elements: the bits depend on the chunk size and the device type (and on CUDA on the GPU model once a
  chunk is larger than ~220k elements).  Kept so that runs made with it resume and replay exactly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from statistics import NormalDist

import numpy as np
import torch

from hpc_es.exact import GAMMA, OCTAVES, SUB_BITS, counter_offsets, keyed_table, keyed_transform, s64
from hpc_es.noise_kernels import CPU_COMPILE_AFTER, DEVICE_BLOCK, NoiseKernels, compile_env, compile_wanted
from hpc_es.seeds import LEGACY_CHUNK, hash64

NOISE_SCHEMES = ("keyed", "legacy")
# es.noise_chunk=0 (the default): this size per device type.  On a GPU large pieces mean few, large kernel
# launches (a 7B model in 1M-element pieces is ~7k of them); the fp32 scratch is two pieces per thread.
DEVICE_CHUNK = {"cuda": 1 << 26}


def default_chunk(chunk: int, scheme: str, device_type: str) -> int:
    """``es.noise_chunk`` as set, or (0) its default: under ``legacy`` LEGACY_CHUNK whatever the device (the
    chunk is part of its trajectory), under ``keyed`` DEVICE_CHUNK's size for the device type (else 1M)."""
    if chunk:
        return chunk
    return LEGACY_CHUNK if scheme == "legacy" else DEVICE_CHUNK.get(device_type, LEGACY_CHUNK)


def chunks(numel: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, end) of the fixed-size chunks of a flattened tensor (under ``legacy`` the boundaries
    are part of the key; under ``keyed`` they only bound the scratch memory)."""
    for i, start in enumerate(range(0, numel, chunk)):
        yield i, start, min(start + chunk, numel)


# ---- legacy: torch.randn per chunk ----------------------------------------------------------------


def chunk_key(seed: int, name: str, chunk: int) -> int:
    """The generator seed of one chunk of one tensor's legacy noise."""
    return hash64("noise", int(seed), name, chunk)


class _WholeTensor:
    """``tensor``: a whole parameter's noise, filled chunk by chunk (tests, references, low-rank factors)."""

    chunk: int

    def fill(self, out: torch.Tensor, seed: int, name: str, start: int) -> torch.Tensor:
        raise NotImplementedError

    def tensor(self, seed: int, name: str, shape: torch.Size | tuple[int, ...],
               device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole fp32 noise tensor (for tests and references; the engine works chunk by chunk)."""
        numel = int(np.prod(shape)) if len(shape) else 1
        flat = torch.empty(numel, dtype=torch.float32, device=device)
        for _, s, e in chunks(numel, self.chunk):
            self.fill(flat[s:e], seed, name, s)
        return flat.view(shape)

    def stack(self, seeds: Sequence[int], name: str, shape: torch.Size | tuple[int, ...],
              device: torch.device | str = "cpu") -> torch.Tensor:
        """``tensor`` of every seed in ``seeds``, stacked: (len(seeds), *shape), the same bits."""
        return torch.stack([self.tensor(int(sd), name, shape, device) for sd in seeds])


class LegacyNoise(_WholeTensor):
    """Fills fp32 buffers with a chunk's noise, one torch.Generator per device and thread, reseeded per chunk.

    The stream is a function of the device type (CPU and CUDA generators differ), which the ledger records.
    Every chunk reseeds its generator, so threads may fill different chunks at once.
    """

    scheme = "legacy"

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

    def fill(self, out: torch.Tensor, seed: int, name: str, start: int) -> torch.Tensor:
        """The noise of elements start.. of ``name``; ``start`` must be a chunk boundary."""
        if start % self.chunk:
            raise ValueError(f"legacy noise starts at chunk boundaries (multiples of {self.chunk}), not {start}")
        g = self._gen(out.device)
        g.manual_seed(chunk_key(seed, name, start // self.chunk))
        return torch.randn(out.shape, generator=g, out=out, dtype=torch.float32, device=out.device)


# ---- keyed: counter hash + quantile table ---------------------------------------------------------


def keyed_table_float64() -> list[float]:
    """|x| = Phi^-1(1 - p/2) at the cell edges p = 2**(g-52) * (1 + j/64), g = 0..51, j = 0..63, then p = 1.

    Computed in float64; hpc_es/_noise_table.py ships these values rounded to 2**-40 as integers (so the
    table does not depend on the libm of the machine), and a test checks it against this function."""
    nd = NormalDist()
    out = []
    for g in range(OCTAVES):
        for j in range(1 << SUB_BITS):
            p = math.ldexp(1.0 + j / (1 << SUB_BITS), g - OCTAVES)
            out.append(-nd.inv_cdf(p / 2))
    out.append(0.0)
    return out


def noise_key(seed: int, name: str) -> int:
    """The 64-bit key of one member's noise for one tensor (the counter's offset)."""
    return hash64("keyed-noise", int(seed), name)


def counter_base(seed: int, name: str, start: int) -> int:
    """The counter of element ``start`` as a signed int64: key + (start + 1) * golden, mod 2**64."""
    return s64(noise_key(seed, name) + (start + 1) * GAMMA)


EAGER_BLOCK = {"cpu": 1 << 14}  # eager CPU blocks stay in cache
STACK_BLOCK = 1 << 20  # elements per eager pass of KeyedNoise.stack


class KeyedNoise(_WholeTensor):
    """The keyed scheme: eps(seed, name, i) for any slice, computed block by block, thread-safe.

    ``compile``: whether to run the checked compiled kernels of ``kernels`` (the process's by default);
    None: compile_wanted(device type), on the CPU only after CPU_COMPILE_AFTER eager elements."""

    scheme = "keyed"

    def __init__(self, chunk: int = 1 << 20, compile: bool | None = None, kernels: NoiseKernels | None = None) -> None:
        self.chunk = chunk  # only used by ``tensor``: the results do not depend on it
        self._compile = compile
        self.kernels = kernels if kernels is not None else NoiseKernels.shared()
        self._lock = threading.Lock()
        self._ramps: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._drawn: dict[str, int] = {}
        self._want: dict[str, bool] = {}
        self.stack_block = STACK_BLOCK

    def _data(self, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The eager counter offsets (at least ``n``) and the quantile table on ``device``."""
        with self._lock:
            ramp = self._ramps.get(device)
            if ramp is None or ramp.numel() < n:
                ramp = self._ramps[device] = counter_offsets(n, device)
            table = self._tables.get(device)
            if table is None:
                table = self._tables[device] = keyed_table(device)
        return ramp, *table

    def stack(self, seeds: Sequence[int], name: str, shape: torch.Size | tuple[int, ...],
              device: torch.device | str = "cpu") -> torch.Tensor:
        """Every seed's noise for ``name`` in one eager pass: (len(seeds), *shape), the bits of ``tensor``.

        Each element is the same integer function of its own counter, so computing many members' counters
        at once changes no bit; it spares one call per member (a low-rank pass draws small factors for
        every member and matrix)."""
        dev = torch.device(device)
        numel = int(np.prod(shape)) if len(shape) else 1
        ramp, cells, steps = self._data(dev, numel)
        out = torch.empty(len(seeds), numel, dtype=torch.float32, device=dev)
        step = max(1, self.stack_block // max(numel, 1))  # members per pass: bounded scratch memory
        for m0 in range(0, len(seeds), step):
            part = seeds[m0:m0 + step]
            base = torch.tensor([counter_base(int(sd), name, 0) for sd in part], dtype=torch.int64,
                                device=dev)  # the counter of element 0
            z = (ramp[None, :numel] + base[:, None]).view(-1)
            keyed_transform(z, cells, steps, out[m0:m0 + len(part)].view(-1))
        return out.view(len(seeds), *shape)

    def _wanted(self, kind: str) -> bool:
        want = self._want.get(kind)
        if want is None:
            want = self._want[kind] = self._compile if self._compile is not None else compile_wanted(kind)
        return want

    def fused_now(self, device: torch.device) -> bool:
        """Whether the compiled kernels are to be used on this device now (auto: on the CPU only after
        CPU_COMPILE_AFTER eager elements).  The compiled CPU kernels parallelise inside (OpenMP, torch's
        thread count where they are built), so the caller should then call them from one thread: on 2
        cores a 2-worker pool calling one-thread kernels ran no faster than one thread (the calls
        serialise), one caller with 2-thread kernels about twice as fast."""
        kind = device.type
        if not self._wanted(kind):
            return False
        auto = self._compile is None and compile_env() == "auto"
        return not (auto and kind == "cpu" and self._drawn.get(kind, 0) < CPU_COMPILE_AFTER)

    def _count(self, device: torch.device, n: int) -> None:
        if self._compile is None and device.type == "cpu":
            self._drawn[device.type] = self._drawn.get(device.type, 0) + n  # a race only delays the switch

    def fill(self, out: torch.Tensor, seed: int, name: str, start: int) -> torch.Tensor:
        """``out`` (fp32, contiguous, 1-D) <- eps of elements start .. start + out.numel() of ``name``."""
        dev, n = out.device, out.numel()
        key = noise_key(seed, name)
        if not (self.fused_now(dev) and self.kernels.fill(out, key, start)):
            block = EAGER_BLOCK.get(dev.type, DEVICE_BLOCK)
            ramp, cells, steps = self._data(dev, min(block, n))
            for s in range(0, n, block):
                m = min(block, n - s)
                keyed_transform(ramp[:m] + s64(key + (start + s + 1) * GAMMA), cells, steps, out[s:s + m])
        self._count(dev, n)
        return out

    # The fused ops: the same bits as the eager ops of exact.py, fewer passes over memory.  Each returns
    # False, with nothing written, where no checked kernel is in use; the caller then runs the eager ops.

    def perturb(self, out: torch.Tensor, master: torch.Tensor, seed: int, name: str, start: int,
                scale: float) -> bool:
        """out <- round(master + scale*eps(seed, name, start..)) (``out``, ``master``: 1-D, one device)."""
        if not self.kernels.perturb(out, master, noise_key(seed, name), start, scale):
            return False
        self._count(out.device, out.numel())
        return True

    def accumulate(self, acc: torch.Tensor, terms: list[tuple[int, float]], name: str, start: int) -> bool:
        """acc <- acc + c*eps(seed, name, start..) for each (seed, c) of ``terms`` in order (``acc``: fp32)."""
        if not self.kernels.accumulate(acc, [(noise_key(seed, name), c) for seed, c in terms], start):
            return False
        self._count(acc.device, acc.numel() * len(terms))
        return True

    def apply(self, acc: torch.Tensor, scale: float, master: torch.Tensor, out: torch.Tensor) -> bool:
        """master <- round(master + scale*acc) and out <- round(new master).  (Not noise, but the same
        compiled-and-checked machinery, used where the noise is.)"""
        return self.kernels.apply(acc, scale, master, out)


NoiseSource = KeyedNoise | LegacyNoise


def noise_source(scheme: str, chunk: int) -> NoiseSource:
    """The noise of ``scheme`` (see NOISE_SCHEMES) with pieces of ``chunk`` elements (0: the default)."""
    if scheme == "keyed":
        return KeyedNoise(default_chunk(chunk, scheme, "cpu"))
    if scheme == "legacy":
        return LegacyNoise(default_chunk(chunk, scheme, "cpu"))
    raise ValueError(f"unknown noise scheme {scheme!r} (one of {', '.join(NOISE_SCHEMES)})")
