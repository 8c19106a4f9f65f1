"""FG-BERT: a bidirectional Transformer over behaviour sequences that encodes item ids together
with item side fields and behaviour fields, pre-trained by multi-attribute masked prediction.

Token of behaviour t (DESIGN.md §4)::

    e_t = Σ_{f ∈ item fields} E_f[x_t,f] + Σ_{g ∈ behaviour fields} E_g[x_t,g] + P[recency_t]

recency 0 is the most recent behaviour, so under right padding the most recent behaviour always
sits at the same position embedding. A multi-valued item field embeds as the mean of its ids.

Masked pre-training: positions are chosen with rate ``mask_rate`` (at least one per non-empty
sequence); each chosen position masks either its item-field group or its behaviour-field group
(probability 0.5 each; always the item group when there are no behaviour fields, e.g. the
``item_only`` variant). Masking replaces each field's embedding of the group by that field's
learned [MASK] vector. One head per field predicts the masked value from the final hidden state:

- ``item``: softmax over all items (padding 0 and the OOV id excluded);
- a multi-valued field: sigmoid/BCE per value (the item's value set as a multi-hot target);
- a single-valued field: softmax; positions whose target is 0 (missing) are skipped.

A single-valued head over a large vocabulary (``ModelConfig.sampled``; Taobao's 4M items) is a
sampled softmax instead (:mod:`srp4ctr.models.sampled_softmax`): the target against K negatives
with the logQ correction, drawn by the sampler :meth:`FGBERT.attach_samplers` gave the field
(pre-training builds them from training frequencies), else a uniform one.

Each head is ``LN(GELU(Linear(h)))`` followed by a product with the field's own embedding table
(**tied** output embeddings, as BERT4Rec) plus a per-value bias. The loss is the mean over the
fields that have at least one masked target in the batch of each field's mean loss (weighted by
``ModelConfig.loss_weights`` when it is set).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from srp4ctr.errors import InputError
from srp4ctr.models.layers import (
    FieldEmbedding,
    TransformerLayer,
    emb_init_std,
    layer_norm,
    recency_positions,
    valid_mask,
)
from srp4ctr.models.sampled_softmax import NegativeSampler, sampled_softmax_loss
from srp4ctr.models.spec import ModelConfig, ModelSpec

__all__ = ["FGBERT", "PredictionHead"]

KV = list[tuple[torch.Tensor, torch.Tensor]]


class PredictionHead(nn.Module):
    """``logits = LN(GELU(W h + b)) · E_f^T + bias_f`` with E_f the field's embedding table."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.ln = layer_norm(d_model)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln(F.gelu(self.dense(h)))

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.linear(self.project(h), table, self.bias)


