"""The low-rank members of one batched pass (es.noise=lowrank): each row's own member term, added to the
linear calls of a forward.

Both rollout engines add the same terms with the same functions: the ``hf`` engine from forward hooks on the
model's modules (hpc_es/lowrank.py), the fast engine (hpc_es/fastgen.py) through :meth:`LowRankPass.linears`,
which gives its transformer block the linear calls of a set of rows.  So the two engines give the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    (``data_ptr``), so a tied ``lm_head`` finds the embedding's factors.
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

    def linears(self, grp: torch.Tensor, tokens: int) -> MemberLinears:
        """The linear calls of a forward over rows of members ``grp``, ``tokens`` positions each (the fast
        engine's block takes them in place of its plain ones)."""
        return MemberLinears(self, self.rows(grp, tokens))

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


@dataclass
class MemberLinears:
    """A transformer block's linear calls (hpc_es.fastgen.Linears) for rows of a low-rank pass: the plain
    layer plus each row's member term."""

    low: LowRankPass
    rows: Rows

    def embed(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.low.embed(ids, F.embedding(ids, w), w, self.rows)

    def weight(self, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.low.weight(w, self.rows, like)

    def proj(self, x: torch.Tensor, wb: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        ys = [F.linear(x, w, b) for w, b in wb]
        return self.low.linear(x, ys, [w for w, _ in wb], [b for _, b in wb], self.rows)

    def out(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self.proj(x, ((w, b),))[0]


def _rowwise(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row values (n, k) shaped to broadcast against x of (n, k') or (n, T, k')."""
    return t[:, None, :] if x.dim() == 3 else t
