"""Analytic FLOP counts per request (1 user, N candidates): the paper's cost metrics.

*efficiency-FLOPs* = ``flops_per_request(kind, cfg, L, 1).total`` (batch 1);
*inference-FLOPs* = ``flops_per_request(kind, cfg, L, 100).total`` (one user, 100 candidates).

Counting rule: FLOPs = 2 × multiply-adds of the matrix products (Linear layers, attention scores
QKᵀ and the weighted sum PV). Embedding lookups, LayerNorm, softmax, activations, residual adds and
other element-wise work are not counted (they are O(T·d), below the O(T·d²) and O(T²·d) terms).
Attention products do not depend on the number of heads.

Notation: d model width, f FFN multiplier, n layers, L history length, M Q-Former queries,
P Q-Former blocks, u user fields, head MLP ``in -> h_1 -> ... -> h_k -> 1``;
``mlp(in) = in·h_1 + Σ h_i·h_{i+1} + h_k``.

A Transformer layer over T tokens attending to T keys::

    layer(T) = (4 + 2f)·T·d² + 2·T²·d              multiply-adds (QKVO, FFN, QKᵀ + PV)

SRP4CTR (folded: the user side runs once per request)::

    user      = n·layer(L)                                         FG-BERT, K/V kept
              + P·[(4 + 2f)·M·d² + 2·M²·d  +  2·M·d² + 2·L·d² + 2·M·L·d]   Q-Former (self + cross
                                                                   attention, FFN)
              + u·d·d + d·M·d                                      query offset MLP (if u > 0)
              + user_dim·h_1                                       head's user block
    candidate = n·[(2 + 2f)·d² + 2·L·d]                           tower: Wq, Wo, FFN, attention
              + cand_dim·h_1 + mlp-rest                            head's candidate block + rest

with cand_dim = 2d (z^n, z^0) and user_dim = M·d (flattened Q-Former tokens); ablations adjust
them (no tower: cand_dim = d, user_dim += d; no Q-Former: no Q-Former terms, user_dim -= M·d).

DIN (nothing user-only; the attention unit runs per candidate and history item)::

    candidate = L·(4d·a_1 + a_1·a_2 + a_2) + L·d + mlp(2d + u·d)      (a = 80, 40)

BST (the sequence plus the candidate is re-encoded for every candidate)::

    candidate = n·layer(L + 1) + mlp(3d + u·d)

User vector as a feature::

    user = n·layer(L);  candidate = mlp(2d + u·d)

Total = 2·(user + N·candidate) FLOPs.

What the serving engine executes per SRP4CTR candidate is less: it folds the item-only terms into
per-item tables (the first layer's ``LN(z⁰)·Wq`` and the head's block on z⁰), so
:func:`served_flops_per_candidate` = ``per_candidate − 2·(d² + d·h_1)`` (with the tower; the
z⁰ block only without it). Achieved FLOP rates of the engine's backends divide these.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from srp4ctr.errors import InputError
from srp4ctr.models.spec import ModelConfig

__all__ = ["FlopCount", "flops_per_request", "served_flops_per_candidate"]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one request: ``user`` once, ``per_candidate`` for each of ``n_candidates``.

    Also reads as a mapping (``dict(f)``, ``{**f}``) with keys ``user``, ``per_candidate``,
    ``n_candidates``, ``total``, for tables and JSON.
    """

    user: int
    per_candidate: int
    n_candidates: int

    @property
    def total(self) -> int:
        return self.user + self.n_candidates * self.per_candidate

    def keys(self) -> tuple[str, ...]:
        return ("user", "per_candidate", "n_candidates", "total")

    def __getitem__(self, key: str) -> int:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)


def _layer(T: int, d: int, f: int) -> int:
    return (4 + 2 * f) * T * d * d + 2 * T * T * d


