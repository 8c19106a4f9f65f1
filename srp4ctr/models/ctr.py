"""The SRP4CTR CTR model: FG-BERT + uni cross-attention candidate tower + Q-Former + MLP head.

User side (once per request, :meth:`SRP4CTR.encode_users` -> :class:`UserState`):
    FG-BERT over the history gives each layer's K^l, V^l [B, L, H, Dh] and the final hidden
    states H^n; the Q-Former turns H^n into M tokens; the head's user block is folded in.

Candidate side (per candidate, :meth:`SRP4CTR.score_candidates`)::

    z0 = Σ_{f ∈ item fields} E_f[cand]                    (FG-BERT's own tables)
    for l = 1..n_layers:
        q = LN1'_l(z) Wq'_l + b                           [H, Dh]
        a = softmax(q K^l^T / sqrt(Dh)) V^l               (padding masked; empty history -> 0)
        z = z + a Wo'_l + b
        z = z + W2'_l GELU(W1'_l LN2'_l(z) + b) + b
    logit = MLP([z, z0 | user block])

The candidate never changes the sequence (uni-directional), candidates never see each other, and
K^l/V^l are exactly those FG-BERT layer l computed, so the user side is computed once and reused
for any number of candidates ("folded inference").

Head input order is ``[candidate part | user part]`` so its first Linear splits in two column
blocks: ``W1 [cand | user] + b1 = W1_c cand + (W1_u user + b1)``; the second term depends only on
the user and is computed once per user in ``encode_users`` (``UserState.head_user``).

- candidate part: ``[z^n, z^0]`` (``use_xattn``) or ``[z^0]`` (ablation);
- user part: ``[mean-pooled H^n]`` (only in the ``use_xattn=False`` ablation, which takes the
  place of the tower output), then ``flatten(Q-Former tokens)`` (``use_qformer``).

Q-Former and the serving kernels: the cross-attention of block b reads K/V =
``blocks[b].cross_attn.w{k,v}(H^n)``. Its queries are the same for every user only when there is
no per-user offset (``qformer_user_offset=False`` or no user fields) and only in block 1; with the
offset each user has its own queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from srp4ctr.errors import InputError
from srp4ctr.kernels import TowerLayerParams
from srp4ctr.kernels.reference import candidate_tower_layer_ref
from srp4ctr.models.fgbert import FGBERT
from srp4ctr.models.layers import (
    MLP,
    FeedForward,
    ItemStatistics,
    MultiHeadAttention,
    UserFeatureEmbedding,
    attend,
    emb_init_std,
    layer_norm,
    masked_mean,
    valid_mask,
)
from srp4ctr.models.spec import ModelConfig, ModelSpec

__all__ = ["SRP4CTR", "CTRHead", "CandidateLayer", "CrossAttend", "QFormer", "UserState",
           "check_encoder"]

#: ``cross_attend(attn: MultiHeadAttention, x [B, M, d], hidden [B, L, d]) -> [B, M, d]``
CrossAttend = Callable[[MultiHeadAttention, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class UserState:
    """Everything the candidate side needs from B users.

    k, v: per layer, [B, L, H, Dh] (empty tuples when ``use_xattn`` is False).
    kv_len: [B] int64, real history length (K/V rows at and after it are padding).
    qtokens: [B, M, d] Q-Former tokens, or None without the Q-Former.
    pooled: [B, d] mean-pooled final hidden state (``use_xattn=False`` ablation only), else None.
    head_user: [B, h1] the user block of the head's first layer, bias included.
    """

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    kv_len: torch.Tensor
    qtokens: torch.Tensor | None
    pooled: torch.Tensor | None
    head_user: torch.Tensor

    @property
    def n_users(self) -> int:
        return int(self.kv_len.shape[0])

    def _map(self, fn) -> UserState:
        return UserState(
            k=tuple(fn(t) for t in self.k),
            v=tuple(fn(t) for t in self.v),
            kv_len=fn(self.kv_len),
            qtokens=None if self.qtokens is None else fn(self.qtokens),
            pooled=None if self.pooled is None else fn(self.pooled),
            head_user=fn(self.head_user),
        )

    def user(self, i: int) -> UserState:
        """The state of user i alone (views, no copy)."""
        if not -self.n_users <= i < self.n_users:
            raise InputError(f"user {i} out of range for {self.n_users} users")
        i = i % self.n_users
        return self._map(lambda t: t[i : i + 1])

    def select(self, index: torch.Tensor) -> UserState:
        """The states of users ``index`` [U] (a gather)."""
        return self._map(lambda t: t.index_select(0, index))

    def to(self, *args, **kwargs) -> UserState:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> UserState:
        return self._map(lambda t: t.detach())

    def replace(self, **changes) -> UserState:
        return dataclasses.replace(self, **changes)


class CandidateLayer(nn.Module):
    """One layer of the candidate tower: new ``ln1, wq, wo, ln2, w1, w2``; K/V come from the user.

    ``tower_params()`` returns ``(ln1_w, ln1_b, wq, bq, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2)``
    (nn.Linear layout ``[out, in]``), the argument list of the fused candidate-tower kernel.
    """

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.ln1 = layer_norm(d_model)
        self.wq = nn.Linear(d_model, d_model)
        self.wo = nn.Linear(d_model, d_model)
        self.ln2 = layer_norm(d_model)
        self.w1 = nn.Linear(d_model, ffn_mult * d_model)
        self.w2 = nn.Linear(ffn_mult * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def tower_params(self) -> tuple[torch.Tensor, ...]:
        return (
            self.ln1.weight, self.ln1.bias, self.wq.weight, self.wq.bias,
            self.wo.weight, self.wo.bias, self.ln2.weight, self.ln2.bias,
            self.w1.weight, self.w1.bias, self.w2.weight, self.w2.bias,
        )

    def query(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, d] -> q [N, H, Dh]."""
        return self.wq(self.ln1(z)).unflatten(-1, (self.n_heads, self.head_dim))

    def finish(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual + output projection + FFN, given the attention output a [N, d]."""
        z = z + self.drop(self.wo(a))
        return z + self.drop(self.w2(F.gelu(self.w1(self.ln2(z)))))

    def forward(
        self,
        z: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: torch.Tensor,
        user_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z [N, d]; k, v [B, L, H, Dh]; kv_len [B]; candidate n attends to user
        ``user_index[n]`` (``None``: candidate n belongs to user n, N == B)."""
        if user_index is not None:
            # a per-candidate gather of K/V: fine for training (one candidate per user); the
            # serving path is forward_one_user or the kernels, which never copy K/V.
            k, v, kv_len = k[user_index], v[user_index], kv_len[user_index]
        q = self.query(z)
        a = attend(q[:, None], k, v, valid_mask(kv_len, k.shape[1]))[:, 0]
        return self.finish(z, a)

    def forward_one_user(self, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """z [C, d] candidates of one user; k, v [n, H, Dh] that user's real K/V rows (n may be
        0). The eager folded path: the kernels' torch reference layer
        (:func:`~srp4ctr.kernels.reference.candidate_tower_layer_ref`), attention
        ``[C, H, Dh] x [n, H, Dh]`` without copying K/V. Inference only: dropout is not applied."""
        return candidate_tower_layer_ref(z, k, v, TowerLayerParams(*self.tower_params()),
                                         upcast=False, eps=self.ln1.eps)


class QFormerBlock(nn.Module):
    """Pre-LN: ``Q += SelfAttn(LN1 Q)``; ``Q += CrossAttn(LN2 Q, H)``; ``Q += FFN(LN3 Q)``."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.ln1 = layer_norm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.ln2 = layer_norm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads)
        self.ln3 = layer_norm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor,
                cross_attend: CrossAttend | None = None) -> torch.Tensor:
        h = self.ln1(q)
        q = q + self.drop(self.self_attn(h, h, None))
        if cross_attend is None:
            c = self.cross_attn(self.ln2(q), hidden, valid)
        else:
            c = cross_attend(self.cross_attn, self.ln2(q), hidden)
        q = q + self.drop(c)
        return q + self.drop(self.ffn(self.ln3(q)))


class QFormer(nn.Module):
    """M learnable queries (+ optional per-user offset) -> blocks -> final LN -> [B, M, d].

    Cross-attention keys/values are the encoder's final hidden states H^n (already layer-normed),
    padding masked; an empty history contributes a zero cross-attention output.
    """

    def __init__(self, d_model: int, n_heads: int, n_queries: int, n_blocks: int,
                 ffn_mult: int, dropout: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * emb_init_std(d_model))
        self.blocks = nn.ModuleList(
            QFormerBlock(d_model, n_heads, ffn_mult, dropout) for _ in range(n_blocks)
        )
        self.ln = layer_norm(d_model)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor,
                offset: torch.Tensor | None = None,
                cross_attend: CrossAttend | None = None) -> torch.Tensor:
        """``cross_attend(attn, x [B, M, d], hidden [B, L, d]) -> [B, M, d]`` replaces each
        block's ``attn(x, hidden, valid)`` (the serving engine runs it on the ``query_pool``
        kernel over the real positions); None: the module's own attention."""
        B = hidden.shape[0]
        q = self.queries.unsqueeze(0).expand(B, -1, -1)
        if offset is not None:
            q = q + offset
        for blk in self.blocks:
            q = blk(q, hidden, valid, cross_attend)
        return self.ln(q)


class CTRHead(nn.Module):
    """MLP over ``[candidate part (cand_dim) | user part (user_dim)]`` -> 1 logit, ReLU.

    The first Linear is applied in two column blocks (see the module docstring):
    ``user_block(u)`` once per user, ``forward(cand, user_block)`` per candidate.
    """

    def __init__(self, cand_dim: int, user_dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        self.cand_dim, self.user_dim = cand_dim, user_dim
        self.first = nn.Linear(cand_dim + user_dim, hidden[0])
        self.rest = MLP(hidden[0], hidden[1:], 1, act="relu", dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def user_block(self, user: torch.Tensor | None, n: int) -> torch.Tensor:
        """[n, h1] = W1_u user + b1 (just b1 when there is no user part)."""
        if user is None:
            return self.first.bias.expand(n, -1)
        return F.linear(user, self.first.weight[:, self.cand_dim :], self.first.bias)

    def forward(self, cand: torch.Tensor, user_block: torch.Tensor) -> torch.Tensor:
        h = F.linear(cand, self.first.weight[:, : self.cand_dim]) + user_block
        return self.rest(self.drop(F.relu(h))).squeeze(-1)


def check_encoder(encoder: FGBERT, config: ModelConfig) -> None:
    """The encoder's architecture must match the CTR config."""
    ec = encoder.config
    for name in ("d_model", "n_layers", "n_heads", "ffn_mult", "max_len", "item_only"):
        if getattr(ec, name) != getattr(config, name):
            raise InputError(
                f"encoder {name}={getattr(ec, name)!r} does not match the CTR config's "
                f"{getattr(config, name)!r}"
            )


class SRP4CTR(nn.Module):
    """The CTR model. ``forward(batch) -> logits [B]`` = ``score_candidates(encode_users(batch),
    batch['cand_item'])``.

    ``freeze_encoder``: every FG-BERT parameter, its embedding tables included (so the candidate
    embeddings too), is frozen; the encoder then runs in eval mode and without autograd.
    """

    kind = "srp4ctr"

    def __init__(self, spec: ModelSpec, config: ModelConfig, encoder: FGBERT | None = None):
        super().__init__()
        self.spec = spec
        self.config = config
        if encoder is None:
            encoder = FGBERT(spec, config)
        check_encoder(encoder, config)
        self.encoder = encoder
        d, M = config.d_model, config.n_queries
        if config.use_xattn:
            self.cand_layers = nn.ModuleList(
                CandidateLayer(d, config.n_heads, config.ffn_mult, config.dropout)
                for _ in range(config.n_layers)
            )
        else:
            self.cand_layers = nn.ModuleList()
        self.user_emb: UserFeatureEmbedding | None = None
        self.query_offset: nn.Module | None = None
        if config.use_qformer:
            self.qformer: QFormer | None = QFormer(
                d, config.n_heads, M, config.qformer_blocks, config.ffn_mult, config.dropout
            )
            if config.qformer_user_offset and spec.user_fields:
                self.user_emb = UserFeatureEmbedding(spec, config)
                self.query_offset = nn.Sequential(
                    nn.Linear(self.user_emb.out_dim, d), nn.GELU(), nn.Linear(d, M * d)
                )
        else:
            self.qformer = None
        self.head_user_features = bool(config.head_user_features and spec.user_fields)
        if self.head_user_features and self.user_emb is None:
            self.user_emb = UserFeatureEmbedding(spec, config)
        self.item_statistics = (ItemStatistics(spec.n_item_ids) if config.item_stats
                                else None)
        cand_dim = ((2 * d if config.use_xattn else d)
                    + (ItemStatistics.width if config.item_stats else 0))
        user_dim = ((0 if config.use_xattn else d) + (M * d if config.use_qformer else 0)
                    + (self.user_emb.out_dim if self.head_user_features else 0))
        self.head = CTRHead(cand_dim, user_dim, config.head_hidden, config.dropout)
        self.item_bias: nn.Embedding | None = None
        if config.item_bias:
            # zeros given: no draw from the global RNG (the other weights' init is unchanged)
            self.item_bias = nn.Embedding(spec.n_item_ids, 1,
                                          _weight=torch.zeros(spec.n_item_ids, 1))
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> SRP4CTR:
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()
        return self

    # ------------------------------------------------------------------ user side
    def encode_users(self, batch: Mapping[str, torch.Tensor],
                     cross_attend: CrossAttend | None = None) -> UserState:
        """The user side of B users; ``cross_attend`` as in :meth:`QFormer.forward`."""
        cfg = self.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.freeze_encoder):
            if cfg.use_xattn:
                hidden, kv = self.encoder.encode(batch, return_kv=True)
            else:
                hidden, kv = self.encoder.encode(batch), []
        hist_len = batch["hist_len"]
        valid = valid_mask(hist_len, hidden.shape[1])
        pooled, qtokens, head_user = self.summarise_user(hidden, valid, batch, cross_attend)
        return UserState(
            k=tuple(k for k, _ in kv),
            v=tuple(v for _, v in kv),
            kv_len=hist_len,
            qtokens=qtokens,
            pooled=pooled,
            head_user=head_user,
        )

    def summarise_user(
        self, hidden: torch.Tensor, valid: torch.Tensor, batch: Mapping[str, torch.Tensor],
        cross_attend: CrossAttend | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """From the encoder's final states [B, L, d]: ``(pooled, qtokens, head_user)``.

        ``pooled`` only in the ``use_xattn=False`` ablation, ``qtokens`` [B, M, d] only with the
        Q-Former; ``head_user`` [B, h1] is the head's user block (bias included). Shared by
        :meth:`encode_users` and the ONNX user-encoder graph.
        """
        cfg = self.config
        user_parts: list[torch.Tensor] = []
        pooled = None
        if not cfg.use_xattn:
            pooled = masked_mean(hidden, valid)
            user_parts.append(pooled)
        qtokens = None
        if self.qformer is not None:
            offset = None
            if self.query_offset is not None:
                offset = self.query_offset(self.user_emb(batch)).unflatten(
                    -1, (cfg.n_queries, cfg.d_model)
                )
            qtokens = self.qformer(hidden, valid, offset, cross_attend)
            user_parts.append(qtokens.flatten(1))
        if self.head_user_features:
            user_parts.append(self.user_emb(batch))
        user = torch.cat(user_parts, -1) if user_parts else None
        return pooled, qtokens, self.head.user_block(user, hidden.shape[0])

    # ------------------------------------------------------------------ candidate side
    def candidate_embedding(self, cand_item: torch.Tensor) -> torch.Tensor:
        """z^0 = Σ item-field embeddings of the candidates (FG-BERT's tables) -> [N, d]."""
        return self.encoder.embeddings.item_embedding(cand_item)

    def tower(self, z0: torch.Tensor, state: UserState,
              user_index: torch.Tensor | None = None) -> torch.Tensor:
        """z^n [N, d] from z^0 through the candidate layers (z^0 itself without ``use_xattn``)."""
        z = z0
        for layer, k, v in zip(self.cand_layers, state.k, state.v):
            z = layer(z, k, v, state.kv_len, user_index)
        return z

    def _score(self, z0: torch.Tensor, zn: torch.Tensor, head_user: torch.Tensor,
               cand_item: torch.Tensor, cand_stats: torch.Tensor | None = None) -> torch.Tensor:
        parts = [zn, z0] if self.config.use_xattn else [z0]
        if self.item_statistics is not None:
            parts.append(self.item_statistics(cand_item, cand_stats))
        cand = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        logits = self.head(cand, head_user)
        if self.item_bias is not None:
            logits = logits + self.item_bias(cand_item).squeeze(-1)
        return logits

    def score_candidates(self, state: UserState, cand_item: torch.Tensor,
                         user_index: torch.Tensor | None = None,
                         cand_stats: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N] of candidates ``cand_item`` [N]; candidate n belongs to user
        ``user_index[n]`` of ``state`` (``None``: user n, N must equal the number of users).
        ``cand_stats`` [N, 3]: the candidates' item statistics (``item_stats``; training
        samples' out-of-fold values), else the model's table."""
        N = cand_item.shape[0]
        if user_index is None:
            if N != state.n_users:
                raise InputError(
                    f"{N} candidates for {state.n_users} users: pass user_index"
                )
            head_user = state.head_user
        else:
            if user_index.shape != cand_item.shape:
                raise InputError(
                    f"user_index shape {tuple(user_index.shape)} != cand_item shape "
                    f"{tuple(cand_item.shape)}"
                )
            head_user = state.head_user[user_index]
        if N == 0:
            return state.head_user.new_zeros(0)
        z0 = self.candidate_embedding(cand_item)
        zn = self.tower(z0, state, user_index)
        return self._score(z0, zn, head_user, cand_item, cand_stats)

    def score_candidates_one_user(self, state: UserState, cand_item: torch.Tensor) -> torch.Tensor:
        """Logits [C] of candidates ``cand_item`` [C] of the single user in ``state`` (B = 1).

        The attention reads that user's K/V in place ([C, H, Dh] x [n, H, Dh]); nothing user-side
        is copied per candidate.
        """
        if state.n_users != 1:
            raise InputError(f"score_candidates_one_user needs a 1-user state, got {state.n_users}")
        C = cand_item.shape[0]
        if C == 0:
            return state.head_user.new_zeros(0)
        n = int(state.kv_len[0])
        z0 = self.candidate_embedding(cand_item)
        z = z0
        for layer, k, v in zip(self.cand_layers, state.k, state.v):
            z = layer.forward_one_user(z, k[0, :n], v[0, :n])
        return self._score(z0, z, state.head_user, cand_item)  # [1, h1] broadcasts over C

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.score_candidates(self.encode_users(batch), batch["cand_item"],
                                     cand_stats=batch.get("cand_stats"))
