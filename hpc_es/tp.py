"""Tensor parallelism: one replica's weights split over K shards, with noise and updates that do not depend on K.

The split is Megatron's: attention by whole heads (q/k/v column-parallel, o row-parallel), the MLP by
intermediate size (gate/up column-parallel, down row-parallel).  A column-parallel layer keeps a block of
its output rows (and the matching rows of its bias): its matmul runs on the shard alone.  A row-parallel
layer keeps a block of its input columns: each shard computes a partial product over its heads or its
intermediate slice, and the K partials are summed in rank order on every shard (:class:`ShardLinears`), so
a run is reproducible for a given K.  Its bias is replicated and added once, after the sum.

Embeddings, the LM head and the norms are replicated, not vocabulary-parallel: a replicated head gives
every shard the full fp32 logits, so the greedy argmax (with its repetition penalty and EOS handling) is the
unsharded decoder's, exact and with no second exchange.  The cost is two vocab x hidden matrices on every
shard (one where they are tied): about 1.1 GB each in bf16 for Qwen2.5-7B (152064 x 3584), 2.5 GB each for
Qwen2.5-72B (152064 x 8192), next to 72B / K x 2 bytes of split weights (36 GB at K=4).

Noise needs no exchange: the keyed noise of element i of a tensor is a pure function of (seed, name, i)
(hpc_es.noise), so a shard draws the noise of its own elements by their global index, and its perturbation
and update are the same bits as that slice of the unsharded ones (:class:`ShardNoise`).  The legacy scheme
keys whole chunks of the flattened tensor and cannot be sliced: a sharded replica requires ``keyed``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from hpc_es.errors import ConfigError, ModelError
from hpc_es.es import Engine
from hpc_es.fastgen import PLAIN
from hpc_es.models import check_model_dir, named_params
from hpc_es.exact import keyed_table, keyed_transform
from hpc_es.noise import KeyedNoise, counter_base

ARCHITECTURES = ("qwen2", "llama")
COLUMN = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads", "gate_proj": "intermediate",
          "up_proj": "intermediate"}  # output rows split (weight and bias), by the unit named
ROW = {"o_proj": "heads", "down_proj": "intermediate"}  # input columns split (weight only; the bias is replicated)


@dataclass(frozen=True)
class ShardView:
    """Where one shard's part of a tensor lies in the whole, viewed as a (rows, cols) row-major matrix
    (a 1-D tensor is one column).  Local element (r, c), r < ``rows``, c < ``cols``, is element ``offset +
    r * stride + c`` of the flattened global tensor.  ``dim``: the split dimension (None: replicated),
    ``lo:hi`` the shard's range along it."""

    name: str
    shape: tuple[int, ...]
    dim: int | None
    lo: int
    hi: int
    offset: int
    stride: int
    rows: int
    cols: int

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        return tuple(self.hi - self.lo if d == self.dim else n for d, n in enumerate(self.shape))

    @property
    def contiguous(self) -> bool:
        """Whether the shard's elements are one range of the flattened global tensor."""
        return self.rows <= 1 or self.stride == self.cols

    def index(self, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Global flat indices (int64) of the shard's local flat elements ``start .. start + n``."""
        j = torch.arange(start, start + n, dtype=torch.int64, device=device)
        r = torch.div(j, self.cols, rounding_mode="floor")
        return (j - r * self.cols).add_(r * self.stride).add_(self.offset)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The shard's part of the global tensor ``full`` (a view)."""
        return full if self.dim is None else full.narrow(self.dim, self.lo, self.hi - self.lo)


@dataclass(frozen=True)
class Plan:
    """How a qwen2/llama model splits over ``shards`` shards (see the module docstring)."""

    shards: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def split(self, name: str, shape: Sequence[int]) -> tuple[int, int] | None:
        """(dimension, size of one shard along it) of parameter ``name``, or None when it is replicated."""
        parts = name.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
        if module in COLUMN and kind in ("weight", "bias"):
            dim, unit = 0, COLUMN[module]
        elif module in ROW and kind == "weight":
            dim, unit = 1, ROW[module]
        else:
            return None
        per = {"heads": self.heads * self.head_dim, "kv_heads": self.kv_heads * self.head_dim,
               "intermediate": self.intermediate}[unit]
        if len(shape) <= dim or shape[dim] != per:
            raise ConfigError(f"tensor parallel: '{name}' has shape {tuple(shape)}, expected {per} along "
                              f"dimension {dim} ({unit})")
        return dim, per // self.shards

    def view(self, name: str, shape: Sequence[int], rank: int) -> ShardView:
        """Shard ``rank``'s view of parameter ``name`` of global shape ``shape``."""
        if not 0 <= rank < self.shards:
            raise ValueError(f"shard {rank} of {self.shards}")
        shape = tuple(int(n) for n in shape)
        cols = 1
        for n in shape[1:]:
            cols *= n
        rows = shape[0] if shape else 1
        split = self.split(name, shape)
        if split is None:
            return ShardView(name, shape, None, 0, shape[0] if shape else 1, 0, cols, rows, cols)
        dim, size = split
        lo, hi = rank * size, (rank + 1) * size
        if dim == 0:  # a block of whole rows: one contiguous range
            return ShardView(name, shape, 0, lo, hi, lo * cols, cols, size, cols)
        return ShardView(name, shape, 1, lo, hi, lo, cols, rows, size)  # a block of columns: one range per row

    def views(self, shapes: Mapping[str, Sequence[int]], rank: int) -> dict[str, ShardView]:
        """Shard ``rank``'s view of every parameter of ``shapes`` (name -> global shape)."""
        return {name: self.view(name, shape, rank) for name, shape in shapes.items()}


def plan_for(config: Any, shards: int) -> Plan:
    """The plan of a model with HF ``config`` over ``shards`` shards, or one ConfigError saying why not."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ConfigError(f"dist.tensor_parallel supports {', '.join(ARCHITECTURES)} models, not '{kind}'")
    if shards < 1:
        raise ConfigError(f"dist.tensor_parallel must be >= 1, got {shards}")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    inter = int(config.intermediate_size)
    bad = [f"{what} = {n}" for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv),
                                           ("intermediate_size", inter)) if n % shards]
    if bad:
        raise ConfigError(f"dist.tensor_parallel = {shards} must divide the model's attention heads, KV heads and "
                          f"intermediate size (whole heads per shard); it does not divide {', '.join(bad)}")
    return Plan(shards, heads, kv, head_dim, inter)


def assemble(views: Sequence[ShardView], parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole tensor from every shard's part, in rank order (``views[r]``, ``parts[r]``: shard r's): what
    a checkpoint or ``final/`` writes, a plain tensor any tool loads.  A replicated tensor is shard 0's."""
    v0 = views[0]
    if v0.dim is None:
        return parts[0]
    edges = [(v.lo, v.hi) for v in views]
    if any(v.name != v0.name or v.dim != v0.dim for v in views) or edges[0][0] != 0 or edges[-1][1] != \
            v0.shape[v0.dim] or any(a[1] != b[0] for a, b in zip(edges, edges[1:])):
        raise ValueError(f"the parts of '{v0.name}' do not tile it in rank order: {edges}")
    return torch.cat([p.to(parts[0].device) for p in parts], dim=v0.dim)


@torch.no_grad()
def shard_model(model: torch.nn.Module, plan: Plan, rank: int) -> dict[str, ShardView]:
    """Cut ``model``'s parameters in place down to shard ``rank``'s parts (each a fresh contiguous tensor)
    and return their views.  The model's config still describes the whole model: the fast decoder reads the
    local head counts from the tensors' shapes."""
    params = named_params(model)
    views = plan.views({n: tuple(p.shape) for n, p in params}, rank)
    for name, p in params:
        v = views[name]
        if v.dim is not None:
            p.data = v.take(p.data).contiguous()
    return views


# ------------------------------------------------------------------------------------------------ noise

_MASK64 = (1 << 64) - 1


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


# The counter of the keyed noise advances by a fixed step per element (noise.counter_base is affine in the
# element index): element g's counter is counter_base(seed, name, 0) + g * STEP, mod 2**64.
STEP = _signed(counter_base(0, "", 1) - counter_base(0, "", 0))


class ShardNoise(KeyedNoise):
    """The keyed noise of a shard's local tensors: local element j of ``name`` gets the noise of its global
    element, so every fill is the same bits as that slice of the whole tensor's noise.

    A shard that is one range of the global tensor (replicated, or a block of rows) is that range, with
    the compiled fused kernels where they are in use.  A block of columns (row-parallel layers) is one
    range per row: its counters are computed from the global index of every element, one eager pass over
    exactly the shard's elements.  (Drawing whole rows and keeping the shard's columns would cost K times
    the work; a call per row would cost a call per row: thousands of kernel launches per tensor on a GPU.)"""

    def __init__(self, views: Mapping[str, ShardView], chunk: int = 1 << 20) -> None:
        super().__init__(chunk)
        self.views = dict(views)

    def _view(self, name: str) -> ShardView:
        v = self.views.get(name)
        if v is None:
            raise KeyError(f"no shard view of parameter '{name}'")
        return v

    def fill(self, out: torch.Tensor, seed: int, name: str, start: int) -> torch.Tensor:
        v = self._view(name)
        if v.contiguous:
            return super().fill(out, seed, name, v.offset + start)
        z = v.index(start, out.numel(), out.device).mul_(STEP).add_(counter_base(seed, name, 0))
        cells, steps = keyed_table(out.device)
        keyed_transform(z, cells, steps, out)
        return out

    def stack(self, seeds: Sequence[int], name: str, shape: torch.Size | tuple[int, ...],
              device: torch.device | str = "cpu") -> torch.Tensor:
        raise NotImplementedError("low-rank factors are not sharded (es.noise=lowrank with dist.tensor_parallel)")

    def perturb(self, out: torch.Tensor, master: torch.Tensor, seed: int, name: str, start: int,
                scale: float) -> bool:
        v = self._view(name)
        return v.contiguous and super().perturb(out, master, seed, name, v.offset + start, scale)

    def accumulate(self, acc: torch.Tensor, terms: list[tuple[int, float]], name: str, start: int) -> bool:
        v = self._view(name)
        return v.contiguous and super().accumulate(acc, terms, name, v.offset + start)


class ShardEngine(Engine):
    """The ES engine of a shard's replica: Engine's perturb, restore and update, op for op, over the local
    tensors, with each element's noise drawn by its global index (keyed noise only)."""

    def __init__(self, views: Mapping[str, ShardView], chunk: int, workers: int = 0) -> None:
        super().__init__(chunk, workers, "keyed")
        self.noise = ShardNoise(views, chunk)


# ------------------------------------------------------------------------------------------------ linears

class Exchange(Protocol):
    """A replica group's exchange of activations: every shard's tensor, in rank order, on every shard."""

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        ...


class ShardLinears:
    """The fast decoder's weight calls (fastgen.Linears) on one shard: column-parallel ``proj`` is the local
    matmul (the head and the embedding are replicated, so they are the unsharded ones); row-parallel ``out``
    sums the shards' partial products in rank order, the same bits on every shard, then adds the bias."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def embed(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return PLAIN.embed(ids, w)

    def weight(self, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return PLAIN.weight(w, like)

    def proj(self, x: torch.Tensor, wb: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        return PLAIN.proj(x, wb)

    def out(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        parts = self.exchange.all_gather(F.linear(x, w))
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total if b is None else total + b


class DistExchange:
    """The exchange over a torch.distributed process group (NCCL on GPU, gloo on CPU)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.size = dist.get_world_size(group)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.dist.all_gather(parts, t, group=self.group)
        return parts


class ThreadExchange:
    """The exchange between ``size`` threads of one process, one shard each (tests, one-process runs):
    ``member(rank)`` is shard ``rank``'s side."""

    def __init__(self, size: int, timeout: float = 300.0) -> None:
        self.size = size
        self._slots: list[torch.Tensor | None] = [None] * size
        self._barrier = threading.Barrier(size, timeout=timeout)  # a shard that died breaks it, not hangs it

    def member(self, rank: int) -> Exchange:
        return _ThreadMember(self, rank)

    def _gather(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self._slots[rank] = t
        self._barrier.wait()
        parts = [p for p in self._slots if p is not None]
        self._barrier.wait()  # nobody overwrites a slot before every shard has read them all
        return parts


class _ThreadMember:
    def __init__(self, group: ThreadExchange, rank: int) -> None:
        self.group, self.rank = group, rank

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self.group._gather(self.rank, t)


# ------------------------------------------------------------------------------------------------ loading

def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ModelError(f"model directory '{path}' has no model.safetensors (nor its index): a sharded replica loads "
                     "its slices from safetensors files only")


@torch.no_grad()
def load_shard(path: str, shards: int, rank: int, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, ShardView]]:
    """Shard ``rank`` of ``shards`` of the model in folder ``path``, and its views: the model is built on the
    meta device and each parameter is read as the shard's slice of its safetensors tensor (``get_slice``),
    so no whole split tensor is ever materialised.  ``dtype``: the files' own where None."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_dir(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    plan = plan_for(config, shards)
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(config)
    metas = dict(model.named_parameters())
    views = plan.views({n: tuple(p.shape) for n, p in metas.items()}, rank)
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                v = views.get(name)
                if v is None:
                    continue
                sl = f.get_slice(name)
                t = sl[:] if v.dim is None else sl[v.lo:v.hi] if v.dim == 0 else sl[:, v.lo:v.hi]
                t = t.to(device=device, dtype=dtype or t.dtype)
                if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    # safetensors' slice is a view of the whole tensor's memory-mapped file pages (mapped,
                    # read only where touched): a compact copy lets the mapping go
                    t = t.clone(memory_format=torch.contiguous_format)
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, torch.nn.Parameter(t, requires_grad=False))
    model.tie_weights()  # a tied head is the embedding (absent from the files)
    inner = model.model  # the rotary tables: buffers computed at construction, rebuilt off the meta device
    with torch.device(device):
        inner.rotary_emb = type(inner.rotary_emb)(config=config)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ModelError(f"model directory '{path}' lacks {len(missing)} tensors, e.g. '{missing[0]}'")
    model.eval()
    model.requires_grad_(False)
    return model, views