def _mlp(in_dim: int, hidden: tuple[int, ...], skip_first: bool = False) -> int:
    dims = (in_dim, *hidden, 1)
    macs = [a * b for a, b in itertools.pairwise(dims)]
    return sum(macs[1:] if skip_first else macs)


def srp4ctr_macs(config: ModelConfig, L: int, u: int) -> tuple[int, int]:
    """SRP4CTR's (user-side, per-candidate) multiply-adds; see the module docstring."""
    d, f, n = config.d_model, config.ffn_mult, config.n_layers
    M, P, hh = config.n_queries, config.qformer_blocks, config.head_hidden
    user = n * _layer(L, d, f)
    user_dim = 0 if config.use_xattn else d
    if config.use_qformer:
        per_block = (4 + 2 * f) * M * d * d + 2 * M * M * d
        per_block += 2 * M * d * d + 2 * L * d * d + 2 * M * L * d
        user += P * per_block
        if config.qformer_user_offset and u > 0:
            user += u * d * d + d * M * d
        user_dim += M * d
    user += user_dim * hh[0]
    cand_dim = 2 * d if config.use_xattn else d
    cand = cand_dim * hh[0] + _mlp(cand_dim, hh, skip_first=True)
    if config.use_xattn:
        cand += n * ((2 + 2 * f) * d * d + 2 * L * d)
    return user, cand


def din_macs(config: ModelConfig, L: int, u: int) -> tuple[int, int]:
    """DIN's (user-side, per-candidate) multiply-adds: nothing runs once per user."""
    from srp4ctr.models.baselines import DIN_ATTENTION_HIDDEN

    d, hh = config.d_model, config.head_hidden
    a1, a2 = DIN_ATTENTION_HIDDEN
    return 0, L * (4 * d * a1 + a1 * a2 + a2) + L * d + _mlp(2 * d + u * d, hh)


def bst_macs(config: ModelConfig, L: int, u: int) -> tuple[int, int]:
    """BST's (user-side, per-candidate) multiply-adds: the sequence is re-encoded per candidate."""
    d, f, n = config.d_model, config.ffn_mult, config.n_layers
    return 0, n * _layer(L + 1, d, f) + _mlp(3 * d + u * d, config.head_hidden)


def user_vector_macs(config: ModelConfig, L: int, u: int) -> tuple[int, int]:
    """The user-vector baseline's (user-side, per-candidate) multiply-adds."""
    d, f, n = config.d_model, config.ffn_mult, config.n_layers
    return n * _layer(L, d, f), _mlp(2 * d + u * d, config.head_hidden)


def flops_per_request(kind: str, config: ModelConfig, L: int, n_candidates: int,
                      n_user_fields: int = 0) -> FlopCount:
    """FLOPs of one request of model ``kind`` with history length ``L`` and ``n_candidates``
    candidates; see the module docstring for the formulas (each kind's is registered with it in
    :mod:`srp4ctr.models.registry`)."""
    from srp4ctr.models.registry import model_entry, model_kinds

    if L < 0 or n_candidates < 0 or n_user_fields < 0:
        raise InputError("L, n_candidates and n_user_fields must be non-negative")
    counted = [k for k in model_kinds() if model_entry(k).macs is not None]
    if kind not in counted:
        raise InputError(f"unknown model kind {kind!r}; expected {', '.join(counted)}")
    user, cand = model_entry(kind).macs(config, L, n_user_fields)
    return FlopCount(user=2 * user, per_candidate=2 * cand, n_candidates=n_candidates)


def served_flops_per_candidate(config: ModelConfig, L: int) -> int:
    """FLOPs per candidate that the engine executes for an SRP4CTR model (item-only terms folded
    into tables: the first tower layer's query projection and the head's z⁰ block)."""
    _, cand = srp4ctr_macs(config, L, 0)
    d, h1 = config.d_model, config.head_hidden[0]
    folded = d * h1 + (d * d if config.use_xattn and config.n_layers else 0)
    return 2 * cand - 2 * folded
