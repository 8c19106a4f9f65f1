"""Torch reference for Q-Former query pooling: M shared queries attend to each user's states."""

from __future__ import annotations

import torch

from .candidate_attention import _bounds, _upcast


def query_pool_ref(
    queries: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(queries_b k_b^T * scale) v_b for every user b.

    Args:
        queries: [M, H, Dh], the same M queries for every user, or [B, M, H, Dh], each user's
            own (a Q-Former whose queries are offset by user features, or after its first block).
        k, v: [Nkv, H, Dh], the users' keys and values one after another.
        kv_offsets: int64 [B+1]; user b owns rows kv_offsets[b]:kv_offsets[b+1]. None: one user.
        scale: default 1/sqrt(Dh).
        upcast: compute in fp32; False keeps the matmuls in the input dtype.

    Returns:
        [B, M, H, Dh] in the queries' dtype (B = 1 without offsets). Empty users get zeros.
    """
    out_dtype = queries.dtype
    if scale is None:
        scale = queries.shape[-1] ** -0.5
    if upcast:
        queries, k, v = _upcast(queries), _upcast(k), _upcast(v)
    kb = _bounds(kv_offsets, k.shape[0])
    shared = queries.dim() == 3

    outs = []
    for b in range(len(kb) - 1):
        q_b = queries if shared else queries[b]  # (M, H, Dh)
        k_u = k[kb[b] : kb[b + 1]]  # (L, H, Dh)
        v_u = v[kb[b] : kb[b + 1]]  # (L, H, Dh)
        if k_u.shape[0] == 0:
            outs.append(torch.zeros_like(q_b))
            continue
        s = torch.einsum("mhd,lhd->hml", q_b, k_u) * scale  # (H, M, L)
        p = torch.softmax(_upcast(s), dim=-1).to(v_u.dtype)
        outs.append(torch.einsum("hml,lhd->mhd", p, v_u))  # (M, H, Dh)
    return torch.stack(outs, dim=0).to(out_dtype)  # (B, M, H, Dh)
