"""Seed table and Gaussian noise keyed by (member seed, parameter name, element).

Nothing here depends on loop order, rank or shard: any process regenerates any member's noise for any
tensor slice from two numbers and a name.  (The paper's code reseeded every tensor with the member
seed alone, so same-shape tensors got identical noise.)

Two noise schemes (``es.noise_scheme``; the ledger attr ``noise_scheme`` records which one a run used, and a
ledger without it is ``legacy``):

* ``keyed`` (the default): eps of element i of tensor ``name`` for member seed s is a pure function of
  (s, name, i), the same bits for any chunking, any thread count and on CPU and CUDA.  A 64-bit counter
  hash (key(s, name) + (i+1)*golden, through a 64-bit finaliser with two multiplies) gives 64 random bits;
  the sign takes one, and 52 more give a tail probability p = r / 2**52 whose exponent (octave) and top six
  mantissa bits pick a cell of a quantile table of |x| = Phi^-1(1 - p/2) (64 cells per octave, 52 octaves,
  so |x| reaches 8.2).  The value is interpolated linearly in p inside the cell in 40-bit fixed point.
  Only integer operations, one exact int64 -> float64 conversion, an exact scaling by 2**-40 and one
  float64 -> float32 rounding are used: every one of them is exactly defined, so CPU vectorisation, CUDA
  kernels and compiled (fused) code give identical bits.  No log, cos or FMA is involved.
* ``legacy``: ``torch.randn`` from a generator reseeded per (seed, name, chunk index) of ``es.noise_chunk``
  elements: the bits depend on the chunk size and the device type (and on CUDA on the GPU model once a
  chunk is larger than ~220k elements).  Kept so that runs made with it resume and replay exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

_MASK63 = (1 << 63) - 1
NOISE_SCHEMES = ("keyed", "legacy")


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


def chunks(numel: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, end) of the fixed-size chunks of a flattened tensor (under ``legacy`` the boundaries
    are part of the key; under ``keyed`` they only bound the scratch memory)."""
    for i, start in enumerate(range(0, numel, chunk)):
        yield i, start, min(start + chunk, numel)


