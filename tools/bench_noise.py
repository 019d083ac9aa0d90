#!/usr/bin/env python
"""Noise throughput on one device: the keyed scheme (eager torch, and torch.compile'd when available) next to
the legacy scheme's torch.randn, one stream, in the same run.  A script that prints, never a test.

    .venv/bin/python tools/bench_noise.py                 # CPU, one thread
    .venv/bin/python tools/bench_noise.py --json
    .venv/bin/python tools/bench_noise.py --device cuda   # (tools/gpu_check.py calls it too)

The keyed figures are checked bit for bit against each other before they are timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hpc_es.noise import KeyedNoise, LegacyNoise, compile_wanted  # noqa: E402

TARGET = 0.7  # issue 12: keyed noise >= 0.7x torch.randn's elements/s on the CPU (0.5x on a GPU)


def _rate(fn: Callable[[int], int], sync: Callable[[], None], min_s: float) -> float:
    """Best of three runs of elements/s, each repeating fn(k) (returns elements) for >= min_s."""
    fn(0)
    sync()
    best, k = 0.0, 1
    for _ in range(3):
        done, t0 = 0, time.perf_counter()
        while True:
            done += fn(k)
            k += 1
            sync()
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = max(best, done / dt)
    return best


def noise_speed(device: str = "cpu", numel: int = 1 << 20, min_s: float = 0.5,
                compiled: bool | None = None) -> dict[str, float]:
    """Elements/s of legacy randn and of keyed noise filling a preallocated fp32 buffer of ``numel``.

    ``compiled``: also time the torch.compile'd keyed path (None: when compile_wanted says so).  Keys:
    randn, keyed_eager, keyed_compiled (absent when not timed), keyed (the better keyed figure),
    noise_over_randn (keyed / randn)."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = torch.empty(numel, dtype=torch.float32, device=dev)
    legacy, eager = LegacyNoise(numel), KeyedNoise(numel, compile=False)

    def run(src: LegacyNoise | KeyedNoise) -> Callable[[int], int]:
        def fn(k: int) -> int:
            src.fill(out, k, "bench.weight", 0)
            return numel
        return fn

    res = {"randn": _rate(run(legacy), sync, min_s), "keyed_eager": _rate(run(eager), sync, min_s)}
    if compiled if compiled is not None else compile_wanted(dev.type):
        fast = KeyedNoise(numel, compile=True)
        a = fast.fill(torch.empty_like(out), 5, "check", 3)
        b = eager.fill(torch.empty_like(out), 5, "check", 3)
        if not torch.equal(a, b):
            raise SystemExit("bench_noise: compiled and eager keyed noise differ")
        if fast._compiled(dev) is not None:
            res["keyed_compiled"] = _rate(run(fast), sync, min_s)
    res["keyed"] = max(res["keyed_eager"], res.get("keyed_compiled", 0.0))
    res["noise_over_randn"] = res["keyed"] / res["randn"]
    return res


def lines(res: dict[str, float], device: str = "cpu") -> list[str]:
    target = TARGET if device == "cpu" else 0.5
    comp = f"{res['keyed_compiled'] / 1e6:8.1f}" if "keyed_compiled" in res else "       -"
    f = res["noise_over_randn"]
    return [f"   noise alone, one stream (M elements/s): legacy torch.randn {res['randn'] / 1e6:8.1f}  "
            f"keyed eager {res['keyed_eager'] / 1e6:8.1f}  keyed compiled {comp}",
            f"     keyed vs torch.randn              {f:6.2f}x   (>= {target:.2f}x) {'PASS' if f >= target else 'MISS'}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--numel", type=int, default=1 << 20, help="elements per fill")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-compile", action="store_true", help="time the eager keyed path only")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = noise_speed(args.device, args.numel, compiled=False if args.no_compile else None)
    print(json.dumps(res) if args.json else "\n".join(lines(res, args.device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
