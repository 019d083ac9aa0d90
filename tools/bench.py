#!/usr/bin/env python
"""Per-iteration time of hpc_es against a re-implementation of the published ES code, on one device.

A script that prints a table, never a test.  It builds a randomly initialised Qwen2-architecture model in
memory (no download; the tiny BPE tokenizer of hpc_es.models), then runs ES iterations of

* hpc_es: the trainer's own ``Population.score`` (Engine.perturb, rollout.generate, task scoring)
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
from hpc_es.config import Config  # noqa: E402
from hpc_es.es import Engine, Replica, shape_rewards  # noqa: E402
from hpc_es.models import DTYPES, _train_tokenizer, named_params  # noqa: E402
from hpc_es.noise import FUSED_TERMS, member_seeds  # noqa: E402
from hpc_es.rollout import generation_config  # noqa: E402
from hpc_es.tasks import load_task, safe_score  # noqa: E402
from hpc_es.population import Population  # noqa: E402

PHASES = ("perturb", "rollout", "reward", "restore", "update")
ES_PHASES = ("perturb", "restore", "update")


@dataclass
class Arch:
    """A Qwen2-architecture shape; vocab 0 = the tokenizer's size."""

    name: str = "bench"
    hidden: int = 512
    layers: int = 7
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 0  # 0 = 3 * hidden
    vocab: int = 0
    tie: bool = True

    def describe(self) -> str:
        return (f"{self.name}: qwen2 hidden={self.hidden} layers={self.layers} heads={self.heads}/"
                f"{self.kv_heads}kv intermediate={self.intermediate or 3 * self.hidden} "
                f"vocab={self.vocab or 'tokenizer'} tied={self.tie}")


_TOKENIZER: list[Any] = []


def tokenizer() -> Any:
    """The tiny BPE tokenizer hpc_es's tiny model uses (trained once per process, left padding)."""
    if not _TOKENIZER:
        _TOKENIZER.append(_train_tokenizer(512))
    return _TOKENIZER[0]


def build_model(arch: Arch, dtype: torch.dtype, device: str, seed: int = 1234) -> torch.nn.Module:
    """A randomly initialised Qwen2 model from a config alone, built directly on ``device``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = tokenizer()
    cfg = Qwen2Config(
        vocab_size=arch.vocab or len(tok), hidden_size=arch.hidden,
        intermediate_size=arch.intermediate or 3 * arch.hidden, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=arch.tie, initializer_range=0.02, rope_theta=1e6, rms_norm_eps=1e-6,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # (manual_seed also reseeds CUDA: fine for a benchmark)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    model.generation_config.do_sample = False
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for _, p in named_params(model))


def syncer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


class CountTokens:
    """Wraps ``model.generate`` on the instance and counts generated positions (batch x new length)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inner = model.generate
        self.tokens = 0
        self.seconds = 0.0  # inside model.generate (the rollout's remainder is tokenizing and decoding)
        self.sync = syncer(str(next(model.parameters()).device))
        model.generate = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        ids = kwargs.get("input_ids", args[0] if args else None)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - t0
        self.tokens += int(out.shape[0]) * int(out.shape[1] - ids.shape[1])
        return out


def bench_config(n: int, prompts: int, tokens: int, sigma: float, alpha: float, chunk: int,
                 engine: str = "hf") -> Config:
    cfg = Config()
    cfg.task = "conciseness"
    cfg.es.population_size = n
    cfg.es.sigma = sigma
    cfg.es.alpha = alpha
    cfg.es.noise_chunk = chunk
    cfg.rollout.max_new_tokens = tokens
    cfg.rollout.prompts_per_iteration = prompts
    cfg.data.train_size = max(cfg.data.train_size, prompts)
    cfg.data.synthetic_size = max(cfg.data.synthetic_size, prompts + 100)
    cfg.progress = False
    cfg.rollout.engine = engine  # hf: this table's rows compare with plain model.generate (bench_rollout: engines)
    return cfg