def trajectory_keys(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The noise settings that define a run's trajectory, from a config dict (as stored in a ledger).

    A config written before ``es.noise_scheme`` existed used the legacy scheme.  Under ``keyed`` the chunk
    size changes no result, so it is no part of the trajectory."""
    es = cfg_dict.get("es", {})
    scheme = es.get("noise_scheme", "legacy")
    return {"es.noise_scheme": scheme, "es.noise_chunk": es.get("noise_chunk") if scheme == "legacy" else None}


def scheme_of(attrs: dict[str, Any]) -> str:
    """The noise scheme a ledger's attrs record (none recorded: a run from before the keyed scheme)."""
    return str(attrs.get("noise_scheme", "legacy"))


# ---- legacy: torch.randn per chunk ----------------------------------------------------------------


def chunk_key(seed: int, name: str, chunk: int) -> int:
    """The generator seed of one chunk of one tensor's legacy noise."""
    return _hash64("noise", int(seed), name, chunk)


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

SUB_BITS = 6  # 2**6 table cells per octave of the tail probability
OCTAVES = 52  # r = 52 random bits: p = r / 2**52, octave g holds p in [2**(g-52), 2**(g-51))
T_BITS = 28  # bits of the interpolation fraction inside a cell
FRAC_BITS = 40  # table values are |x| * 2**40, rounded to integers
_GAMMA = 0x9E3779B97F4A7C15  # the counter step: 2**64 / golden ratio, odd
_MUL1 = 0xBF58476D1CE4E5B9  # the finaliser's multipliers (Stafford's mix 13)
_MUL2 = 0x94D049BB133111EB


def _s64(v: int) -> int:
    """``v`` mod 2**64 as a signed int64 (torch's int64 arithmetic wraps the same way)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _lo(bits: int) -> int:
    return (1 << bits) - 1


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
    return _hash64("keyed-noise", int(seed), name)


def counter_base(seed: int, name: str, start: int) -> int:
    """The counter of element ``start`` as a signed int64: key + (start + 1) * golden, mod 2**64."""
    return _s64(noise_key(seed, name) + (start + 1) * _GAMMA)


def keyed_transform(z: torch.Tensor, cells: torch.Tensor, steps: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 standard normals from int64 counters ``z`` (consumed): hash, then the table lookup.

    ``cells``/``steps`` are the table's values and differences (int64, on z's device).  Signed int64
    right shifts are arithmetic, so every logical shift is masked; multiplications wrap mod 2**64.
    In-place steps on fresh intermediates only (they spare allocations; torch.compile accepts them)."""
    z ^= (z >> 30).bitwise_and_(_lo(34))
    z *= _s64(_MUL1)
    z ^= (z >> 27).bitwise_and_(_lo(37))
    z *= _s64(_MUL2)
    z ^= (z >> 31).bitwise_and_(_lo(33))
    # 52 bits -> float64 exactly; its exponent is the octave, the top mantissa bits the cell.
    bits = (z & _lo(OCTAVES)).to(torch.float64).view(torch.int64)
    idx = (bits >> (52 - SUB_BITS)).sub_(1023 * (1 << SUB_BITS)).clamp_(min=0)  # r = 0 -> the deepest cell
    t = (bits >> (52 - SUB_BITS - T_BITS)).bitwise_and_(_lo(T_BITS))
    x = torch.index_select(steps, 0, idx).mul_(t)  # |steps| < 2**35, t < 2**28: no overflow
    x >>= T_BITS
    x += torch.index_select(cells, 0, idx)
    sign = z >> 63  # 0 or -1 from the top bit, which nothing above used
    x ^= sign
    x -= sign
    scaled = x.to(torch.float64).mul_(2.0 ** -FRAC_BITS)  # exact, exact; then one rounding to fp32
    if out is None:
        return scaled.to(torch.float32)
    return out.copy_(scaled)


def _compiled_block(ramp: torch.Tensor, z0: torch.Tensor, cells: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One block from counter z0 (a 0-d int64 tensor) and the counter offsets ``ramp``: what torch.compile
    fuses.  (The offsets come in as a tensor: an in-kernel ``arange * golden`` miscompiled on the CPU with
    torch 2.13, and the bit-for-bit check in KeyedNoise._build caught it.)"""
    return keyed_transform(ramp + z0, cells, steps)


def _perturb_block(ramp: torch.Tensor, z0: torch.Tensor, cells: torch.Tensor, steps: torch.Tensor,
                   scale: torch.Tensor, master: torch.Tensor, out: torch.Tensor) -> None:
    """out <- round(master + scale*eps) in one pass (Engine.perturb's eager ops, fused): the fp32 product,
    the fp32 sum and the rounding to out's dtype are three separately rounded steps, as eager.  ``scale``
    is a 0-d fp32 tensor (eager multiplies by the Python float rounded to fp32: the same operand)."""
    out.copy_(keyed_transform(ramp + z0, cells, steps) * scale + master)


def _accumulate_block(ramp: torch.Tensor, z0s: torch.Tensor, cells: torch.Tensor, steps: torch.Tensor,
                      coefs: torch.Tensor, acc: torch.Tensor) -> None:
    """acc <- acc + c_k*eps_k for each term k in order, one pass over acc for several terms: each
    product and each sum rounded to fp32 as Engine.update's eager ``acc.add_(eps.mul_(c))``."""
    total = acc
    for k in range(z0s.shape[0]):  # the term count is a guard: one graph per count
        total = total + keyed_transform(ramp + z0s[k], cells, steps) * coefs[k]
    acc.copy_(total)


def _apply_block(acc: torch.Tensor, scale: torch.Tensor, master: torch.Tensor, out: torch.Tensor) -> None:
    """master <- round(master + acc*scale), out <- round(new master) in one pass: Engine.update's eager
    ``acc.mul_(scale)``, ``master.add_(acc)`` (fp32 sum, one rounding to the master's dtype) and the copy
    into the working weights, each step rounded as there.  ``scale``: a 0-d fp32 tensor."""
    new = (acc * scale + master).to(master.dtype)
    master.copy_(new)
    out.copy_(new)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_TABLES_LOCK = threading.Lock()


def _table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with _TABLES_LOCK:
        t = _TABLES.get(device)
        if t is None:
            from hpc_es._noise_table import QUANTILES

            q = torch.tensor(QUANTILES, dtype=torch.int64)
            steps = q[1:] - q[:-1]
            assert int(steps.abs().max()) < 1 << (63 - T_BITS)
            t = _TABLES[device] = (q[:-1].contiguous().to(device), steps.to(device))
        return t


def _compile_env() -> str:
    return os.environ.get("HPC_ES_NOISE_COMPILE", "auto").strip().lower()


def compile_wanted(device_type: str) -> bool:
    """Whether the keyed noise runs as one torch.compile'd kernel (the bits are the same either way).

    HPC_ES_NOISE_COMPILE=1/0 forces it; unset, CUDA compiles when Triton is importable and the CPU when
    a C++ compiler is on PATH and the process has drawn enough noise for the compile time to pay off."""
    env = _compile_env()
    if env in ("0", "off", "false", "no"):
        return False
    if env in ("1", "on", "true", "yes"):
        return True
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device_type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    return False


# Eager CPU blocks stay in cache; compiled blocks are larger (one call's overhead over more elements).
_EAGER_BLOCK = {"cpu": 1 << 14}
_COMPILED_BLOCK = {"cpu": 1 << 16}
_DEFAULT_BLOCK = 1 << 24
# The fused kernels keep no block-sized temporaries, so their blocks are whole CPU chunks: a call's Python
# overhead is then negligible (at 2**16 it cost a third of the perturb on a 2-core machine).
_FUSED_BLOCK = {"cpu": 1 << 20}
_STACK_BLOCK = 1 << 20  # elements per eager pass of KeyedNoise.stack
_MIN_COMPILED = 16  # smaller fills stay eager (sizes 0 and 1 would make the dynamic kernel recompile)
# Under auto, the CPU compiles only after this many eager elements (~10-60 s of eager work, more than the
# compile takes), so short CPU runs (the demo, the tests) never pay for a compile.
CPU_COMPILE_AFTER = 1 << 30


# One compiled kernel per device type and process, shared by every KeyedNoise (each torch.compile wrapper of
# the same function would trace it again, and past dynamo's recompile limit it silently runs uncompiled).
_KERNELS: dict[str, Callable[..., torch.Tensor] | None] = {}
_KERNELS_LOCK = threading.Lock()


def _build_kernel(device: torch.device, ramp: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """torch.compile of the block function, checked bit for bit against the eager path first.

    Both compute the same exactly defined integer and rounding steps, so they agree by construction; the
    check guards against a compiler bug (a wrong kernel is refused with a warning and the eager path kept)."""
    fn = torch.compile(_compiled_block, dynamic=True)
    cells, steps = _table(device)
    for base, m in ((0, ramp.numel()), (_s64(0x5DEECE66D << 30 | 7), min(ramp.numel(), 4099))):
        z0 = torch.tensor(base, dtype=torch.int64, device=device)
        if not torch.equal(fn(ramp[:m], z0, cells, steps), keyed_transform(ramp[:m] + z0, cells, steps)):
            warnings.warn(f"hpc_es: torch.compile gives other keyed noise bits than eager on {device.type}; "
                          "using the eager path", RuntimeWarning, stacklevel=2)
            return None
    return fn


# The fused kernels must round every step as eager does: no contraction of a*b + c into a fused multiply-add.
# Inductor's C++ code is built with -ffp-contract=off by default (forced here against the environment
# variable); Triton contracts unless fp fusion is off, which emulate_precision_casts does.  The check at
# build time (_check_fused) would catch a contraction: random masters and accumulators, several scales.
_NO_CONTRACT: dict[str, str | int | bool | Callable[..., Any]] = {
    "cpp.enable_floating_point_contract_flag": "off", "emulate_precision_casts": True}
FUSED_TERMS = 4  # update terms folded into the accumulator per pass over it (one compiled graph per count)
_FUSED_FNS: dict[str, Callable[..., None]] = {}
_FUSED: dict[tuple[object, ...], Callable[..., None] | None] = {}


def _fused_fn(op: str) -> Callable[..., None]:
    """The process's torch.compile wrapper of one fused op (dtypes and term counts are guards inside it)."""
    fn = _FUSED_FNS.get(op)
    if fn is None:
        bodies: dict[str, Callable[..., None]] = {"perturb": _perturb_block, "accumulate": _accumulate_block,
                                                  "apply": _apply_block}
        body = bodies[op]
        fn = _FUSED_FNS[op] = torch.compile(body, dynamic=True, options=_NO_CONTRACT)
    return fn


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _perturb_eager(z: torch.Tensor, cells: torch.Tensor, steps: torch.Tensor, scale: float,
                   master: torch.Tensor, out: torch.Tensor) -> None:
    """Engine.perturb's eager arithmetic on counters ``z``: what the fused kernel must reproduce."""
    torch.add(keyed_transform(z, cells, steps).mul_(scale), master, out=out)


def _accumulate_eager(ramp: torch.Tensor, z0s: list[int], cells: torch.Tensor, steps: torch.Tensor,
                      coefs: list[float], acc: torch.Tensor) -> None:
    """Engine.update's eager arithmetic, term by term: what the fused kernel must reproduce."""
    for z0, c in zip(z0s, coefs):
        acc.add_(keyed_transform(ramp + z0, cells, steps).mul_(c))


def _apply_eager(acc: torch.Tensor, scale: float, master: torch.Tensor, out: torch.Tensor) -> None:
    """Engine.update's eager arithmetic after the sum (acc is consumed): what the fused kernel must reproduce."""
    master.add_(acc.mul_(scale))
    out.copy_(master)


def _check_fused(op: str, device: torch.device, ramp: torch.Tensor, variant: Any) -> bool:
    """The compiled op against the eager ops, bit for bit, on data that would show a contracted FMA or any
    other change of rounding: random masters/accumulators of several magnitudes, several scales and
    coefficients, a whole block and an odd length."""
    fn = _fused_fn(op)
    cells, steps = _table(device)
    g = torch.Generator().manual_seed(20261130)

    def rand(m: int) -> torch.Tensor:
        mag = torch.pow(10.0, torch.randint(-4, 2, (m,), generator=g).float())
        return (torch.randn(m, generator=g) * mag).to(device)

    for base, m in ((0, ramp.numel()), (_s64(0x5DEECE66D << 30 | 7), min(ramp.numel(), 4099))):
        r = ramp[:m]
        if op == "perturb":
            out_dtype, master_dtype = variant
            master = rand(m).to(master_dtype)
            z0 = torch.tensor(base, dtype=torch.int64, device=device)
            for scale in (1e-3, -1e-3, 0.3721, -2.5e-5, 3.0):
                got = torch.empty(m, dtype=out_dtype, device=device)
                fn(r, z0, cells, steps, torch.tensor(scale, dtype=torch.float32, device=device), master, got)
                want = torch.empty_like(got)
                _perturb_eager(r + base, cells, steps, scale, master, want)
                if not _same_bits(got, want):
                    return False
        elif op == "apply":
            master_dtype, out_dtype = variant
            master = rand(m).to(master_dtype)
            for scale in (5e-4 / 30, -0.0371, 1.7):
                acc = rand(m) * 3.0
                got_m, want_m = master.clone(), master.clone()
                got = torch.empty(m, dtype=out_dtype, device=device)
                want = torch.empty_like(got)
                fn(acc, torch.tensor(scale, dtype=torch.float32, device=device), got_m, got)
                _apply_eager(acc.clone(), scale, want_m, want)
                if not (_same_bits(got_m, want_m) and _same_bits(got, want)):
                    return False
        else:
            k = int(variant)
            z0s = [_s64(base + 0x1234567 * (j + 1) * _GAMMA) for j in range(k)]
            coefs = [float(c) for c in torch.randn(k, generator=g) * 2.0]
            acc = rand(m) * 3.0
            got, want = acc.clone(), acc.clone()
            fn(r, torch.tensor(z0s, dtype=torch.int64, device=device), cells, steps,
               torch.tensor(coefs, dtype=torch.float32, device=device), got)
            _accumulate_eager(r, z0s, cells, steps, coefs, want)
            if not _same_bits(got, want):
                return False
    return True


class KeyedNoise(_WholeTensor):
    """The keyed scheme: eps(seed, name, i) for any slice, computed block by block, thread-safe."""

    scheme = "keyed"

    def __init__(self, chunk: int = 1 << 20, compile: bool | None = None) -> None:
        self.chunk = chunk  # only used by ``tensor``: the results do not depend on it
        self._compile = compile  # None: compile_wanted(device type)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._drawn: dict[str, int] = {}
        self._want: dict[str, bool] = {}

    def _counters(self, device: torch.device, n: int) -> torch.Tensor:
        """i * golden for i < n (mod 2**64), cached per thread and device: the eager counter offsets."""
        cache = getattr(self._local, "steps", None)
        if cache is None:
            cache = self._local.steps = {}
        c = cache.get(device)
        if c is None or c.numel() < n:
            ramp = (np.arange(n, dtype=np.uint64) * np.uint64(_GAMMA)).view(np.int64)
            c = cache[device] = torch.from_numpy(ramp).to(device)
        return c[:n]

    def stack(self, seeds: Sequence[int], name: str, shape: torch.Size | tuple[int, ...],
              device: torch.device | str = "cpu") -> torch.Tensor:
        """Every seed's noise for ``name`` in one eager pass: (len(seeds), *shape), the bits of ``tensor``.

        Each element is the same integer function of its own counter, so computing many members' counters
        at once changes no bit; it spares one call per member (a low-rank pass draws small factors for
        every member and matrix)."""
        dev = torch.device(device)
        numel = int(np.prod(shape)) if len(shape) else 1
        cells, steps = _table(dev)
        out = torch.empty(len(seeds), numel, dtype=torch.float32, device=dev)
        step = max(1, _STACK_BLOCK // max(numel, 1))  # members per pass: bounded scratch memory
        for m0 in range(0, len(seeds), step):
            part = seeds[m0:m0 + step]
            base = torch.tensor([_s64(noise_key(int(sd), name) + _GAMMA) for sd in part], dtype=torch.int64,
                                device=dev)  # the counter of element 0
            z = (self._counters(dev, numel)[None, :] + base[:, None]).view(-1)
            keyed_transform(z, cells, steps, out[m0:m0 + len(part)].view(-1))
        return out.view(len(seeds), *shape)

    def _wanted(self, kind: str) -> bool:
        want = self._want.get(kind)
        if want is None:
            want = self._want[kind] = self._compile if self._compile is not None else compile_wanted(kind)
        return want

    def _compile_now(self, device: torch.device) -> bool:
        """Whether compiled kernels are wanted on this device type now (auto: on the CPU only after
        CPU_COMPILE_AFTER eager elements)."""
        kind = device.type
        if not self._wanted(kind):
            return False
        auto = self._compile is None and _compile_env() == "auto"
        return not (auto and kind == "cpu" and self._drawn.get(kind, 0) < CPU_COMPILE_AFTER)

    def _count(self, device: torch.device, n: int) -> None:
        if self._compile is None and device.type == "cpu":
            self._drawn[device.type] = self._drawn.get(device.type, 0) + n  # a race only delays the switch

    def _once(self, device: torch.device, cache: dict[Any, Any], key: Any, build: Callable[[], Any]) -> Any:
        """``cache[key]``, built once per process by ``build`` under the compile lock; None while compiling
        is not wanted or not yet worth it here, or while another thread is building (it carries on eagerly)."""
        if key in cache and self._wanted(device.type):
            return cache[key]
        if not self._compile_now(device):
            return None
        if not _KERNELS_LOCK.acquire(blocking=False):
            return None  # another thread is compiling: carry on eagerly meanwhile
        try:
            if key not in cache:
                cache[key] = build()
        finally:
            _KERNELS_LOCK.release()
        return cache[key]

    def _compiled(self, device: torch.device) -> Callable[..., torch.Tensor] | None:
        """The process's compiled kernel for this device type, or None (eager) when not wanted or not yet."""
        block = _COMPILED_BLOCK.get(device.type, _DEFAULT_BLOCK)
        return self._once(device, _KERNELS, device.type,
                          lambda: _build_kernel(device, self._counters(device, block)))

    def fill(self, out: torch.Tensor, seed: int, name: str, start: int) -> torch.Tensor:
        """``out`` (fp32, contiguous, 1-D) <- eps of elements start .. start + out.numel() of ``name``."""
        dev = out.device
        n = out.numel()
        cells, steps = _table(dev)
        key = noise_key(seed, name)
        fn = self._compiled(dev) if n >= _MIN_COMPILED else None  # (a tiny fill builds no kernel)
        done = 0
        if fn is not None:  # the fused kernel, one call per block: the same bits
            block = _COMPILED_BLOCK.get(dev.type, _DEFAULT_BLOCK)
            ramp = self._counters(dev, min(block, n))
            for s in range(0, n, block):
                m = min(block, n - s)
                z0 = torch.tensor(_s64(key + (start + s + 1) * _GAMMA), dtype=torch.int64, device=dev)
                out[s:s + m].copy_(fn(ramp[:m], z0, cells, steps))
            done = n
        block = _EAGER_BLOCK.get(dev.type, _DEFAULT_BLOCK)
        ramp = self._counters(dev, min(block, n - done))
        for s in range(done, n, block):
            m = min(block, n - s)
            z = ramp[:m] + _s64(key + (start + s + 1) * _GAMMA)
            keyed_transform(z, cells, steps, out[s:s + m])
        self._count(dev, n)
        return out

    def fused_now(self, device: torch.device) -> bool:
        """Whether perturb/accumulate/apply run compiled on this device now.  The compiled CPU kernels
        parallelise inside (OpenMP, torch's thread count where they are built), so the caller should then
        call them from one thread: on 2 cores a 2-worker pool calling one-thread kernels ran no faster than
        one thread (the calls serialise), one caller with 2-thread kernels about twice as fast."""
        return self._compile_now(device)

    def _fused(self, device: torch.device, op: str, variant: Any) -> Callable[..., None] | None:
        """The compiled fused op for this device type and variant (dtypes or term count), checked against
        the eager ops the first time; None: eager (not wanted, not yet, being built, or refused)."""

        def build() -> Callable[..., None] | None:
            ramp = self._counters(device, _FUSED_BLOCK.get(device.type, _DEFAULT_BLOCK))
            try:
                ok, why = _check_fused(op, device, ramp, variant), "gives other bits than eager"
            except Exception as e:  # no working compiler, an inductor error: eager is always there
                ok, why = False, f"failed to build ({type(e).__name__}: {str(e)[:200]})"
            if not ok:
                warnings.warn(f"hpc_es: the compiled fused {op} {variant} on {device.type} {why}; "
                              "using the eager path", RuntimeWarning, stacklevel=5)  # the engine's call
            return _fused_fn(op) if ok else None

        return self._once(device, _FUSED, (device.type, op, variant), build)

    def perturb(self, out: torch.Tensor, master: torch.Tensor, seed: int, name: str, start: int,
                scale: float) -> bool:
        """out <- round(master + scale*eps(seed, name, start..)) by the fused compiled kernel, one pass per
        block, the same bits as the eager ops (Engine.perturb).  False, with nothing written, when the
        fused kernel is not in use here: the caller then runs the eager ops.  ``out`` and ``master`` are
        contiguous 1-D slices on one device."""
        dev, n = out.device, out.numel()
        if n < _MIN_COMPILED or master.device != dev:
            return False
        fn = self._fused(dev, "perturb", (out.dtype, master.dtype))
        if fn is None:
            return False
        cells, steps = _table(dev)
        key = noise_key(seed, name)
        block = _FUSED_BLOCK.get(dev.type, _DEFAULT_BLOCK)
        ramp = self._counters(dev, min(block, n))
        sc = torch.tensor(scale, dtype=torch.float32, device=dev)
        for s in range(0, n, block):
            m = min(block, n - s)
            z0 = _s64(key + (start + s + 1) * _GAMMA)
            if m < _MIN_COMPILED:  # a short tail would make the dynamic kernel recompile
                _perturb_eager(ramp[:m] + z0, cells, steps, scale, master[s:s + m], out[s:s + m])
            else:
                fn(ramp[:m], torch.tensor(z0, dtype=torch.int64, device=dev), cells, steps, sc,
                   master[s:s + m], out[s:s + m])
        self._count(dev, n)
        return True

    def accumulate(self, acc: torch.Tensor, terms: list[tuple[int, float]], name: str, start: int) -> bool:
        """acc <- acc + c*eps(seed, name, start..) for each (seed, c) of ``terms`` in order, by the fused
        compiled kernel (FUSED_TERMS terms per pass over acc), the same bits as Engine.update's eager ops.
        False, with acc untouched, when the fused kernel is not in use here.  ``acc``: fp32, 1-D."""
        dev, n = acc.device, acc.numel()
        if n < _MIN_COMPILED or not terms:
            return False
        groups = [terms[i:i + FUSED_TERMS] for i in range(0, len(terms), FUSED_TERMS)]
        fns = {}
        for k in sorted({len(gr) for gr in groups}):
            fn = self._fused(dev, "accumulate", k)
            if fn is None:
                return False
            fns[k] = fn
        cells, steps = _table(dev)
        keys = [[noise_key(seed, name) for seed, _ in gr] for gr in groups]
        coefs = [[c for _, c in gr] for gr in groups]
        coef_t = [torch.tensor(c, dtype=torch.float32, device=dev) for c in coefs]
        block = _FUSED_BLOCK.get(dev.type, _DEFAULT_BLOCK)
        ramp = self._counters(dev, min(block, n))
        for s in range(0, n, block):
            m = min(block, n - s)
            for gk, gc, gt in zip(keys, coefs, coef_t):
                z0s = [_s64(k + (start + s + 1) * _GAMMA) for k in gk]
                if m < _MIN_COMPILED:  # a short tail would make the dynamic kernel recompile
                    _accumulate_eager(ramp[:m], z0s, cells, steps, gc, acc[s:s + m])
                else:
                    fns[len(gk)](ramp[:m], torch.tensor(z0s, dtype=torch.int64, device=dev), cells, steps, gt,
                                 acc[s:s + m])
        self._count(dev, n * len(terms))
        return True

    def apply(self, acc: torch.Tensor, scale: float, master: torch.Tensor, out: torch.Tensor) -> bool:
        """master <- round(master + scale*acc) and out <- round(new master) by the fused compiled kernel,
        one pass, the same bits as Engine.update's eager ops.  False, with nothing written, when it is not
        in use here.  (Not noise, but the same compiled-and-checked machinery, used where the noise is.)"""
        dev, n = acc.device, acc.numel()
        if n < _MIN_COMPILED or master.device != dev or out.device != dev:
            return False
        fn = self._fused(dev, "apply", (master.dtype, out.dtype))
        if fn is None:
            return False
        sc = torch.tensor(scale, dtype=torch.float32, device=dev)
        block = _FUSED_BLOCK.get(dev.type, _DEFAULT_BLOCK)
        for s in range(0, n, block):
            m = min(block, n - s)
            if m < _MIN_COMPILED:
                _apply_eager(acc[s:s + m], scale, master[s:s + m], out[s:s + m])
            else:
                fn(acc[s:s + m], sc, master[s:s + m], out[s:s + m])
        return True


NoiseSource = KeyedNoise | LegacyNoise


def noise_source(scheme: str, chunk: int) -> NoiseSource:
    """The noise of ``scheme`` (see NOISE_SCHEMES) with pieces of ``chunk`` elements."""
    if scheme == "keyed":
        return KeyedNoise(chunk)
    if scheme == "legacy":
        return LegacyNoise(chunk)
    raise ValueError(f"unknown noise scheme {scheme!r} (one of {', '.join(NOISE_SCHEMES)})")
