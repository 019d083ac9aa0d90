"""The exact operations, each defined once in eager torch: the keyed noise transform (int64 counters to
fp32 normals) and the three steps ES takes with noise (perturb, accumulate, apply the update).

The engine (es.py) and the noise schemes (noise.py) run these; noise_kernels.py fuses them into compiled
kernels and refuses any kernel whose bits differ from these.  Every step is an exactly defined integer
operation or one IEEE rounding, so the same inputs give the same bits on any device, thread count or
chunking; no step may become a fused multiply-add.
"""

from __future__ import annotations

import numpy as np
import torch

from hpc_es._noise_table import QUANTILES

SUB_BITS = 6  # 2**6 table cells per octave of the tail probability
OCTAVES = 52  # r = 52 random bits: p = r / 2**52, octave g holds p in [2**(g-52), 2**(g-51))
T_BITS = 28  # bits of the interpolation fraction inside a cell
FRAC_BITS = 40  # table values are |x| * 2**40, rounded to integers
GAMMA = 0x9E3779B97F4A7C15  # the counter step: 2**64 / golden ratio, odd
MUL1 = 0xBF58476D1CE4E5B9  # the finaliser's multipliers (Stafford's mix 13)
MUL2 = 0x94D049BB133111EB


def s64(v: int) -> int:
    """``v`` mod 2**64 as a signed int64 (torch's int64 arithmetic wraps the same way)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _lo(bits: int) -> int:
    return (1 << bits) - 1


def keyed_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantile table's cells and their differences (int64, on ``device``): what keyed_transform reads.
    Small (3,329 entries); callers keep it per device."""
    q = torch.tensor(QUANTILES, dtype=torch.int64)
    steps = q[1:] - q[:-1]
    assert int(steps.abs().max()) < 1 << (63 - T_BITS)
    return q[:-1].contiguous().to(device), steps.to(device)


def counter_offsets(n: int, device: torch.device) -> torch.Tensor:
    """i * GAMMA mod 2**64 for i < n (int64): element i's counter is its block's counter plus this."""
    ramp = (np.arange(n, dtype=np.uint64) * np.uint64(GAMMA)).view(np.int64)
    return torch.from_numpy(ramp).to(device)


def keyed_transform(z: torch.Tensor, cells: torch.Tensor, steps: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 standard normals from int64 counters ``z`` (consumed): hash, then the table lookup.

    ``cells``/``steps`` are the table's values and differences (int64, on z's device).  Signed int64
    right shifts are arithmetic, so every logical shift is masked; multiplications wrap mod 2**64.
    In-place steps on fresh intermediates only (they spare allocations; torch.compile accepts them)."""
    z ^= (z >> 30).bitwise_and_(_lo(34))
    z *= s64(MUL1)
    z ^= (z >> 27).bitwise_and_(_lo(37))
    z *= s64(MUL2)
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


def perturb(eps: torch.Tensor, scale: float, master: torch.Tensor, out: torch.Tensor) -> None:
    """out <- round(master + scale*eps): the fp32 product, the fp32 sum, one rounding to out's dtype on the
    store (the same bits as add_ then copy_).  ``eps`` (fp32, on out's device) is consumed; ``master`` may
    live in host memory."""
    torch.add(eps.mul_(scale), master.to(out.device, non_blocking=True), out=out)


def accumulate(acc: torch.Tensor, eps: torch.Tensor, coef: float, fma: bool = False) -> None:
    """acc <- acc + coef*eps in fp32: the product and the sum rounded separately, so CPU and CUDA agree.
    ``fma``: legacy runs' single-rounding ``add_(alpha=)``, kept for their bits.  ``eps`` is consumed."""
    if fma:
        acc.add_(eps, alpha=coef)
    else:
        acc.add_(eps.mul_(coef))


def apply(acc: torch.Tensor, scale: float, master: torch.Tensor) -> None:
    """master <- round(master + scale*acc): the fp32 product, the fp32 sum, one rounding to the master's
    dtype.  ``acc`` (fp32, on the compute device) is consumed; ``master`` may live in host memory."""
    acc.mul_(scale)
    if master.device == acc.device:
        master.add_(acc)
    else:
        acc.add_(master.to(acc.device, non_blocking=True))
        master.copy_(acc)
