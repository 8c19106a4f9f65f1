"""Torch reference for candidate cross-attention: the definition the Triton kernel is checked against.

Each user's candidates attend to that user's keys and values only; candidates never see each
other. Written for reading, not for speed: one einsum pair per user, in fp32 unless told otherwise.
"""

from __future__ import annotations

import torch


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _bounds(offsets: torch.Tensor | None, n: int) -> list[int]:
    return [0, n] if offsets is None else [int(x) for x in offsets.tolist()]


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
            it to size the error a low-precision kernel is allowed.

    Returns:
        [Nq, H, Dh] in q's dtype. A user with no history gets zeros.
    """
    out_dtype = q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if upcast:
        q, k, v = _upcast(q), _upcast(k), _upcast(v)
    qb, kb = _bounds(q_offsets, q.shape[0]), _bounds(kv_offsets, k.shape[0])

    outs = []
    for b in range(len(qb) - 1):
        q_u = q[qb[b] : qb[b + 1]]  # (C, H, Dh) this user's candidates
        k_u = k[kb[b] : kb[b + 1]]  # (L, H, Dh) this user's history
        v_u = v[kb[b] : kb[b + 1]]  # (L, H, Dh)
        if k_u.shape[0] == 0:  # no history: nothing to attend to
            outs.append(torch.zeros_like(q_u))
            continue
        s = torch.einsum("chd,lhd->hcl", q_u, k_u) * scale  # (H, C, L)
        p = torch.softmax(_upcast(s), dim=-1).to(v_u.dtype)  # (H, C, L)
        outs.append(torch.einsum("hcl,lhd->chd", p, v_u))  # (C, H, Dh)
    return torch.cat(outs, dim=0).to(out_dtype)
