#!/usr/bin/env python
"""The fast engine's decode step, eager against compiled (``rollout.compile``): kernels per step and tokens/s.

A library for the benches (tools/bench.py, tools/gpu_check.py), never a test.  Both figures run
hpc_es.fastgen as a run does, on a batch that never stops (no EOS id can match), so every step decodes every
row:

* :func:`decode_kernels_per_step`: what the profiler counts per decode step: CUDA kernels (and memory
  operations) on a GPU, with the CUDA graphs off so that each launch is seen; operator calls on a CPU (where
  the C++ kernels inductor fuses are not profiler events: a compiled CPU step counts only what it calls
  out to, mostly the matrix products).  Counted as the difference between a call of ``1 + 2 s`` and one of
  ``1 + s`` new tokens, divided by ``s``: prefill, the first token and the call's set-up cancel.
* :func:`compiled_over_eager`: rollout tokens/s with the decode step compiled and eager (CUDA graphs on
  where a run has them), the best of ``reps`` timed calls after a warm-up call that compiles and captures.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hpc_es import fastgen  # noqa: E402

NEVER = [-1]  # an EOS id no row can emit: every row decodes to the end


@contextmanager
def _compile(model: torch.nn.Module, on: bool) -> Iterator[None]:
    fastgen.set_compile(model, "true" if on else "false")
    try:
        yield
    finally:
        fastgen.set_compile(model, "auto")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _events(fn: Callable[[], Any], dev: torch.device) -> int:
    """Profiler events of one call of ``fn``: device kernels on CUDA, top-level operator calls on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    _sync(dev)
    with profile(activities=acts) as prof:
        fn()
        _sync(dev)
    events = prof.events()
    if dev.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and
               (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


@torch.no_grad()
def decode_kernels_per_step(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                            compiled: bool, steps: int = 8) -> float:
    """Kernels per fastgen decode step of ``model`` on this batch, the step compiled or eager (graphs off)."""
    dev = next(model.parameters()).device
    ids, mask = input_ids.to(dev), attention_mask.to(dev)

    def call(new: int) -> Callable[[], Any]:
        # check_every past the end: the one "all finished?" check after prefill is in both calls and cancels
        return lambda: fastgen.generate_ids(model, ids, mask, new, NEVER, 0, graphs=False, check_every=1 << 30)

    with _compile(model, compiled):
        call(1 + 2 * steps)()  # warm-up: compiles every shape the counted calls use
        short, long = _events(call(1 + steps), dev), _events(call(1 + 2 * steps), dev)
    return (long - short) / steps


@torch.no_grad()
def compiled_over_eager(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        max_new_tokens: int, *, reps: int = 3) -> dict[str, Any]:
    """Rollout tokens/s of fastgen with the decode step eager and compiled, and their ratio; ``refused``: the
    compiled step was refused (it then ran eagerly, and the ratio says nothing of it)."""
    dev = next(model.parameters()).device
    ids, mask = input_ids.to(dev), attention_mask.to(dev)
    out: dict[str, Any] = {}
    for name, on in (("eager", False), ("compiled", True)):
        with _compile(model, on):
            fastgen.generate_ids(model, ids, mask, max_new_tokens, NEVER, 0)  # compiles, captures
            best = float("inf")
            for _ in range(reps):
                _sync(dev)
                t0 = time.perf_counter()
                new = fastgen.generate_ids(model, ids, mask, max_new_tokens, NEVER, 0)
                _sync(dev)
                best = min(best, time.perf_counter() - t0)
            out[f"{name}_tokens_per_s"] = new.numel() / max(best, 1e-12)
            if on:
                out["refused"] = fastgen.compile_refused(model)
    out["compiled_over_eager"] = out["compiled_tokens_per_s"] / max(out["eager_tokens_per_s"], 1e-12)
    return out


def figures(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            max_new_tokens: int, *, steps: int = 8, reps: int = 3) -> dict[str, Any]:
    """tools/bench.py's ``--json`` keys: ``decode_kernels_per_step`` ({eager, compiled}) and
    ``compiled_over_eager`` (tokens/s ratio; the tokens/s and ``refused`` under ``compiled_decode``)."""
    kernels = {name: decode_kernels_per_step(model, input_ids, attention_mask, compiled=name == "compiled",
                                             steps=steps) for name in ("eager", "compiled")}
    speed = compiled_over_eager(model, input_ids, attention_mask, max_new_tokens, reps=reps)
    return {"decode_kernels_per_step": kernels, "compiled_over_eager": speed["compiled_over_eager"],
            "compiled_decode": speed}
