#!/usr/bin/env python
"""GPU check: random Qwen2.5-1.5B and 7B architectures on one GPU, in phases under a wall-time budget.

Meant to finish within 8 minutes on one H200.  Each phase runs on its own (an error is recorded with its
text and the check moves on), is skipped when less of ``--budget-s`` (wall time from the start) is left
than the phase is expected to take, and its record goes to ``--out`` as soon as it is done: the file is
rewritten after every phase, so a crash or a kill keeps every phase before it.  The phases, in order:

* ``exactness``: a small fp32 model, the fast engine (CUDA graphs, row compaction, ragged schedule)
  against HF generate: token ids must be identical.
* per model, ``<model>.engines``: one member's rollout as the paper runs it (200 prompts of 100-140 tokens,
  completion lengths from the schedule: exponential, mean 300, capped at 1024, one row at 1024) with the
  fast engine (its first call captures the graphs; the second is timed) and HF generate (7B: both on the
  schedule capped at ``--hf-cap-7b`` tokens), the eager decode step; tokens/s of each, the decode step at
  200 rows (every call it times warmed first), peak memory, and the first-step logits of fast against HF
  (``rows identical`` on random bf16 weights mostly measures near-ties: a changed first token is counted
  as a near-tie flip when HF's own two logits are closer than twice the largest logit difference on that
  row).
* ``<model>.perturb_update``: Engine.perturb and Engine.update (N=30) over the whole model at the
  default ``es.noise_chunk``, after building every compiled noise kernel they use.
* ``<model>.noise_bits``: keyed noise on CUDA against the CPU, bit for bit, on a sample of the model's
  tensors, and its statistics.
* ``<model>.compiled``: the same member with the compiled decode step (``rollout.compile``; its first call
  compiles and captures), tokens/s over the eager step's, refused or not (``--no-compile``, and ``--tiny``,
  skip it).
* ``<model>.iteration``: the full-iteration estimate at the paper's settings (N=30, 200 prompts, up to
  1024 new tokens): N x (one member's measured rollout, the faster decode step a run would use + perturb)
  + update.
* after both models, ``<model>.kernels``: kernels per decode step, eager and compiled (the profiler).
* ``lowrank``: es.noise=lowrank member passes against plain batched decoding of the same rows (1.5B).
* ``1.5B.es_table`` (tools/bench.py's table with the fast engine, no baseline) and ``1.5B.master``
  (es.master_on / es.master_dtype agree, fp32 master moves norm weights), last, if time is left.

The architectures are written out below (no download); the tokenizer is hpc_es's tiny one, so most sampled
ids of the 151936-entry vocabulary decode to nothing, which changes no cost that is timed.

    PYTHONPATH=. python3 tools/gpu_check.py --out gpu_check.json   # both models on cuda
    PYTHONPATH=. python3 tools/gpu_check.py --only 1.5B
    PYTHONPATH=. python3 tools/gpu_check.py --tiny               # the same phases on CPU, tiny architecture

Exit status 1 when a noise bit, an exactness check or a master check is wrong; phase errors are in the
report (``phases.<name>.status == "error"``) and do not change the exit status.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: the ES table)
import benchlib  # noqa: E402  (tools/benchlib.py: the bench model, the kernel warm-up)
import bench_noise  # noqa: E402  (tools/bench_noise.py: keyed noise checks)
import bench_rollout  # noqa: E402  (tools/bench_rollout.py: the length schedule, completion tokens)
from hpc_es import fastgen  # noqa: E402
from hpc_es.config import Config  # noqa: E402
from hpc_es.es import Engine, Replica, shape_rewards  # noqa: E402
from hpc_es.models import named_params, tensor_digest, weights_digest  # noqa: E402
from hpc_es.noise import default_chunk  # noqa: E402
from hpc_es.seeds import member_seeds  # noqa: E402
from hpc_es.rollout import _ForceEOS, generation_config  # noqa: E402

VOCAB = 151936
ARCHS = {
    # Qwen2.5-1.5B: hidden 1536, 28 layers, 12 query / 2 key-value heads, MLP 8960, tied embeddings.
    "1.5B": benchlib.Arch("Qwen2.5-1.5B (random init)", hidden=1536, layers=28, heads=12, kv_heads=2,
                       intermediate=8960, vocab=VOCAB, tie=True),
    # Qwen2.5-7B: hidden 3584, 28 layers, 28 query / 4 key-value heads, MLP 18944, untied embeddings.
    "7B": benchlib.Arch("Qwen2.5-7B (random init)", hidden=3584, layers=28, heads=28, kv_heads=4,
                     intermediate=18944, vocab=VOCAB, tie=False),
}
# (the tokenizer's 512-entry vocabulary: a 151936-entry embedding would be most of a CPU dry run's time)
TINY = benchlib.Arch("tiny Qwen2.5-shaped (CPU check of this script)", hidden=32, layers=2, heads=4, kv_heads=2,
                  intermediate=96, vocab=0, tie=True)

PAPER = {"n": 30, "rows": 200, "cap": 1024, "mean": 300.0}  # Countdown: N, prompts, max new tokens, mean length
TARGETS = {"iteration_s": {"1.5B": 45.0, "7B": 150.0}, "fast_over_hf": {"1.5B": 5.0}}
# Expected seconds of each phase on one H200 (a phase is skipped when less of the budget is left).
ESTIMATE_S = {"exactness": 15, "build": 15, "engines": 60, "compiled": 90, "kernels": 45, "perturb_update": 25,
              "noise_bits": 20,
              "iteration": 0, "lowrank": 80, "es_table": 60, "master": 45}


class Check:
    """The report and its phases: each phase runs in try/except under the wall-time budget, and the report
    is rewritten (atomically) after each, so a crash or a kill keeps every phase before it."""

    def __init__(self, out: str | None, budget_s: float, report: dict[str, Any]) -> None:
        self.out, self.budget = out, budget_s
        self.t0 = time.perf_counter()
        self.report = report
        report.setdefault("phases", {})
        report["budget_s"] = budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def phase(self, name: str, estimate_s: float, fn: Callable[..., Any], *args: Any,
              record: Callable[[Any], Any] = lambda r: r, skip: str = "", **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as phase ``name``: its result, or None when it failed or was skipped (for
        ``skip``, or short of time); the report keeps ``record(result)``."""
        got: Any = None
        rec: dict[str, Any] = {"estimate_s": estimate_s, "started_s": round(time.perf_counter() - self.t0, 1)}
        if skip or self.left() < estimate_s:
            rec.update(status="skipped", reason=skip or f"{self.left():.0f} s of the {self.budget:.0f} s budget "
                       f"left, the phase takes about {estimate_s} s")
            print(f"-- {name}: skipped ({rec['reason']})", flush=True)
        else:
            print(f"-- {name} (at {rec['started_s']:.0f} s)", flush=True)
            a = time.perf_counter()
            try:
                got = fn(*args, **kwargs)
                rec.update(status="ok", result=record(got))
            except Exception as e:  # noqa: BLE001 - recorded, and the check goes on with the next phase
                rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                           traceback=traceback.format_exc()[-4000:])
                print(f"-- {name}: ERROR {rec['error']}", flush=True)
            rec["seconds"] = round(time.perf_counter() - a, 2)
            _free()
        self.report["phases"][name] = rec
        self.write()
        return got if rec["status"] == "ok" else None

    def result(self, name: str) -> dict[str, Any] | None:
        rec = self.report["phases"].get(name)
        return rec.get("result") if rec else None

    def write(self) -> None:
        self.report["wall_s"] = round(time.perf_counter() - self.t0, 1)
        if not self.out:
            return
        tmp = f"{self.out}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.report, fh, indent=1, default=str)
        os.replace(tmp, self.out)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _gib(nbytes: float) -> float:
    return nbytes / 2**30


