"""Low-rank population mode (EGGROLL, Sarkar et al. 2025): many members in one batch over one weight copy.

Member n perturbs every weight matrix W (out x in) by σ s_n A_n B_nᵀ / √r, with A_n (out x r) and B_n
(in x r) drawn from the same keyed noise as the full-rank mode (keys ``<param>.A`` and ``<param>.B``).  The
weights themselves are never written during a rollout: forward hooks on the model's own ``nn.Linear`` and
``nn.Embedding`` modules add, for the batch rows of member n, σ s_n/√r · (x B_n) A_nᵀ to the layer's
output, one batched matmul over the member groups.  So a batch that holds several members' prompts (rows
grouped member by member) runs on one copy of the weights; memory is one model, the KV cache and the
small factors, with no master copy (the model's parameters are the master).

Which parameters take part (``es.lowrank_scope``):

* ``frozen`` (default, EGGROLL's LLM setting): the weights of ``nn.Linear`` layers only; embeddings (and a
  tied ``lm_head``), norms and biases keep their values for the whole run.
* ``full``: also the embedding (rows of A_n gathered by token id; a tied ``lm_head`` reuses the same
  factors, since it is the same parameter) and every 1-D parameter (norm weights, biases) with full-rank
  noise keyed by its name, as in the full-rank mode.

The update W <- round(W + (α/N)/√r · Σ_n Z_n s_n A_n B_nᵀ) is summed in fp32 one rank-1 term at a time,
each term an element-wise product and each sum an element-wise add, in a fixed order: every element is
the same sequence of IEEE operations whatever the thread count, block size or device split, so every
rank computes the same bits.  It works on row blocks, so no member's full product is ever held.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpc_es.errors import ConfigError
from hpc_es.es import Replica, _cpu_pool, update_terms
from hpc_es.models import named_params
from hpc_es.noise import NoiseSource, noise_source

SCOPES = ("frozen", "full")
LOWRANK, FULLRANK = "lowrank", "fullrank"


def factor_keys(name: str) -> tuple[str, str]:
    """Noise keys of a matrix's two factors (A: out x r, B: in x r)."""
    return f"{name}.A", f"{name}.B"