class FGBERT(nn.Module):
    """The pre-trained sequence encoder.

    ``encode(batch)`` -> final hidden states [B, L, d] (after the final LayerNorm);
    ``encode(batch, return_kv=True)`` -> (hidden, [(K^l, V^l) for l = 1..n_layers]) with
    K^l = LN1_l(H^{l-1}) W_K^l + b, [B, L, H, Dh], exactly as used inside layer l.
    """

    kind = "fgbert"

    def __init__(self, spec: ModelSpec, config: ModelConfig):
        super().__init__()
        self.spec = spec
        self.config = config
        d = config.d_model
        self.embeddings = FieldEmbedding(spec, config)
        self.position = nn.Embedding(config.max_len, d)
        self.emb_drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, config.n_heads, config.ffn_mult, config.dropout)
            for _ in range(config.n_layers)
        )
        self.final_ln = layer_norm(d)
        groups = self.embeddings.item_group + self.embeddings.behaviour_group
        # the dataset's fields (an item-only model predicts the item alone: the others' weights
        # do not apply to it, so one setting serves both pre-trainings)
        fields_ = list(spec.item_fields) + list(spec.behaviour_fields)
        unknown = sorted(set(config.loss_weights or ()) - set(fields_))
        if unknown:
            raise InputError(f"ModelConfig.loss_weights names field(s) {unknown} the dataset "
                             f"does not have; its fields: {fields_}")
        self.mask_emb = nn.ParameterDict(
            {f: nn.Parameter(torch.randn(d) * emb_init_std(d)) for f in groups}
        )
        self.heads = nn.ModuleDict({f: PredictionHead(d, spec.vocab[f]) for f in groups})
        nn.init.normal_(self.position.weight, std=emb_init_std(d))
        #: single-valued fields whose pre-training head is a sampled softmax
        self.sampled_fields: list[str] = list(self.embeddings.sparse_fields)
        self._samplers: dict[str, NegativeSampler] = {}

    def attach_samplers(self, samplers: Mapping[str, NegativeSampler]) -> None:
        """The negative samplers of the sampled fields (pre-training builds them from the
        training split's frequencies); a sampled field without one samples uniformly."""
        unknown = sorted(set(samplers) - set(self.sampled_fields))
        if unknown:
            raise InputError(f"samplers for fields without a sampled softmax: {unknown}")
        self._samplers = dict(samplers)

    def sampler(self, f: str) -> NegativeSampler:
        if f not in self._samplers:
            exclude = (0, self.spec.oov_item) if f == "item" else (0,)
            self._samplers[f] = NegativeSampler(
                "uniform", self.spec.vocab[f], self.config.n_sampled, exclude=exclude,
                device=self.position.weight.device)
        return self._samplers[f]

    def softmax_description(self) -> dict[str, str]:
        """How each pre-training head is computed (recorded with a pre-training run)."""
        out = {}
        for f in self.item_group + self.behaviour_group:
            if f in self.sampled_fields:
                out[f] = self.sampler(f).describe()
            elif f in self.embeddings.multi:
                out[f] = "sigmoid per value (multi-valued)"
            else:
                out[f] = "full softmax"
        return out

    def _single_loss(self, f: str, h: torch.Tensor, t: torch.Tensor,
                     generator: torch.Generator | None, exclude: tuple[int, ...]):
        """The loss of a single-valued head (targets 0 skipped; None if all are 0)."""
        if f in self.sampled_fields:
            head = self.heads[f]
            return sampled_softmax_loss(head.project(h), self.embeddings.weight(f), head.bias,
                                        t, self.sampler(f), generator)
        return _ce_ignore0(_exclude(self.field_logits(f, h), exclude), t)

    # ------------------------------------------------------------------ input
    @property
    def item_group(self) -> list[str]:
        return self.embeddings.item_group

    @property
    def behaviour_group(self) -> list[str]:
        return self.embeddings.behaviour_group

    def _group_mask_vector(self, fields: list[str]) -> torch.Tensor:
        return torch.stack([self.mask_emb[f] for f in fields]).sum(0)

    def embed(
        self,
        batch: Mapping[str, torch.Tensor],
        item_mask: torch.Tensor | None = None,
        behaviour_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [B, L, d] (before dropout) and the valid mask [B, L].

        item_mask / behaviour_mask: [B, L] bool, positions whose item / behaviour field group is
        replaced by the [MASK] vectors.
        """
        hist = batch["hist_item"]
        L = hist.shape[1]
        if L > self.config.max_len:
            raise InputError(f"history width {L} exceeds max_len {self.config.max_len}")
        hist_len = batch["hist_len"]
        x = self.embeddings.item_embedding(hist)
        if item_mask is not None:
            x = torch.where(item_mask[..., None], self._group_mask_vector(self.item_group), x)
        beh = self.embeddings.behaviour_embedding(batch)
        if beh is not None:
            if behaviour_mask is not None:
                beh = torch.where(
                    behaviour_mask[..., None], self._group_mask_vector(self.behaviour_group), beh
                )
            x = x + beh
        x = x + self.position(recency_positions(hist_len, L))
        return x, valid_mask(hist_len, L)

    # ------------------------------------------------------------------ encoder
    def encode_embedded(self, x: torch.Tensor, valid: torch.Tensor, return_kv: bool = False):
        x = self.emb_drop(x)
        kv: KV = []
        for layer in self.layers:
            x, k, v = layer(x, valid)
            if return_kv:
                kv.append((k, v))
        h = self.final_ln(x)
        return (h, kv) if return_kv else h

    def encode(self, batch: Mapping[str, torch.Tensor], return_kv: bool = False):
        x, valid = self.embed(batch)
        return self.encode_embedded(x, valid, return_kv)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(batch)

    # ------------------------------------------------------------------ heads
    def field_logits(self, f: str, h: torch.Tensor) -> torch.Tensor:
        """Logits over the values of field f (padding column 0 included, unmasked)."""
        return self.heads[f](h, self.embeddings.weight(f))

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over all item ids with padding 0 and the OOV id set to -inf."""
        logits = self.field_logits("item", h)
        return _exclude(logits, (0, self.spec.oov_item))

    # ------------------------------------------------------------------ pre-training
    def sample_mask(
        self, hist_len: torch.Tensor, width: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(item_mask, behaviour_mask), [B, width] bool, disjoint, both False on padding."""
        dev = hist_len.device
        valid = valid_mask(hist_len, width)
        u = torch.rand(valid.shape, generator=generator, device=dev)
        chosen = (u < self.config.mask_rate) & valid
        # at least one per non-empty sequence: the valid position with the smallest draw
        need = ~chosen.any(1) & (hist_len > 0)
        first = torch.where(valid, u, torch.full_like(u, 2.0)).argmin(1)
        chosen |= need[:, None] & (torch.arange(width, device=dev)[None, :] == first[:, None])
        if self.behaviour_group:
            pick_item = torch.rand(valid.shape, generator=generator, device=dev) < 0.5
            return chosen & pick_item, chosen & ~pick_item
        return chosen, torch.zeros_like(chosen)

    def pretrain_loss(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Multi-attribute masked-prediction loss -> (loss, {field: detached per-field loss}).

        ``generator`` drives the choice of masked positions and groups (reproducible masking);
        dropout draws from the global RNG as usual. Fields with no masked target in the batch are
        absent from the dict; a batch of empty histories gives a zero loss (with a graph).
        """
        hist = batch["hist_item"]
        item_mask, beh_mask = self.sample_mask(batch["hist_len"], hist.shape[1], generator)
        x, valid = self.embed(batch, item_mask, beh_mask)
        h = self.encode_embedded(x, valid)
        losses: dict[str, torch.Tensor] = {}

        if bool(item_mask.any()):
            h_item = h[item_mask]  # [P, d]
            targets = self.embeddings.item_field_ids(hist[item_mask])
            for f in self.item_group:
                t = targets[f]
                if f == "item":
                    t = torch.where(t == self.spec.oov_item, torch.zeros_like(t), t)
                    loss = self._single_loss(f, h_item, t, generator, (0, self.spec.oov_item))
                elif f in self.embeddings.multi:
                    logits = self.field_logits(f, h_item)[:, 1:]
                    multi_hot = torch.zeros(
                        t.shape[0], logits.shape[1] + 1, device=t.device, dtype=logits.dtype
                    ).scatter_(1, t, 1.0)[:, 1:]
                    loss = F.binary_cross_entropy_with_logits(logits, multi_hot)
                else:
                    loss = self._single_loss(f, h_item, t, generator, (0,))
                if loss is not None:
                    losses[f] = loss
        if self.behaviour_group and bool(beh_mask.any()):
            h_beh = h[beh_mask]
            for f in self.behaviour_group:
                t = batch["hist_" + f][beh_mask]
                loss = self._single_loss(f, h_beh, t, generator, (0,))
                if loss is not None:
                    losses[f] = loss

        if losses:
            weights = self.config.loss_weights
            if weights:
                w = [weights.get(f, 1.0) for f in losses]
                total = sum(wi * v for wi, v in zip(w, losses.values())) / max(sum(w), 1e-12)
            else:
                total = torch.stack(list(losses.values())).mean()
        else:  # nothing masked (every history empty): a zero that still has a graph
            total = h.sum() * 0.0
        return total, {f: v.detach() for f, v in losses.items()}

    # ------------------------------------------------------------------ next item
    def next_item_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores of every item as the next behaviour -> [B, vocab['item']]: the item head on
        :meth:`next_item_hidden`. Padding 0 and the OOV id score -inf."""
        return self.item_logits(self.next_item_hidden(batch))

    def next_item_hidden(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The final hidden state [B, d] of a masked token appended as the next behaviour.

        A fully masked token (item group and behaviour group) is appended after the last real
        behaviour; it takes recency 0 and the others shift by one. A history already at
        ``max_len`` drops its oldest behaviour.
        """
        hist = batch["hist_item"]
        hist_len = batch["hist_len"]
        B, L = hist.shape
        if L == 0:
            hist = hist.new_zeros(B, 1)
            L = 1
        W = min(L + 1, self.config.max_len)
        drop = (hist_len >= W).long()  # full at max_len: drop the oldest
        new_len = hist_len + 1 - drop
        j = torch.arange(W, device=hist.device)[None, :]
        src = (j + drop[:, None]).clamp(max=L - 1)
        real = j < (new_len - 1)[:, None]
        new_tok = j == (new_len - 1)[:, None]

        def shifted(t: torch.Tensor) -> torch.Tensor:
            if t.shape[1] == 0:
                t = t.new_zeros(B, 1)
            return torch.where(real, t.gather(1, src), torch.zeros_like(src))

        nb = {"hist_item": shifted(hist), "hist_len": new_len}
        for f in self.behaviour_group:
            nb["hist_" + f] = shifted(batch["hist_" + f])
        x, valid = self.embed(nb, new_tok, new_tok if self.behaviour_group else None)
        h = self.encode_embedded(x, valid)
        return h[torch.arange(B, device=h.device), new_len - 1]


def _exclude(logits: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """Set the given columns to -inf (out of place, autograd-safe)."""
    col = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    col[list(ids)] = True
    return logits.masked_fill(col, float("-inf"))


def _ce_ignore0(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy ignoring target 0; None when every target is 0."""
    if not bool((target > 0).any()):
        return None
    return F.cross_entropy(logits, target, ignore_index=0)
