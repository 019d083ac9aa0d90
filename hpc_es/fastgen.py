"""A greedy decoder for the population's rollouts: the same tokens as HF ``generate``, with less around them.

Why it exists: a member's rollout is hundreds of prompts decoded greedily for up to 1024 tokens.  HF's
``generate`` pays, every step, for a growing cache (``torch.cat``), masks rebuilt from scratch, a host
synchronisation for the stop check, and rows that finished long ago but still ride along.  This decoder
runs the same arithmetic as the HF Qwen2 / Llama modules, op for op where it matters for the numbers
(RMSNorm in fp32, RoPE tables rounded to the model dtype, logits cast to fp32 before the argmax), with

* the loaded model's own parameter tensors, read at every call (``Engine.perturb``/``update`` write them
  in place between members, so nothing derived from the weights is kept from one call to the next);
* a preallocated KV cache, written in place;
* left-padded prompts with HF's positions (cumsum of the attention mask) and pad keys masked out;
* rows that reach EOS leave the batch (cache, tokens and state are compacted to the active rows);
* grouped-query attention done by folding each KV head's query heads into one block, so K/V are never
  repeated;
* the "all finished?" question asked every ``check_every`` steps only (one host sync), not every step;
* on CUDA, the decode step captured as CUDA graphs, bucketed by batch and cache length, captured once per
  model and replayed for every later member (the graphs read the parameter storage, whose contents the
  ES engine rewrites in place; a change of storage address forces a new capture).  Prefill stays eager.
  On the CPU the same step runs eagerly.
* es.noise=lowrank natively (:class:`LowRankPass`): every linear call adds, for each row, its member's
  σ s/√r · (x B) Aᵀ term (and 1-D parameters their full-rank noise), the same functions the ``hf`` engine's
  hooks call, so the two engines give the same tokens.  Rows keep their member while the batch compacts.

The entry points are :func:`unsupported` (why a model cannot use it, or None) and :func:`generate_ids`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("qwen2", "llama")
STATIC_ROPE = ("default", "linear", "llama3")  # inv_freq fixed at load time (not recomputed per length)
MAX_EOS = 16


def unsupported(model: torch.nn.Module) -> str | None:
    """Why the fast engine cannot run ``model`` (one short phrase), or None when it can."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"architecture '{kind}' (the fast engine supports {', '.join(SUPPORTED_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation '{cfg.hidden_act}'"  # type: ignore[union-attr]
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE:
        return f"RoPE type '{rope_type}'"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window attention layers"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "forward hooks on the model (es.noise=lowrank adds its perturbations through them)"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"model class {type(model).__name__} (no .model.layers / rotary_emb)"
    return None


# ------------------------------------------------------------------------------------------------ weights

@dataclass
class _Layer:
    ln1: torch.Tensor
    eps1: float
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln2: torch.Tensor
    eps2: float
    wg: torch.Tensor
    bg: torch.Tensor | None
    wu: torch.Tensor
    bu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None


@dataclass
class _Weights:
    """References to the model's parameter tensors (no copies), taken at the start of a call."""

    embed: torch.Tensor
    layers: list[_Layer]
    norm: torch.Tensor
    norm_eps: float
    head: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor
    rope_scale: float
    dtype: torch.dtype
    device: torch.device

    def key(self) -> tuple:
        """Storage addresses of every tensor a captured graph reads: equal keys, valid graphs."""
        ptrs = [self.embed.data_ptr(), self.norm.data_ptr(), self.head.data_ptr()]
        for L in self.layers:
            for t in (L.ln1, L.wq, L.bq, L.wk, L.bk, L.wv, L.bv, L.wo, L.bo, L.ln2, L.wg, L.bg, L.wu, L.bu, L.wd,
                      L.bd):
                ptrs.append(0 if t is None else t.data_ptr())
        return tuple(ptrs)


def _bias(mod: Any) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    return None if b is None else b.data


def _weights(model: Any) -> _Weights:  # Any: HF modules' attributes are not typed
    cfg = model.config
    inner = model.model
    layers = []
    for lay in inner.layers:
        at, mlp = lay.self_attn, lay.mlp
        layers.append(_Layer(
            lay.input_layernorm.weight.data, float(lay.input_layernorm.variance_epsilon),
            at.q_proj.weight.data, _bias(at.q_proj), at.k_proj.weight.data, _bias(at.k_proj),
            at.v_proj.weight.data, _bias(at.v_proj), at.o_proj.weight.data, _bias(at.o_proj),
            lay.post_attention_layernorm.weight.data, float(lay.post_attention_layernorm.variance_epsilon),
            mlp.gate_proj.weight.data, _bias(mlp.gate_proj), mlp.up_proj.weight.data, _bias(mlp.up_proj),
            mlp.down_proj.weight.data, _bias(mlp.down_proj)))
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    embed = inner.embed_tokens.weight.data
    rot = inner.rotary_emb
    return _Weights(embed, layers, inner.norm.weight.data, float(inner.norm.variance_epsilon),
                    model.get_output_embeddings().weight.data, heads, kv, head_dim, rot.inv_freq,
                    float(rot.attention_scaling), embed.dtype, embed.device)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm, op for op: fp32 statistics, rounded back before the weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rot(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# -------------------------------------------------------------------------------------- low-rank members

@dataclass
class Factors:
    """One matrix W (out x in) for every member of a pass: the columns g*r .. g*r+r-1 belong to member g."""

    b: torch.Tensor  # (in, G r): B of each member, side by side
    a_t: torch.Tensor  # (G r, out): Aᵀ of each member, stacked
    a: torch.Tensor | None = None  # (out, G r): embeddings only (rows gathered by token id)
    b_t: torch.Tensor | None = None  # (G r, in): embeddings only


@dataclass
class Rows:
    """The rows of one forward call in a low-rank pass: their members, and the scale mask per position."""

    grp: torch.Tensor  # (n,): each row's member (group) in the pass
    mask: torch.Tensor  # (n * positions per row, G r), fp32: σ s_g/√r in the row's own member's r columns, else 0


@dataclass
class LowRankPass:
    """The members of one batched pass (es.noise=lowrank): per parameter, every member's factors.

    ``((x @ [B_0 .. B_G-1]) * mask) @ [A_0 .. A_G-1]ᵀ`` is, for every row, its own member's term
    σ s/√r · (x B_g) A_gᵀ: one GEMM over all members' factors, the other members' columns multiplied by
    exact zeros (the scaling in fp32, so a bf16 σ cannot shrink every perturbation alike).  Layers that
    read the same input (q/k/v, gate/up) share the first GEMM.  Keys are the parameters' storage addresses
    (``data_ptr``), so a tied ``lm_head`` finds the embedding's factors.  Both rollout engines call these
    methods: the ``hf`` engine from forward hooks, the fast engine from its own layer loop.
    """

    groups: int
    scale: torch.Tensor  # (G, G r), fp32: row g is member g's mask
    mats: dict[int, Factors]
    vectors: dict[int, torch.Tensor]  # 1-D parameters (scope=full): σ s_g ε_g, (G, numel), fp32
    _joined: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def rows(self, grp: torch.Tensor, tokens: int = 1) -> Rows:
        """Rows whose members are ``grp`` (n,), each with ``tokens`` positions in the call."""
        mask = self.scale[grp]
        return Rows(grp, mask if tokens == 1 else mask.repeat_interleave(tokens, 0))

    def member_major(self, batch: int) -> torch.Tensor:
        """The member of each row of a member-major batch of ``batch`` rows: ``batch / groups`` rows each."""
        if batch % self.groups:
            raise ValueError(f"a low-rank pass of {self.groups} members needs a multiple of {self.groups} rows, "
                             f"got {batch}")
        return torch.arange(self.groups, device=self.scale.device).repeat_interleave(batch // self.groups)

    def linear(self, x: torch.Tensor, ys: Sequence[torch.Tensor], ws: Sequence[torch.Tensor],
               biases: Sequence[torch.Tensor | None], rows: Rows) -> list[torch.Tensor]:
        """``ys[j] = x W_jᵀ + b_j`` of unperturbed layers that all read ``x`` ((n, in) or (n, T, in)), each
        plus every row's member terms."""
        out = list(ys)
        fs = [self.mats.get(w.data_ptr()) for w in ws]
        have = [j for j, f in enumerate(fs) if f is not None]
        if have:
            x2 = x.reshape(-1, x.shape[-1])
            key = tuple(ws[j].data_ptr() for j in have)
            b = self._joined.get(key)
            if b is None:
                parts = [fs[j].b for j in have]  # type: ignore[union-attr]
                b = self._joined[key] = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            gr = self.scale.shape[1]
            u = (x2 @ b).float().view(x2.shape[0], len(have), gr).mul_(rows.mask[:, None, :]).to(x.dtype)
            for i, j in enumerate(have):
                y = out[j]
                out[j] = torch.addmm(y.reshape(-1, y.shape[-1]), u[:, i], fs[j].a_t).view(y.shape)  # type: ignore[union-attr]
        for j, bias in enumerate(biases):
            v = None if bias is None else self.vectors.get(bias.data_ptr())
            if v is not None:
                out[j] = out[j] + _rowwise(v[rows.grp], x).to(out[j].dtype)
        return out

    def embed(self, ids: torch.Tensor, y: torch.Tensor, w: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Embedding rows plus each row's member term σ s/√r · A[id] Bᵀ (ids (n,) or (n, T))."""
        f = self.mats.get(w.data_ptr())
        if f is None or f.a is None or f.b_t is None:
            return y
        u = (f.a[ids.reshape(-1)].float() * rows.mask).to(y.dtype)
        return torch.addmm(y.reshape(-1, y.shape[-1]), u, f.b_t).view(y.shape)

    def weight(self, w: torch.Tensor, rows: Rows, like: torch.Tensor) -> torch.Tensor:
        """A 1-D weight (a norm's) per row: round(w + σ s_g ε_g), as the explicit member weights hold it."""
        v = self.vectors.get(w.data_ptr())
        if v is None:
            return w
        return _rowwise((w.float() + v[rows.grp]).to(w.dtype), like)


def _rowwise(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row values (n, k) shaped to broadcast against x of (n, k') or (n, T, k')."""
    return t[:, None, :] if x.dim() == 3 else t


# ------------------------------------------------------------------------------------------------- state

class _State:
    """Every tensor one generation needs, sized for ``rows`` x ``slots``; views ``[:b]`` are the live rows.

    On CUDA one State is kept per model and reused by later calls (its addresses are what the captured
    graphs read); it holds no weights and nothing computed from them between calls.
    """

    def __init__(self, W: _Weights, rows: int, slots: int, vocab: int, presence: bool, sched: bool) -> None:
        dev, n = W.device, len(W.layers)
        self.rows, self.slots, self.vocab = rows, slots, vocab
        shape = (rows, W.kv_heads, slots, W.head_dim)
        self.kc = [torch.zeros(shape, dtype=W.dtype, device=dev) for _ in range(n)]
        self.vc = [torch.zeros(shape, dtype=W.dtype, device=dev) for _ in range(n)]
        self.valid = torch.zeros(rows, slots, dtype=torch.bool, device=dev)
        self.cos = torch.zeros(slots, W.head_dim, dtype=W.dtype, device=dev)
        self.sin = torch.zeros(slots, W.head_dim, dtype=W.dtype, device=dev)
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.done = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.length = torch.zeros(rows, dtype=torch.long, device=dev)
        self.out = torch.zeros(rows, slots, dtype=torch.long, device=dev)  # generated ids, by step
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # cache slot the next step writes
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # index of the next generated token
        self.presence = torch.zeros(rows, vocab, dtype=torch.bool, device=dev) if presence else None
        self.sched = torch.zeros(rows, dtype=torch.long, device=dev) if sched else None
        self.grp = torch.zeros(rows, dtype=torch.long, device=dev)  # low-rank: each row's member in the pass
        self.eos_row = torch.zeros(vocab, dtype=torch.float32, device=dev)
        self.eos = torch.zeros(MAX_EOS, dtype=torch.long, device=dev)  # fixed size: graphs read its address
        self.pad = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs: dict[tuple, Any] = {}
        self.pool: Any = None
        self.wkey: tuple = ()

    def fits(self, rows: int, slots: int, vocab: int, presence: bool, sched: bool) -> bool:
        return (rows <= self.rows and slots <= self.slots and vocab == self.vocab
                and presence == (self.presence is not None) and sched == (self.sched is not None))


_STATES: weakref.WeakKeyDictionary[torch.nn.Module, _State] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------- steps

class _Decoder:
    def __init__(self, W: _Weights, st: _State, penalty: float, low: LowRankPass | None = None) -> None:
        self.W, self.st, self.penalty, self.low = W, st, penalty, low
        self.G = W.heads // W.kv_heads
        self.scale = W.head_dim ** -0.5
        self.on_logits: Any = None  # tests: called with each step's raw fp32 logits (eager steps only)

    def _lin(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: Rows | None) -> torch.Tensor:
        return self._lins(x, ((w, b),), rows)[0]

    def _lins(self, x: torch.Tensor, wb: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
              rows: Rows | None) -> list[torch.Tensor]:
        """Layers that read the same input (one shared low-rank GEMM for their members' terms)."""
        ys = [F.linear(x, w, b) for w, b in wb]
        if self.low is None or rows is None:
            return ys
        return self.low.linear(x, ys, [w for w, _ in wb], [b for _, b in wb], rows)

    def _norm(self, x: torch.Tensor, w: torch.Tensor, eps: float, rows: Rows | None) -> torch.Tensor:
        return _rms(x, w if self.low is None or rows is None else self.low.weight(w, rows, x), eps)

    def _mlp(self, h: torch.Tensor, L: _Layer, rows: Rows | None) -> torch.Tensor:
        g, u = self._lins(h, ((L.wg, L.bg), (L.wu, L.bu)), rows)
        return self._lin(F.silu(g) * u, L.wd, L.bd, rows)

    def _embed(self, ids: torch.Tensor, rows: Rows | None) -> torch.Tensor:
        x = F.embedding(ids, self.W.embed)
        return x if self.low is None or rows is None else self.low.embed(ids, x, self.W.embed, rows)

    def advance(self, logits: torch.Tensor, b: int) -> None:
        """Pick step ``st.step``'s token for rows ``[:b]`` from fp32 logits and update the row state.

        HF's greedy loop, in place: repetition penalty, forced EOS of the length schedule, argmax, pad for
        finished rows, EOS bookkeeping.  No host sync (CUDA-graph safe)."""
        st = self.st
        if st.presence is not None:
            p = self.penalty
            logits = torch.where(st.presence[:b], torch.where(logits < 0, logits * p, logits / p), logits)
        if st.sched is not None:
            logits = torch.where((st.sched[:b] == st.step)[:, None], st.eos_row, logits)
        nxt = logits.argmax(-1)
        done = st.done[:b]
        nxt = torch.where(done, st.pad, nxt)
        st.out[:b].index_copy_(1, st.step, nxt[:, None])
        if st.presence is not None:
            st.presence[:b].scatter_(1, nxt[:, None], True)
        is_eos = (nxt[:, None] == st.eos[None, :]).any(-1)
        st.length[:b].copy_(torch.where(is_eos & ~done, st.step + 1, st.length[:b]))
        done |= is_eos
        st.tok[:b].copy_(nxt)
        st.step += 1

    def decode(self, b: int, S: int) -> None:
        """One decode step for rows ``[:b]``, attending over cache slots ``[:S]`` (unwritten ones masked)."""
        W, st, G = self.W, self.st, self.G
        H, K, D = W.heads, W.kv_heads, W.head_dim
        tok, pos = st.tok[:b], st.pos[:b]
        valid = st.valid[:b]
        valid.index_fill_(1, st.slot, True)
        mask = valid[:, None, None, :S]
        cos, sin = st.cos[pos][:, None], st.sin[pos][:, None]  # (b, 1, D)
        rows = None if self.low is None else self.low.rows(st.grp[:b])
        x = self._embed(tok, rows)
        for i, L in enumerate(W.layers):
            h = self._norm(x, L.ln1, L.eps1, rows)
            q, k, v = self._lins(h, ((L.wq, L.bq), (L.wk, L.bk), (L.wv, L.bv)), rows)
            q, k, v = q.view(b, H, D), k.view(b, K, D), v.view(b, K, D)
            q = q * cos + _rot(q) * sin
            k = k * cos + _rot(k) * sin
            kc, vc = st.kc[i][:b], st.vc[i][:b]
            kc.index_copy_(2, st.slot, k[:, :, None])
            vc.index_copy_(2, st.slot, v[:, :, None])
            a = F.scaled_dot_product_attention(q.view(b, K, G, D), kc[:, :, :S], vc[:, :, :S], attn_mask=mask,
                                               scale=self.scale)
            x = x + self._lin(a.reshape(b, H * D), L.wo, L.bo, rows)
            x = x + self._mlp(self._norm(x, L.ln2, L.eps2, rows), L, rows)
        logits = self._lin(self._norm(x, W.norm, W.norm_eps, rows), W.head, None, rows).float()
        if self.on_logits is not None:
            self.on_logits(logits)
        st.pos[:b] += 1
        st.slot += 1
        self.advance(logits, b)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, r0: int, logits_out: torch.Tensor) -> None:
        """Rows ``r0 : r0+n`` of the prompt batch through every layer (eager); their K/V into the cache, their
        last position's fp32 logits into ``logits_out``."""
        W, st, G = self.W, self.st, self.G
        H, K, D = W.heads, W.kv_heads, W.head_dim
        n, P = ids.shape
        r1 = r0 + n
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # HF's positions for left padding
        st.pos[r0:r1] = pos[:, -1] + 1
        keys = mask.bool()
        st.valid[r0:r1, :P] = keys
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        # A pad query sees only itself, so no softmax row is empty (its output is never used: pad keys are
        # masked for every real query).
        am = (causal & keys[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)
        am = am[:, None, None].expand(n, 1, G, P, P).reshape(n, 1, G * P, P)
        cos, sin = st.cos[pos][:, None], st.sin[pos][:, None]  # (n, 1, P, D)
        rows = last_rows = None
        if self.low is not None:
            rows, last_rows = self.low.rows(st.grp[r0:r1], P), self.low.rows(st.grp[r0:r1])
        x = self._embed(ids, rows)
        for i, L in enumerate(W.layers):
            h = self._norm(x, L.ln1, L.eps1, rows)
            q, k, v = self._lins(h, ((L.wq, L.bq), (L.wk, L.bk), (L.wv, L.bv)), rows)
            q = q.view(n, P, H, D).transpose(1, 2)
            k = k.view(n, P, K, D).transpose(1, 2)
            v = v.view(n, P, K, D).transpose(1, 2)
            q = q * cos + _rot(q) * sin
            k = k * cos + _rot(k) * sin
            st.kc[i][r0:r1, :, :P] = k
            st.vc[i][r0:r1, :, :P] = v
            qg = q.reshape(n, K, G * P, D)  # heads h = kv*G + g: each KV head's G query heads in one block
            a = F.scaled_dot_product_attention(qg, k, v, attn_mask=am, scale=self.scale)
            a = a.view(n, K, G, P, D).permute(0, 3, 1, 2, 4).reshape(n, P, H * D)
            x = x + self._lin(a, L.wo, L.bo, rows)
            x = x + self._mlp(self._norm(x, L.ln2, L.eps2, rows), L, rows)
        last = x[:, -1]
        logits_out[r0:r1] = self._lin(self._norm(last, W.norm, W.norm_eps, last_rows), W.head, None,
                                      last_rows).float()


# ------------------------------------------------------------------------------------------------- driver

def _bucket_rows(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


def _bucket_len(n: int, cap: int, step: int = 256) -> int:
    return min(-(-n // step) * step, cap)


@torch.no_grad()
def generate_ids(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, eos_token_id: int | Sequence[int], pad_token_id: int, *,
                 repetition_penalty: float = 1.0, length_schedule: Sequence[int] | None = None,
                 check_every: int = 0, graphs: bool | None = None, lowrank: LowRankPass | None = None,
                 logits_log: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Greedy completions of a left-padded batch: the new ids, padded like HF's ``generate(...)[:, P:]``.

    ``length_schedule[i]`` (benchmarks and tests): row i's completion ends with EOS at the latest as its
    ``length_schedule[i]``-th new token.  ``check_every``: steps between "all finished?" checks (0: every
    step on CPU, 8 on CUDA).  ``graphs``: CUDA graphs for the decode step (default: on CUDA, except with
    ``lowrank``).  ``lowrank`` (es.noise=lowrank): the members of a pass; the batch's rows are member-major,
    ``B / lowrank.groups`` rows per member.
    ``logits_log`` (tests): receives (step, original row ids, raw fp32 logits) for the live rows of every
    step.
    """
    W = _weights(model)
    dev = W.device
    cuda = dev.type == "cuda"
    # A pass's factors are new tensors each call, which captured graphs would not see: low-rank runs eagerly.
    use_graphs = lowrank is None and (cuda if graphs is None else (graphs and cuda))
    every = check_every or (8 if cuda else 1)
    ids = input_ids.to(dev)
    mask = attention_mask.to(dev)
    B, P = ids.shape
    eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    vocab = W.head.shape[0]
    penalty = float(repetition_penalty)
    need = P + max_new_tokens
    slots = _bucket_len(need, 1 << 62) if use_graphs else need
    st = _STATES.get(model) if use_graphs else None
    want = (B, slots, vocab, penalty != 1.0, length_schedule is not None)
    if st is None or not st.fits(*want):
        st = _State(W, *want)
        if use_graphs:
            _STATES[model] = st
    if use_graphs and st.wkey != W.key():  # weights moved (reloaded, another dtype): graphs are stale
        st.graphs.clear()
        st.wkey = W.key()
    dec = _Decoder(W, st, penalty, lowrank)
    if lowrank is not None:
        st.grp[:B].copy_(lowrank.member_major(B))

    # Per-call state: RoPE tables (HF's formula: fp32 angle, cos/sin scaled, rounded to the model dtype).
    t = torch.arange(st.slots, device=dev, dtype=torch.float32)
    ang = t[:, None] * W.inv_freq.to(device=dev, dtype=torch.float32)[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    st.cos.copy_((emb.cos() * W.rope_scale).to(W.dtype))
    st.sin.copy_((emb.sin() * W.rope_scale).to(W.dtype))
    if not 1 <= len(eos) <= MAX_EOS:
        raise ValueError(f"the fast engine takes 1 to {MAX_EOS} EOS ids, got {len(eos)}")
    st.eos.copy_(torch.tensor(eos + [eos[0]] * (MAX_EOS - len(eos)), device=dev))
    st.pad.fill_(int(pad_token_id))
    st.eos_row.fill_(float("-inf"))
    if 0 <= eos[0] < vocab:
        st.eos_row[eos[0]] = 0.0
    st.valid.zero_()
    st.done[:B].zero_()
    st.length[:B].fill_(max_new_tokens)
    st.out[:B, :max_new_tokens].fill_(int(pad_token_id))
    st.step.zero_()
    st.slot.fill_(P)
    if st.presence is not None:
        st.presence[:B].zero_()
        st.presence[:B].scatter_(1, ids, True)  # HF penalises every id of the row, pads included
    if st.sched is not None:
        sched = torch.tensor([int(s) - 1 for s in length_schedule], dtype=torch.long)  # type: ignore[union-attr]
        if sched.numel() != B:
            raise ValueError(f"length_schedule has {sched.numel()} entries for {B} prompts")
        st.sched[:B].copy_(sched.to(dev))

    logits = torch.empty(B, vocab, dtype=torch.float32, device=dev)
    chunk = max(1, 16384 // max(P, 1))
    for r0 in range(0, B, chunk):
        dec.prefill(ids[r0:r0 + chunk], mask[r0:r0 + chunk], r0, logits)
    rows = torch.arange(B, device=dev)  # original row of each live slot (-1: a filler slot)
    rows_now = [rows]
    if logits_log is not None:
        logits_log.append((0, rows.clone(), logits.clone()))
        use_graphs = False
        dec.on_logits = lambda lg: logits_log.append((int(st.step), rows_now[0].clone(), lg.clone()))
    dec.advance(logits, B)
    del logits

    final = torch.full((B, max_new_tokens), int(pad_token_id), dtype=torch.long, device=dev)
    final_len = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
    b = B
    done_steps = 1
    since = every  # check right after prefill (all rows may stop at the first token)
    while done_steps < max_new_tokens:
        if since >= every:
            since = 0
            live = torch.nonzero(~st.done[:b] & (rows >= 0)).flatten()
            n = int(live.numel())  # the host sync, once per check
            if n == 0:
                break
            nb = _bucket_rows(n, B) if use_graphs else n
            if nb < b:
                _flush(st, rows, b, final, final_len)
                _compact(st, live, nb, n, P + done_steps)
                rows = torch.cat([rows[live], rows.new_full((nb - n,), -1)])
                rows_now[0] = rows
                b = nb
        S = _bucket_len(P + done_steps, st.slots) if use_graphs else P + done_steps
        if use_graphs:
            _replay(dec, b, S)
        else:
            dec.decode(b, S)
        done_steps += 1
        since += 1
    _flush(st, rows, b, final, final_len)
    width = int(final_len.max()) if B else 0
    return final[:, :width]


def _flush(st: _State, rows: torch.Tensor, b: int, final: torch.Tensor, final_len: torch.Tensor) -> None:
    """Copy the live slots' outputs to their original rows (filler slots skipped)."""
    real = torch.nonzero(rows >= 0).flatten()
    idx = rows[real]
    w = final.shape[1]
    final[idx] = st.out[real, :w]
    final_len[idx] = st.length[real]


def _compact(st: _State, live: torch.Tensor, nb: int, n: int, used: int) -> None:
    """Move the live rows to slots ``[:n]`` (one layer at a time, over the written slots only); slots
    ``[n:nb]`` become finished fillers."""
    for t in (st.tok, st.pos, st.done, st.length):
        t[:n] = t[live]
    for t2 in (st.out, st.valid):
        t2[:n] = t2[live]
    if st.presence is not None:
        st.presence[:n] = st.presence[live]
    if st.sched is not None:
        st.sched[:n] = st.sched[live]
    st.grp[:n] = st.grp[live]
    for kc, vc in zip(st.kc, st.vc):
        kc[:n, :, :used] = kc[live, :, :used]
        vc[:n, :, :used] = vc[live, :, :used]
    if nb > n:
        st.done[n:nb] = True


def _replay(dec: _Decoder, b: int, S: int) -> None:
    """The decode step for (b, S) as a CUDA graph: captured on first use, replayed after."""
    st = dec.st
    key = (b, S, dec.penalty)  # the penalty is a constant of the captured kernels
    g = st.graphs.get(key)
    if g is None:
        snap = _snapshot(st, b)
        side = torch.cuda.Stream(st.tok.device)
        side.wait_stream(torch.cuda.current_stream(st.tok.device))
        with torch.cuda.stream(side):  # warm-up (lazy inits, workspace) outside the capture
            dec.decode(b, S)
        torch.cuda.current_stream(st.tok.device).wait_stream(side)
        _restore(st, b, snap)
        if st.pool is None:
            st.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        # thread_local: replicas that share the GPU run in other threads and may allocate meanwhile
        with torch.cuda.graph(g, pool=st.pool, capture_error_mode="thread_local"):
            dec.decode(b, S)
        _restore(st, b, snap)  # capture does not run the kernels, but keep the state exact regardless
        st.graphs[key] = g
    g.replay()


def _snapshot(st: _State, b: int) -> dict[str, torch.Tensor]:
    """The small per-row state a decode step changes (the cache slot it writes is rewritten on replay)."""
    snap = {"tok": st.tok[:b].clone(), "pos": st.pos[:b].clone(), "done": st.done[:b].clone(),
            "length": st.length[:b].clone(), "slot": st.slot.clone(), "step": st.step.clone(),
            "valid": st.valid[:b].clone(), "out": st.out[:b].clone()}
    if st.presence is not None:
        snap["presence"] = st.presence[:b].clone()
    return snap


def _restore(st: _State, b: int, snap: dict[str, torch.Tensor]) -> None:
    for k, v in snap.items():
        t = getattr(st, k)
        (t if k in ("slot", "step") else t[:b]).copy_(v)
