"""Sampled softmax for pre-training heads over large vocabularies (Taobao: ~4M items).

A full softmax over V items costs ``P × V`` logits per step for P masked positions (at V = 4.1M
and a few hundred positions, tens of GB). Above a vocabulary threshold
(:attr:`~srp4ctr.models.ModelConfig.sampled_softmax_above`) FG-BERT's single-valued heads
score each masked position against its target and K shared negatives instead, and correct each
negative's logit by the log of its expected count in the sample (the "logQ" correction of Jean
et al. 2015)::

    o_sk  = logit_sk − log(K · Q(sk))        for each sampled negative sk (not the target)
    loss  = −log softmax([logit_target, o_s1 … o_sK])[0]   (sampled sk equal to the target: −inf)

``exp(logit_target) + Σ_k exp(o_sk)`` is then an unbiased estimate of ``Σ_j exp(logit_j)``, so
the loss and its gradient approach the full softmax's as K grows (tested on a toy problem). The
target's logit is left as it is on purpose: correcting it too (as TensorFlow's
``sampled_softmax_loss`` does for its true classes) adds log(K · Q(target)) to the loss, which
grows with K and never reaches the full softmax.

Samplers (ids 1 .. V−2: padding 0 and the out-of-vocabulary id never drawn):

- ``"log_uniform"``: Zipf over the ids ranked by training frequency (most frequent first),
  ``P(rank r) = log((r + 2) / (r + 1)) / log(N + 1)``, with replacement; the default, since item
  popularity is close to a power law;
- ``"uniform"``: every id alike, with replacement;
- ``"in_batch"``: the batch's own targets are the negatives (their rows gathered once);
  ``Q(j)`` is the unigram frequency of j in training, times the number of targets.

Only the rows a step touches get gradients: the head gathers them with sparse gradients, and
the embedding table of a sampled field is a sparse-gradient ``nn.Embedding``
(:mod:`srp4ctr.train.optim` steps it with ``SparseAdam``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from srp4ctr.errors import InputError

__all__ = ["SAMPLERS", "NegativeSampler", "sampled_softmax_loss"]

SAMPLERS = ("log_uniform", "uniform", "in_batch")


class NegativeSampler:
    """Draws negatives for one field and knows each id's log expected count.

    Args:
        kind: one of :data:`SAMPLERS`.
        vocab: the field's vocabulary size (padding 0 and, for items, the OOV id included).
        n_sampled: negatives per step (K); unused by ``"in_batch"``.
        counts: ``[vocab]`` training frequency of every id (needed by ``"log_uniform"`` to rank
            ids and by ``"in_batch"`` for Q; ``None`` ranks by id, i.e. assumes ids sorted by
            popularity, and makes ``"in_batch"`` uniform).
        exclude: ids never drawn (padding 0 and the OOV item).
        device: where the tables live.
    """

    def __init__(self, kind: str, vocab: int, n_sampled: int, counts: np.ndarray | None = None,
                 exclude: tuple[int, ...] = (0,), device: torch.device | str = "cpu"):
        if kind not in SAMPLERS:
            raise InputError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
        if isinstance(n_sampled, bool) or not isinstance(n_sampled, int) or n_sampled < 1:
            raise InputError(f"n_sampled must be a positive integer, got {n_sampled!r}")
        self.kind, self.vocab, self.n_sampled = kind, int(vocab), int(n_sampled)
        allowed = np.ones(self.vocab, dtype=bool)
        allowed[[i for i in exclude if 0 <= i < self.vocab]] = False
        ids = np.flatnonzero(allowed)
        if ids.size == 0:
            raise InputError("nothing to sample: every id is excluded")
        if counts is not None:
            counts = np.asarray(counts, dtype=np.float64)
            if counts.shape != (self.vocab,) or np.any(counts < 0):
                raise InputError(f"counts must be [{self.vocab}] non-negative, got shape "
                                 f"{counts.shape}")
        n = ids.size
        if kind == "log_uniform":
            order = ids if counts is None else ids[np.lexsort((ids, -counts[ids]))]
            ranks = np.arange(n, dtype=np.float64)
            p_rank = np.log((ranks + 2.0) / (ranks + 1.0)) / math.log(n + 1.0)
            p = np.zeros(self.vocab)
            p[order] = p_rank
            self._by_rank = torch.as_tensor(order, dtype=torch.int64, device=device)
        elif kind == "uniform" or counts is None or counts[ids].sum() <= 0:
            p = np.where(allowed, 1.0 / n, 0.0)
        else:  # in_batch: unigram frequency (add-one, so unseen ids keep a finite log Q)
            c = np.where(allowed, counts + 1.0, 0.0)
            p = c / c.sum()
        self._ids = torch.as_tensor(ids, dtype=torch.int64, device=device)
        with np.errstate(divide="ignore"):
            self.log_p = torch.as_tensor(np.log(p), dtype=torch.float32, device=device)

    def describe(self) -> str:
        if self.kind == "in_batch":
            return "sampled softmax, in-batch negatives, logQ-corrected"
        return f"sampled softmax, {self.n_sampled} {self.kind} negatives, logQ-corrected"

    def draw(self, targets: torch.Tensor, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative ids [K], their log expected count log(K·Q) [K]) for a step whose targets
        are ``targets`` [P] (the in-batch sampler returns them, K = P)."""
        dev = self.log_p.device
        if self.kind == "in_batch":
            s = targets.to(dev)
            k = s.numel()
        else:
            k = self.n_sampled
            u = torch.rand(k, generator=generator, device=dev, dtype=torch.float64)
            if self.kind == "log_uniform":
                n = self._by_rank.numel()
                r = (torch.exp(u * math.log(n + 1.0)).floor().long() - 1).clamp_(0, n - 1)
                s = self._by_rank[r]
            else:
                s = self._ids[(u * self._ids.numel()).long().clamp_(max=self._ids.numel() - 1)]
        return s, self.log_p[s] + math.log(max(k, 1))


def sampled_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         targets: torch.Tensor, sampler: NegativeSampler,
                         generator: torch.Generator | None = None,
                         sparse: bool = True) -> torch.Tensor | None:
    """Mean sampled-softmax cross-entropy of ``hidden`` [P, d] (the head's projection) against
    ``targets`` [P] over the rows of ``weight`` [V, d] (+ ``bias`` [V]); targets 0 are ignored,
    None when every target is 0. Rows are gathered with sparse gradients when ``sparse``."""
    keep = targets > 0
    if not bool(keep.any()):
        return None
    h, t = hidden[keep], targets[keep]
    s, log_es = sampler.draw(t, generator)
    w_t = F.embedding(t, weight, sparse=sparse)  # [P, d]
    # in-batch negatives are the targets themselves: their rows once
    w_s = w_t if sampler.kind == "in_batch" else F.embedding(s, weight, sparse=sparse)  # [K, d]
    pos = (h * w_t).sum(-1) + bias[t]
    neg = h @ w_s.T + bias[s] - log_es  # [P, K]
    neg = neg.masked_fill(s[None, :] == t[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos[:, None], neg], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(t))
