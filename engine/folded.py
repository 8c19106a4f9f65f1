"""The candidate side of an SRP4CTR model in serving form, with one-sided work folded away.

What the training model computes per candidate c of a user (eval mode, DESIGN.md §4)::

    z0  = Σ_f E_f[item fields of c]                      candidate embedding
    z   = z0; for each tower layer l:
          q = LN1_l(z) Wq_l + bq_l;  a = softmax(q K_l^T / sqrt(Dh)) V_l   (per head)
          z = z + a Wo_l + bo_l;     z = z + W2_l gelu(W1_l LN2_l(z) + b1_l) + b2_l
    h1  = W_zn z + W_z0 z0 (+ W_s s[c]) + (W_u u + b)    head's first layer, [zn | z0 | s | user]
    y   = rest(relu(h1)) (+ b_item[c])                   remaining Linear/ReLU layers -> logit

Folding, exact in fp32 (only the summation order of the first head layer changes):

- per item, once at load: ``z0`` for every item id (padding, items, OOV), the first layer's
  query ``LN1_1(z0) Wq_1 + bq_1`` and the head block ``W_z0 z0`` (plus ``W_s s`` of the item's
  training statistics ``s``, ``ModelConfig.item_stats``) -> tables ``[V, d]``,
  ``[V, d]``, ``[V, h1]`` gathered per candidate;
- per user, once per request (in the :class:`~srp4ctr.engine.UserCache`): ``W_u u + b``.

Per candidate what is left is the tower from the first attention on, and ``W_zn z``.
Tables larger than ``max_table_bytes`` are not built; the same quantities are then computed per
request from the embeddings (same values, more FLOPs). A backend whose kernel computes the first
query itself (Triton: ``LN1 Wq`` in registers) asks for no ``q0`` table.

This module holds the weights and tables only; the algorithm that runs on them is the kernels'
reference tower (:func:`srp4ctr.kernels.reference.candidate_tower_ref`), called by the torch
backend (:mod:`srp4ctr.engine.backends.torch`), and its fast equivalents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srp4ctr.errors import InputError
from srp4ctr.kernels import TowerLayerParams
from srp4ctr.models import SRP4CTR

from .config import DEFAULT_MAX_TABLE_BYTES

__all__ = ["DEFAULT_MAX_TABLE_BYTES", "FoldedModel"]

_TABLE_BLOCK = 1 << 16  # item ids per step when building the tables


class FoldedModel:
    """Immutable serving weights of one :class:`SRP4CTR` model, on one device, in one dtype.

    Attributes:
        d_model, n_heads, head_dim, n_layers (tower layers; 0 without ``use_xattn``), h1.
        layers: one :class:`~srp4ctr.kernels.TowerLayerParams` per tower layer.
        head_zn: ``[h1, d]`` the head's first-layer block on the tower output (None without tower).
        head_z0: ``[h1, d]`` its block on z0.
        rest: ``((W, b), ...)`` the head's remaining Linear layers (ReLU before each).
        tables: whether the per-item tables were built (``z0``, ``q0``, ``hz0`` attributes;
            ``q0`` is None without a tower or when ``fold_q0`` is False).
        eps: the LayerNorm epsilon of the tower (the model's own), passed to every backend.
    """

    def __init__(self, model: SRP4CTR, dtype: torch.dtype, device: torch.device,
                 fold_items: bool | str = "auto", max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
                 fold_q0: bool = True):
        cfg = model.config
        self.dtype, self.device = dtype, torch.device(device)
        self.d_model, self.n_heads = cfg.d_model, cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.use_xattn = bool(cfg.use_xattn)
        self.n_layers = len(model.cand_layers)
        self.n_item_ids = model.spec.n_item_ids
        # the model's own epsilon (without a tower no LayerNorm runs per candidate)
        self.eps = float((model.cand_layers[0].ln1 if self.n_layers
                          else model.encoder.final_ln).eps)
        self.fold_q0 = bool(fold_q0) and self.n_layers > 0
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
        # ModelConfig.item_stats: the head's block on the candidate's item statistics (the
        # columns after z0) times the model's per-item table -> one more term of hz0 per item
        self._stats_f32 = None
        if model.item_statistics is not None:
            c0 = 2 * d if self.use_xattn else d
            w_s = w1[:, c0 : c0 + model.item_statistics.width].to(self.device, torch.float32)
            self._stats_f32 = (model.item_statistics.table.detach().to(self.device, torch.float32),
                               w_s.contiguous())
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
        # ModelConfig.item_bias: a learned scalar per item id added to the logit (fp32 [V]; the
        # engine adds it to every backend's logits, the ONNX scorer graph in the graph)
        self.item_bias = (model.item_bias.weight.detach().to(self.device, torch.float32)
                          .reshape(-1).contiguous() if model.item_bias is not None else None)

        elt = torch.empty((), dtype=dtype).element_size()
        per_row = (d + (d if self.fold_q0 else 0) + self.h1) * elt
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
                a, b, c = self.compute_rows(ids)
                z0.append(a)
                q0.append(b)
                hz0.append(c)
            self.z0 = torch.cat(z0).contiguous()
            self.q0 = torch.cat(q0).contiguous() if self.fold_q0 else None
            self.hz0 = torch.cat(hz0).contiguous()
        else:
            self.table_bytes = 0

    # ------------------------------------------------------------------ item side
    @torch.no_grad()
    def compute_rows(self, ids: torch.Tensor):
        """(z0, q0, hz0) of internal item ids [N], computed in fp32 from the embeddings and
        rounded to the dtype once (q0 None when not folded): the tables' rows, or a request's
        rows when the tables are not built."""
        z0 = self._embeddings.item_embedding(ids)  # [N, d] fp32
        q0 = None
        if self.fold_q0:
            p = self._layer0_f32
            q0 = F.linear(F.layer_norm(z0, (self.d_model,), p.ln1_w, p.ln1_b, self.eps),
                          p.wq, p.bq)
            q0 = q0.to(self.dtype)
        hz0 = F.linear(z0, self._head_z0_f32)
        if self._stats_f32 is not None:
            table, w_s = self._stats_f32
            hz0 = hz0 + F.linear(table.index_select(0, ids), w_s)
        return z0.to(self.dtype), q0, hz0.to(self.dtype)

    def describe(self) -> dict:
        return {
            "d_model": self.d_model, "n_heads": self.n_heads, "head_dim": self.head_dim,
            "tower_layers": self.n_layers, "h1": self.h1, "item_ids": self.n_item_ids,
            "item_tables": self.tables, "q0_table": self.tables and self.fold_q0,
            "item_table_bytes": self.table_bytes, "layer_norm_eps": self.eps,
            "item_bias": self.item_bias is not None,
        }
