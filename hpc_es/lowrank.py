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
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch

from hpc_es.config import ESConfig, RolloutConfig
from hpc_es.errors import ConfigError
from hpc_es.es import Replica, cpu_pool, update_terms
from hpc_es.lowrank_pass import Factors, LowRankPass, Rows
from hpc_es.models import named_params
from hpc_es.noise import NoiseSource, noise_source

LOWRANK, FULLRANK = "rank-r", "dense"  # how plan() perturbs a parameter: factors A Bᵀ, or eps of its own shape


def factor_keys(name: str) -> tuple[str, str]:
    """Noise keys of a matrix's two factors (A: out x r, B: in x r)."""
    return f"{name}.A", f"{name}.B"


def factors(noise: NoiseSource, seed: int, name: str, shape: Sequence[int], rank: int,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A_n (out x r) and B_n (in x r) of member seed ``seed`` for the matrix ``name``, fp32."""
    ka, kb = factor_keys(name)
    return (noise.tensor(seed, ka, (int(shape[0]), rank), device),
            noise.tensor(seed, kb, (int(shape[1]), rank), device))


def side_by_side(noise: NoiseSource, seeds: Sequence[int], name: str, shape: Sequence[int], rank: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """[A_0 .. A_K-1] (out x K r) and [B_0 .. B_K-1] (in x K r) of the members ``seeds`` (columns k*r ..
    k*r+r-1 are member k's), fp32, drawn in one pass per factor: the bits of ``factors`` for each."""
    ka, kb = factor_keys(name)
    k = len(seeds)
    a = noise.stack(seeds, ka, (int(shape[0]), rank), device)  # (K, out, r)
    b = noise.stack(seeds, kb, (int(shape[1]), rank), device)  # (K, in, r)
    return (a.permute(1, 0, 2).reshape(int(shape[0]), k * rank),
            b.permute(1, 0, 2).reshape(int(shape[1]), k * rank))


def plan(model: torch.nn.Module, scope: str) -> dict[str, str]:
    """Parameter name -> LOWRANK or FULLRANK for every parameter that is perturbed; the rest stay frozen.

    Raises ConfigError for a parameter the hooks cannot perturb (a matrix outside nn.Linear/nn.Embedding).
    """
    names = {id(p): n for n, p in named_params(model)}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            name = names[id(p)]
            if id(p) in embedding:
                if scope == ESConfig.FULL:
                    out[name] = LOWRANK
            elif isinstance(mod, torch.nn.Linear) and pname == "weight":
                out[name] = LOWRANK
            elif p.dim() == 1:
                if scope == ESConfig.FULL:
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


class LowRankModel:
    """The low-rank members of one model copy: builds a pass's factors, and (``hf`` engine) the forward hooks
    that add them.

    Hooks exist only inside ``members(..., hooks=True)``: outside, the model is a plain model (eval and the
    test split run on the unperturbed weights, and the fast engine, which refuses hooked models, can run it).
    """

    def __init__(self, model: torch.nn.Module, scope: str, rank: int, noise: NoiseSource) -> None:
        self.model, self.rank, self.noise = model, rank, noise
        self.plan = plan(model, scope)
        self.active: LowRankPass | None = None
        params = dict(named_params(model))
        self.params = {n: params[n] for n in self.plan}
        self.embeddings = {n for n, p in params.items()
                           if any(p is m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding))}
        self.handles: list[Any] = []
        self._rows: dict[tuple[int, int], Rows] = {}

    def remove(self) -> None:
        """Take the hooks off (the end of a ``members`` block does it too)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def build(self, seeds: Sequence[int], signs: Sequence[int], sigma: float) -> LowRankPass:
        """Members (seed, sign) side by side: per matrix [B_0 .. B_G-1] and [A_0 .. A_G-1]ᵀ, per 1-D
        parameter σ s ε.  The scale σ s/√r stays fp32 (a bf16 σ would shrink every perturbation alike)."""
        p0 = next(self.model.parameters())
        dev, dtype = p0.device, p0.dtype
        g, r = len(seeds), self.rank
        scale = torch.zeros(g, g * r, dtype=torch.float32)
        for k, sign in enumerate(signs):
            scale[k, k * r:(k + 1) * r] = float(sign) * sigma / math.sqrt(r)
        mats: dict[int, Factors] = {}
        vectors: dict[int, torch.Tensor] = {}
        for name, kind in self.plan.items():
            p = self.params[name]
            if kind == FULLRANK:
                eps = self.noise.stack(seeds, name, (p.numel(),), dev)
                vectors[p.data_ptr()] = eps * torch.tensor([float(s) * sigma for s in signs], device=dev)[:, None]
                continue
            a, b = side_by_side(self.noise, seeds, name, p.shape, r, dev)
            a, b = a.to(dtype), b.to(dtype)  # (out, G r), (in, G r)
            emb = name in self.embeddings
            mats[p.data_ptr()] = Factors(b.contiguous(), a.T.contiguous(), a.contiguous() if emb else None,
                                                 b.T.contiguous() if emb else None)
        return LowRankPass(g, scale.to(dev), mats, vectors)

    @contextlib.contextmanager
    def members(self, seeds: Sequence[int], signs: Sequence[int], sigma: float,
                hooks: bool = True) -> Iterator[LowRankPass]:
        """Within the block, batch rows are member-major: rows [g*B/G, (g+1)*B/G) belong to member g.

        ``hooks``: the model's own modules add the members' terms (``hf`` engine, plain forward calls);
        without, the caller hands the yielded pass to the fast engine."""
        lp = self.build(seeds, signs, sigma)
        self.active, self._rows = lp, {}
        if hooks:
            self._hook()
        try:
            yield lp
        finally:
            self.remove()
            self.active, self._rows = None, {}

    def _rows_of(self, x: torch.Tensor) -> Rows:
        """The rows of a member-major batch (HF keeps every row to the end), for an input of (B, T, ...)."""
        st = self.active
        assert st is not None
        batch, tokens = int(x.shape[0]), int(x.shape[1]) if x.dim() > 1 else 1
        got = self._rows.get((batch, tokens))
        if got is None:
            got = self._rows[(batch, tokens)] = st.rows(st.member_major(batch), tokens)
        return got

    def _hook(self) -> None:
        ptrs = {p.data_ptr() for p in self.params.values()}
        for mod in self.model.modules():
            mine = {pn: p for pn, p in mod.named_parameters(recurse=False) if p.data_ptr() in ptrs}
            if not mine:
                continue
            if isinstance(mod, torch.nn.Embedding):
                hook = self._embedding_hook()
            elif isinstance(mod, torch.nn.Linear):
                hook = self._linear_hook()
            else:
                hook = self._vector_hook(mine)
            self.handles.append(mod.register_forward_hook(hook))

    def _linear_hook(self) -> Callable[..., Any]:
        def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            st = self.active
            if st is None:
                return None
            x, lin = inputs[0], cast(torch.nn.Linear, mod)
            return st.linear(x, [out], [lin.weight], [lin.bias], self._rows_of(x[..., 0]))[0]

        return hook

    def _embedding_hook(self) -> Callable[..., Any]:
        def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            st = self.active
            if st is None:
                return None
            ids = inputs[0]
            return st.embed(ids, out, cast(torch.nn.Embedding, mod).weight, self._rows_of(ids))

        return hook

    def _vector_hook(self, mine: dict[str, torch.nn.Parameter]) -> Callable[..., Any]:
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
            saved = {pn: p.data for pn, p in mine.items()}
            vecs = {pn: st.vectors[p.data_ptr()] for pn, p in mine.items()}
            res = []
            with lock:
                try:
                    for k in range(g):
                        for pn, p in mine.items():
                            p.data = (saved[pn].float() + vecs[pn][k]).to(saved[pn].dtype)
                        res.append(mod.forward(parts[k], *inputs[1:]))
                finally:
                    for pn, p in mine.items():
                        p.data = saved[pn]
            return torch.cat(res, 0).view(out.shape)

        return hook


class LowRankEngine:
    """The exact low-rank update and restore of a set of replicas (hpc_es.search.LowRank adds the members)."""

    def __init__(self, chunk: int, rank: int, scope: str, block: int = 1 << 16, workers: int = 0,
                 scheme: str = "keyed") -> None:
        self.noise = noise_source(scheme, chunk)
        self.chunk, self.rank, self.scope = chunk, rank, scope
        self.block = block  # fp32 elements per accumulation block (L2-sized on the CPU); no effect on the bits
        self.workers = workers
        self._plans: dict[int, dict[str, str]] = {}

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
        left, right = side_by_side(self.noise, [seed for seed, _ in terms], name, master.shape, r, dev)
        coef = torch.tensor([c for _, c in terms], dtype=torch.float32, device=dev).repeat_interleave(r)
        left.mul_(coef)  # column k*r + j: term k's coefficient times A_k[:, j], one fp32 product each
        right = right.T.contiguous()  # (K r, in): row k is a contiguous factor
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
            for _ in cpu_pool(workers).map(lambda se: block(*se), blocks):
                pass


def _store(master: torch.Tensor, acc: torch.Tensor) -> None:
    """master <- round(master + acc), the sum in fp32 and one rounding to the master's dtype."""
    if master.dtype == torch.float32:
        master.add_(acc.view(master.shape))
    else:
        acc = acc.view(master.shape)
        acc.add_(master.float())
        master.copy_(acc)


# ---- rollout.members_per_pass=0: as many members per pass as the device holds ----------------------------
HEADROOM = 0.85  # share of the free memory a pass may fill: the allocator's fragments and the kernels' workspace


def free_bytes(device: torch.device) -> int:
    """Memory a pass can still take on ``device``: the driver's free memory plus what PyTorch holds unused
    (CUDA), or the host's free pages (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def member_bytes(lm: LowRankModel, rows: int, prompt_len: int, max_new_tokens: int, engine: str) -> int:
    """Device memory one member adds to a pass: its rows' KV cache over prompt + completion, their fp32
    logits and per-row state, its factors; with ``hf`` also the rows' prefill activations (the fast engine
    prefills a bounded number of tokens at a time whatever the batch)."""
    c: Any = lm.model.config  # (an HF config: typed as a module attribute)
    p0 = next(lm.model.parameters())
    size = p0.element_size()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    slots = prompt_len + max_new_tokens
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * slots * size
    per_row = kv + c.vocab_size * 4 * 2 + slots * 9  # logits and their penalised copy; ids and mask per slot
    if engine == "hf":
        per_row += prompt_len * (2 * c.intermediate_size + 4 * c.hidden_size) * size
    factors = 0
    for name, kind in lm.plan.items():
        p = lm.params[name]
        factors += p.numel() * 8 if kind == FULLRANK else sum(p.shape) * lm.rank * (size + 4)
    return rows * per_row + factors


def members_per_pass(free: int, per_member: int, members: int) -> int:
    """How many of ``members`` fit in ``HEADROOM`` of ``free`` bytes at ``per_member`` each (at least one)."""
    return max(1, min(members, int(free * HEADROOM) // max(per_member, 1)))


def plan_passes(lm: LowRankModel, rollout: RolloutConfig, tokenizer: Any, train: Sequence[Any], members: int,
                engine: str, sharing: int = 1, free: int | None = None) -> tuple[int, str]:
    """Members per batched pass for a run, and the words that say why: ``rollout.members_per_pass``, or
    with 0 as many as fit in the device's free memory (``free``, else measured now, split between the
    ``sharing`` replicas on the device) at the KV cache of the longest training prompt plus
    ``rollout.max_new_tokens``.  Fixed for the run, so a pass's batch shape is the same every iteration."""
    if rollout.members_per_pass:
        n = min(rollout.members_per_pass, max(members, 1))
        return n, f"{n} members per pass (rollout.members_per_pass)"
    prompts = min(rollout.prompts_per_iteration, len(train))
    rows = min(rollout.batch_size or prompts, prompts)
    longest = max((len(ids) for ids in tokenizer([ex.prompt for ex in train[:4096]])["input_ids"]), default=0)
    dev = next(lm.model.parameters()).device
    avail = (free_bytes(dev) if free is None else free) // max(sharing, 1)
    each = member_bytes(lm, rows, longest, rollout.max_new_tokens, engine)
    n = members_per_pass(avail, each, members)
    return n, (f"{n} of {members} members per pass (as many as fit: {avail / 2**30:.1f} GiB free on {dev}, "
               f"{each / 2**30:.2f} GiB per member at {rows} x {longest + rollout.max_new_tokens} cache slots)")
