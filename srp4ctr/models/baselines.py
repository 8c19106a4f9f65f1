"""CTR baselines with SRP4CTR's interface (``forward(batch) -> logits [B]``) and its field
embeddings (:class:`~srp4ctr.models.layers.FieldEmbedding`: item fields of the history and the
candidate, behaviour fields of the history, user fields).

- :class:`DIN` (Zhou et al. 2018): target attention over the embedded history.
- :class:`BST` (Chen et al. 2019): the candidate joins the history and a Transformer re-encodes the
  whole sequence for every candidate.
- :class:`UserVectorCTR`: a pre-trained FG-BERT user vector as an extra feature — the approach the
  SRP4CTR paper argues against (not item-aware inside the encoder).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from srp4ctr.models.ctr import check_encoder
from srp4ctr.models.fgbert import FGBERT
from srp4ctr.models.layers import (
    MLP,
    FieldEmbedding,
    ItemStatistics,
    TransformerLayer,
    UserFeatureEmbedding,
    emb_init_std,
    layer_norm,
    masked_mean,
    recency_positions,
    valid_mask,
)
from srp4ctr.models.spec import ModelConfig, ModelSpec

__all__ = ["BST", "DIN", "DIN_ATTENTION_HIDDEN", "UserVectorCTR"]

DIN_ATTENTION_HIDDEN = (80, 40)


class _CTRBase(nn.Module):
    def __init__(self, spec: ModelSpec, config: ModelConfig):
        super().__init__()
        self.spec = spec
        self.config = config
        self.user_emb = UserFeatureEmbedding(spec, config) if spec.user_fields else None
        # ModelConfig.item_bias: a learned scalar per item id added to the logit (zero at start)
        self.item_bias: nn.Embedding | None = None
        if config.item_bias:
            # zeros given: no draw from the global RNG (the other weights' init is unchanged)
            self.item_bias = nn.Embedding(spec.n_item_ids, 1,
                                          _weight=torch.zeros(spec.n_item_ids, 1))

        self.item_statistics = (ItemStatistics(spec.n_item_ids) if config.item_stats
                                else None)

    def _logit(self, out: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, 1] head output -> [B] logits, plus the candidate's item bias where there is one."""
        out = out.squeeze(-1)
        if self.item_bias is not None:
            out = out + self.item_bias(batch["cand_item"]).squeeze(-1)
        return out

    @property
    def user_dim(self) -> int:
        """The width the head takes after the model's own parts: the user features and the
        candidate's item statistics (``item_stats``)."""
        return ((0 if self.user_emb is None else self.user_emb.out_dim)
                + (0 if self.item_statistics is None else ItemStatistics.width))

    def _with_user(self, parts: list[torch.Tensor], batch: Mapping[str, torch.Tensor]
                   ) -> torch.Tensor:
        if self.user_emb is not None:
            parts = parts + [self.user_emb(batch)]
        if self.item_statistics is not None:
            parts = parts + [self.item_statistics(batch["cand_item"], batch.get("cand_stats"))]
        return torch.cat(parts, -1)


class DIN(_CTRBase):
    """Deep Interest Network.

    History token h_t = Σ item-field + Σ behaviour-field embeddings; candidate c = Σ item-field
    embeddings. Activation unit: ``w_t = MLP_att([h_t, c, h_t - c, h_t * c])`` (80-40, PReLU),
    no softmax; padding gets weight 0; ``pooled = Σ_t w_t h_t``. Logit =
    ``MLP([pooled, c, user fields])`` (head_hidden, PReLU).
    """

    kind = "din"

    def __init__(self, spec: ModelSpec, config: ModelConfig):
        super().__init__(spec, config)
        d = config.d_model
        self.embeddings = FieldEmbedding(spec, config)
        self.att = MLP(4 * d, DIN_ATTENTION_HIDDEN, 1, act="prelu")
        self.head = MLP(2 * d + self.user_dim, config.head_hidden, 1, act="prelu",
                        dropout=config.dropout)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hist = batch["hist_item"]
        h = self.embeddings.item_embedding(hist)
        beh = self.embeddings.behaviour_embedding(batch)
        if beh is not None:
            h = h + beh
        c = self.embeddings.item_embedding(batch["cand_item"])
        ce = c[:, None, :].expand_as(h)
        w = self.att(torch.cat([h, ce, h - ce, h * ce], -1)).squeeze(-1)  # [B, L]
        w = w * valid_mask(batch["hist_len"], hist.shape[1]).to(w.dtype)
        pooled = torch.einsum("bl,bld->bd", w, h)
        return self._logit(self.head(self._with_user([pooled, c], batch)), batch)


