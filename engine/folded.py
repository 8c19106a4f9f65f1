"""The candidate side of an SRP4CTR model in serving form, with one-sided work folded away.

What the training model computes per candidate c of a user (eval mode, DESIGN.md §4)::

    z0  = Σ_f E_f[item fields of c]                      candidate embedding
    z   = z0; for each tower layer l:
          q = LN1_l(z) Wq_l + bq_l;  a = softmax(q K_l^T / sqrt(Dh)) V_l   (per head)
          z = z + a Wo_l + bo_l;     z = z + W2_l gelu(W1_l LN2_l(z) + b1_l) + b2_l
    h1  = W_zn z + W_z0 z0 + (W_u u + b)                 head's first layer, [zn | z0 | user]
    y   = rest(relu(h1))                                 remaining Linear/ReLU layers -> logit

Folding, exact in fp32 (only the summation order of the first head layer changes):

- per item, once at load: ``z0`` for every item id (padding, items, OOV), the first layer's
  query ``LN1_1(z0) Wq_1 + bq_1`` and the head block ``W_z0 z0`` -> tables ``[V, d]``,
  ``[V, d]``, ``[V, h1]`` gathered per candidate;
- per user, once per request (in the :class:`~srp4ctr.engine.UserCache`): ``W_u u + b``.

Per candidate what is left is the tower from the first attention on, and ``W_zn z``.
Tables larger than ``max_table_bytes`` are not built; the same quantities are then computed per
request from the embeddings (same values, more FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from srp4ctr.errors import InputError
from srp4ctr.kernels import TowerLayerParams
from srp4ctr.models import SRP4CTR

__all__ = ["DEFAULT_MAX_TABLE_BYTES", "FoldedModel", "attention_one_user", "tower_torch"]

LN_EPS = 1e-5
DEFAULT_MAX_TABLE_BYTES = 1 << 30
_TABLE_BLOCK = 1 << 16  # item ids per step when building the tables


class FoldedModel:
    """Immutable serving weights of one :class:`SRP4CTR` model, on one device, in one dtype.

    Attributes:
        d_model, n_heads, head_dim, n_layers (tower layers; 0 without ``use_xattn``), h1.
        layers: one :class:`~srp4ctr.kernels.TowerLayerParams` per tower layer.
        head_zn: ``[h1, d]`` the head's first-layer block on the tower output (None without tower).
        head_z0: ``[h1, d]`` its block on z0.
        rest: ``((W, b), ...)`` the head's remaining Linear layers (ReLU before each).
        tables: whether the per-item tables were built (``z0``, ``q0``, ``hz0`` attributes).
    """

    def __init__(self, model: SRP4CTR, dtype: torch.dtype, device: torch.device,
                 fold_items: bool | str = "auto", max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES):
        cfg = model.config
        self.dtype, self.device = dtype, torch.device(device)
        self.d_model, self.n_heads = cfg.d_model, cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.use_xattn = bool(cfg.use_xattn)
        self.n_layers = len(model.cand_layers)
        self.n_item_ids = model.spec.n_item_ids
        self._embeddings = model.encoder.embeddings  # fp32, for per-request rows without tables

        def prep(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=self.device, dtype=dtype).contiguous()

        d = self.d_model
        w1 = model.head.first.weight.detach()
        self.h1 = int(w1.shape[0])
        if self.use_xattn:
            self.head_zn: torch.Tensor | None = prep(w1[:, :d])
            head_z0 = w1[:, d : 2 * d]
        else:
            self.head_zn = None
            head_z0 = w1[:, :d]
        self._head_z0_f32 = head_z0.to(self.device, torch.float32).contiguous()
        self.head_z0 = prep(head_z0)
        self.layers: tuple[TowerLayerParams, ...] = tuple(
            TowerLayerParams(*(prep(t) for t in layer.tower_params()))
            for layer in model.cand_layers
        )
        self._layer0_f32 = (
            TowerLayerParams(*(t.detach().to(self.device, torch.float32)
                               for t in model.cand_layers[0].tower_params()))
            if self.n_layers else None
        )
        rest = []
        for m in model.head.rest.net:
            if isinstance(m, nn.Linear):
                rest.append((prep(m.weight), prep(m.bias)))
            elif not isinstance(m, (nn.ReLU, nn.Dropout)):
                raise InputError(f"the engine cannot fold a head layer of type {type(m).__name__}")
        self.rest = tuple(rest)

        elt = torch.empty((), dtype=dtype).element_size()
        per_row = (d + (d if self.n_layers else 0) + self.h1) * elt
        self.table_bytes = per_row * self.n_item_ids
        if fold_items == "auto":
            fold = self.table_bytes <= max_table_bytes
        elif isinstance(fold_items, bool):
            fold = fold_items
        else:
            raise InputError(f"fold_items must be True, False or 'auto', got {fold_items!r}")
        self.tables = fold
        self.z0 = self.q0 = self.hz0 = None
        if fold:
            z0, q0, hz0 = [], [], []
            for s in range(0, self.n_item_ids, _TABLE_BLOCK):
                ids = torch.arange(s, min(s + _TABLE_BLOCK, self.n_item_ids), device=self.device)
                a, b, c = self._compute_rows(ids)
                z0.append(a)
                q0.append(b)
                hz0.append(c)
            self.z0 = torch.cat(z0).contiguous()
            self.q0 = torch.cat(q0).contiguous() if self.n_layers else None
            self.hz0 = torch.cat(hz0).contiguous()
        else:
            self.table_bytes = 0

    # ------------------------------------------------------------------ item side
    @torch.no_grad()
    def _compute_rows(self, ids: torch.Tensor):
        """(z0, q0, hz0) of internal item ids, computed in fp32 and rounded to the dtype once."""
        z0 = self._embeddings.item_embedding(ids)  # [N, d] fp32
        q0 = None
        if self._layer0_f32 is not None:
            p = self._layer0_f32
            q0 = F.linear(F.layer_norm(z0, (self.d_model,), p.ln1_w, p.ln1_b, LN_EPS), p.wq, p.bq)
            q0 = q0.to(self.dtype)
        hz0 = F.linear(z0, self._head_z0_f32).to(self.dtype)
        return z0.to(self.dtype), q0, hz0

    def item_rows(self, ids: torch.Tensor):
        """(z0 [N, d], q0 [N, d] or None, hz0 [N, h1]) of internal item ids [N]."""
        if self.tables:
            # index_select: several times faster than advanced indexing for row gathers on CPU
            return (self.z0.index_select(0, ids),
                    None if self.q0 is None else self.q0.index_select(0, ids),
                    self.hz0.index_select(0, ids))
        return self._compute_rows(ids)

    # ------------------------------------------------------------------ head
    def head(self, zn: torch.Tensor | None, hz0: torch.Tensor, head_user: torch.Tensor
             ) -> torch.Tensor:
        """Logits [N] from the tower output zn [N, d] (None without a tower), the z0 block
        hz0 [N, h1] (consumed: overwritten in place) and the user block head_user ([h1] or
        [N, h1])."""
        h = hz0.add_(head_user)  # hz0 is a fresh gather (or computed) per call: safe in place
        if zn is not None:
            h = torch.addmm(h, zn, self.head_zn.t())
        for w, b in self.rest:
            h = F.linear(torch.relu_(h), w, b)
        return h.squeeze(-1)

    def describe(self) -> dict:
        return {
            "d_model": self.d_model, "n_heads": self.n_heads, "head_dim": self.head_dim,
            "tower_layers": self.n_layers, "h1": self.h1, "item_ids": self.n_item_ids,
            "item_tables": self.tables, "item_table_bytes": self.table_bytes,
        }


def attention_one_user(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for one user's candidates: q [C, H, Dh], k/v [n, H, Dh]
    (read in place) -> [C, H * Dh]. No history (n = 0): zeros."""
    C, H, Dh = q.shape
    if k.shape[0] == 0:
        return q.new_zeros(C, H * Dh)
    s = torch.baddbmm(  # [H, C, n] scores, scale folded into the product
        q.new_empty(()).expand(H, C, k.shape[0]), q.transpose(0, 1), k.permute(1, 2, 0),
        beta=0.0, alpha=Dh ** -0.5,
    )
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p, v.transpose(0, 1)).transpose(0, 1).reshape(C, H * Dh)


