#!/usr/bin/env python
"""Per-iteration time of hpc_es against a re-implementation of the published ES code, on one device.

A script that prints a table, never a test.  It builds a randomly initialised Qwen2-architecture model in
memory (no download; the tiny BPE tokenizer of hpc_es.models), then runs ES iterations of

* hpc_es: the trainer's own ``Population.score`` (the search distribution's perturb, rollout.generate, task scoring)
  followed by ``Population.update``, exactly as ``Trainer.run`` calls them;
* the baseline: tools/baseline.py, the published code's hot path (reseed per tensor, noise in the model
  dtype, add/subtract in place, model-dtype update);

alternately, one iteration of each in turn, on two copies of the same model, so that load from other
processes on the machine hits both alike.  Per phase it reports the median over the timed iterations, the
ES overhead (perturb + restore + update) and its share of the iteration, noise throughput next to this
machine's limits measured in the same run, and rollout tokens/s next to plain ``model.generate``.

    .venv/bin/python tools/bench.py                   # ~21M params, N=8, 16 prompts, 32 new tokens, CPU
    .venv/bin/python tools/bench.py --dtype bfloat16 --hidden 384 --layers 4
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import baseline  # noqa: E402  (tools/baseline.py)
import bench_noise  # noqa: E402  (tools/bench_noise.py: keyed noise vs torch.randn, alone)
from benchlib import (  # noqa: E402  (tools/benchlib.py: the bench model and the trainer-driven iteration)
    ES_PHASES, PHASES, Arch, CountTokens, HpcEsRun, PlainGenerate, add_args, add_arch_args, arch_of, bench_config,
    build_model, load_avg, n_params, resolve, syncer, tokenizer)
from hpc_es.config import Config  # noqa: E402
from hpc_es.tasks import load_task, safe_score  # noqa: E402


class BaselineRun:
    def __init__(self, model: torch.nn.Module, cfg: Config, examples: list, device: str, seed: int) -> None:
        self.model, self.cfg, self.examples = model, cfg, examples
        self.sync = syncer(device)
        self.counter = CountTokens(model)
        self.task = load_task(cfg)
        self.rng = np.random.default_rng(seed)
        self.prompts = [ex.prompt for ex in examples]

    def iteration(self, t: int, n: int = 0) -> dict[str, float]:
        cfg = self.cfg
        score = lambda i, text: safe_score(self.task, text, self.examples[i])  # noqa: E731
        return baseline.iteration(self.model, tokenizer(), self.prompts, cfg.rollout.max_new_tokens, score,
                                  n or cfg.es.population_size, cfg.es.sigma, cfg.es.alpha, self.rng, self.sync)


# ------------------------------------------------------------------------------------------- machine limits

def _rate(fn: Callable[[], int], sync: Callable[[], None], min_s: float = 0.3, reps: int = 3) -> float:
    """Best of ``reps`` runs of elements/s, each run repeating ``fn`` (returns elements) for >= min_s."""
    return bench_noise.rate(lambda _k: fn(), sync, min_s, reps)


def machine_limits(device: str, numel: int, chunk: int, workers: int) -> dict[str, float]:
    """Elements/s of torch.randn into a preallocated fp32 buffer (one stream; ``workers`` streams with
    their own generators, CPU only) and of an in-place fp32 add over ``numel`` elements."""
    dev = torch.device(device)
    sync = syncer(device)
    out: dict[str, float] = {}
    size = min(chunk, numel)
    buf = torch.empty(size, dtype=torch.float32, device=dev)
    g = torch.Generator(device=dev)
    seed = [0]

    def randn_chunk() -> int:
        seed[0] += 1
        g.manual_seed(seed[0])
        torch.randn(buf.shape, generator=g, out=buf)
        return size

    whole = torch.empty(numel, dtype=torch.float32, device=dev)

    def randn_whole() -> int:
        seed[0] += 1
        g.manual_seed(seed[0])
        torch.randn(whole.shape, generator=g, out=whole)
        return numel

    out["randn_1"] = max(_rate(randn_chunk, sync), _rate(randn_whole, sync))
    out["randn_all"] = out["randn_1"]
    if dev.type == "cpu" and workers > 1:
        out["randn_all"] = max(out["randn_1"], _parallel_randn(workers, size))
    other = torch.ones(numel, dtype=torch.float32, device=dev)
    whole.zero_()

    def add() -> int:
        whole.add_(other)
        return numel

    out["add"] = _rate(add, sync)
    return out


def _parallel_randn(workers: int, size: int, per_thread: int = 24, reps: int = 3) -> float:
    """Elements/s of ``workers`` threads, each with its own generator and buffer, drawing chunks of
    ``size`` in a loop (one OpenMP thread each): the all-core torch.randn limit of this machine."""
    best = 0.0
    for _ in range(reps):
        start = threading.Barrier(workers + 1)

        def draw(k: int, start: threading.Barrier = start) -> None:
            torch.set_num_threads(1)  # per-thread under OpenMP
            g, buf = torch.Generator(), torch.empty(size)
            start.wait()
            for i in range(per_thread):
                g.manual_seed(k * 1000 + i)
                torch.randn(buf.shape, generator=g, out=buf)

        threads = [threading.Thread(target=draw, args=(k,)) for k in range(workers)]
        for th in threads:
            th.start()
        start.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        best = max(best, workers * per_thread * size / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------------------------------- run

@dataclass
class Result:
    arch: Arch
    params: int
    dtype: torch.dtype
    device: str
    n: int
    prompts: int
    tokens: int
    iterations: int
    warmup: int
    chunk: int
    threads: int
    hpc: dict[str, float]
    base: dict[str, float] | None
    hpc_tokens: float
    base_tokens: float
    plain_rate: float
    wrapper_share: float
    limits: dict[str, float]
    terms: int
    synthetic_updates: int
    load: tuple[float, float]
    wall: float
    timed_compiles: int  # graphs torch.compile built during the timed iterations: 0 unless a warm-up missed one


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    out["es"] = sum(out[k] for k in ES_PHASES)
    out["iteration"] = sum(out[k] for k in PHASES)
    return out


def run(arch: Arch, *, dtype: torch.dtype, device: str = "cpu", n: int = 8, prompts: int = 16,
        tokens: int = 32, iterations: int = 3, warmup: int = 1, warmup_n: int = 0, chunk: int = 1 << 20,
        sigma: float = 1e-3, alpha: float = 5e-4, with_baseline: bool = True, seed: int = 0, engine: str = "hf",
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Result:
    """Build the model (twice: one copy per implementation), measure limits, then alternate iterations.

    Warm-up iterations use ``warmup_n`` members (0: all n); they are not timed.  ``engine``: hpc_es's
    rollout engine (``hf``: the table's rollout row compares with plain model.generate; a run's engine is
    ``fast``)."""
    t_start = time.perf_counter()
    load0 = load_avg()
    logging.getLogger("hpc_es").setLevel(logging.ERROR)  # tied rewards on a random model warn every time
    cfg = bench_config(n, prompts, tokens, sigma, alpha, chunk, engine)
    log(f"building {arch.describe()} ({str(dtype).removeprefix('torch.')}, {device})")
    model = build_model(arch, dtype, device)
    params = n_params(model)
    base_model = copy.deepcopy(model) if with_baseline else None
    threads = torch.get_num_threads() if device == "cpu" else 1
    log(f"{params / 1e6:.1f}M parameters; measuring this machine's limits")
    limits = machine_limits(device, min(params, 1 << 28), chunk, threads)  # <= 1 GiB per limit buffer
    hpc = HpcEsRun(model, cfg, device)
    base = BaselineRun(base_model, cfg, hpc.examples, device, seed) if base_model is not None else None
    plain = PlainGenerate(model, [ex.prompt for ex in hpc.examples], tokens, device)
    rows_h: list[dict[str, float]] = []
    rows_b: list[dict[str, float]] = []
    tok_h = tok_b = 0
    gen_s = 0.0
    timed_compiles = 0
    for t in range(warmup + iterations):
        timed = t >= warmup
        if timed:
            hpc.counter.tokens, hpc.counter.seconds = 0, 0.0
        wn = 0 if timed else warmup_n
        built = bench_noise.compiles()
        r = hpc.iteration(t, wn)
        timed_compiles += (bench_noise.compiles() - built) if timed else 0
        if timed:
            rows_h.append(r)
            tok_h += hpc.counter.tokens
            gen_s += hpc.counter.seconds
        log(f"  iteration {t} hpc_es {sum(r.values()):.2f}s" + ("" if timed else " (warm-up)"))
        if timed:  # the same batch through bare model.generate, twice, in the same conditions
            plain()
            plain()
        if base is not None:
            if timed:
                base.counter.tokens = 0
            r = base.iteration(t, wn)
            if timed:
                rows_b.append(r)
                tok_b += base.counter.tokens
            log(f"  iteration {t} baseline {sum(r.values()):.2f}s" + ("" if timed else " (warm-up)"))
    hm = _median(rows_h)
    bm = _median(rows_b) if rows_b else None
    rollout_s = sum(r["rollout"] for r in rows_h)
    hpc_tokens = tok_h / max(rollout_s, 1e-12)
    wrapper = 1.0 - gen_s / max(rollout_s, 1e-12)
    base_tokens = tok_b / max(sum(r["rollout"] for r in rows_b), 1e-12) if rows_b else float("nan")
    plain_rate = plain.tokens / max(plain.seconds, 1e-12)
    return Result(arch, params, dtype, device, n, prompts, tokens, iterations, warmup, chunk, threads, hm, bm,
                  hpc_tokens, base_tokens, plain_rate, wrapper, limits, hpc.terms, hpc.synthetic_updates,
                  (load0, load_avg()), time.perf_counter() - t_start, timed_compiles)


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:8.2f}x" if b > 0 else "      -"


def table(res: Result) -> str:
    h, b = res.hpc, res.base
    lines = []
    lines.append(f"== {res.arch.describe()}")
    lines.append(f"   {res.params / 1e6:.1f}M params, {str(res.dtype).removeprefix('torch.')}, {res.device}, "
                 f"{res.threads} thread(s) | N={res.n}, {res.prompts} prompts, {res.tokens} new tokens | "
                 f"noise_chunk={res.chunk} | median of {res.iterations} iteration(s) after {res.warmup} "
                 f"warm-up | load avg {res.load[0]:.2f} -> {res.load[1]:.2f} | {res.wall:.0f}s")
    lines.append(f"   {'phase (s / iteration)':28s} {'hpc_es':>9s} {'baseline':>9s} {'hpc/base':>9s}")
    for k in PHASES + ("es", "iteration"):
        label = {"es": "ES overhead (p+r+u)", "iteration": "iteration"}.get(k, k)
        bv = f"{b[k]:9.4f}" if b else f"{'-':>9s}"
        rv = _fmt_ratio(h[k], b[k]) if b else ""
        lines.append(f"   {label:28s} {h[k]:9.4f} {bv} {rv}")
    share_h = h["es"] / h["iteration"]
    share_b = f"{b['es'] / b['iteration']:8.1%}" if b else f"{'-':>8s}"
    lines.append(f"   {'ES overhead share':28s} {share_h:8.1%}  {share_b}")
    lim = res.limits
    noise_h = (res.n + res.terms) * res.params / max(h["perturb"] + h["update"], 1e-12)
    perturb_h = res.n * res.params / max(h["perturb"], 1e-12)
    update_h = res.terms * res.params / max(h["update"], 1e-12)
    lines.append("   noise throughput (M params/s = members x params / s)")
    lines.append(f"     hpc_es perturb {perturb_h / 1e6:8.1f}  update {update_h / 1e6:8.1f}  "
                 f"both {noise_h / 1e6:8.1f}")
    if b:
        noise_b = 3 * res.n * res.params / max(b["es"], 1e-12)
        lines.append(f"     baseline (3 draws per member, model dtype) {noise_b / 1e6:8.1f}")
    lines.append(f"     limit: torch.randn fp32 into a preallocated buffer, 1 stream {lim['randn_1'] / 1e6:8.1f}"
                 f"; {res.threads} streams {lim['randn_all'] / 1e6:8.1f}")
    lines.append(f"     limit: in-place fp32 add over the same bytes {lim['add'] / 1e6:8.1f} M elem/s "
                 f"({lim['add'] * 12 / 1e9:.1f} GB/s moved)")
    bt = f"{res.base_tokens:8.0f}" if b else "-"
    lines.append(f"   rollout tokens/s: hpc_es {res.hpc_tokens:8.0f}  baseline {bt}  "
                 f"plain model.generate {res.plain_rate:8.0f}   (hpc_es rollout outside model.generate, "
                 f"i.e. tokenizing + decoding: {res.wrapper_share:.1%})")
    if res.synthetic_updates:
        lines.append(f"   note: {res.synthetic_updates} iteration(s) had tied rewards; their update was timed "
                     "with synthetic shaped rewards (a real update, not a skipped one)")
    if res.timed_compiles:
        lines.append(f"   WARNING: torch.compile built {res.timed_compiles} graph(s) inside the timed iterations "
                     "(their times include compiling)")
    lines.append("   targets")
    if b:
        r = h["es"] / b["es"]
        lines.append(f"     ES overhead vs baseline          {r:6.2f}x   (<= 0.40x) {'PASS' if r <= 0.4 else 'MISS'}")
    lines.append(f"     ES overhead share of iteration   {share_h:6.1%}   (<= 25%)   "
                 f"{'PASS' if share_h <= 0.25 else 'MISS'}")
    f1 = noise_h / lim["randn_1"]
    lines.append(f"     noise vs 1-stream randn limit    {f1:6.2f}x   (>= 0.80x) {'PASS' if f1 >= 0.8 else 'MISS'}"
                 f"   (vs {res.threads}-stream limit {noise_h / lim['randn_all']:.2f}x)")
    f2 = res.hpc_tokens / res.plain_rate
    lines.append(f"     rollout tokens/s vs plain        {f2:6.2f}x   (>= 1.00x) {'PASS' if f2 >= 0.97 else 'MISS'}"
                 "   (3% timing noise allowed)")
    if b:
        lines.append(f"     whole iteration hpc_es/baseline  {h['iteration'] / b['iteration']:6.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arch_args(ap)
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures and targets")
    ap.add_argument("--no-rollout", action="store_true", help="skip the rollout engines' comparison")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode step's eager/compiled figures")
    add_args(ap)
    args = ap.parse_args(argv)
    dtype = resolve(args)
    arch = arch_of(args)
    res = run(arch, dtype=dtype, device=args.device, n=args.n, prompts=args.prompts, tokens=args.tokens,
              iterations=args.iterations, warmup=args.warmup, chunk=args.chunk,
              with_baseline=not args.no_baseline)
    print(table(res), flush=True)
    noise = bench_noise.noise_speed(args.device, min_s=0.3)  # keyed noise against torch.randn, one buffer
    print("\n".join(bench_noise.lines(noise, args.device)), flush=True)
    low = None
    if args.lowrank:  # low-rank rows: the same model and token budget, --lowrank-prompts per member
        import bench_lowrank

        low = bench_lowrank.from_args(args, arch, dtype, args.lowrank_n, args.lowrank_prompts)
        print(bench_lowrank.table(low), flush=True)
    import bench_rollout  # the rollout engines (tools/bench_rollout.py), and the --json line
    # whole iterations on the rollout rows' ragged schedule (96 new tokens at most, mean 30), N and prompts
    # as in the table above
    roll = None if args.no_rollout else bench_rollout.run(arch, dtype=dtype, device=args.device, n=args.n,
                                                          iter_prompts=args.prompts, iter_reps=args.iterations,
                                                          chunk=args.chunk)
    if roll is not None:
        print(bench_rollout.table(roll), flush=True)
    dec = None if args.no_decode else decode_figures(arch, dtype, args.device, args.prompts, args.tokens)
    if args.json:
        print(json.dumps(bench_rollout.summary(res, roll, noise, low, dec)), flush=True)
    return 0


def decode_figures(arch: Arch, dtype: torch.dtype, device: str, prompts: int, tokens: int) -> dict[str, Any]:
    """The fast engine's decode step on the bench model, eager against compiled (tools/bench_decode.py):
    kernels per step and rollout tokens/s, on the table's prompts and token budget."""
    import bench_decode

    model = build_model(arch, dtype, device)
    cfg = bench_config(1, prompts, tokens, 1e-3, 5e-4, 1 << 20)
    texts = [ex.prompt for ex in load_task(cfg).train_examples()][:prompts]
    enc = tokenizer()(texts, return_tensors="pt", padding=True)
    got = bench_decode.figures(model, enc["input_ids"], enc["attention_mask"], tokens)
    k, c = got["decode_kernels_per_step"], got["compiled_decode"]
    print(f"== decode step (tools/bench_decode.py), {arch.layers} layers: kernels per step eager {k['eager']:.0f}, "
          f"compiled {k['compiled']:.0f}; rollout tokens/s eager {c['eager_tokens_per_s']:.0f}, compiled "
          f"{c['compiled_tokens_per_s']:.0f} = {got['compiled_over_eager']:.2f}x"
          + (" (the compiled step was refused: it ran eagerly)" if c["refused"] else ""), flush=True)
    return got


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # keyed noise: compile from the start (a long run switches by itself; the warm-up absorbs the compile)
    os.environ.setdefault("HPC_ES_NOISE_COMPILE", "1")
    sys.exit(main())