# ---- rollouts ------------------------------------------------------------------------------------------------

def _prompts(rows: int, lo: int, hi: int, vocab: int, pad: int, eos: int, device: str, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of lo..hi tokens (no pad or EOS inside)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (rows,), generator=g)
    P = int(lens.max())
    ids = torch.randint(0, vocab, (rows, P), generator=g)
    ids[(ids == pad) | (ids == eos)] = 2
    mask = torch.zeros(rows, P, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, P - n:] = 1
        ids[i, : P - n] = pad
    return ids.to(device), mask.to(device)


def _decode(engine: str, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int,
            sched: list[int] | None, gen_cfg: Any, eos: int, pad: int) -> tuple[torch.Tensor, float]:
    dev = str(ids.device)
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        if engine == "fast":
            out = fastgen.generate_ids(model, ids, mask, new, eos, pad, observer=fastgen.Observer(sched))
        else:
            gen_cfg.max_new_tokens = new
            procs = [_ForceEOS(sched, ids.shape[1], eos)] if sched is not None else None
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                 logits_processor=procs)[:, ids.shape[1]:]
    _sync(dev)
    return out, time.perf_counter() - t0


def exactness(device: str, rows: int = 37, new: int = 64) -> dict[str, bool]:
    """fp32 on the device: fast (graphs, compaction, schedule) == HF, token for token."""
    arch = benchlib.Arch("exactness", hidden=64, layers=2, heads=4, kv_heads=1, intermediate=128)
    model = benchlib.build_model(arch, torch.float32, device)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # sharpened logits: no float near-ties
    tok = benchlib.tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    gen_cfg = generation_config(model, tok, new)
    ids, mask = _prompts(rows, 1, 40, model.config.vocab_size, pad, eos, device, seed=1)
    sched = bench_rollout.length_schedule(rows, new / 5, new, seed=1)
    out = {}
    for name, s in (("ragged", sched), ("uniform", None)):
        want, _ = _decode("hf", model, ids, mask, new, s, gen_cfg, eos, pad)
        got1, _ = _decode("fast", model, ids, mask, new, s, gen_cfg, eos, pad)
        got2, _ = _decode("fast", model, ids, mask, new, s, gen_cfg, eos, pad)  # replayed graphs
        out[name] = bool(torch.equal(want, got1) and torch.equal(want, got2))
    print(f"exactness (fp32, fast vs hf, identical token ids): {out}", flush=True)
    return out