def _finish_layer(z: torch.Tensor, a: torch.Tensor, p: TowerLayerParams, d: int) -> torch.Tensor:
    z = torch.addmm(z + p.bo, a, p.wo.t())
    h = F.layer_norm(z, (d,), p.ln2_w, p.ln2_b, LN_EPS)
    return torch.addmm(z + p.b2, F.gelu(F.linear(h, p.w1, p.b1)), p.w2.t())


def tower_torch(fm: FoldedModel, z0: torch.Tensor, q0: torch.Tensor,
                kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                segments: Sequence[tuple[int, int, int, int]] | None = None) -> torch.Tensor:
    """The candidate tower in plain torch from z0 [N, d] and the folded first query q0 [N, d].

    kv: per layer (k, v), [Nkv, H, Dh]. segments: per user ``(q_start, q_end, kv_start,
    kv_end)``: candidates ``q_start:q_end`` attend to k/v rows ``kv_start:kv_end``; None: one user
    owns everything.
    """
    N, d = z0.shape
    H, Dh = fm.n_heads, fm.head_dim
    z, q = z0, q0
    for i, (p, (k, v)) in enumerate(zip(fm.layers, kv)):
        if i:
            q = F.linear(F.layer_norm(z, (d,), p.ln1_w, p.ln1_b, LN_EPS), p.wq, p.bq)
        q3 = q.view(N, H, Dh)
        if segments is None:
            a = attention_one_user(q3, k, v)
        else:
            a = q.new_empty(N, d)
            for qs, qe, ks, ke in segments:
                if qe > qs:
                    a[qs:qe] = attention_one_user(q3[qs:qe], k[ks:ke], v[ks:ke])
        z = _finish_layer(z, a, p, d)
    return z
