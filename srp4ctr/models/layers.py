"""Building blocks shared by FG-BERT, SRP4CTR and the baselines.

Shapes: B batch, L history width, H heads, Dh head dim, d = H * Dh model width.
Attention masks are boolean "may attend" masks over keys, True for real positions. A query whose
key set is empty (an empty history) gets an all-zero attention output, never NaN: the mask of such
a row is opened to every key (so the softmax is finite) and the result is multiplied by zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from srp4ctr.models.spec import ModelConfig, ModelSpec

__all__ = [
    "LAYER_NORM_EPS",
    "MLP",
    "FeedForward",
    "FieldEmbedding",
    "MultiHeadAttention",
    "TransformerLayer",
    "UserFeatureEmbedding",
    "attend",
    "emb_init_std",
    "layer_norm",
    "masked_mean",
    "recency_positions",
    "valid_mask",
]


#: the epsilon of every LayerNorm of the models; serving reads it back from the modules
LAYER_NORM_EPS = 1e-5


def layer_norm(d_model: int) -> nn.LayerNorm:
    """The models' LayerNorm over the last dimension (eps :data:`LAYER_NORM_EPS`)."""
    return nn.LayerNorm(d_model, eps=LAYER_NORM_EPS)


def emb_init_std(d_model: int) -> float:
    """Standard deviation of every embedding / learned-vector init: 1/sqrt(d).

    (BERT's 0.02 made small models sit on a loss plateau for tens of steps.)"""
    return d_model ** -0.5


def valid_mask(hist_len: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool, True at the first hist_len[b] positions (right padding)."""
    return torch.arange(width, device=hist_len.device)[None, :] < hist_len[:, None]


def recency_positions(hist_len: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] int64 recency index: 0 for the most recent real behaviour, 1 for the one before,
    ...; padding positions get 0 (they are masked as keys, so their value does not matter)."""
    ar = torch.arange(width, device=hist_len.device)[None, :]
    return (hist_len[:, None] - 1 - ar).clamp(min=0)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid positions of x [B, L, d]; zeros for rows without any."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    zero_empty: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention of q [B, Lq, H, Dh] over k, v [B, Lk, H, Dh].

    key_valid: [B, Lk] bool or None (all keys valid). A row with no valid key attends to all of
    its (padding) keys, so nothing is NaN, and with ``zero_empty`` (the default) its output is then
    zeroed. Returns [B, Lq, H * Dh].
    """
    B, Lq, H, Dh = q.shape
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, Dh]
    if key_valid is None:
        out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        nonempty = key_valid.any(dim=1)  # [B]
        mask = (key_valid | ~nonempty[:, None])[:, None, None, :]  # [B, 1, 1, Lk]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        if zero_empty:
            out = out * nonempty.to(out.dtype)[:, None, None, None]
    return out.transpose(1, 2).reshape(B, Lq, H * Dh)


class FieldEmbedding(nn.Module):
    """Embedding tables of the item fields and behaviour fields, plus the item side-feature table.

    Items are plain ids everywhere; an id's side fields are looked up here in buffers
    ``table_<field>`` (persistent: they travel in the state dict). A multi-valued field embeds as
    the mean of its non-zero ids' embeddings (zeros when it has none). Id 0 is padding in every
    field and embeds to zeros (``padding_idx=0``). The OOV item row starts at zero.

    With ``config.item_only`` (BERT4Rec-style) only the item id field is used. A single-valued
    field whose vocabulary exceeds ``sampled_softmax_above`` (:meth:`ModelConfig.sampled`: its
    FG-BERT head is sampled) has a sparse-gradient table (``sparse_fields``), in every model that
    embeds with this class: a step's gradient holds only the rows it touched.
    """

    def __init__(self, spec: ModelSpec, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.init_std = emb_init_std(d)
        self.item_group: list[str] = ["item"] if config.item_only else list(spec.item_fields)
        self.behaviour_group: list[str] = [] if config.item_only else list(spec.behaviour_fields)
        self.multi: set[str] = set(spec.multi_fields) & set(self.item_group)
        self.emb = nn.ModuleDict()
        self.sparse_fields: list[str] = []
        for f in self.item_group + self.behaviour_group:
            if f in self.multi:
                self.emb[f] = nn.EmbeddingBag(spec.vocab[f], d, mode="mean", padding_idx=0)
            else:
                sparse = config.sampled(spec.vocab[f])
                self.emb[f] = nn.Embedding(spec.vocab[f], d, padding_idx=0, sparse=sparse)
                if sparse:
                    self.sparse_fields.append(f)
        for f in self.item_group[1:]:
            self.register_buffer(f"table_{f}", torch.as_tensor(spec.item_table[f], dtype=torch.int64))
        self.oov_item = spec.oov_item
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for m in self.emb.values():
                nn.init.normal_(m.weight, std=self.init_std)
                m.weight[0].zero_()
            self.emb["item"].weight[self.oov_item].zero_()

    def table(self, f: str) -> torch.Tensor:
        return getattr(self, f"table_{f}")

    def weight(self, f: str) -> torch.Tensor:
        return self.emb[f].weight

    def item_field_ids(self, item_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ids of every item field of ``item_ids`` (any shape); a multi-valued field adds a
        trailing dimension G."""
        out = {"item": item_ids}
        for f in self.item_group[1:]:
            out[f] = self.table(f)[item_ids]
        return out

    def embed_field(self, f: str, ids: torch.Tensor) -> torch.Tensor:
        m = self.emb[f]
        if f in self.multi:
            lead = ids.shape[:-1]
            return m(ids.reshape(-1, ids.shape[-1])).reshape(*lead, -1)
        return m(ids)

    def item_embedding(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Σ over item fields of the field embeddings of ``item_ids`` [...] -> [..., d]."""
        out = self.emb["item"](item_ids)
        for f in self.item_group[1:]:
            out = out + self.embed_field(f, self.table(f)[item_ids])
        return out

    def behaviour_embedding(self, batch: Mapping[str, torch.Tensor], prefix: str = "hist_"
                            ) -> torch.Tensor | None:
        """Σ over behaviour fields of ``batch[prefix + f]`` embeddings -> [B, L, d] (None when
        the model has no behaviour fields)."""
        out = None
        for f in self.behaviour_group:
            e = self.emb[f](batch[prefix + f])
            out = e if out is None else out + e
        return out


class UserFeatureEmbedding(nn.Module):
    """Concatenated embeddings of the user fields (batch keys ``user_<f>``) -> [B, n_fields * d]."""

    def __init__(self, spec: ModelSpec, config: ModelConfig):
        super().__init__()
        self.fields = list(spec.user_fields)
        self.emb = nn.ModuleDict(
            {f: nn.Embedding(spec.vocab[f], config.d_model, padding_idx=0) for f in self.fields}
        )
        with torch.no_grad():
            for m in self.emb.values():
                nn.init.normal_(m.weight, std=emb_init_std(config.d_model))
                m.weight[0].zero_()
        self.out_dim = len(self.fields) * config.d_model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.emb[f](batch[f"user_{f}"]) for f in self.fields], dim=-1)


class MultiHeadAttention(nn.Module):
    """Standard multi-head attention with separate biased projections ``wq, wk, wv, wo``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, d_model)
        self.wk = nn.Linear(d_model, d_model)
        self.wv = nn.Linear(d_model, d_model)
        self.wo = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., H, Dh] (a view)."""
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.split(self.wq(x))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, d] -> K, V each [B, L, H, Dh]."""
        return self.split(self.wk(x)), self.split(self.wv(x))

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor, key_valid: torch.Tensor | None
                ) -> torch.Tensor:
        k, v = self.project_kv(xkv)
        return self.wo(attend(self.project_q(xq), k, v, key_valid))


