"""A greedy decoder for the population's rollouts: the same tokens as HF ``generate``, with less around them.

Why it exists: a member's rollout is hundreds of prompts decoded greedily for up to 1024 tokens.  HF's
``generate`` pays, every step, for a growing cache (``torch.cat``), masks rebuilt from scratch, a host
synchronisation for the stop check, and rows that finished long ago but still ride along.  This decoder
runs the same arithmetic as the HF Qwen2 / Llama modules, op for op where it matters for the numbers
(RMSNorm in fp32, RoPE tables rounded to the model dtype, logits cast to fp32 before the argmax), with

* one transformer block (:func:`block`) for prefill and decode alike, as in gpt-fast's model: a forward
  over ``T`` positions (the prompt, or the one new token), its keys and values written in place into a
  preallocated :class:`KVCache` per layer, attention called in one place (:func:`_attend`);
* the block's weight calls behind one seam (:class:`Linears`): plain layers, or a low-rank pass's per-row
  member terms (es.noise=lowrank, hpc_es/lowrank_pass.py: the functions the ``hf`` engine's hooks call too,
  so the engines give the same tokens), or a tensor-parallel shard's (hpc_es/tp.py, :func:`set_linears`):
  the same block, with the shard's head counts read from its tensors;
* the loaded model's own parameter tensors, read at every call (``Engine.perturb``/``update`` write them
  in place between members, so nothing derived from the weights is kept from one call to the next);
* left-padded prompts with HF's positions (cumsum of the attention mask); the attention mask built once
  per step (not per layer) as an additive mask in the model's dtype, the form SDPA's fused kernels take,
  and none where no row is padded: prefill is then ``is_causal`` and an eager decode step sees every key;
* rows that reach EOS leave the batch (cache, tokens and state are compacted to the active rows);
* grouped-query attention done by folding each KV head's query heads into one block, so K/V are never
  repeated;
* the "all finished?" question asked every ``check_every`` steps only (one host sync), not every step;
* on CUDA, the decode step captured as CUDA graphs, bucketed by batch and cache length, captured once per
  model on a capture stream of the replica's own device (one per thread) and replayed for every later
  member (the graphs read the parameter storage, whose contents the ES engine rewrites in place; a change
  of storage address forces a new capture).  Prefill stays eager.  On the CPU the same step runs eagerly;
* ``rollout.compile``: the decode step compiled with ``torch.compile`` (RMSNorm, RoPE, residuals and the
  cache write fused), checked against the eager step on the live model at every new shape and refused with
  one warning if it differs or fails to build; on CUDA the graphs capture the compiled step.

The entry points are :func:`unsupported` (why a model cannot use it, or None), :func:`generate_ids` and
:func:`set_compile` (a model's ``rollout.compile``).
"""

from __future__ import annotations

import logging
import shutil
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from hpc_es.config import RolloutConfig

log = logging.getLogger("hpc_es")
SUPPORTED_TYPES = ("qwen2", "llama")
STATIC_ROPE = ("default", "linear", "llama3")  # inv_freq fixed at load time (not recomputed per length)
MAX_EOS = 16
COMPILE = RolloutConfig.COMPILES  # rollout.compile


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
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # Head counts from the tensors, not the config: a tensor-parallel shard holds whole heads of q and k/v.
    heads = layers[0].wq.shape[0] // head_dim if layers else cfg.num_attention_heads
    kv = layers[0].wk.shape[0] // head_dim if layers else (getattr(cfg, "num_key_value_heads", None) or heads)
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


# ------------------------------------------------------------------------------------------------ seams