def first_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, gen_cfg: Any, eos: int,
               pad: int) -> dict[str, Any]:
    """The first generated position's fp32 logits, fast against HF generate's own (raw) logits: the largest
    difference, and the rows whose first token differs -- a near-tie flip when HF's logits of the two tokens
    are closer than twice that row's largest difference (rounding decides), else a real flip."""
    log: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        fastgen.generate_ids(model, ids, mask, 1, eos, pad, observer=fastgen.Observer(logits=log))
        gen_cfg.max_new_tokens = 1
        hf = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, output_logits=True,
                            return_dict_in_generate=True).logits[0].float()
    step, rows, fast = log[0]
    fast = fast[torch.argsort(rows)].float()
    diff = (fast - hf).abs().amax(1)
    a, b = hf.argmax(1), fast.argmax(1)
    flip = a != b
    gap = hf.gather(1, a[:, None])[:, 0] - hf.gather(1, b[:, None])[:, 0]
    near = flip & (gap <= 2 * diff)
    return {"rows": int(ids.shape[0]), "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float((fast - hf).abs().mean()),
            "first_token_identical": float((~flip).float().mean()),
            "near_tie_flips": int(near.sum()), "other_flips": int((flip & ~near).sum())}


class Member:
    """One member's rollout batch at the paper's scale: ``rows`` random prompts of ``lens`` tokens, completion
    lengths from the schedule (the same bits in every phase that builds it)."""

    def __init__(self, model: torch.nn.Module, rows: int, cap: int, mean: float, lens: tuple[int, int]) -> None:
        self.model, self.rows, self.cap = model, rows, cap
        tok = benchlib.tokenizer()
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        self.gen_cfg = generation_config(model, tok, cap)
        dev = str(next(model.parameters()).device)
        self.ids, self.mask = _prompts(rows, *lens, model.config.vocab_size, self.pad, self.eos, dev)
        self.sched = bench_rollout.length_schedule(rows, mean, cap)
        self.tokens = int(sum(self.sched))

    def decode(self, engine: str, new: int | None = None, sched: list[int] | None = None) -> tuple[torch.Tensor, float]:
        return _decode(engine, self.model, self.ids, self.mask, self.cap if new is None else new,
                       self.sched if sched is None else sched, self.gen_cfg, self.eos, self.pad)

    def rollout(self) -> dict[str, Any]:
        """The member's rollout twice with the fast engine as set: the first call compiles and captures (its
        time is reported apart), the second is timed; and the decode step at ``rows`` rows: 33 against 1 new
        token on the same state (the schedule's flag) and graphs, both warmed first."""
        before = bench_noise.compiles()
        first, first_s = self.decode("fast")
        first_built = bench_noise.compiles() - before
        for n in (1, 33):  # warm-up of the step calls
            self.decode("fast", n, [n] * self.rows)
        before = bench_noise.compiles()
        second, s = self.decode("fast")
        times = {n: self.decode("fast", n, [n] * self.rows)[1] for n in (1, 33)}
        return {"first_s": first_s, "s": s, "tokens_per_s": bench_rollout.completion_tokens(second, [self.eos]) / s,
                "replay_identical": bool(torch.equal(first, second)), "out": second,
                "decode_step_ms": (times[33] - times[1]) / 32 * 1e3, "compiles_first_call": first_built,
                "kernels_built_while_timed": bench_noise.compiles() - before}