class FeedForward(nn.Module):
    """Linear(d, mult*d) -> GELU (exact, erf) -> Linear(mult*d, d)."""

    def __init__(self, d_model: int, mult: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, mult * d_model)
        self.w2 = nn.Linear(mult * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class TransformerLayer(nn.Module):
    """Pre-LN bidirectional Transformer layer:
    ``x = x + Drop(MHA(LN1(x)))``, ``x = x + Drop(FFN(LN2(x)))``; LayerNorm eps :data:`LAYER_NORM_EPS`.

    ``forward`` also returns this layer's K, V = LN1(x) W_{K,V} + b, [B, L, H, Dh] — exactly
    the tensors the attention used.

    Self-attention over a sequence with no valid position (an empty history) is finite but not
    zeroed: every query of such a row is itself padding, masked everywhere downstream, so the
    multiply (a full pass over [B, L, d] in forward and backward) is skipped.
    """

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.ln1 = layer_norm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.ln2 = layer_norm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.ln1(x)
        k, v = self.attn.project_kv(h)
        a = attend(self.attn.project_q(h), k, v, key_valid, zero_empty=False)
        x = x + self.drop(self.attn.wo(a))
        x = x + self.drop(self.ffn(self.ln2(x)))
        return x, k, v


class MLP(nn.Module):
    """Linear -> act -> Dropout for each hidden size, then Linear(last, out_dim).

    act: "relu" or "prelu" (one learned slope per layer, as in DIN).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int = 1,
                 act: str = "relu", dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers.append(nn.Linear(prev, h))
            layers.append(nn.PReLU() if act == "prelu" else nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


#: the columns of :class:`ItemStatistics` (standardised), in order
ITEM_STAT_COLUMNS = ("log1p_count", "label_mean", "rating_mean")


class ItemStatistics(nn.Module):
    """Training-split statistics of the candidate item as a CTR input (``ModelConfig.item_stats``):
    ``[log1p(count), label mean, rating mean]``, smoothed and standardised
    (:func:`srp4ctr.train.item_stats.item_statistics`) -> ``[N, 3]``.

    ``table`` [n_item_ids, 3] (a saved buffer) holds every item's statistics over the whole
    training split: validation, test and serving read it. Training samples carry their own
    out-of-fold values as ``batch["cand_stats"]`` (their own label never enters them), which
    take its place. A fresh model's table is zeros until training fills it.
    """

    width = len(ITEM_STAT_COLUMNS)

    def __init__(self, n_item_ids: int):
        super().__init__()
        self.register_buffer("table", torch.zeros(n_item_ids, self.width))

    def forward(self, cand_item: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        return self.table.index_select(0, cand_item) if given is None else given