class HpcEsRun:
    """One replica driven by the real ``Population.score`` and ``Population.update``, exactly as
    ``Trainer.run`` calls them (a population without a model folder, ledger or communicator)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str) -> None:
        self.cfg = cfg
        self.sync = syncer(device)
        self.counter = CountTokens(model)
        task = load_task(cfg)
        rep = Replica.wrap(model, cfg.es.master_on, cfg.es.master_dtype)
        self.population = Population(cfg, [rep], [tokenizer()], task)
        self.examples = list(task.train_examples())[: cfg.rollout.prompts_per_iteration]
        self.synthetic_updates = 0
        self.terms = 0
        if isinstance(self.population.engine, Engine):
            warm_kernels(self.population.engine, rep)
        if device.startswith("cuda"):  # the timers would see asynchronous launches only
            eng = self.population.engine
            for name in ("perturb", "restore", "update"):
                setattr(eng, name, self._synced(getattr(eng, name)))

    def _synced(self, fn: Callable[..., None]) -> Callable[..., None]:
        def call(*a: Any, **k: Any) -> None:
            fn(*a, **k)
            self.sync()
        return call

    def iteration(self, t: int, n: int = 0) -> dict[str, float]:
        """One iteration; ``n`` < N scores and updates with the first n members only (a warm-up)."""
        pop, cfg = self.population, self.cfg
        N = cfg.es.population_size
        n = n or N
        seeds, signs = member_seeds(cfg.seed, t, N, cfg.es.antithetic)
        everyone = pop.members
        pop.members = [list(range(n))]
        scores = pop.score(seeds, signs, self.examples)
        pop.members = everyone
        if scores.error is not None:
            raise scores.error
        times = scores.times
        seeds, signs, rewards = seeds[:n], signs[:n], scores.rewards[:n]
        shaped = shape_rewards(rewards, cfg.es.shaping)
        if not np.any(shaped):  # tied rewards would skip the update's noise: time a real one instead
            shaped = shape_rewards(np.arange(n, dtype=np.float64), cfg.es.shaping)
            self.synthetic_updates += n == N
        self.terms = int(np.count_nonzero(shaped))
        t1 = time.perf_counter()
        pop.update(seeds, signs, shaped, cfg.es.alpha)
        times["update"] = time.perf_counter() - t1
        return {k: times.get(k, 0.0) for k in PHASES}


def warm_kernels(engine: Engine, rep: Replica) -> None:
    """Build every compiled noise kernel ``engine``'s perturb and update can use with ``rep``'s device and
    dtypes -- the perturb, the update's accumulate for each term count 1..FUSED_TERMS (an update of K terms
    runs K // FUSED_TERMS passes of FUSED_TERMS and one of the rest), the apply -- on a scratch tensor, so
    that no timed phase compiles one: a warm-up iteration of fewer members, or with other tied rewards, than
    the timed one misses some (the N=30 update's 4-term accumulate after a 2-member warm-up)."""
    name, p = rep.params[0]
    master = rep.master[name]
    scratch = Replica(model=torch.nn.Module(), device=rep.device,
                      params=[("warm.weight", torch.zeros(1 << 12, dtype=p.dtype, device=p.device))],
                      master={"warm.weight": torch.zeros(1 << 12, dtype=master.dtype, device=master.device)})
    engine.perturb(scratch, 1, 1, 1e-3)
    for k in range(1, FUSED_TERMS + 1):
        engine.update([scratch], np.arange(1, k + 1), np.ones(k, dtype=np.int64), np.ones(k), 1e-3)


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


class PlainGenerate:
    """A bare ``model.generate`` on the pre-tokenized batch of all prompts: no tokenizing, no decoding."""

    def __init__(self, model: torch.nn.Module, prompts: list[str], max_new_tokens: int, device: str) -> None:
        tok = tokenizer()
        self.model = model
        self.enc = tok(prompts, return_tensors="pt", padding=True).to(torch.device(device))
        self.gen_cfg = generation_config(model, tok, max_new_tokens)
        self.sync = syncer(device)
        self.tokens = 0
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self) -> None:
        inner = getattr(self.model.generate, "inner", self.model.generate)
        t0 = time.perf_counter()
        ids = inner(**self.enc, generation_config=self.gen_cfg)
        self.sync()
        self.seconds += time.perf_counter() - t0
        self.tokens += ids.shape[0] * (ids.shape[1] - self.enc["input_ids"].shape[1])


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


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run(arch: Arch, *, dtype: torch.dtype, device: str = "cpu", n: int = 8, prompts: int = 16,
        tokens: int = 32, iterations: int = 3, warmup: int = 1, warmup_n: int = 0, chunk: int = 1 << 20,
        sigma: float = 1e-3, alpha: float = 5e-4, with_baseline: bool = True, seed: int = 0, engine: str = "hf",
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Result:
    """Build the model (twice: one copy per implementation), measure limits, then alternate iterations.

    Warm-up iterations use ``warmup_n`` members (0: all n); they are not timed.  ``engine``: hpc_es's
    rollout engine (``hf``: the table's rollout row compares with plain model.generate; a run's engine is
    ``fast``)."""
    t_start = time.perf_counter()
    load0 = _load()
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
                  (load0, _load()), time.perf_counter() - t_start, timed_compiles)


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


def add_arch_args(ap: argparse.ArgumentParser) -> None:
    """The bench model's shape (defaults: the 21.4M-parameter Qwen2-architecture bench model)."""
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=0, help="0 = 3 x hidden")


def arch_of(args: argparse.Namespace) -> Arch:
    return Arch("bench", args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="model dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--n", type=int, default=8, help="population size")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=Config().es.noise_chunk, help="es.noise_chunk")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--lowrank", action="store_true", help="also low-rank vs full-rank rows (tools/bench_lowrank.py)")
    ap.add_argument("--lowrank-n", type=int, default=32, help="population of the low-rank comparison")
    ap.add_argument("--lowrank-prompts", type=int, default=4,
                    help="prompts per member in the low-rank comparison (see tools/bench_lowrank.py)")


def resolve(args: argparse.Namespace) -> torch.dtype:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        return torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return DTYPES[args.dtype]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arch_args(ap)
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures and targets")
    ap.add_argument("--no-rollout", action="store_true", help="skip the rollout engines' comparison")
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
    if args.lowrank:  # issue 14: low-rank rows, the same model and token budget, --lowrank-prompts per member
        import bench_lowrank

        low = bench_lowrank.from_args(args, arch, dtype, args.lowrank_n, args.lowrank_prompts)
        print(bench_lowrank.table(low), flush=True)
    import bench_rollout  # issue 11: the rollout engines (tools/bench_rollout.py), and the --json line
    # whole iterations on the rollout rows' ragged schedule (96 new tokens at most, mean 30), N and prompts
    # as in the table above
    roll = None if args.no_rollout else bench_rollout.run(arch, dtype=dtype, device=args.device, n=args.n,
                                                          iter_prompts=args.prompts, iter_reps=args.iterations,
                                                          chunk=args.chunk)
    if roll is not None:
        print(bench_rollout.table(roll), flush=True)
    if args.json:
        print(json.dumps(bench_rollout.summary(res, roll, noise, low)), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # keyed noise: compile from the start (a long run switches by itself; the warm-up absorbs the compile)
    os.environ.setdefault("HPC_ES_NOISE_COMPILE", "1")
    sys.exit(main())
