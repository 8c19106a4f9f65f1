"""Torch reference for one candidate-tower layer and for a stack of them (fp32 composition)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._params import LAYER_NORM_EPS, TowerLayerParams
from .candidate_attention import candidate_attention_ref


def candidate_tower_layer_ref(
    z: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: TowerLayerParams,
    q_offsets: torch.Tensor | None = None,
    kv_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pre-LN cross-attention layer of the candidate tower, computed in fp32.

    Args:
        z: [Nq, d] candidate states, d = H * Dh.
        k, v: [Nkv, H, Dh] the users' cached keys and values for this layer.
        params: the layer's weights (see :class:`TowerLayerParams`).
        q_offsets, kv_offsets: int64 [B+1] as in ``candidate_attention_ref``; None: one user.

    Returns:
        [Nq, d] in z's dtype.
    """
    n, d = z.shape
    out_dtype = z.dtype
    heads, head_dim = k.shape[1], k.shape[2]
    compute = torch.promote_types(z.dtype, torch.float32)  # fp32, or fp64 if z is fp64
    p = params.to(compute)
    z = z.to(compute)

    h = F.layer_norm(z, (d,), p.ln1_w, p.ln1_b, eps=LAYER_NORM_EPS)  # (N, d)
    q = F.linear(h, p.wq, p.bq).view(n, heads, head_dim)  # (N, H, Dh)
    a = candidate_attention_ref(
        q, k.to(compute), v.to(compute), q_offsets, kv_offsets
    )  # (N, H, Dh)
    z = z + F.linear(a.reshape(n, d), p.wo, p.bo)  # (N, d)

    h = F.layer_norm(z, (d,), p.ln2_w, p.ln2_b, eps=LAYER_NORM_EPS)
    z = z + F.linear(F.gelu(F.linear(h, p.w1, p.b1)), p.w2, p.b2)  # exact erf GELU
    return z.to(out_dtype)


def candidate_tower_ref(
    z: torch.Tensor,
    kv_per_layer: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params_per_layer: Sequence[TowerLayerParams],
    q_offsets: torch.Tensor | None = None,
    kv_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole tower: ``candidate_tower_layer_ref`` once per layer, in order."""
    for (k, v), params in zip(kv_per_layer, params_per_layer, strict=True):
        z = candidate_tower_layer_ref(z, k, v, params, q_offsets, kv_offsets)
    return z
