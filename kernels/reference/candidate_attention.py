"""Torch reference for candidate cross-attention: the definition the Triton kernel is checked against.

Each user's candidates attend to that user's keys and values only; candidates never see each
other. One batched matrix product pair per user (heads batched), the user's K/V read in place —
the same formulation the engine's torch backend runs, so the reference is also the torch path.
"""

from __future__ import annotations

import torch


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _bounds(offsets: torch.Tensor | None, n: int) -> list[int]:
    return [0, n] if offsets is None else [int(x) for x in offsets.tolist()]


def attention_one_user(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                       ) -> torch.Tensor:
    """softmax(q k^T * scale) v of one user: q [C, H, Dh], k/v [n, H, Dh] (read in place, not
    copied per candidate) -> [C, H, Dh], in q's dtype; the softmax in at least fp32. No history
    (n = 0): zeros."""
    C, H, Dh = q.shape
    if k.shape[0] == 0:  # nothing to attend to
        return q.new_zeros(C, H, Dh)
    s = torch.baddbmm(  # (H, C, n) scores, the scale folded into the product
        q.new_empty(()).expand(H, C, k.shape[0]), q.transpose(0, 1), k.permute(1, 2, 0),
        beta=0.0, alpha=scale,
    )
    if s.dtype in (torch.float32, torch.float64):
        p = torch.softmax(s, dim=-1)
    else:  # low precision: the softmax in fp32
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.bmm(p, v.transpose(0, 1)).transpose(0, 1)  # (C, H, Dh)


def candidate_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor | None = None,
    kv_offsets: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale) v, per user and head.

    Args:
        q: [Nq, H, Dh] candidate queries, users' candidates one after another.
        k, v: [Nkv, H, Dh] the users' keys and values, one user after another.
        q_offsets, kv_offsets: int64 [B+1]; user b owns q rows q_offsets[b]:q_offsets[b+1] and
            k/v rows kv_offsets[b]:kv_offsets[b+1]. Both None: one user owning everything.
        scale: score scale, default 1/sqrt(Dh).
        upcast: compute in fp32 (the exact definition). False keeps the matmuls in the input
            dtype (softmax still in fp32), i.e. what plain low-precision torch would do; tests use
            it to size the error a low-precision kernel is allowed, and the engine's torch
            backend scores that way in bf16/fp16.

    Returns:
        [Nq, H, Dh] in q's dtype. A user with no history gets zeros.
    """
    out_dtype = q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if upcast:
        q, k, v = _upcast(q), _upcast(k), _upcast(v)
    if q_offsets is None and kv_offsets is None:
        out = attention_one_user(q, k, v, scale)
        return out if out.dtype is out_dtype else out.to(out_dtype)
    qb, kb = _bounds(q_offsets, q.shape[0]), _bounds(kv_offsets, k.shape[0])
    out = q.new_empty(q.shape)
    for b in range(len(qb) - 1):
        if qb[b + 1] > qb[b]:
            out[qb[b] : qb[b + 1]] = attention_one_user(
                q[qb[b] : qb[b + 1]], k[kb[b] : kb[b + 1]], v[kb[b] : kb[b + 1]], scale)
    return out.to(out_dtype)
