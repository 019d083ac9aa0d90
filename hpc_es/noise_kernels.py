"""Compiled kernels of the keyed noise: the plain fill and the fused perturb, accumulate and apply.

Each kernel is torch.compile'd once per process and device type and checked bit for bit, when it is
built, against the eager definition in exact.py on data that would show any change of rounding.  A
kernel that gives other bits is refused with a warning; a kernel that fails to build (no C++ compiler,
no Triton, an inductor error) turns compiling off on that device type with one warning.  Either way the
eager ops run instead, with the same bits: compiling only ever changes the speed.

Scalars (block counters, scales, coefficients) reach the kernels as 0-d host tensors: inductor passes them
to a device kernel by value, so no call copies a value to the device and waits for it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from hpc_es import exact

MIN_COMPILED = 16  # smaller pieces stay eager (sizes 0 and 1 would make the dynamic kernel recompile)
FUSED_TERMS = 4  # update terms folded into the accumulator per pass over it (one compiled graph per count)
# Under auto, the CPU compiles only after this many eager elements (~10-60 s of eager work, more than the
# compile takes), so short CPU runs (the demo, the tests) never pay for a compile.
CPU_COMPILE_AFTER = 1 << 30
# Compiled fill blocks are larger than eager ones (one call's overhead over more elements).  The fused
# kernels keep no block-sized temporaries, so their CPU blocks are whole CPU chunks: a call's Python
# overhead is then negligible (at 2**16 it cost a third of the perturb on a 2-core machine).
FILL_BLOCK = {"cpu": 1 << 16}
FUSED_BLOCK = {"cpu": 1 << 20}
DEVICE_BLOCK = 1 << 24  # either, on other device types
# The fused kernels must round every step as eager does: no contraction of a*b + c into a fused multiply-add.
# Inductor's C++ code is built with -ffp-contract=off by default (forced here against the environment
# variable); Triton contracts unless fp fusion is off, which emulate_precision_casts does.  The check at
# build time would catch a contraction: random masters and accumulators, several scales.
NO_CONTRACT: dict[str, Any] = {"cpp.enable_floating_point_contract_flag": "off", "emulate_precision_casts": True}
_FALSE, _TRUE = ("0", "off", "false", "no"), ("1", "on", "true", "yes")


def compile_env() -> str:
    return os.environ.get("HPC_ES_NOISE_COMPILE", "auto").strip().lower()


def compile_wanted(device_type: str) -> bool:
    """Whether the keyed noise runs as torch.compile'd kernels (the bits are the same either way).

    HPC_ES_NOISE_COMPILE=1/0 forces it; unset, CUDA compiles when Triton is importable and the CPU when
    a C++ compiler is on PATH (and, see KeyedNoise, once the process has drawn enough noise to pay off)."""
    env = compile_env()
    if env in _FALSE:
        return False
    if env in _TRUE:
        return True
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device_type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    return False


# ---- the kernel bodies: what torch.compile fuses ---------------------------------------------------
# z0: the block's first counter (0-d int64); ``ramp``: the counter offsets (exact.counter_offsets) as a
# tensor: an in-kernel ``arange * GAMMA`` miscompiled on the CPU with torch 2.13, and the check caught it.


def _fill_block(ramp: torch.Tensor, z0: torch.Tensor, cells: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    return exact.keyed_transform(ramp + z0, cells, steps)


def _perturb_block(ramp: torch.Tensor, z0: torch.Tensor, cells: torch.Tensor, steps: torch.Tensor,
                   scale: torch.Tensor, master: torch.Tensor, out: torch.Tensor) -> None:
    """exact.perturb in one pass: ``scale`` is a 0-d fp32 tensor (eager multiplies by the Python float
    rounded to fp32: the same operand)."""
    out.copy_(exact.keyed_transform(ramp + z0, cells, steps) * scale + master)


def _accumulate_block(ramp: torch.Tensor, z0s: list[torch.Tensor], cells: torch.Tensor, steps: torch.Tensor,
                      coefs: list[torch.Tensor], acc: torch.Tensor) -> None:
    """exact.accumulate for each term in order, one pass over ``acc`` for several terms."""
    total = acc
    for z0, c in zip(z0s, coefs):  # the term count is a guard: one graph per count
        total = total + exact.keyed_transform(ramp + z0, cells, steps) * c
    acc.copy_(total)


def _apply_block(acc: torch.Tensor, scale: torch.Tensor, master: torch.Tensor, out: torch.Tensor) -> None:
    """exact.apply and the copy of the new master into the working weights, in one pass."""
    new = (acc * scale + master).to(master.dtype)
    master.copy_(new)
    out.copy_(new)


_BODIES: dict[str, Callable[..., Any]] = {"fill": _fill_block, "perturb": _perturb_block,
                                          "accumulate": _accumulate_block, "apply": _apply_block}


def _host(v: float | int, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d host tensor: passed by value to a device kernel, so no copy to the device and no wait."""
    return torch.tensor(v, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class NoiseKernels:
    """The compiled kernels, built once each and checked, with everything they cache.

    One instance serves a whole process by default (``shared()``): each torch.compile wrapper of a body
    traces it again, and past dynamo's recompile limit it silently runs uncompiled.  Tests build their own
    (``compiler`` and ``options`` replace torch.compile and its options; the block sizes are per device
    type).  Thread-safe: a thread that finds another one building carries on eagerly meanwhile."""

    def __init__(self, *, compiler: Callable[..., Callable[..., Any]] | None = None,
                 options: dict[str, Any] | None = None, fill_block: dict[str, int] | None = None,
                 fused_block: dict[str, int] | None = None) -> None:
        self._compiler: Callable[..., Callable[..., Any]] = compiler or torch.compile
        self._options = {**NO_CONTRACT, **(options or {})}
        self._blocks = {"fill": {**FILL_BLOCK, **(fill_block or {})}, "fused": {**FUSED_BLOCK, **(fused_block or {})}}
        self._fns: dict[str, Callable[..., Any]] = {}  # op -> its torch.compile wrapper
        self.built: dict[tuple[Any, ...], Callable[..., Any] | None] = {}  # (device type, op, variant) -> kernel
        self.failed: dict[str, str] = {}  # device type -> why building failed there (compiling is then off)
        self._lock = threading.Lock()
        self._data_lock = threading.Lock()
        self._ramps: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    _shared: ClassVar[NoiseKernels | None] = None

    @classmethod
    def shared(cls) -> NoiseKernels:
        """The process's instance."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def block(self, kind: str, device: torch.device) -> int:
        """Elements per kernel call of ``kind`` (fill or fused) on ``device``."""
        return self._blocks[kind].get(device.type, DEVICE_BLOCK)

    def _data(self, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The counter offsets (at least ``n``) and the quantile table on ``device``."""
        with self._data_lock:
            ramp = self._ramps.get(device)
            if ramp is None or ramp.numel() < n:
                ramp = self._ramps[device] = exact.counter_offsets(n, device)
            table = self._tables.get(device)
            if table is None:
                table = self._tables[device] = exact.keyed_table(device)
        return ramp, *table

    def _fn(self, op: str) -> Callable[..., Any]:
        fn = self._fns.get(op)
        if fn is None:
            options = None if op == "fill" else self._options  # the fill has no float arithmetic
            fn = self._fns[op] = self._compiler(_BODIES[op], dynamic=True, options=options)
        return fn

    def kernel(self, device: torch.device, op: str, variant: Any = None) -> Callable[..., Any] | None:
        """The checked kernel of ``op`` for this device type and variant (dtypes or term count), built the
        first time; None: eager (refused, building failed here, or another thread is building it)."""
        key = (device.type, op, variant)
        if key in self.built:
            return self.built[key]
        if device.type in self.failed or not self._lock.acquire(blocking=False):
            return None
        try:
            if key not in self.built and device.type not in self.failed:
                self.built[key] = self._build(device, op, variant)
        finally:
            self._lock.release()
        return self.built.get(key)

    def _build(self, device: torch.device, op: str, variant: Any) -> Callable[..., Any] | None:
        what = f"the compiled keyed-noise {op}{'' if variant is None else f' {variant}'} on {device.type}"
        try:
            ok = self.check(device, op, variant)
        except Exception as e:  # no working compiler, an inductor error: eager is always there
            self.failed[device.type] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"  # one line
            warnings.warn(f"hpc_es: {what} failed to build ({self.failed[device.type]}); the noise runs eagerly "
                          f"on {device.type} (the same bits, slower)", RuntimeWarning, stacklevel=2)
            return None
        if not ok:
            warnings.warn(f"hpc_es: {what} gives other bits than eager; using the eager path", RuntimeWarning,
                          stacklevel=2)
            return None
        return self._fn(op)

    def check(self, device: torch.device, op: str, variant: Any) -> bool:
        """The compiled op against exact.py's eager ops, bit for bit, on data that would show a contracted
        FMA or any other change of rounding: random masters/accumulators of several magnitudes, several
        scales and coefficients, a whole block and an odd length."""
        fn = self._fn(op)
        ramp, cells, steps = self._data(device, self.block("fill" if op == "fill" else "fused", device))
        g = torch.Generator().manual_seed(20261130)

        def rand(m: int) -> torch.Tensor:
            mag = torch.pow(10.0, torch.randint(-4, 2, (m,), generator=g).float())
            return (torch.randn(m, generator=g) * mag).to(device)

        def eps(r: torch.Tensor, z0: int) -> torch.Tensor:
            return exact.keyed_transform(r + z0, cells, steps)

        for base, m in ((0, ramp.numel()), (exact.s64(0x5DEECE66D << 30 | 7), min(ramp.numel(), 4099))):
            r = ramp[:m]
            if op == "fill":
                if not same_bits(fn(r, _host(base, torch.int64), cells, steps), eps(r, base)):
                    return False
            elif op == "perturb":
                out_dtype, master_dtype = variant
                master = rand(m).to(master_dtype)
                for scale in (1e-3, -1e-3, 0.3721, -2.5e-5, 3.0):
                    got, want = (torch.empty(m, dtype=out_dtype, device=device) for _ in range(2))
                    fn(r, _host(base, torch.int64), cells, steps, _host(scale, torch.float32), master, got)
                    exact.perturb(eps(r, base), scale, master, want)
                    if not same_bits(got, want):
                        return False
            elif op == "apply":
                master_dtype, out_dtype = variant
                master = rand(m).to(master_dtype)
                for scale in (5e-4 / 30, -0.0371, 1.7):
                    acc = rand(m) * 3.0
                    got_m, want_m = master.clone(), master.clone()
                    got = torch.empty(m, dtype=out_dtype, device=device)
                    fn(acc, _host(scale, torch.float32), got_m, got)
                    exact.apply(acc.clone(), scale, want_m)
                    if not (same_bits(got_m, want_m) and same_bits(got, want_m.to(out_dtype))):
                        return False
            else:
                z0s = [exact.s64(base + 0x1234567 * (j + 1) * exact.GAMMA) for j in range(int(variant))]
                coefs = [float(c) for c in torch.randn(int(variant), generator=g) * 2.0]
                acc = rand(m) * 3.0
                got, want = acc.clone(), acc.clone()
                fn(r, [_host(z, torch.int64) for z in z0s], cells, steps, [_host(c, torch.float32) for c in coefs],
                   got)
                for z0, c in zip(z0s, coefs):
                    exact.accumulate(want, eps(r, z0), c)
                if not same_bits(got, want):
                    return False
        return True

    # ---- the ops: False (nothing written) where no checked kernel is in use; the caller runs eager ----

    def fill(self, out: torch.Tensor, key: int, start: int) -> bool:
        """``out`` (fp32, 1-D) <- the keyed noise of elements start.. of the tensor keyed ``key``."""
        dev, n = out.device, out.numel()
        fn = self.kernel(dev, "fill") if n >= MIN_COMPILED else None
        if fn is None:
            return False
        block = self.block("fill", dev)
        ramp, cells, steps = self._data(dev, min(block, n))
        for s in range(0, n, block):
            m = min(block, n - s)
            z0 = exact.s64(key + (start + s + 1) * exact.GAMMA)
            if m < MIN_COMPILED:  # a short tail would make the dynamic kernel recompile
                exact.keyed_transform(ramp[:m] + z0, cells, steps, out[s:s + m])
            else:
                out[s:s + m].copy_(fn(ramp[:m], _host(z0, torch.int64), cells, steps))
        return True

    def perturb(self, out: torch.Tensor, master: torch.Tensor, key: int, start: int, scale: float) -> bool:
        """out <- round(master + scale*eps) (exact.perturb), one pass per block.  ``out`` and ``master``:
        contiguous 1-D slices on one device."""
        dev, n = out.device, out.numel()
        if n < MIN_COMPILED or master.device != dev:
            return False
        fn = self.kernel(dev, "perturb", (out.dtype, master.dtype))
        if fn is None:
            return False
        block = self.block("fused", dev)
        ramp, cells, steps = self._data(dev, min(block, n))
        sc = _host(scale, torch.float32)
        for s in range(0, n, block):
            m = min(block, n - s)
            z0 = exact.s64(key + (start + s + 1) * exact.GAMMA)
            if m < MIN_COMPILED:
                exact.perturb(exact.keyed_transform(ramp[:m] + z0, cells, steps), scale, master[s:s + m],
                              out[s:s + m])
            else:
                fn(ramp[:m], _host(z0, torch.int64), cells, steps, sc, master[s:s + m], out[s:s + m])
        return True

    def accumulate(self, acc: torch.Tensor, terms: list[tuple[int, float]], start: int) -> bool:
        """acc <- acc + c*eps(key) for each (key, c) of ``terms`` in order (exact.accumulate), FUSED_TERMS
        terms per pass over ``acc`` (fp32, 1-D)."""
        dev, n = acc.device, acc.numel()
        if n < MIN_COMPILED or not terms:
            return False
        groups = [terms[i:i + FUSED_TERMS] for i in range(0, len(terms), FUSED_TERMS)]
        fns = {}
        for k in sorted({len(gr) for gr in groups}):
            fn = self.kernel(dev, "accumulate", k)
            if fn is None:
                return False
            fns[k] = fn
        block = self.block("fused", dev)
        ramp, cells, steps = self._data(dev, min(block, n))
        coefs = [[_host(c, torch.float32) for _, c in gr] for gr in groups]
        for s in range(0, n, block):
            m = min(block, n - s)
            for gr, gc in zip(groups, coefs):
                z0s = [exact.s64(k + (start + s + 1) * exact.GAMMA) for k, _ in gr]
                if m < MIN_COMPILED:
                    for z0, (_, c) in zip(z0s, gr):
                        exact.accumulate(acc[s:s + m], exact.keyed_transform(ramp[:m] + z0, cells, steps), c)
                else:
                    fns[len(gr)](ramp[:m], [_host(z, torch.int64) for z in z0s], cells, steps, gc, acc[s:s + m])
        return True

    def apply(self, acc: torch.Tensor, scale: float, master: torch.Tensor, out: torch.Tensor) -> bool:
        """master <- round(master + scale*acc) (exact.apply) and out <- round(new master), one pass."""
        dev, n = acc.device, acc.numel()
        if n < MIN_COMPILED or master.device != dev or out.device != dev:
            return False
        fn = self.kernel(dev, "apply", (master.dtype, out.dtype))
        if fn is None:
            return False
        sc = _host(scale, torch.float32)
        block = self.block("fused", dev)
        for s in range(0, n, block):
            m = min(block, n - s)
            if m < MIN_COMPILED:
                exact.apply(acc[s:s + m], scale, master[s:s + m])
                out[s:s + m].copy_(master[s:s + m])
            else:
                fn(acc[s:s + m], sc, master[s:s + m], out[s:s + m])
        return True
