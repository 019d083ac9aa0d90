"""What the benchmark scripts share: the bench model, its tokenizer, the trainer-driven iteration, the CLI.

tools/bench.py, tools/bench_lowrank.py, tools/bench_rollout.py and tools/gpu_check.py all build the same
randomly initialised Qwen2-architecture model and drive the trainer's own ``Population``; the pieces live here
so that the scripts import this module and never each other in a circle.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from hpc_es.config import Config
from hpc_es.es import Engine, Replica, shape_rewards
from hpc_es.models import DTYPES, _train_tokenizer, named_params
from hpc_es.noise_kernels import FUSED_TERMS
from hpc_es.population import Population
from hpc_es.rollout import generation_config
from hpc_es.seeds import member_seeds
from hpc_es.tasks import load_task

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
    cfg.rollout.engine = engine  # hf: bench.py's rows compare with plain model.generate (bench_rollout: engines)
    return cfg


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


class HpcEsRun:
    """One replica driven by the real ``Population.score`` and ``Population.update``, exactly as
    ``Trainer.run`` calls them (a population without a model folder, ledger or communicator)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str) -> None:
        self.cfg = cfg
        self.sync = syncer(device)
        self.counter = CountTokens(model)
        task = load_task(cfg)
        self.population = Population(cfg.es, cfg.rollout, [model], [tokenizer()], task)
        self.examples = list(task.train_examples())[: cfg.rollout.prompts_per_iteration]
        self.synthetic_updates = 0
        self.terms = 0
        if isinstance(self.population.search, Engine):  # full rank: the perturb/update kernels it will time
            warm_kernels(self.population.search, self.population.replicas[0])
        if device.startswith("cuda"):  # the timers would see asynchronous launches only
            search = self.population.search
            for name in ("perturb", "restore", "update"):  # low rank has no perturb: members run side by side
                if hasattr(search, name):
                    setattr(search, name, self._synced(getattr(search, name)))

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


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


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