def engines(model: torch.nn.Module, key: str, rows: int, cap: int, mean: float, hf_cap: int,
            lens: tuple[int, int] = (100, 140)) -> dict[str, Any]:
    """One member's rollout at the paper's scale: fast with the eager decode step (CUDA graphs) and HF
    generate, tokens/s, the decode step at ``rows`` rows, peak memory, the first-step logits against HF."""
    cfg = model.config
    device = str(next(model.parameters()).device)
    mem = _Mem(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    m = Member(model, rows, cap, mean, lens)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    slots = -(-(m.ids.shape[1] + cap) // 256) * 256
    dtype = next(model.parameters()).dtype
    kv = cfg.num_hidden_layers * 2 * rows * cfg.num_key_value_heads * slots * head_dim * dtype.itemsize
    res: dict[str, Any] = {"rows": rows, "prompt_len": int(m.ids.shape[1]), "tokens": m.tokens,
                           "weights_gib": _gib(weights), "kv_cache_gib": _gib(kv)}
    fastgen.set_compile(model, "false")  # this phase: the eager decode step (the compiled one: <model>.compiled)
    mem.reset()
    base = mem.now()
    r = m.rollout()
    fast2 = r.pop("out")
    res.update({f"fast_{k}": v for k, v in r.items()})
    res["fast_peak_gib"] = _gib(mem.peak())
    res["fast_extra_gib"] = _gib(mem.peak() - base)
    # peak <= weights + master (the ES copy, not allocated here) + KV cache + 4 GiB
    res["memory_bound_gib"] = _gib(2 * weights + kv) + 4
    res["memory_ok"] = res["fast_peak_gib"] + _gib(weights) <= res["memory_bound_gib"]
    # HF: the whole member, or (hf_cap < cap) both engines on the schedule capped at hf_cap
    hf_sched = m.sched if hf_cap >= cap else [min(s, hf_cap) for s in m.sched]
    res["hf_schedule"] = "the member's" if hf_cap >= cap else f"the member's capped at {hf_cap} tokens"
    if hf_cap >= cap:
        fast_ref, fast_ref_s = fast2, res["fast_s"]
    else:
        m.decode("fast", hf_cap, hf_sched)
        fast_ref, fast_ref_s = m.decode("fast", hf_cap, hf_sched)
    mem.reset()
    hf, res["hf_s"] = m.decode("hf", max(hf_sched), hf_sched)
    res["hf_peak_gib"] = _gib(mem.peak())
    res["hf_tokens_per_s"] = bench_rollout.completion_tokens(hf, [m.eos]) / res["hf_s"]
    res["fast_over_hf"] = (bench_rollout.completion_tokens(fast_ref, [m.eos]) / fast_ref_s) / res["hf_tokens_per_s"]
    res["hf_member_s"] = res["hf_s"] if hf_cap >= cap else res["tokens"] / res["hf_tokens_per_s"]
    width = min(hf.shape[1], fast_ref.shape[1])  # (whole rows: in bf16 mostly a count of near-ties, see first_step)
    res["rows_identical_to_hf"] = float((hf[:, :width] == fast_ref[:, :width]).all(1).float().mean())
    res["first_step"] = first_step(model, m.ids, m.mask, m.gen_cfg, m.eos, m.pad)
    fastgen.set_compile(model, "auto")
    want = TARGETS["fast_over_hf"].get(key)
    res["pass"] = {"memory": res["memory_ok"], "replay": res["fast_replay_identical"]}
    if want is not None:
        res["pass"]["fast_over_hf"] = res["fast_over_hf"] >= want
    fs = res["first_step"]
    print(f"engines {key}: fast (eager step) {res['fast_s']:.1f} s/member ({res['fast_tokens_per_s']:.0f} tokens/s; "
          f"first call {res['fast_first_s']:.1f} s), hf {res['hf_tokens_per_s']:.0f} tokens/s on {res['hf_schedule']} "
          f"schedule: fast/hf {res['fast_over_hf']:.2f}x (target {f'{want}x' if want else 'none'}); decode step at "
          f"{rows} rows {res['fast_decode_step_ms']:.1f} ms; peak {res['fast_peak_gib']:.1f} GiB (bound "
          f"{res['memory_bound_gib']:.1f}); first step: max |logit diff| {fs['max_abs_logit_diff']:.3g}, first "
          f"token identical {fs['first_token_identical']:.0%} ({fs['near_tie_flips']} near-tie flips, "
          f"{fs['other_flips']} others)", flush=True)
    return res


def compiled(model: torch.nn.Module, key: str, check: Check, rows: int, cap: int, mean: float,
             lens: tuple[int, int] = (100, 140)) -> dict[str, Any]:
    """The same member with the compiled decode step (rollout.compile=true): the first call compiles and
    captures, the second is timed; tokens/s over the eager step's (``<model>.engines``), and whether the
    step was refused (then it ran eagerly) or gave other tokens than the eager step."""
    m = Member(model, rows, cap, mean, lens)
    fastgen.set_compile(model, "true")
    try:
        r = m.rollout()
        res = {f"compiled_{k}": v for k, v in r.items() if k != "out"}
        res["refused"] = fastgen.compile_refused(model)
        fastgen.set_compile(model, "false")
        eager, _ = m.decode("fast")
        res["tokens_identical_to_eager"] = bool(torch.equal(eager, r["out"]))
    finally:
        fastgen.set_compile(model, "auto")
    eng = check.result(f"{key}.engines")
    res["compiled_over_eager"] = res["compiled_tokens_per_s"] / eng["fast_tokens_per_s"] if eng else None
    print(f"compiled {key}: {res['compiled_s']:.1f} s/member ({res['compiled_tokens_per_s']:.0f} tokens/s; first call "
          f"{res['compiled_first_s']:.1f} s, {res['compiled_compiles_first_call']} graph(s) compiled), decode step "
          f"{res['compiled_decode_step_ms']:.1f} ms; over eager {res['compiled_over_eager'] or float('nan'):.2f}x; "
          f"refused: {res['refused']}; tokens identical to eager: {res['tokens_identical_to_eager']}", flush=True)
    return res


def kernels(model: torch.nn.Module, rows: int, lens: tuple[int, int] = (100, 140),
            steps: tuple[str, ...] = ("eager", "compiled")) -> dict[str, float]:
    """Kernels per decode step of each of ``steps`` (tools/bench_decode.py: the profiler, graphs off), on
    ``rows`` of the member's prompts (the count does not depend on the row count)."""
    import bench_decode

    m = Member(model, rows, 8, 4.0, lens)
    out = {name: bench_decode.decode_kernels_per_step(model, m.ids, m.mask, compiled=name == "compiled")
           for name in steps}
    print("   kernels per decode step: " + ", ".join(f"{k} {v:.0f}" for k, v in out.items()), flush=True)
    return out


class _Mem:
    """CUDA memory statistics (zeros on the CPU, where --tiny runs the same phases)."""

    def __init__(self, device: str) -> None:
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.dev) if self.cuda else 0

    def now(self) -> int:
        return torch.cuda.memory_allocated(self.dev) if self.cuda else 0


# ---- ES engine -----------------------------------------------------------------------------------------------

def perturb_update(model: torch.nn.Module, n: int, reps: int = 2) -> dict[str, Any]:
    """Seconds of Engine.perturb and of Engine.update (n members, the default shaping and antithetic
    setting) over the whole model at the default es.noise_chunk, the best of ``reps`` each, after
    benchlib.warm_kernels has built every compiled noise kernel they use."""
    cfg = Config()
    dev = str(next(model.parameters()).device)
    rep = Replica.wrap(model, "device", "model")
    eng = Engine(cfg.es.noise_chunk, scheme=cfg.es.noise_scheme)
    seeds, signs = member_seeds(cfg.seed, 0, n, cfg.es.antithetic)
    shaped = shape_rewards(np.arange(n, dtype=np.float64), cfg.es.shaping)
    benchlib.warm_kernels(eng, rep)
    built = bench_noise.compiles()
    best = {"perturb_s": float("inf"), "update_s": float("inf")}
    for k in range(reps):
        _sync(dev)
        a = time.perf_counter()
        eng.perturb(rep, int(seeds[k]), int(signs[k]), cfg.es.sigma)
        _sync(dev)
        b = time.perf_counter()
        eng.update([rep], seeds, signs, shaped, cfg.es.alpha)
        _sync(dev)
        best = {"perturb_s": min(best["perturb_s"], b - a), "update_s": min(best["update_s"], time.perf_counter() - b)}
    chunk = default_chunk(cfg.es.noise_chunk, cfg.es.noise_scheme, torch.device(dev).type)
    out = {"chunk": chunk, "n": n, "params": sum(p.numel() for _, p in rep.params), **best,
           "kernels_built_while_timed": bench_noise.compiles() - built}
    print(f"   perturb {out['perturb_s']:.3f} s, update (N={n}) {out['update_s']:.3f} s at es.noise_chunk="
          f"{out['chunk']}", flush=True)
    del rep
    return out


def noise_bits(model: torch.nn.Module, device: str, small: bool) -> dict[str, Any]:
    shapes = [(n, tuple(p.shape)) for n, p in named_params(model)]
    r = bench_noise.device_check(shapes, device, per_slice=1 << (14 if small else 20),
                                 stats_elems=1 << (18 if small else 24))
    print(f"   keyed noise: {r['elements_compared']} elements of {r['tensors']} tensors compared with the CPU, "
          f"{len(r['mismatches'])} mismatches; statistics out of bounds: {r['stats_out_of_bounds'] or 'none'}",
          flush=True)
    return r


def iteration(key: str, check: Check) -> dict[str, Any]:
    """The paper's iteration from this run's measurements: N x (member rollout + perturb) + update (rewards
    are CPU string checks, restore is free: perturb-from-theta)."""
    eng, pu = check.result(f"{key}.engines"), check.result(f"{key}.perturb_update")
    if eng is None or pu is None:
        raise RuntimeError(f"needs {key}.engines and {key}.perturb_update")
    comp = check.result(f"{key}.compiled") or {}
    usable = comp and not comp["refused"]  # (a run uses the compiled step unless its own check refused it)
    member = min(eng["fast_s"], comp["compiled_s"] if usable else float("inf"))
    n = PAPER["n"]
    est = n * (member + pu["perturb_s"]) + pu["update_s"]
    want = TARGETS["iteration_s"].get(key)
    out = {"iteration_s": est, "member_rollout_s": member, "decode_step": "compiled" if member < eng["fast_s"]
           else "eager", "n": n, "rows": eng["rows"], "tokens": eng["tokens"],
           "target_s": want, "pass": None if want is None else est <= want,
           "formula": "n * (member_rollout_s + perturb_s) + update_s"}
    print(f"   paper iteration {key} (N={n}, {eng['rows']} prompts, <= {PAPER['cap']} tokens): {est:.1f} s "
          f"(target {f'{want} s' if want else 'none'})", flush=True)
    return out


# ---- es.master_dtype and es.master_on ---------------------------------------------------------------------
MASTER_SETTINGS = [("device", "model"), ("host", "model"), ("device", "float32"), ("host", "float32")]


def master_checks(arch: benchlib.Arch, *, dtype: torch.dtype, device: str, n: int, chunk: int,
                  updates: int = 1, sigma: float = 1e-3, alpha: float = 5e-4) -> dict:
    """The same updates from the same weights under each (es.master_on, es.master_dtype): host and device
    masters must give the same master and working-weight digests, an fp32 master must move the RMSNorm
    weights (which a bf16 master cannot at the paper's sigma and alpha), and the device-side digest must
    equal the CPU's on sample tensors.  Prints memory by component; returns what it found (``ok``)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    mem = (lambda: torch.cuda.memory_allocated(dev)) if cuda else (lambda: 0)
    model = benchlib.build_model(arch, dtype, device)
    weights_bytes = sum(p.numel() * p.element_size() for _, p in named_params(model))
    start = {name: p.detach().to("cpu", copy=True) for name, p in named_params(model)}
    norms = [name for name in start if "norm" in name]
    out: dict = {"arch": arch.name, "weights": weights_bytes, "settings": {}, "problems": []}
    print(f"-- master checks: {arch.name}, {updates} update(s) at sigma={sigma:g} alpha={alpha:g} N={n}; "
          f"weights {_gib(weights_bytes):.2f} GiB", flush=True)
    for master_on, master_dtype in MASTER_SETTINGS:
        with torch.no_grad():
            for name, p in named_params(model):
                p.copy_(start[name])
        base_mem = mem()
        rep = Replica.wrap(model, master_on, master_dtype)
        master_bytes = sum(t.numel() * t.element_size() for t in rep.master.values())
        master_dev = mem() - base_mem
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        eng = Engine(chunk)
        t0 = time.perf_counter()
        for t in range(updates):
            seeds, signs = member_seeds(12, t, n)
            eng.perturb(rep, int(seeds[0]), 1, sigma)
            shaped = (np.arange(n, dtype=np.float64) - (n - 1) / 2) / n
            eng.update([rep], seeds, signs, shaped, alpha)
        if cuda:
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - t0
        scratch = (torch.cuda.max_memory_allocated(dev) - mem()) if cuda else 0
        moved = float(np.mean([(rep.master[name] != start[name].to(rep.master[name].dtype)).float().mean().item()
                               for name in norms])) if norms else float("nan")
        got = {"master_digest": weights_digest(sorted(rep.master.items())),
               "working_digest": weights_digest(rep.params), "norm_moved": moved,
               "master_bytes": master_bytes, "master_on_device": master_dev, "update_scratch_peak": scratch,
               "seconds": elapsed}
        # the device digest against the CPU's, on the first and the largest tensors
        for name, p in (rep.params[0], max(rep.params, key=lambda kv: kv[1].numel())):
            if tensor_digest(p) != tensor_digest(p.to("cpu")):
                out["problems"].append(f"{master_on}/{master_dtype}: device digest of {name} differs from the CPU's")
        out["settings"][f"{master_on}/{master_dtype}"] = got
        print(f"   master_on={master_on:6s} master_dtype={master_dtype:7s} master {_gib(master_bytes):.2f} GiB "
              f"({'on the device' if master_on == 'device' else 'host'}; +{_gib(master_dev):.2f} GiB device), update "
              f"scratch peak {_gib(scratch):.2f} GiB, {elapsed:.1f} s; norm weights moved: {moved:.1%}; "
              f"digest {got['master_digest'][:12]}", flush=True)
        del rep, eng
        _free()
    s = out["settings"]
    for kind in ("model", "float32"):
        a, b = s[f"device/{kind}"], s[f"host/{kind}"]
        for key in ("master_digest", "working_digest"):
            if a[key] != b[key]:
                out["problems"].append(f"master_dtype={kind}: master_on=host gives another {key} than device")
    if dtype != torch.float32:  # in fp32 models both settings are one
        if s["device/model"]["norm_moved"] != 0.0:
            out["problems"].append("a model-dtype master moved norm weights: the rounding analysis is wrong")
        if not s["device/float32"]["norm_moved"] > 0.9:
            out["problems"].append(f"an fp32 master moved only {s['device/float32']['norm_moved']:.1%} of norm weights")
    out["ok"] = not out["problems"]
    for p in out["problems"]:
        print(f"   MISMATCH: {p}", flush=True)
    print("gpu_check master: " + json.dumps(out, sort_keys=True), flush=True)
    return out


# ---- low-rank and the ES table ------------------------------------------------------------------------------

def lowrank_throughput(tiny: bool, device: str) -> dict[str, Any]:
    """es.noise=lowrank: tokens/s of member passes over plain batched decoding of the same rows."""
    import bench_lowrank

    if tiny:
        r = bench_lowrank.gpu_throughput(TINY, dtype=torch.float32, device="cpu", population=8, prompts=4, tokens=8,
                                         members_per_pass=4, passes=1, check_prompts=2, check_tokens=4)
    else:
        r = bench_lowrank.gpu_throughput(ARCHS["1.5B"], dtype=torch.bfloat16, device=device, passes=1,
                                         check_tokens=16)
    print(bench_lowrank.gpu_table(r), flush=True)
    return r


def es_table(arch: benchlib.Arch, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """tools/bench.py's table, the fast engine (a run's), no baseline."""
    res = bench.run(arch, dtype=dtype, device=args.device, n=args.n, prompts=args.prompts, tokens=args.tokens,
                    iterations=args.iterations, warmup=args.warmup, warmup_n=args.warmup_n, chunk=args.chunk,
                    with_baseline=False, engine="fast")
    print(bench.table(res), flush=True)
    return {"hpc": res.hpc, "rollout_tokens_per_s": res.hpc_tokens, "kernels_built_while_timed": res.timed_compiles,
            "n": res.n, "prompts": res.prompts, "tokens": res.tokens}


# ---- the summary -----------------------------------------------------------------------------------------------

def summary(check: Check, keys: list[str]) -> dict[str, Any]:
    """Per model, the figures the check exists for (None where a phase failed or was skipped)."""
    out: dict[str, Any] = {}
    low = check.result("lowrank")
    for key in keys:
        eng = check.result(f"{key}.engines") or {}
        comp = check.result(f"{key}.compiled") or {}
        kern = check.result(f"{key}.kernels")
        pu = check.result(f"{key}.perturb_update") or {}
        nb = check.result(f"{key}.noise_bits")
        it = check.result(f"{key}.iteration") or {}
        out[key] = {
            "fast_tokens_per_s": eng.get("fast_tokens_per_s"),
            "compiled_tokens_per_s": comp.get("compiled_tokens_per_s"), "compiled_over_eager": comp.get(
                "compiled_over_eager"), "compiled_refused": comp.get("refused"),
            "hf_tokens_per_s": eng.get("hf_tokens_per_s"), "fast_over_hf": eng.get("fast_over_hf"),
            "kernels_per_decode_step": kern, "decode_step_ms": eng.get("fast_decode_step_ms"),
            "compiled_decode_step_ms": comp.get("compiled_decode_step_ms"),
            "first_step": eng.get("first_step"), "perturb_s": pu.get("perturb_s"), "update_s": pu.get("update_s"),
            "noise_chunk": pu.get("chunk"), "iteration_s": it.get("iteration_s"),
            "iteration_target_s": it.get("target_s"),
            "noise_bits_identical": None if nb is None else not nb["mismatches"],
            "noise_stats_ok": None if nb is None else not nb["stats_out_of_bounds"]}
        if key in ("1.5B", "tiny") and low is not None:
            out[key]["lowrank_fraction_of_plain"] = low["lowrank_fraction_of_plain"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="run on CPU with a tiny architecture (a dry run)")
    ap.add_argument("--only", choices=sorted(ARCHS), action="append", help="run only this model (repeatable)")
    benchlib.add_args(ap)
    ap.set_defaults(dtype="bfloat16", device="cuda", n=30, prompts=16, tokens=32, iterations=1, warmup=1)
    ap.add_argument("--warmup-n", type=int, default=2, help="members per warm-up iteration of the ES table")
    ap.set_defaults(chunk=1 << 26)  # the ES table's es.noise_chunk (keyed: the chunk changes no bit)
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="wall seconds from the start; a phase that would not fit in what is left is skipped")
    ap.add_argument("--hf-cap-7b", type=int, default=128, help="7B: HF and fast on the schedule capped here")
    ap.add_argument("--out", default=None, help="JSON report, rewritten after each phase (default: "
                    "gpu_check.json on a GPU, none with --tiny)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode step (the default with "
                    "--tiny: compiling it on a CPU takes minutes; tests/test_fastgen_compile.py checks it there)")
    ap.add_argument("--rows", type=int, default=PAPER["rows"], help="prompts per member in the engines phase")
    ap.add_argument("--cap", type=int, default=PAPER["cap"], help="max new tokens in the engines phase")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
        archs = {"tiny": TINY}
        args.rows, args.cap = min(args.rows, 8), min(args.cap, 24)
    else:
        if not torch.cuda.is_available() and args.device.startswith("cuda"):
            print("gpu_check: torch sees no GPU (use --tiny for a CPU dry run)", file=sys.stderr)
            return 2
        archs = {k: ARCHS[k] for k in (args.only or ["1.5B", "7B"])}
        args.out = args.out or "gpu_check.json"
    dtype = benchlib.resolve(args)
    import transformers

    report: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "tiny": args.tiny,
                              "paper": PAPER, "targets": TARGETS}
    report["device_name"] = (torch.cuda.get_device_name(torch.device(args.device))
                             if args.device.startswith("cuda") else "cpu")
    check = Check(args.out, args.budget_s, report)
    print(f"device: {report['device_name']}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"budget {args.budget_s:.0f} s", flush=True)
    check.write()
    est = {k: (1 if args.tiny else v) for k, v in ESTIMATE_S.items()}
    no_compile = "--no-compile" if args.no_compile else "--tiny: a CPU dry run" if args.tiny else ""
    exact = check.phase("exactness", est["exactness"], exactness, args.device, *((9, 16) if args.tiny else ()))
    bad: list[str] = [] if exact is None else [f"exactness {k}" for k, ok in exact.items() if not ok]
    # First what the check exists for, per model (the iteration estimate needs the engines, the perturb and
    # update, and the compiled step); then kernels per step, low-rank, the ES table and the master checks.
    mean = PAPER["mean"] if not args.tiny else 8.0
    lens = (100, 140) if not args.tiny else (3, 9)
    models: dict[str, torch.nn.Module] = {}
    for key, arch in archs.items():
        model = check.phase(f"{key}.build", est["build"] * (2 if key == "7B" else 1), benchlib.build_model, arch,
                            dtype, args.device,
                            record=lambda m, arch=arch: {"arch": arch.describe(), "params": benchlib.n_params(m)})
        if model is None:
            continue
        models[key] = model
        hf_cap = args.hf_cap_7b if key == "7B" else args.cap
        check.phase(f"{key}.engines", est["engines"], engines, model, key, args.rows, args.cap, mean, hf_cap, lens)
        check.phase(f"{key}.perturb_update", est["perturb_update"], perturb_update, model, PAPER["n"])
        nb = check.phase(f"{key}.noise_bits", est["noise_bits"], noise_bits, model, args.device, args.tiny)
        if nb is not None:
            bad += [f"{key}: {m}" for m in nb["mismatches"]]
            bad += [f"{key}: noise {k} out of bounds" for k in nb["stats_out_of_bounds"]]
        check.phase(f"{key}.compiled", est["compiled"], compiled, model, key, check, args.rows, args.cap, mean, lens,
                    skip=no_compile)
        check.phase(f"{key}.iteration", est["iteration"], iteration, key, check)
        report["summary"] = summary(check, list(archs))
        check.write()
    for key, model in models.items():
        check.phase(f"{key}.kernels", est["kernels"], kernels, model, min(args.rows, 16), lens,
                    ("eager",) if no_compile else ("eager", "compiled"))
    del model, models
    _free()
    check.phase("lowrank", est["lowrank"], lowrank_throughput, args.tiny, args.device)
    table_key = "tiny" if args.tiny else "1.5B"
    if table_key in archs:
        arch = archs[table_key]
        check.phase(f"{table_key}.es_table", est["es_table"], es_table, arch, args, dtype)
        found = check.phase(f"{table_key}.master", est["master"], master_checks, arch, dtype=dtype, device=args.device,
                            n=4, chunk=args.chunk)
        if found is not None and not found["ok"]:
            bad += [f"master: {p}" for p in found["problems"]]
    report["summary"] = summary(check, list(archs))
    report["mismatches"] = bad
    check.write()
    print("gpu_check summary: " + json.dumps(report["summary"], default=str), flush=True)
    print(f"gpu_check: {time.perf_counter() - check.t0:.0f}s in all", flush=True)
    for f in bad:
        print(f"gpu_check: MISMATCH {f}", flush=True)
    if bad:
        print("gpu_check: MISMATCH (see above)", file=sys.stderr, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
