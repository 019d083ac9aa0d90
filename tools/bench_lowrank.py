#!/usr/bin/env python
"""Low-rank (es.noise=lowrank) against full-rank ES iterations, same model, prompts and token budget.

A script that prints a table, never a test.  Two copies of one randomly initialised Qwen2-architecture
model (tools/bench.py builds it) run the trainer's own ``Trainer.evaluate`` and engine update, one
iteration of each mode in turn so that load from other processes hits both alike; the figure is the
ratio of median iteration times (``lowrank_over_full``: how many times faster the low-rank iteration is).

The figure depends on how many rows one member's rollout has.  With few (4 prompts, the default here and
in ``tools/bench.py --lowrank``) a full-rank member's decode step is bound by reading the weights, as on a
GPU, and the batched pass wins; with many (16 and more at 21M parameters on 2 CPU cores) each member's
rollout is already bound by arithmetic, which batching cannot reduce.  ``--sweep 2,4,8,16`` prints the
whole curve.

    .venv/bin/python tools/bench_lowrank.py                       # N=32, 4 prompts, CPU, the bench model
    .venv/bin/python tools/bench_lowrank.py --sweep 2,4,8,16        # the speed-up by prompts per member
    .venv/bin/python tools/bench_lowrank.py --json                 # one JSON line on stdout
    .venv/bin/python tools/bench.py --lowrank                      # the same rows after bench.py's table
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (tools/benchlib.py: model building, the trainer-driven iteration)

from hpc_es import lowrank  # noqa: E402

PHASES = benchlib.PHASES


@dataclass
class Comparison:
    arch: benchlib.Arch
    params: int
    device: str
    n: int
    prompts: int
    tokens: int
    rank: int
    iterations: int
    full: dict[str, float]
    low: dict[str, float]
    full_tokens: float
    low_tokens: float
    plain_tokens: float  # bare model.generate of the same N x prompts rows: the ceiling of any batched scheme
    load: tuple[float, float]
    wall: float

    @property
    def lowrank_over_full(self) -> float:
        return self.full["iteration"] / max(self.low["iteration"], 1e-12)

    def as_json(self) -> dict[str, Any]:
        return {"lowrank_over_full": self.lowrank_over_full, "n": self.n, "prompts": self.prompts,
                "tokens": self.tokens, "rank": self.rank, "params": self.params, "device": self.device,
                "full_s": self.full, "lowrank_s": self.low, "full_tokens_per_s": self.full_tokens,
                "lowrank_tokens_per_s": self.low_tokens, "plain_batched_tokens_per_s": self.plain_tokens}


def compare(arch: benchlib.Arch, *, dtype: torch.dtype, device: str = "cpu", n: int = 32, prompts: int = 16,
            tokens: int = 32, iterations: int = 3, warmup: int = 1, warmup_n: int = 2, rank: int = 1,
            chunk: int = 1 << 20,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Comparison:
    """Alternate full-rank and low-rank iterations on two copies of one model; medians per phase.

    Warm-up iterations (untimed) use ``warmup_n`` members (0: all)."""
    t_start = time.perf_counter()
    load0 = benchlib.load_avg()
    logging.getLogger("hpc_es").setLevel(logging.ERROR)
    cfg = benchlib.bench_config(n, prompts, tokens, 0.05, 0.01, chunk)  # a sigma that moves a random model
    lcfg = copy.deepcopy(cfg)
    lcfg.es.noise, lcfg.es.rank = "lowrank", rank
    log(f"building {arch.describe()} ({str(dtype).removeprefix('torch.')}, {device})")
    model = benchlib.build_model(arch, dtype, device)
    params = benchlib.n_params(model)
    full = benchlib.HpcEsRun(model, cfg, device)
    low = benchlib.HpcEsRun(copy.deepcopy(model), lcfg, device)  # es.noise=lowrank: no master copy
    plain = benchlib.PlainGenerate(model, [ex.prompt for ex in full.examples] * n, tokens, device)
    rows: dict[str, list[dict[str, float]]] = {"full": [], "low": []}
    toks = {"full": 0.0, "low": 0.0}
    for t in range(warmup + iterations):
        for key, run in (("full", full), ("low", low)):
            run.counter.tokens = 0
            r = run.iteration(t, 0 if t >= warmup else warmup_n)
            log(f"  iteration {t} {key:4s} {sum(r.values()):.2f}s" + ("" if t >= warmup else " (warm-up)"))
            if t >= warmup:
                rows[key].append(r)
                toks[key] += run.counter.tokens
        if t >= warmup:
            plain()  # the unperturbed model on the low-rank pass's batch
    med = {k: _median(v) for k, v in rows.items()}
    rate = {k: toks[k] / max(sum(r["rollout"] for r in rows[k]), 1e-12) for k in rows}
    return Comparison(arch, params, device, n, prompts, tokens, rank, iterations, med["full"], med["low"],
                      rate["full"], rate["low"], plain.tokens / max(plain.seconds, 1e-12), (load0, benchlib.load_avg()),
                      time.perf_counter() - t_start)


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    out["iteration"] = statistics.median(sum(r[k] for k in PHASES) for r in rows)
    return out


def table(res: Comparison) -> str:
    lines = [f"== low-rank vs full-rank ES: {res.arch.describe()}",
             f"   {res.params / 1e6:.1f}M params, {res.device} | N={res.n}, {res.prompts} prompts, {res.tokens} new "
             f"tokens, rank {res.rank} | median of {res.iterations} iteration(s) | load avg {res.load[0]:.2f} -> "
             f"{res.load[1]:.2f} | {res.wall:.0f}s",
             f"   {'phase (s / iteration)':28s} {'full':>9s} {'lowrank':>9s} {'full/low':>9s}"]
    for k in PHASES + ("iteration",):
        f, lo = res.full[k], res.low[k]
        ratio = f"{f / lo:8.2f}x" if lo > 0 else "        -"
        lines.append(f"   {k:28s} {f:9.3f} {lo:9.3f} {ratio}")
    lines.append(f"   rollout tokens/s: full {res.full_tokens:8.0f}  lowrank {res.low_tokens:8.0f}  plain "
                 f"model.generate of the same {res.n} x {res.prompts} rows {res.plain_tokens:8.0f}")
    r = res.lowrank_over_full
    lines.append(f"   lowrank_over_full (iteration speed-up) {r:6.2f}x   (>= 4x) {'PASS' if r >= 4 else 'MISS'}")
    return "\n".join(lines)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rank", type=int, default=1, help="es.rank of the low-rank mode")


def from_args(args: argparse.Namespace, arch: benchlib.Arch, dtype: torch.dtype, n: int,
              prompts: int | None = None) -> Comparison:
    """The comparison with bench.py's model, token budget and iteration counts, at population n and
    ``prompts`` per member (default: ``args.prompts``)."""
    return compare(arch, dtype=dtype, device=args.device, n=n, prompts=prompts or args.prompts,
                   tokens=args.tokens, iterations=args.iterations, warmup=args.warmup,
                   rank=getattr(args, "rank", 1), chunk=args.chunk)


def sweep_table(rows: list[Comparison]) -> str:
    """One line per prompts-per-member setting: where the batched pass stops paying on this machine."""
    lines = [f"== low-rank over full-rank by prompts per member (N={rows[0].n}, {rows[0].tokens} new tokens, "
             f"{str(rows[0].device)})",
             f"   {'prompts':>7s} {'full s':>8s} {'low s':>8s} {'speed-up':>9s} {'rollout':>8s} {'full tok/s':>10s} "
             f"{'low tok/s':>10s} {'plain tok/s':>11s}"]
    for r in rows:
        lines.append(f"   {r.prompts:7d} {r.full['iteration']:8.2f} {r.low['iteration']:8.2f} "
                     f"{r.lowrank_over_full:8.2f}x {r.full['rollout'] / max(r.low['rollout'], 1e-12):7.2f}x "
                     f"{r.full_tokens:10.0f} {r.low_tokens:10.0f} {r.plain_tokens:11.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_arch_args(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON line (lowrank_over_full, ...) on stdout")
    benchlib.add_args(ap)
    add_args(ap)
    ap.add_argument("--sweep", default="", help="comma-separated prompts per member, e.g. 2,4,8,16: one "
                    "comparison each, then a table of the speed-ups")
    ap.set_defaults(n=32, iterations=2, prompts=4)
    args = ap.parse_args(argv)
    dtype = benchlib.resolve(args)
    arch = benchlib.arch_of(args)
    if args.sweep:
        rows = [from_args(args, arch, dtype, args.n, int(p)) for p in args.sweep.split(",")]
        print(json.dumps([r.as_json() for r in rows]) if args.json else sweep_table(rows), flush=True)
        return 0
    res = from_args(args, arch, dtype, args.n)
    print(json.dumps(res.as_json()) if args.json else table(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------- GPU check (gpu_check.py)

def gpu_throughput(arch: benchlib.Arch, *, dtype: torch.dtype, device: str, population: int = 256, prompts: int = 64,
                   tokens: int = 256, members_per_pass: int = 32, passes: int = 2, rank: int = 1,
                   check_prompts: int = 8, check_tokens: int = 32,
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Generated tokens/s of low-rank member passes over plain batched inference of the unperturbed model
    with the same batch (members_per_pass x prompts rows, the full token budget: no row stops at EOS), both
    on the fast engine as a run uses it (plain decoding with CUDA graphs; a low-rank pass runs eagerly).

    Times ``passes`` of the population's population/members_per_pass passes (the rest cost the same).  Also
    the plain engine without graphs and the hf engine with the hooks (one pass each, the hooks over
    ``check_tokens`` tokens), and whether the fast pass gives the hooks' tokens on ``check_prompts`` prompts x
    ``check_tokens`` tokens per member."""
    from hpc_es import fastgen
    from hpc_es.noise import KeyedNoise
    from hpc_es.seeds import member_seeds
    from hpc_es.rollout import generate_ids

    t0 = time.perf_counter()
    model = benchlib.build_model(arch, dtype, device)
    tok = benchlib.tokenizer()
    sync = benchlib.syncer(device)
    texts = [f"Q{i}: using the numbers [{i} {2 * i + 1} {i + 7}], create an equation." for i in range(prompts)]
    enc = tok(texts, return_tensors="pt", padding=True).to(torch.device(device))
    rows = members_per_pass * prompts
    ids, mask = enc["input_ids"].repeat(members_per_pass, 1), enc["attention_mask"].repeat(members_per_pass, 1)
    pad = int(tok.pad_token_id)
    out: dict[str, Any] = {"arch": arch.name, "population": population, "prompts": prompts, "tokens": tokens,
                           "members_per_pass": members_per_pass, "rows": rows, "engine": "fast"}

    def gen(n: int, low: Any = None, graphs: bool | None = None) -> torch.Tensor:
        # EOS id -1 matches no token: every row decodes the whole budget, plain and low-rank alike
        return fastgen.generate_ids(model, ids, mask, n, [-1], pad, lowrank=low, graphs=graphs)

    def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, int]:
        sync()
        a = time.perf_counter()
        got = fn()
        sync()
        return time.perf_counter() - a, int(got.shape[0]) * int(got.shape[1])

    with torch.no_grad():
        lm = lowrank.LowRankModel(model, "frozen", rank, KeyedNoise(1 << 20))
        seeds, signs = member_seeds(0, 0, population)
        first = (seeds[:members_per_pass].tolist(), signs[:members_per_pass].tolist(), 1e-3)
        # the plain warm-up decodes the timed call's whole budget: its KV cache has the timed call's slots and
        # every (rows, cache length) graph the timed call replays is captured here, not inside the timing
        log(f"warm-up: {rows} rows x {tokens} tokens plain (graphs captured), x 4 low-rank")
        gen(tokens)
        with lm.members(*first, hooks=False) as lp:
            gen(4, lp)
        import bench_noise

        built = bench_noise.compiles()
        log(f"timing: {rows} rows x {tokens} tokens")
        plain_s, plain_n = timed(lambda: gen(tokens))
        out["plain_tokens_per_s"] = plain_n / plain_s
        log(f"plain batched inference (fast engine): {plain_n / plain_s:.0f} tokens/s")
        eager_s, eager_n = timed(lambda: gen(tokens, graphs=False))
        out["plain_eager_tokens_per_s"] = eager_n / eager_s
        low_s, low_n, setup_s = 0.0, 0, 0.0
        for p in range(min(passes, population // members_per_pass)):
            sl = slice(p * members_per_pass, (p + 1) * members_per_pass)
            sync()
            a = time.perf_counter()
            with lm.members(seeds[sl].tolist(), signs[sl].tolist(), 1e-3, hooks=False) as lp:
                sync()
                setup_s += time.perf_counter() - a
                s, k = timed(lambda: gen(tokens, lp))
            low_s += s
            low_n += k
            log(f"low-rank pass {p}: {k / s:.0f} tokens/s")
        out["kernels_built_while_timed"] = bench_noise.compiles() - built
        out.update(passes_timed=passes, lowrank_tokens_per_s=low_n / low_s,
                   lowrank_fraction_of_plain=(low_n / low_s) / (plain_n / plain_s),
                   lowrank_fraction_of_plain_eager=(low_n / low_s) / (eager_n / eager_s),
                   factor_setup_s_per_pass=setup_s / max(passes, 1))
        from transformers import GenerationConfig

        short = min(tokens, check_tokens)  # HF's own loop is slow on a GPU: a shorter budget tells its rate
        gcfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=short, min_new_tokens=short,
                                pad_token_id=pad, eos_token_id=tok.eos_token_id)
        with lm.members(*first):
            s, k = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=gcfg))
        out["hf_hooks_tokens_per_s"] = (k - ids.numel()) / s
        log(f"hf engine with the hooks: {out['hf_hooks_tokens_per_s']:.0f} tokens/s")
        few = [t for _ in range(members_per_pass) for t in texts[:check_prompts]]
        with lm.members(*first, hooks=False) as lp:
            fast = generate_ids(model, tok, few, check_tokens, engine="fast", lowrank=lp)
        with lm.members(*first):
            hooked = generate_ids(model, tok, few, check_tokens, engine="hf")
        out["rows_identical_fast_vs_hooks"] = sum(a == b for a, b in zip(fast, hooked)) / len(few)
        log(f"fast pass vs hooks: {out['rows_identical_fast_vs_hooks']:.0%} of rows identical")
    cuda = device.startswith("cuda")
    out["peak_gib"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**30 if cuda else 0.0
    out["wall_s"] = time.perf_counter() - t0
    return out


def gpu_table(r: dict[str, Any]) -> str:
    f = r["lowrank_fraction_of_plain"]
    return "\n".join([
        f"== low-rank population throughput: {r['arch']}",
        f"   population {r['population']} ({r['members_per_pass']} members x {r['prompts']} prompts = {r['rows']} rows "
        f"per pass, {r['passes_timed']} pass(es) timed), {r['tokens']} new tokens",
        f"   plain batched inference {r['plain_tokens_per_s']:10.0f} tokens/s (fast engine; without CUDA graphs "
        f"{r['plain_eager_tokens_per_s']:.0f})",
        f"   low-rank members        {r['lowrank_tokens_per_s']:10.0f} tokens/s   "
        f"({f:.1%} of plain, target >= 70%: {'PASS' if f >= 0.7 else 'MISS'}; "
        f"{r['lowrank_fraction_of_plain_eager']:.1%} of plain without graphs)",
        f"   hf engine with the hooks {r['hf_hooks_tokens_per_s']:9.0f} tokens/s | fast pass vs hooks: "
        f"{r['rows_identical_fast_vs_hooks']:.0%} of rows identical",
        f"   factor set-up {r['factor_setup_s_per_pass']:.2f} s per pass | peak memory {r['peak_gib']:.1f} GiB | "
        f"{r['wall_s']:.0f}s"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HPC_ES_NOISE_COMPILE", "1")  # the full-rank side at its best, as tools/bench.py runs it
    sys.exit(main())