class BST(_CTRBase):
    """Behavior Sequence Transformer.

    Sequence = [candidate token, history tokens]; candidate token = Σ item-field embeddings +
    P[0]; history token = Σ item-field + Σ behaviour-field embeddings + P[recency + 1]. A pre-LN
    Transformer (``config.n_layers`` layers) runs over it, once per candidate. Logit =
    ``MLP([out_candidate, mean(out_history), c, user fields])`` (head_hidden, ReLU).
    """

    kind = "bst"

    def __init__(self, spec: ModelSpec, config: ModelConfig):
        super().__init__(spec, config)
        d = config.d_model
        self.embeddings = FieldEmbedding(spec, config)
        self.position = nn.Embedding(config.max_len + 1, d)
        nn.init.normal_(self.position.weight, std=emb_init_std(d))
        self.emb_drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, config.n_heads, config.ffn_mult, config.dropout)
            for _ in range(config.n_layers)
        )
        self.final_ln = layer_norm(d)
        self.head = MLP(3 * d + self.user_dim, config.head_hidden, 1, act="relu",
                        dropout=config.dropout)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hist = batch["hist_item"]
        hist_len = batch["hist_len"]
        B, L = hist.shape
        h = self.embeddings.item_embedding(hist)
        beh = self.embeddings.behaviour_embedding(batch)
        if beh is not None:
            h = h + beh
        h = h + self.position(recency_positions(hist_len, L) + 1)
        c = self.embeddings.item_embedding(batch["cand_item"])
        x = torch.cat([(c + self.position.weight[0])[:, None], h], 1)
        hist_valid = valid_mask(hist_len, L)
        valid = torch.cat([hist_valid.new_ones(B, 1), hist_valid], 1)
        x = self.emb_drop(x)
        for layer in self.layers:
            x, _, _ = layer(x, valid)
        x = self.final_ln(x)
        feats = [x[:, 0], masked_mean(x[:, 1:], hist_valid), c]
        return self._logit(self.head(self._with_user(feats, batch)), batch)


class UserVectorCTR(_CTRBase):
    """"Pre-trained user vector as a feature": logit = ``MLP([u, c, user fields])`` with
    u = FG-BERT's final hidden states pooled (``pooling="mean"`` over real positions, or
    ``"last"``: the most recent behaviour; zeros for an empty history) and c = Σ item-field
    embeddings from FG-BERT's tables. Frozen (embeddings included) when
    ``config.freeze_encoder``. The candidate never enters the encoder.
    """

    kind = "user_vector"

    def __init__(self, spec: ModelSpec, config: ModelConfig, encoder: FGBERT | None = None,
                 pooling: str = "mean"):
        super().__init__(spec, config)
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.pooling = pooling
        if encoder is None:
            encoder = FGBERT(spec, config)
        check_encoder(encoder, config)
        self.encoder = encoder
        d = config.d_model
        self.head = MLP(2 * d + self.user_dim, config.head_hidden, 1, act="relu",
                        dropout=config.dropout)
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> UserVectorCTR:
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()
        return self

    def user_vector(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            hidden = self.encoder.encode(batch)
        hist_len = batch["hist_len"]
        if self.pooling == "mean":
            return masked_mean(hidden, valid_mask(hist_len, hidden.shape[1]))
        idx = (hist_len - 1).clamp(min=0)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return last * (hist_len > 0).to(last.dtype)[:, None]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        u = self.user_vector(batch)
        c = self.encoder.embeddings.item_embedding(batch["cand_item"])
        return self._logit(self.head(self._with_user([u, c], batch)), batch)