def factors(noise: NoiseSource, seed: int, name: str, shape: Sequence[int], rank: int,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A_n (out x r) and B_n (in x r) of member seed ``seed`` for the matrix ``name``, fp32."""
    ka, kb = factor_keys(name)
    return (noise.tensor(seed, ka, (int(shape[0]), rank), device),
            noise.tensor(seed, kb, (int(shape[1]), rank), device))


def plan(model: torch.nn.Module, scope: str) -> dict[str, str]:
    """Parameter name -> LOWRANK or FULLRANK for every parameter that is perturbed; the rest stay frozen.

    Raises ConfigError for a parameter the hooks cannot perturb (a matrix outside nn.Linear/nn.Embedding).
    """
    if scope not in SCOPES:
        raise ConfigError(f"config key 'es.lowrank_scope' = {scope!r} is not allowed; choose one of "
                          f"{', '.join(SCOPES)}")
    names = {id(p): n for n, p in named_params(model)}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            name = names[id(p)]
            if id(p) in embedding:
                if scope == "full":
                    out[name] = LOWRANK
            elif isinstance(mod, torch.nn.Linear) and pname == "weight":
                out[name] = LOWRANK
            elif p.dim() == 1:
                if scope == "full":
                    out[name] = FULLRANK
            else:
                raise ConfigError(f"es.noise=lowrank cannot perturb parameter '{name}' ({p.dim()}-D, in "
                                  f"{type(mod).__name__} '{mod_name}'): only nn.Linear and nn.Embedding "
                                  "matrices and 1-D parameters are supported; use es.noise=full")
    return dict(sorted(out.items()))


def wrap(model: torch.nn.Module, master_dtype: torch.dtype | None = None) -> Replica:
    """A Replica whose master weights ARE the model's parameters (no copy): a low-rank rollout never
    writes the weights, so there is nothing to restore.  With a ``master_dtype`` wider than the model's
    (fp32 master for a bf16 model) the master is a copy in that dtype, and every update rounds it into
    the model once."""
    params = [(n, p.data) for n, p in named_params(model)]
    master = {n: (p if master_dtype in (None, p.dtype) else p.detach().to(master_dtype)) for n, p in params}
    return Replica(model=model, device=params[0][1].device, params=params, master=master)


@dataclass
class _Pass:
    """The members of one batched rollout: per perturbed parameter, their stacked, scaled factors."""

    groups: int
    left: dict[str, torch.Tensor] = field(default_factory=dict)  # A·σ s/√r: (G, r, out); embeddings (G, vocab, r)
    right: dict[str, torch.Tensor] = field(default_factory=dict)  # B: (G, in, r)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # σ s ε for 1-D params, (G, numel)


class LowRankModel:
    """Forward hooks on one model copy that add the active members' low-rank perturbations.

    Outside ``members(...)`` the hooks do nothing, so the same model also evaluates the unperturbed
    weights (eval, test split).
    """

    def __init__(self, model: torch.nn.Module, scope: str, rank: int, noise: NoiseSource) -> None:
        self.model, self.rank, self.noise = model, rank, noise
        self.plan = plan(model, scope)
        self.active: _Pass | None = None
        self.shapes = {n: tuple(p.shape) for n, p in named_params(model) if n in self.plan}
        names = {id(p): n for n, p in named_params(model)}
        self.embeddings = {names[id(m.weight)] for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        self.handles = []
        for mod in model.modules():
            own = {pn: names[id(p)] for pn, p in mod.named_parameters(recurse=False)}
            mine = {pn: n for pn, n in own.items() if n in self.plan}
            if not mine:
                continue
            if isinstance(mod, torch.nn.Embedding):
                hook = self._embedding_hook(own["weight"])
            elif isinstance(mod, torch.nn.Linear):
                hook = self._linear_hook(mine.get("weight"), mine.get("bias"))
            else:
                hook = self._vector_hook(mine)
            self.handles.append(mod.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @contextlib.contextmanager
    def members(self, seeds: Sequence[int], signs: Sequence[int], sigma: float) -> Iterator[None]:
        """Within the block, batch rows are member-major: rows [g*B/G, (g+1)*B/G) belong to member g."""
        dev = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        g = len(seeds)
        st = _Pass(groups=g)
        root = 1.0 / math.sqrt(self.rank)
        scale = torch.tensor([float(s) * sigma * root for s in signs], dtype=torch.float32, device=dev)
        full = torch.tensor([float(s) * sigma for s in signs], dtype=torch.float32, device=dev)
        for name, kind in self.plan.items():
            shape = self.shapes[name]
            if kind == FULLRANK:
                eps = torch.stack([self.noise.tensor(int(s), name, shape, dev).view(-1) for s in seeds])
                st.vectors[name] = eps * full[:, None]  # fp32: σ s ε, as the explicit weights add it
                continue
            pairs = [factors(self.noise, int(s), name, shape, self.rank, dev) for s in seeds]
            a = torch.stack([p[0] for p in pairs]) * scale[:, None, None]  # (G, out, r)
            b = torch.stack([p[1] for p in pairs])  # (G, in, r)
            st.left[name] = a.to(dtype).contiguous() if name in self.embeddings else a.transpose(1, 2).to(dtype)
            st.right[name] = b.to(dtype).contiguous()
        self.active = st
        try:
            yield
        finally:
            self.active = None

    def _linear_hook(self, weight: str | None, bias: str | None) -> Callable[..., Any]:
        tied = weight is not None and weight in self.embeddings

        def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            st = self.active
            if st is None:
                return None
            g = st.groups
            if weight is not None:
                x = inputs[0].reshape(g, -1, inputs[0].shape[-1])
                if tied:  # the embedding's factors: left (G, vocab, r), right (G, hidden, r)
                    d = torch.bmm(torch.bmm(x, st.right[weight]), st.left[weight].transpose(1, 2))
                else:
                    d = torch.bmm(torch.bmm(x, st.right[weight]), st.left[weight])
                out = out + d.view(out.shape)
            if bias is not None:
                out = (out.reshape(g, -1, out.shape[-1]) + st.vectors[bias][:, None, :].to(out.dtype)).view(out.shape)
            return out

        return hook

    def _embedding_hook(self, weight: str) -> Callable[..., Any]:
        def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            st = self.active
            if st is None or weight not in st.left:
                return None
            g = st.groups
            ids = inputs[0].reshape(g, -1)
            rows = st.left[weight][torch.arange(g, device=ids.device)[:, None], ids]  # (G, B*T/G, r)
            d = torch.bmm(rows, st.right[weight].transpose(1, 2))
            return out + d.view(out.shape)

        return hook

    def _vector_hook(self, mine: dict[str, str]) -> Callable[..., Any]:
        """A module whose own parameters are 1-D (a norm): run it once per member group with that
        member's parameters swapped in (they are tiny), so its own arithmetic is unchanged."""
        lock = threading.Lock()

        def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            st = self.active
            if st is None:
                return None
            g = st.groups
            x = inputs[0]
            parts = x.reshape(g, x.shape[0] // g, *x.shape[1:])
            params = {pn: getattr(mod, pn) for pn in mine}
            saved = {pn: p.data for pn, p in params.items()}
            res = []
            with lock:
                try:
                    for k in range(g):
                        for pn, p in params.items():
                            p.data = (saved[pn].float() + st.vectors[mine[pn]][k].float()).to(saved[pn].dtype)
                        res.append(mod.forward(parts[k], *inputs[1:]))
                finally:
                    for pn, p in params.items():
                        p.data = saved[pn]
            return torch.cat(res, 0).view(out.shape)

        return hook


def perturbed_weights(model: torch.nn.Module, scope: str, rank: int, noise: NoiseSource, seed: int, sign: int,
                      sigma: float) -> dict[str, torch.Tensor]:
    """Member (seed, sign)'s weights written out explicitly: W + σ s A Bᵀ/√r (1-D: W + σ s ε), rounded
    once to the weights' dtype.  The reference the batched forward is checked against; never used in a run."""
    out = {}
    for name, p in named_params(model):
        kind = plan(model, scope).get(name)
        w = p.detach().float()
        if kind == LOWRANK:
            a, b = factors(noise, seed, name, p.shape, rank, p.device)
            w = w + (sign * sigma / math.sqrt(rank)) * (a @ b.T)
        elif kind == FULLRANK:
            w = w + (sign * sigma) * noise.tensor(seed, name, p.shape, p.device)
        out[name] = w.to(p.dtype)
    return out


class LowRankEngine:
    """The update of the low-rank mode, with the ``Engine`` interface the trainer and replay call."""

    def __init__(self, chunk: int, rank: int, scope: str, block: int = 1 << 16, workers: int = 0,
                 scheme: str = "keyed") -> None:  # issue 12: + scheme
        self.noise = noise_source(scheme, chunk)  # issue 12: es.noise_scheme
        self.chunk, self.rank, self.scope = chunk, rank, scope
        self.block = block  # fp32 elements per accumulation block (L2-sized on the CPU); no effect on the bits
        self.workers = workers
        self._plans: dict[int, dict[str, str]] = {}
        self.models: dict[int, LowRankModel] = {}

    def attach(self, rep: Replica) -> LowRankModel:
        """Hooks on this replica's model (once)."""
        lm = self.models.get(id(rep.model))
        if lm is None:
            lm = self.models[id(rep.model)] = LowRankModel(rep.model, self.scope, self.rank, self.noise)
        return lm

    def perturb(self, rep: Replica, seed: int, sign: int, sigma: float) -> None:
        raise RuntimeError("es.noise=lowrank never writes perturbed weights: use LowRankModel.members")

    def restore(self, rep: Replica) -> None:
        """Nothing to do: the working weights are the master."""
        for name, p in rep.params:
            if rep.master[name] is not p:
                p.copy_(rep.master[name])

    def _plan(self, rep: Replica) -> dict[str, str]:
        got = self._plans.get(id(rep.model))
        if got is None:
            got = self._plans[id(rep.model)] = plan(rep.model, self.scope)
        return got

    @torch.no_grad()
    def update(self, replicas: list[Replica], seeds: np.ndarray, signs: np.ndarray,
               shaped: np.ndarray, alpha: float) -> None:
        """master <- round(master + (α/N)/√r Σ_n Z_n s_n A_n B_nᵀ) (1-D: (α/N) Σ Z_n s_n ε_n), fp32 sums.

        Antithetic members share a seed, so their coefficients fold first (as in the full-rank mode).  The
        first replica computes; the others (and working weights that are not the master) get copies.
        """
        n = len(shaped)
        terms = update_terms(seeds, signs, shaped)
        scale = alpha / n
        lead = replicas[0]
        if terms and scale != 0.0:
            for name, kind in self._plan(lead).items():
                master = lead.master[name]
                if kind == LOWRANK:
                    self._matrix(master, name, terms, scale / math.sqrt(self.rank))
                else:
                    self._vector(master, name, terms, scale)
        for rep in replicas:
            same = rep is lead
            for name, p in rep.params:
                if not same:
                    rep.master[name].copy_(lead.master[name])
                if rep.master[name] is not p:
                    p.copy_(rep.master[name])

    def _vector(self, master: torch.Tensor, name: str, terms: list[tuple[int, float]], scale: float) -> None:
        dev = master.device
        acc = torch.zeros(master.numel(), dtype=torch.float32, device=dev)
        for seed, c in terms:
            acc.add_(self.noise.tensor(seed, name, (master.numel(),), dev).mul_(c))
        acc.mul_(scale)
        _store(master.view(-1), acc)

    def _matrix(self, master: torch.Tensor, name: str, terms: list[tuple[int, float]], scale: float) -> None:
        dev = master.device
        out_f, in_f = master.shape
        r = self.rank
        # Factors of every term: (out x K r) scaled by its coefficient, and (in x K r); small.
        lefts, rights = [], []
        for seed, c in terms:
            a, b = factors(self.noise, seed, name, master.shape, r, dev)
            lefts.append(a.mul_(c))
            rights.append(b)
        left = torch.cat(lefts, 1)
        right = torch.cat(rights, 1).T.contiguous()  # (K r, in): row k is a contiguous factor
        rows = max(1, self.block // in_f) if dev.type == "cpu" else out_f
        blocks = [(s, min(s + rows, out_f)) for s in range(0, out_f, rows)]

        def block(s: int, e: int) -> None:
            acc = torch.zeros(e - s, in_f, dtype=torch.float32, device=dev)
            tmp = torch.empty_like(acc)
            for k in range(left.shape[1]):  # fixed order: term by term, rank column by rank column
                torch.outer(left[s:e, k], right[k], out=tmp)
                acc.add_(tmp)
            acc.mul_(scale)
            _store(master[s:e], acc)

        workers = self.workers or torch.get_num_threads()
        if dev.type != "cpu" or workers <= 1 or len(blocks) <= 1:
            for s, e in blocks:
                block(s, e)
        else:
            for _ in _cpu_pool(workers).map(lambda se: block(*se), blocks):
                pass


def _store(master: torch.Tensor, acc: torch.Tensor) -> None:
    """master <- round(master + acc), the sum in fp32 and one rounding to the master's dtype."""
    if master.dtype == torch.float32:
        master.add_(acc.view(master.shape))
    else:
        acc = acc.view(master.shape)
        acc.add_(master.float())
        master.copy_(acc)


def check_config(cfg: Any) -> None:
    """Settings the low-rank mode cannot honour: one clear error before any model is loaded."""
    if cfg.es.noise != "lowrank":
        return
    engine = getattr(cfg.rollout, "engine", "hf")
    if engine not in ("hf", "auto"):  # issue 11: auto resolves to hf on a model with the low-rank hooks
        raise ConfigError(f"es.noise=lowrank runs on rollout.engine=hf only (got {engine!r}; auto runs hf here)")


def score_members(lm: LowRankModel, tokenizer: Any, members: list[int], seeds: np.ndarray, signs: np.ndarray,
                  examples: list[Any], task: Any, cfg: Any, local: np.ndarray, times: dict[str, float] | None,
                  fault: Callable[[str], None] | None = None) -> None:
    """Mean reward of each of ``members`` into ``local[n]``: ``rollout.members_per_pass`` members (0 = all)
    per batched generation, rows member-major; ``rollout.batch_size`` prompts per generate call."""
    import time

    from hpc_es.rollout import generate, resolve_repetition_penalty
    from hpc_es.tasks import safe_score

    penalty = resolve_repetition_penalty(cfg.rollout.repetition_penalty, lm.model)  # issue 13: per row, as HF does
    prompts = [ex.prompt for ex in examples]
    per_pass = cfg.rollout.members_per_pass or len(members)
    size = cfg.rollout.batch_size or len(prompts)
    for start in range(0, len(members), per_pass):
        group = members[start:start + per_pass]
        g = len(group)
        a = time.perf_counter()
        with lm.members([int(seeds[n]) for n in group], [int(signs[n]) for n in group], cfg.es.sigma):
            b = time.perf_counter()
            if fault is not None:
                fault("rollout")
            comps: list[list[str]] = [[] for _ in range(g)]
            for p0 in range(0, len(prompts), size):
                batch = prompts[p0:p0 + size]
                out = generate(lm.model, tokenizer, [p for _ in range(g) for p in batch],
                               cfg.rollout.max_new_tokens, repetition_penalty=penalty)
                for k in range(g):
                    comps[k].extend(out[k * len(batch):(k + 1) * len(batch)])
        c = time.perf_counter()
        for k, n in enumerate(group):
            limit = cfg.rollout.reward_timeout_s  # issue 16
            local[n] = float(np.mean([safe_score(task, comp, ex, limit) for comp, ex in zip(comps[k], examples)]))
        d = time.perf_counter()
        if times is not None:
            times["perturb"] += b - a
            times["rollout"] += c - b
            times["reward"] += d - c


def make_engine(cfg: Any) -> LowRankEngine:
    """The low-rank engine a config asks for (es.noise=lowrank)."""
    check_config(cfg)
    # issue 12: + the noise scheme
    return LowRankEngine(cfg.es.noise_chunk, cfg.es.rank, cfg.es.lowrank_scope, scheme=cfg.es.noise_scheme)


def ledger_attrs(cfg: Any) -> dict[str, Any]:
    """Ledger attributes naming the search distribution (also in the config attribute; these are for readers)."""
    if cfg.es.noise != "lowrank":
        return {"noise": "full"}
    return {"noise": "lowrank", "noise_rank": int(cfg.es.rank), "noise_scope": cfg.es.lowrank_scope}
