"""Backend ``triton``: the fused Triton kernels of :mod:`srp4ctr.kernels` on CUDA (on CPU only
under ``TRITON_INTERPRET=1``, for tests). Inference only.

Candidate side: one fused launch per tower layer (LN → Q → attention over the user's cached K/V
→ O → residual → LN → FFN → residual; users jagged by offsets), the head in torch. The kernel
computes the first layer's query ``LN1(z0) Wq`` in registers from z0, so no ``q0`` table is built
for it (one [V, d] table less).

User side: FG-BERT's layers in torch, and the Q-Former's cross-attention — its M queries over
each user's final states, the design's second hot operation — through
:func:`srp4ctr.kernels.query_pool` over the users' jagged states (no padding), every block, with
per-user queries where the model offsets them by user features.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from srp4ctr.kernels import candidate_tower, query_pool, triton_available
from srp4ctr.kernels._backend import interpreting

from ._base import Scorer, UserSide, UserTensors, register
from .torch import head, item_rows, jagged_kv, split_users, user_block

__all__ = ["TritonBackend", "TritonUserSide"]

# The interpreter patches triton.language while it runs and autotuning fills shared caches: one
# launch sequence at a time per process.
_LOCK = threading.Lock()


def _where_reason(device: torch.device, what: str) -> str | None:
    if not triton_available():
        return (f"{what}='triton' needs triton installed and either a CUDA device or "
                "TRITON_INTERPRET=1 (set before triton is imported)")
    if device.type == ("cpu" if interpreting() else "cuda"):
        return None
    where = "CPU only under TRITON_INTERPRET=1" if interpreting() else "CUDA devices"
    return f"{what}='triton' runs on {where}; the engine is on {device}"


class TritonBackend(Scorer):
    """The fused candidate-tower kernels (see the module docstring)."""

    name = "triton"
    uses_q0 = False

    @classmethod
    def hardware_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        return _where_reason(device, "backend")

    def _tower(self, z0, kv, q_offsets=None, kv_offsets=None):
        with _LOCK:
            return candidate_tower(z0, kv, self.folded.layers, q_offsets, kv_offsets,
                                   backend="triton", validate=False, eps=self.folded.eps)

    def score_one(self, cache, item_ids):
        fm = self.folded
        z0, _, hz0 = item_rows(fm, item_ids)
        zn = None
        if fm.n_layers:
            zn = self._tower(z0, [cache.layer_kv(i) for i in range(fm.n_layers)])
        return head(zn, hz0, cache.head_user, fm.head_zn, fm.rest)

    def score_many(self, caches, item_ids, counts):
        fm = self.folded
        z0, _, hz0 = item_rows(fm, item_ids)
        zn = None
        if fm.n_layers:
            k, v, q_off, kv_off = jagged_kv(caches, counts, item_ids.device)
            zn = self._tower(z0, [(k[i], v[i]) for i in range(fm.n_layers)], q_off, kv_off)
        return head(zn, hz0, user_block(caches, counts, item_ids.device), fm.head_zn, fm.rest)


class TritonUserSide(UserSide):
    """FG-BERT in torch; the Q-Former's cross-attention on the ``query_pool`` kernel."""

    name = "triton"

    @classmethod
    def unavailable_reason(cls, model, device: torch.device) -> str | None:
        return _where_reason(device, "user_side")

    def encode(self, batch: Mapping[str, torch.Tensor]) -> list[UserTensors]:
        model = self.model
        lengths = batch["hist_len"]
        zero = lengths.new_zeros(1)
        kv_offsets = torch.cat([zero, lengths.cumsum(0)])
        mask = None

        def pool(attn, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            """attn(x, hidden) of one Q-Former block over the users' real positions only:
            x [B, M, d] queries, hidden [B, L, d] right-padded -> [B, M, d]."""
            nonlocal mask
            if mask is None:
                mask = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]
            k, v = attn.project_kv(hidden[mask])  # [Σn, H, Dh]: the jagged states, no padding
            with _LOCK:
                o = query_pool(attn.project_q(x), k, v, kv_offsets, backend="triton",
                               validate=False)  # [B, M, H, Dh]
            return attn.wo(o.flatten(2))

        with torch.no_grad():
            state = model.encode_users(batch, cross_attend=pool)
        return split_users(model, state, [int(n) for n in lengths.tolist()])


register("triton", TritonBackend, TritonUserSide)