class Linears(Protocol):
    """The block's weight calls.  Plain decoding uses :data:`PLAIN`; a low-rank pass adds each row's member
    term (``hpc_es.lowrank_pass.MemberLinears``); a tensor-parallel shard's (``hpc_es.tp.ShardLinears``)
    runs ``proj`` on its own output rows and sums the shards' partials in ``out``, the block itself unchanged."""

    def embed(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``ids`` ((n, T) -> (n, T, hidden))."""
        ...

    def weight(self, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A 1-D weight (a norm's), shaped to scale ``like``."""
        ...

    def proj(self, x: torch.Tensor, wb: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        """``x W_jᵀ + b_j`` for layers that read the same input (q/k/v, gate/up, the head)."""
        ...

    def out(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """A projection back into the residual stream (o, down)."""
        ...


class _Plain:
    def embed(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, w)

    def weight(self, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return w

    def proj(self, x: torch.Tensor, wb: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        return [F.linear(x, w, b) for w, b in wb]

    def out(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)


PLAIN: Linears = _Plain()
_LINEARS: weakref.WeakKeyDictionary[torch.nn.Module, Linears] = weakref.WeakKeyDictionary()


def set_linears(model: torch.nn.Module, lin: Linears | None) -> None:
    """The weight calls ``model``'s decoding uses instead of :data:`PLAIN` (a tensor-parallel shard's:
    ``hpc_es.tp.ShardLinears``); None: plain again.  Such a model decodes eagerly (its exchange is neither
    captured nor compiled) and takes no low-rank pass."""
    if lin is None:
        _LINEARS.pop(model, None)
    else:
        _LINEARS[model] = lin


class Members(Protocol):
    """Per-row weight terms of a batched pass (es.noise=lowrank: ``hpc_es.lowrank_pass.LowRankPass``); the
    batch's rows are member-major."""

    groups: int

    def member_major(self, batch: int) -> torch.Tensor:
        """Each row's member in a batch of ``batch`` rows."""
        ...

    def linears(self, grp: torch.Tensor, tokens: int) -> Linears:
        """The block's weight calls for rows of members ``grp``, ``tokens`` positions each."""
        ...


@dataclass
class Observer:
    """What a test or a benchmark watches or steers in a generation; a run has none.

    ``stop_at[i]``: row i's completion ends with EOS by its ``stop_at[i]``-th new token (ragged completions
    from a random-weight model, as a population's are).  ``logits``: receives (step, the original row of each
    live slot (-1: a filler), raw fp32 logits) for every step; the steps then run eagerly.
    """

    stop_at: Sequence[int] | None = None
    logits: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None

    def part(self, start: int, stop: int) -> Observer:
        """The observer of rows ``start:stop`` (one batch of a longer prompt list)."""
        return Observer(None if self.stop_at is None else list(self.stop_at[start:stop]), self.logits)


# ------------------------------------------------------------------------------------------------- block

class KVCache:
    """One layer's keys and values, (rows, kv_heads, slots, head_dim), written in place."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, rows: slice, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (n, K, T, D) of ``rows`` at slots ``at`` (T,); their keys and values in slots
        ``[:upto]``."""
        kc, vc = self.k[rows], self.v[rows]
        kc.index_copy_(2, at, k)
        vc.index_copy_(2, at, v)
        return kc[:, :, :upto], vc[:, :, :upto]

    def keep(self, live: torch.Tensor, used: int) -> None:
        """Rows ``live`` move to the front (over the ``used`` written slots only)."""
        n = live.numel()
        self.k[:n, :, :used] = self.k[live, :, :used]
        self.v[:n, :, :used] = self.v[live, :, :used]


def block(x: torch.Tensor, L: _Layer, W: _Weights, cache: KVCache, rows: slice, at: torch.Tensor, upto: int,
          rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, lin: Linears) -> torch.Tensor:
    """One decoder layer over ``x`` (n, T, hidden): T prompt positions (prefill) or the one new token
    (decode).  RoPE tables ``rope`` (n, 1, T, D) at the rows' positions; keys and values go to cache slots
    ``at`` and attention reads slots ``[:upto]`` (``mask``: see :func:`_attend`)."""
    n, T, _ = x.shape
    H, K, D = W.heads, W.kv_heads, W.head_dim
    cos, sin = rope
    h = _rms(x, lin.weight(L.ln1, x), L.eps1)
    q, k, v = lin.proj(h, ((L.wq, L.bq), (L.wk, L.bk), (L.wv, L.bv)))
    q = q.view(n, T, H, D).transpose(1, 2)
    k = k.view(n, T, K, D).transpose(1, 2)
    v = v.view(n, T, K, D).transpose(1, 2)
    q = q * cos + _rot(q) * sin
    k = k * cos + _rot(k) * sin
    keys, values = cache.update(rows, at, k, v, upto)
    a = _attend(q, keys, values, mask, D ** -0.5)
    x = x + lin.out(a.transpose(1, 2).reshape(n, T, H * D), L.wo, L.bo)
    h = _rms(x, lin.weight(L.ln2, x), L.eps2)
    g, u = lin.proj(h, ((L.wg, L.bg), (L.wu, L.bu)))
    return x + lin.out(F.silu(g) * u, L.wd, L.bd)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """Attention of q (n, H, T, D) over k, v (n, K, S, D) -> (n, H, T, D).

    ``mask``: additive, (n, 1, G T, S) or broadcastable to it (heads h = kv*G + g: each KV head's G query heads
    are folded into one block of G T queries, so K/V are never repeated); None: no row is padded, so a prompt
    is plain causal and a decode step sees every key it is given."""
    n, H, T, D = q.shape
    K = k.shape[1]
    if mask is None and T > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=H != K)
    a = F.scaled_dot_product_attention(q.reshape(n, K, H // K * T, D), k, v, attn_mask=mask, scale=scale)
    return a.view(n, H, T, D)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as SDPA's fused kernels take it: 0 where kept, -inf elsewhere, in the queries' dtype."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


# ------------------------------------------------------------------------------------------------- state

class _State:
    """Every tensor one generation needs, sized for ``rows`` x ``slots``; views ``[:b]`` are the live rows.

    Where the decode step is bucketed (CUDA graphs, a compiled step) one State is kept per model and reused by
    later calls (its addresses are what the captured graphs read); it holds no weights and nothing computed
    from them between calls.
    """

    def __init__(self, W: _Weights, rows: int, slots: int, vocab: int, presence: bool, sched: bool) -> None:
        dev = W.device
        self.rows, self.slots, self.vocab = rows, slots, vocab
        self.caches = [KVCache((rows, W.kv_heads, slots, W.head_dim), W.dtype, dev) for _ in W.layers]
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
        self.checked: set[tuple] = set()  # decode shapes (and penalty) whose compiled step matched the eager one
        self.pool: Any = None
        self.wkey: tuple = ()

    def fits(self, rows: int, slots: int, vocab: int, presence: bool, sched: bool) -> bool:
        return (rows <= self.rows and slots <= self.slots and vocab == self.vocab
                and presence == (self.presence is not None) and sched == (self.sched is not None))

    def start(self, W: _Weights, ids: torch.Tensor, eos: list[int], pad: int, new: int,
              stop_at: Sequence[int] | None, members: Members | None) -> None:
        """Per-call state: RoPE tables (HF's formula: fp32 angle, cos/sin scaled, rounded to the model dtype),
        stop ids, the rows' counters, the penalty's seen ids, the stop schedule, each row's member."""
        dev, (B, P) = W.device, ids.shape
        if not 1 <= len(eos) <= MAX_EOS:
            raise ValueError(f"the fast engine takes 1 to {MAX_EOS} EOS ids, got {len(eos)}")
        t = torch.arange(self.slots, device=dev, dtype=torch.float32)
        ang = t[:, None] * W.inv_freq.to(device=dev, dtype=torch.float32)[None, :]
        emb = torch.cat((ang, ang), dim=-1)
        self.cos.copy_((emb.cos() * W.rope_scale).to(W.dtype))
        self.sin.copy_((emb.sin() * W.rope_scale).to(W.dtype))
        self.eos.copy_(torch.tensor(eos + [eos[0]] * (MAX_EOS - len(eos)), device=dev))
        self.pad.fill_(pad)
        self.eos_row.fill_(float("-inf"))
        if 0 <= eos[0] < self.vocab:
            self.eos_row[eos[0]] = 0.0
        self.valid.zero_()
        self.done[:B].zero_()
        self.length[:B].fill_(new)
        self.out[:B, :new].fill_(pad)
        self.step.zero_()
        self.slot.fill_(P)
        if self.presence is not None:
            self.presence[:B].zero_()
            self.presence[:B].scatter_(1, ids, True)  # HF penalises every id of the row, pads included
        if self.sched is not None and stop_at is not None:
            if len(stop_at) != B:
                raise ValueError(f"the stop schedule has {len(stop_at)} entries for {B} prompts")
            self.sched[:B].copy_(torch.tensor([int(s) - 1 for s in stop_at], dtype=torch.long).to(dev))
        if members is not None:
            self.grp[:B].copy_(members.member_major(B))

    def keep(self, live: torch.Tensor, nb: int, used: int) -> None:
        """Move the live rows to slots ``[:n]`` (one layer at a time, over the written slots only); slots
        ``[n:nb]`` become finished fillers."""
        n = live.numel()
        for t in (self.tok, self.pos, self.done, self.length, self.out, self.valid, self.grp, self.presence,
                  self.sched):
            if t is not None:
                t[:n] = t[live]
        for cache in self.caches:
            cache.keep(live, used)
        if nb > n:
            self.done[n:nb] = True


_STATES: weakref.WeakKeyDictionary[torch.nn.Module, _State] = weakref.WeakKeyDictionary()


def _state(model: torch.nn.Module, W: _Weights, want: tuple[int, int, int, bool, bool], keep: bool) -> _State:
    """A State that fits ``want``: the model's kept one where it fits (``keep``: bucketed steps), else new."""
    st = _STATES.get(model) if keep else None
    if st is None or not st.fits(*want):
        st = _State(W, *want)
        if keep:
            _STATES[model] = st
    if keep and st.wkey != W.key():  # weights moved (reloaded, another dtype): graphs are stale
        st.graphs.clear()
        st.checked.clear()
        st.wkey = W.key()
    return st


# ------------------------------------------------------------------------------------------------- steps

class _Decoder:
    """Prefill and the decode step of one call: the block over every layer, then the greedy pick."""

    def __init__(self, model: torch.nn.Module, W: _Weights, st: _State, penalty: float, members: Members | None,
                 padded: bool, bucketed: bool, compiled: Callable[..., torch.Tensor] | None) -> None:
        self.model, self.W, self.st, self.penalty, self.members = model, W, st, penalty, members
        self.padded, self.bucketed, self.compiled = padded, bucketed, compiled
        self.on_logits: Callable[[torch.Tensor], None] | None = None

    def linears(self, grp: torch.Tensor, tokens: int) -> Linears:
        if self.members is None:
            return _LINEARS.get(self.model, PLAIN)
        return self.members.linears(grp, tokens)

    def logits(self, x: torch.Tensor, lin: Linears) -> torch.Tensor:
        """fp32 logits of the last position of ``x`` (n, T, hidden)."""
        W, x = self.W, x[:, -1:]
        return lin.proj(_rms(x, lin.weight(W.norm, x), W.norm_eps), ((W.head, None),))[0][:, -1].float()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prompts through every layer (eager), in chunks of rows that bound the activations: their K/V
        into the cache; returns the last position's fp32 logits."""
        logits = torch.empty(ids.shape[0], self.st.vocab, dtype=torch.float32, device=ids.device)
        chunk = max(1, 16384 // max(ids.shape[1], 1))
        for r0 in range(0, ids.shape[0], chunk):
            self._prefill(ids[r0:r0 + chunk], mask[r0:r0 + chunk], r0, logits)
        return logits

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, r0: int, logits_out: torch.Tensor) -> None:
        """Rows ``r0 : r0+n`` of the prompt batch through every layer; their K/V into the cache, their last
        position's fp32 logits into ``logits_out``."""
        W, st = self.W, self.st
        n, P = ids.shape
        r1, dev = r0 + n, ids.device
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # HF's positions for left padding
        st.pos[r0:r1] = pos[:, -1] + 1
        keys = mask.bool()
        st.valid[r0:r1, :P] = keys
        am = None
        if self.padded:
            # A pad query sees only itself, so no softmax row is empty (its output is never used: pad keys are
            # masked for every real query).
            see = (torch.ones(P, P, dtype=torch.bool, device=dev).tril() & keys[:, None, :]) | torch.eye(
                P, dtype=torch.bool, device=dev)
            G = W.heads // W.kv_heads
            am = _additive(see[:, None, None].expand(n, 1, G, P, P).reshape(n, 1, G * P, P), W.dtype)
        rope = st.cos[pos][:, None], st.sin[pos][:, None]  # (n, 1, P, D)
        grp = st.grp[r0:r1]
        lin = self.linears(grp, P)
        x = lin.embed(ids, W.embed)
        at = torch.arange(P, device=dev)
        for L, cache in zip(W.layers, st.caches):
            x = block(x, L, W, cache, slice(r0, r1), at, P, rope, am, lin)
        logits_out[r0:r1] = self.logits(x, self.linears(grp, 1))

    def step(self, b: int, S: int) -> torch.Tensor:
        """One decode step for rows ``[:b]``, attending over cache slots ``[:S]``: the new tokens picked, the
        state advanced; returns the step's fp32 logits."""
        W, st = self.W, self.st
        st.valid[:b].index_fill_(1, st.slot, True)
        # Unwritten slots (a bucketed length) and pad keys masked; none to mask in a dense step.
        mask = _additive(st.valid[:b, None, None, :S], W.dtype) if self.padded or self.bucketed else None
        pos = st.pos[:b]
        rope = st.cos[pos][:, None, None], st.sin[pos][:, None, None]  # (b, 1, 1, D)
        lin = self.linears(st.grp[:b], 1)
        x = lin.embed(st.tok[:b, None], W.embed)
        for L, cache in zip(W.layers, st.caches):
            x = block(x, L, W, cache, slice(0, b), st.slot, S, rope, mask, lin)
        logits = self.logits(x, lin)
        st.pos[:b] += 1
        st.slot += 1
        self.advance(logits, b)
        return logits

    def advance(self, logits: torch.Tensor, b: int) -> None:
        """Pick step ``st.step``'s token for rows ``[:b]`` from fp32 logits and update the row state.

        HF's greedy loop, in place: repetition penalty, forced EOS of the stop schedule, argmax, pad for
        finished rows, EOS bookkeeping.  No host sync (CUDA-graph safe)."""
        st = self.st
        if self.on_logits is not None:
            self.on_logits(logits)
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

    def run(self, b: int, S: int) -> None:
        """The decode step, compiled where it is on: the first step of each shape also runs eagerly, and a
        compiled step that differs (or fails to build) is refused for good."""
        if self.compiled is None:
            self.step(b, S)
            return
        if (b, S, self.penalty) in self.st.checked:
            self.compiled(self, b, S)
            return
        st = self.st
        snap = _snapshot(st, b)
        want = self.step(b, S)
        picked = st.tok[:b].clone()
        _restore(st, b, snap)
        try:
            got = self.compiled(self, b, S)
            why = _differs(want, got, picked, st.tok[:b], self.W.dtype)
        except Exception as e:  # noqa: BLE001 - any failure to build or run means: eager
            why = f"it failed to build or run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if why is None:
            st.checked.add((b, S, self.penalty))
            return
        _refuse(self.model, why)
        self.compiled = None
        _restore(st, b, snap)
        self.step(b, S)


def _differs(want: torch.Tensor, got: torch.Tensor, picked: torch.Tensor, took: torch.Tensor,
             dtype: torch.dtype) -> str | None:
    """Why compiled logits ``got`` do not stand for the eager ``want`` (None: they do): every logit within a
    tolerance of the dtype's rounding, and the same token wherever the eager logits decide it by more."""
    tol = (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max()) if want.numel() else 0.0
    if not err <= tol:
        return f"its logits differ from the eager step's by {err:.3g} (tolerance {tol:.3g})"
    top = want.topk(min(2, want.shape[-1]), dim=-1).values
    clear = top[:, 0] - top[:, -1] > 2 * tol
    if bool((clear & (picked != took)).any()):
        return "it picks other tokens than the eager step"
    return None


# ------------------------------------------------------------------------------------------------- compile

_COMPILE: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_SAID: set[str] = set()
_STEP: list[Callable[..., torch.Tensor]] = []
_LOCK = threading.Lock()


def set_compile(model: torch.nn.Module, mode: str) -> None:
    """``rollout.compile`` for ``model``'s fast decoding: ``auto`` (on CUDA), ``true`` or ``false``; a later
    refusal (``refused``) stands until it is set again."""
    if mode not in COMPILE:
        raise ValueError(f"rollout.compile = {mode!r}; choose one of {', '.join(COMPILE)}")
    _COMPILE[model] = mode


def compile_refused(model: torch.nn.Module) -> bool:
    """Whether ``model``'s compiled decode step was refused (it decodes eagerly until set again)."""
    return _COMPILE.get(model) == "refused"


def _compiled_step(model: torch.nn.Module, W: _Weights) -> Callable[..., torch.Tensor] | None:
    """The compiled decode step where ``model``'s setting asks for it and nothing refused it, else None.

    One ``torch.compile`` of :meth:`_Decoder.step` (inductor, default mode) serves every model; on CUDA the
    graphs are captured by hpc_es itself (:func:`_replay`) rather than by ``mode="reduce-overhead"``, so that
    the compiled step shares the eager step's buckets, graph pool and per-thread capture stream."""
    mode = _COMPILE.get(model, "auto")
    if mode in ("false", "refused") or (mode == "auto" and W.device.type != "cuda"):
        return None
    if W.device.type == "cpu" and not shutil.which("cc"):
        _refuse(model, "there is no C compiler ('cc') for torch.compile on the CPU")
        return None
    with _LOCK:
        if not _STEP:
            import torch._dynamo.config as dynamo_config

            # every (rows, slots) bucket of every model is a compiled variant: far more than the default 8
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
            _STEP.append(torch.compile(_Decoder.step, dynamic=None))
    return _STEP[0]


def _refuse(model: torch.nn.Module, why: str) -> None:
    """``model`` decodes eagerly from now on; the first refusal in the process says why."""
    with _LOCK:
        _COMPILE[model] = "refused"
        first = not _SAID
        _SAID.add(why)
    if first:
        log.warning("rollout.compile: the compiled decode step is refused, %s; decoding eagerly", why)


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
                 repetition_penalty: float = 1.0, lowrank: Members | None = None, observer: Observer | None = None,
                 check_every: int = 0, graphs: bool | None = None) -> torch.Tensor:
    """Greedy completions of a left-padded batch: the new ids, padded like HF's ``generate(...)[:, P:]``.

    ``lowrank`` (es.noise=lowrank): the members of a pass; the batch's rows are member-major, ``B /
    lowrank.groups`` rows per member.  ``observer``: see :class:`Observer`.  ``check_every``: steps between
    "all finished?" checks (0: every step on CPU, 8 on CUDA).  ``graphs``: CUDA graphs for the decode step
    (default: on CUDA, except with ``lowrank``).
    """
    W, obs = _weights(model), observer or Observer()
    dev, cuda = W.device, W.device.type == "cuda"
    ids, mask = input_ids.to(dev), attention_mask.to(dev)
    B, P = ids.shape
    # A pass's factors are new tensors each call, which captured graphs (and compiled guards) would not see:
    # low-rank runs eagerly; so does a step whose logits are watched.
    own = model in _LINEARS
    if own and lowrank is not None:
        raise ValueError("a model with its own weight calls (a tensor-parallel shard) takes no low-rank pass")
    plain = lowrank is None and obs.logits is None and not own
    use_graphs = plain and cuda and graphs is not False
    compiled = _compiled_step(model, W) if plain else None
    bucketed = use_graphs or compiled is not None
    slots = _bucket_len(P + max_new_tokens, 1 << 62) if bucketed else P + max_new_tokens
    st = _state(model, W, (B, slots, W.head.shape[0], repetition_penalty != 1.0, obs.stop_at is not None),
                bucketed)
    eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    st.start(W, ids, eos, int(pad_token_id), max_new_tokens, obs.stop_at, lowrank)
    dec = _Decoder(model, W, st, float(repetition_penalty), lowrank, not bool(mask.all()), bucketed, compiled)
    logits = dec.prefill(ids, mask)
    rows = torch.arange(B, device=dev)  # original row of each live slot (-1: a filler slot)
    if obs.logits is not None:
        sink = obs.logits
        dec.on_logits = lambda lg: sink.append((int(st.step), rows.clone(), lg.clone()))
    dec.advance(logits, B)
    final = torch.full((B, max_new_tokens), int(pad_token_id), dtype=torch.long, device=dev)
    final_len = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
    b, steps, every = B, 1, check_every or (8 if cuda else 1)
    while steps < max_new_tokens:
        if (steps - 1) % every == 0:  # right after prefill first (all rows may stop at the first token)
            live = torch.nonzero(~st.done[:b] & (rows >= 0)).flatten()
            n = int(live.numel())  # the host sync, once per check
            if n == 0:
                break
            nb = _bucket_rows(n, B) if bucketed else n
            if nb < b:
                _flush(st, rows, b, final, final_len)
                st.keep(live, nb, P + steps)
                rows = torch.cat([rows[live], rows.new_full((nb - n,), -1)])
                b = nb
        S = _bucket_len(P + steps, st.slots) if bucketed else P + steps
        if use_graphs:
            _replay(dec, b, S)
        else:
            dec.run(b, S)
        steps += 1
    _flush(st, rows, b, final, final_len)
    return final[:, :int(final_len.max()) if B else 0]


def _flush(st: _State, rows: torch.Tensor, b: int, final: torch.Tensor, final_len: torch.Tensor) -> None:
    """Copy the live slots' outputs to their original rows (filler slots skipped)."""
    real = torch.nonzero(rows >= 0).flatten()
    idx = rows[real]
    w = final.shape[1]
    final[idx] = st.out[real, :w]
    final_len[idx] = st.length[real]


_CAPTURE = threading.local()


def _capture_stream(dev: torch.device) -> Any:
    """This thread's capture stream on ``dev``: replicas that capture at once (one thread each, several per
    device or on several devices) never share a stream, nor capture on another device's."""
    streams = _CAPTURE.__dict__.setdefault("streams", {})
    s = streams.get(dev.index)
    if s is None:
        s = streams[dev.index] = torch.cuda.Stream(dev)
    return s


def _replay(dec: _Decoder, b: int, S: int) -> None:
    """The decode step for (b, S) as a CUDA graph: captured on first use, replayed after."""
    st = dec.st
    key = (b, S, dec.penalty)  # the penalty is a constant of the captured kernels
    g = st.graphs.get(key)
    if g is None:
        dev = st.tok.device
        snap = _snapshot(st, b)
        side = _capture_stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up (lazy inits, workspace, compiling and its check) outside capture
            dec.run(b, S)
        torch.cuda.current_stream(dev).wait_stream(side)
        _restore(st, b, snap)
        if st.pool is None:
            st.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        # thread_local: replicas that share the GPU run in other threads and may allocate meanwhile
        with torch.cuda.graph(g, pool=st.pool, stream=side, capture_error_mode="thread_local"):
            dec.run(b, S)
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
