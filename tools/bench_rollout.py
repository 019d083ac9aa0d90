#!/usr/bin/env python
"""Rollout engines side by side: HF ``generate`` against hpc_es.fastgen, on copies of the same model.

A script, never a test.  tools/bench.py calls :func:`run` after its own table (and puts the figures in its
``--json`` line); on its own it prints the same table.  Both engines decode the same pre-tokenized prompts
(tokenizing and decoding are not timed), calls alternating between the engines so that load from other
processes hits both alike, with

* ``ragged`` lengths: a per-row schedule (exponential lengths, capped at max_new_tokens, one row at the cap),
  EOS forced where the schedule ends, the way a population's completions end at different lengths;
* ``uniform`` lengths: every row runs to max_new_tokens;

and whole ES iterations (the trainer's own ``Population.score`` + ``Population.update``) with each engine,
every member's completions on the ragged schedule.
Tokens/s counts the tokens of the completions (EOS included, padding after it not).

    .venv/bin/python tools/bench_rollout.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import benchlib  # noqa: E402  (tools/benchlib.py: model building, the trainer-driven iteration)
from hpc_es import fastgen  # noqa: E402
from hpc_es.rollout import _ForceEOS, generation_config  # noqa: E402

TARGETS = {"fast_over_hf_ragged": 1.5, "fast_over_hf_uniform": 1.0, "fast_over_hf_iteration": 1.3}


def length_schedule(n: int, mean: float, cap: int, seed: int = 0) -> list[int]:
    """Completion lengths (tokens, EOS included): exponential with ``mean``, in [1, cap], row 0 at ``cap``."""
    rng = np.random.default_rng(seed)
    out = np.clip(np.ceil(rng.exponential(mean, n)), 1, cap).astype(int).tolist()
    if out:
        out[0] = cap
    return out


def _eos_ids(eos: Any) -> list[int]:
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def completion_tokens(new: torch.Tensor, eos: list[int]) -> int:
    """Tokens up to and including each row's first EOS (the whole row when it has none)."""
    hit = torch.isin(new, torch.tensor(eos, device=new.device))
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1],
                                                                               dtype=torch.long))
    return int(first.sum())


class Engines:
    """One model copy per engine; ``call(engine, sched)`` decodes the batch once, returns (tokens, s)."""

    def __init__(self, model: torch.nn.Module, tok: Any, prompts: list[str], max_new: int, device: str) -> None:
        self.models = {"hf": model, "fast": copy.deepcopy(model)}
        self.enc = tok(prompts, return_tensors="pt", padding=True).to(torch.device(device))
        self.gen_cfg = generation_config(model, tok, max_new)
        self.eos = _eos_ids(self.gen_cfg.eos_token_id)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos[0]
        self.max_new = max_new
        self.cuda = device.startswith("cuda")
        self.out: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def call(self, engine: str, sched: list[int] | None) -> tuple[int, float]:
        ids, mask = self.enc["input_ids"], self.enc["attention_mask"]
        model = self.models[engine]
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if engine == "fast":
            new = fastgen.generate_ids(model, ids, mask, self.max_new, self.eos, self.pad,
                                        observer=fastgen.Observer(sched))
        else:
            procs = [_ForceEOS(sched, ids.shape[1], self.eos[0])] if sched is not None else None
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=self.gen_cfg,
                                 logits_processor=procs)[:, ids.shape[1]:]
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.out[engine] = new
        return completion_tokens(new, self.eos), dt


