"""Backend ``torch``: plain torch on any device — the reference the other backends equal.

Candidate side: the folded per-item rows, then the kernels' reference tower
(:func:`srp4ctr.kernels.reference.candidate_tower_ref`, the one torch definition of the tower:
one GEMM per projection, attention with each user's K/V read in place), then the head.
User side: the model's own ``encode_users`` (FG-BERT, Q-Former, the head's user block).

:func:`item_rows`, :func:`tower` and :func:`head` are the candidate side's three stages; the
Triton and C++ backends reuse the ones they do not replace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from srp4ctr.kernels.reference import candidate_tower_ref

from ..cache import UserCache
from ..folded import FoldedModel
from ._base import Scorer, UserSide, UserTensors, intra_op_threads, register

__all__ = ["TorchBackend", "TorchUserSide", "head", "item_rows", "jagged_kv", "tower"]


def item_rows(fm: FoldedModel, ids: torch.Tensor):
    """(z0 [N, d], q0 [N, d] or None, hz0 [N, h1]) of internal item ids [N]: gathered from the
    folded tables, or computed when they were not built. hz0 is a fresh tensor (the head adds
    into it)."""
    if fm.tables:
        # index_select: several times faster than advanced indexing for row gathers on CPU
        return (fm.z0.index_select(0, ids),
                None if fm.q0 is None else fm.q0.index_select(0, ids),
                fm.hz0.index_select(0, ids))
    return fm.compute_rows(ids)


def tower(fm: FoldedModel, z0: torch.Tensor, q0: torch.Tensor | None,
          kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
          q_offsets: torch.Tensor | None = None,
          kv_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """z^n [N, d] of the tower in the folded model's dtype (kv: per layer ``[Nkv, H, Dh]``)."""
    return candidate_tower_ref(z0, kv, fm.layers, q_offsets, kv_offsets, q0=q0, upcast=False,
                               eps=fm.eps)


def head(zn: torch.Tensor | None, hz0: torch.Tensor, head_user: torch.Tensor,
         head_zn: torch.Tensor | None, rest: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
         inplace: bool = True) -> torch.Tensor:
    """Logits [N] from the tower output zn [N, d] (None without a tower), the z0 block hz0
    [N, h1] (overwritten when ``inplace``), the user block head_user ([h1] or [N, h1]), the
    first layer's block on zn ``head_zn`` [h1, d] and the remaining ``(W, b)`` layers (ReLU
    before each)."""
    h = hz0.add_(head_user) if inplace else hz0 + head_user
    if zn is not None:
        h = torch.addmm(h, zn, head_zn.t())
    for w, b in rest:
        h = F.linear(torch.relu_(h) if inplace else torch.relu(h), w, b)
    return h.squeeze(-1)


def jagged_kv(caches: Sequence[UserCache], counts: Sequence[int], device: torch.device):
    """The users' K/V concatenated once per call (``[NL, Σn, H, Dh]``) and the int64 offsets
    ``[B+1]`` of their candidates and of their K/V rows, on ``device``."""
    zero = torch.zeros(1, dtype=torch.int64)
    q_off = torch.cat([zero, torch.as_tensor(list(counts), dtype=torch.int64).cumsum(0)])
    kv_off = torch.cat([zero, torch.as_tensor([c.length for c in caches],
                                              dtype=torch.int64).cumsum(0)])
    k = torch.cat([c.k for c in caches], dim=1)
    v = torch.cat([c.v for c in caches], dim=1)
    return k, v, q_off.to(device), kv_off.to(device)


def user_block(caches: Sequence[UserCache], counts: Sequence[int], device) -> torch.Tensor:
    """[N, h1]: each user's head block repeated for that user's candidates (h1 numbers each;
    the K/V are never repeated)."""
    hu = torch.stack([c.head_user for c in caches])
    return hu.repeat_interleave(torch.as_tensor(list(counts), device=device), dim=0)


class TorchBackend(Scorer):
    """The candidate side in plain torch (see the module docstring)."""

    name = "torch"

    def _threads(self):
        return intra_op_threads(self.options.threads if self.folded.device.type == "cpu"
                                else None)

    def score_one(self, cache: UserCache, item_ids: torch.Tensor) -> torch.Tensor:
        fm = self.folded
        with self._threads():
            z0, q0, hz0 = item_rows(fm, item_ids)
            zn = None
            if fm.n_layers:
                zn = tower(fm, z0, q0, [cache.layer_kv(i) for i in range(fm.n_layers)])
            return head(zn, hz0, cache.head_user, fm.head_zn, fm.rest)

    def score_many(self, caches, item_ids, counts):
        fm = self.folded
        with self._threads():
            z0, q0, hz0 = item_rows(fm, item_ids)
            zn = None
            if fm.n_layers:
                k, v, q_off, kv_off = jagged_kv(caches, counts, torch.device("cpu"))
                zn = tower(fm, z0, q0, [(k[i], v[i]) for i in range(fm.n_layers)], q_off, kv_off)
            return head(zn, hz0, user_block(caches, counts, item_ids.device), fm.head_zn,
                        fm.rest)


def split_users(model, state, lengths: Sequence[int]) -> list[UserTensors]:
    """A model ``UserState`` of B users -> B :class:`UserTensors` cut to their real lengths."""
    cfg = model.config
    heads, head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
    out = []
    for i, n in enumerate(lengths):
        if state.k:
            k = torch.stack([t[i, :n] for t in state.k])
            v = torch.stack([t[i, :n] for t in state.v])
        else:
            k = v = state.head_user.new_zeros(0, n, heads, head_dim)
        out.append(UserTensors(k, v, state.head_user[i],
                               None if state.qtokens is None else state.qtokens[i],
                               None if state.pooled is None else state.pooled[i]))
    return out


class TorchUserSide(UserSide):
    """The model's own forward: one padded FG-BERT batch (the training layout) for all users."""

    name = "torch"

    def encode(self, batch: Mapping[str, torch.Tensor]) -> list[UserTensors]:
        on_cpu = batch["hist_len"].device.type == "cpu"
        with torch.no_grad(), intra_op_threads(
                self.options.call_threads(user_side=True) if on_cpu else None):
            state = self.model.encode_users(batch)
        return split_users(self.model, state, [int(n) for n in batch["hist_len"].tolist()])


register("torch", TorchBackend, TorchUserSide)