def measure(eng: Engines, sched: list[int] | None, reps: int) -> dict[str, Any]:
    """Alternating calls (after one warm-up call each); tokens/s per engine from its fastest call (on a
    shared machine other processes only ever slow a call down, so the best call is the least disturbed)."""
    import bench_noise

    tokens = {"hf": 0, "fast": 0}
    secs: dict[str, list[float]] = {"hf": [], "fast": []}
    built = 0
    for r in range(reps + 1):
        for engine in (("hf", "fast") if r % 2 else ("fast", "hf")):
            before = bench_noise.compiles()
            n, dt = eng.call(engine, sched)
            if r:
                tokens[engine] += n
                secs[engine].append(dt)
                built += bench_noise.compiles() - before
        if not torch.equal(eng.out["hf"], eng.out["fast"]):
            raise AssertionError("the engines produced different tokens")
    rate = {e: tokens[e] / reps / max(min(secs[e]), 1e-12) for e in tokens}
    return {"tokens_per_s": rate, "fast_over_hf": rate["fast"] / max(rate["hf"], 1e-12),
            "best_s": {e: min(secs[e]) for e in secs}, "median_s": {e: statistics.median(secs[e]) for e in secs},
            "tokens_per_call": tokens["fast"] // reps, "kernels_built_while_timed": built}


def iterations(arch: Any, dtype: torch.dtype, device: str, n: int, prompts: int, tokens: int, reps: int,
               chunk: int, mean: float | None = None) -> dict[str, Any]:
    """Whole ES iterations (Population.score + Population.update) with each engine, alternating; the
    fastest iteration of each (see measure).  With ``mean``, every member's completions end on the ragged
    length schedule (as a population's do); without it, where the random model happens to stop."""
    cfg = {e: benchlib.bench_config(n, prompts, tokens, 1e-3, 5e-4, chunk) for e in ("hf", "fast")}
    runs = {}
    for e in ("hf", "fast"):
        cfg[e].rollout.engine = e
        runs[e] = benchlib.HpcEsRun(benchlib.build_model(arch, dtype, device), cfg[e], device)
        if mean is not None:
            runs[e].population.observer = fastgen.Observer(length_schedule(prompts, mean, tokens))
    import bench_noise

    rows: dict[str, list[float]] = {"hf": [], "fast": []}
    built = 0
    for t in range(reps + 1):
        for e in (("hf", "fast") if t % 2 else ("fast", "hf")):
            before = bench_noise.compiles()
            r = runs[e].iteration(t, 0 if t else 2)  # (HpcEsRun built every noise kernel beforehand)
            if t:
                rows[e].append(sum(r.values()))
                built += bench_noise.compiles() - before
    med = {e: min(v) for e, v in rows.items()}
    return {"seconds": med, "fast_over_hf": med["hf"] / max(med["fast"], 1e-12), "kernels_built_while_timed": built}


def run(arch: Any, *, dtype: torch.dtype, device: str = "cpu", prompts: int = 32, max_new: int = 96,
        mean: float = 30.0, reps: int = 3, n: int = 8, iter_prompts: int = 16, iter_tokens: int = 96,
        iter_reps: int = 3, chunk: int = 1 << 20, log: Any = None) -> dict[str, Any]:
    """The rollout figures: tokens/s per engine on ragged and uniform lengths, and whole iterations."""
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    tok = benchlib.tokenizer()
    model = benchlib.build_model(arch, dtype, device)
    from hpc_es.tasks import load_task

    cfg = benchlib.bench_config(n, prompts, max_new, 1e-3, 5e-4, chunk)
    train = list(load_task(cfg).train_examples())
    texts = [train[i % len(train)].prompt for i in range(prompts)]
    eng = Engines(model, tok, texts, max_new, device)
    sched = length_schedule(prompts, mean, max_new)
    say(f"rollout engines: {prompts} prompts, {max_new} new tokens; ragged (mean {mean:g}) and uniform")
    ragged = measure(eng, sched, reps)
    uniform = measure(eng, [max_new] * prompts, reps)
    iter_mean = mean * iter_tokens / max_new
    say(f"rollout engines: whole iterations, N={n}, {iter_prompts} prompts x {iter_tokens} tokens, ragged "
        f"(mean {iter_mean:g})")
    it = iterations(arch, dtype, device, n, iter_prompts, iter_tokens, iter_reps, chunk, iter_mean)
    ratios = {"ragged": ragged["fast_over_hf"], "uniform": uniform["fast_over_hf"], "iteration": it["fast_over_hf"]}
    return {"ragged": ragged, "uniform": uniform, "iteration": it, "fast_over_hf": ratios,
            "pass": {k: ratios[k.removeprefix("fast_over_hf_")] >= v for k, v in TARGETS.items()},
            "setup": {"prompts": prompts, "max_new_tokens": max_new, "mean_length": mean, "reps": reps},
            "wall_s": time.perf_counter() - t0}


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [(f"== rollout engines (hf = model.generate, fast = hpc_es.fastgen), {s['prompts']} prompts, "
              f"{s['max_new_tokens']} new tokens, {s['reps']} alternating calls each, best of each | "
              f"{res['wall_s']:.0f}s")]
    for key, label in (("ragged", f"ragged (exp. mean {s['mean_length']:g})"), ("uniform", "uniform")):
        r = res[key]
        lines.append(f"   {label:26s} tokens/s hf {r['tokens_per_s']['hf']:8.0f}  fast {r['tokens_per_s']['fast']:8.0f}"
                     f"  fast/hf {r['fast_over_hf']:5.2f}x   ({r['tokens_per_call']} tokens per call)")
    it = res["iteration"]
    lines.append(f"   {'whole iteration (s)':26s} hf {it['seconds']['hf']:8.2f}  fast {it['seconds']['fast']:8.2f}"
                 f"  hf/fast {it['fast_over_hf']:5.2f}x")
    lines.append("   targets")
    for k, want in TARGETS.items():
        got = res["fast_over_hf"][k.removeprefix("fast_over_hf_")]
        lines.append(f"     {k:28s} {got:6.2f}x   (>= {want:.2f}x) {'PASS' if got >= want else 'MISS'}")
    return "\n".join(lines)


def summary(res: Any, roll: dict[str, Any] | None, keyed: dict[str, float] | None = None,
            low: Any = None, decode: dict[str, Any] | None = None) -> dict[str, Any]:
    """tools/bench.py's --json line: its own figures (a bench.Result) and, when run, the engines', the keyed
    noise against torch.randn (tools/bench_noise.py), low-rank against full-rank (tools/bench_lowrank.py) and
    the decode step eager against compiled (tools/bench_decode.py: ``decode_kernels_per_step``,
    ``compiled_over_eager``)."""
    h, b, lim = res.hpc, res.base, res.limits
    noise = (res.n + res.terms) * res.params / max(h["perturb"] + h["update"], 1e-12)
    out: dict[str, Any] = {
        "params": res.params, "device": res.device, "n": res.n, "prompts": res.prompts, "tokens": res.tokens,
        "es_overhead_over_baseline": h["es"] / b["es"] if b else None,
        "overhead_share": h["es"] / h["iteration"],
        "iteration_over_baseline": h["iteration"] / b["iteration"] if b else None,
        "noise_over_randn": noise / lim["randn_1"],
        "rollout_over_plain": res.hpc_tokens / res.plain_rate,
        "kernels_built_while_timed": res.timed_compiles,
        "load_avg": list(res.load)}
    passed = {"es_overhead_over_baseline": b is not None and h["es"] / b["es"] <= 0.4,
              "overhead_share": h["es"] / h["iteration"] <= 0.25,
              "noise_over_randn": noise / lim["randn_1"] >= 0.8,
              "rollout_over_plain": res.hpc_tokens / res.plain_rate >= 0.97}
    if roll is not None:
        out["rollout_tokens_per_s"] = {k: roll[k]["tokens_per_s"] for k in ("ragged", "uniform")}
        out["fast_over_hf"] = roll["fast_over_hf"]
        out["iteration_seconds"] = roll["iteration"]["seconds"]
        out["kernels_built_while_timed"] += sum(roll[k]["kernels_built_while_timed"]
                                                for k in ("ragged", "uniform", "iteration"))
        passed.update(roll["pass"])
    if keyed is not None:
        out["keyed_noise_over_randn"] = keyed["noise_over_randn"]
        out["noise_m_per_s"] = {k: keyed[k] / 1e6 for k in ("randn", "keyed_eager", "keyed_compiled", "keyed")
                                if k in keyed}
        passed["keyed_noise_over_randn"] = keyed["noise_over_randn"] >= 0.7
        out["kernels_built_while_timed"] += keyed.get("kernels_built_while_timed", 0)
    if low is not None:
        out["lowrank_over_full"] = low.lowrank_over_full
        passed["lowrank_over_full"] = low.lowrank_over_full >= 4.0
    if decode is not None:
        out.update(decode)
    passed["no_kernel_built_while_timed"] = out["kernels_built_while_timed"] == 0  # every figure above is warm
    out["pass"] = passed
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--mean", type=float, default=30.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(benchlib.Arch(), dtype=torch.float32, prompts=args.prompts, max_new=args.tokens, mean=args.mean,
              reps=args.reps)
    print(table(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
