"""Torch reference for the candidate tower: the one torch definition of the candidate side.

Everything that runs the tower in torch calls this file: the kernels' torch backend, the engine's
torch backend (with the folded first-layer query ``q0``), the exported ONNX scorer graph (with
the score scale folded into its weights and its own attention primitive) and the model's eager
one-user path. The Triton kernel and the C++ path are checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .._params import LAYER_NORM_EPS, TowerLayerParams
from .candidate_attention import candidate_attention_ref

#: ``attention(q [N, H, Dh], k [Nkv, H, Dh], v, q_offsets, kv_offsets, scale) -> [N, H, Dh]``
Attention = Callable[..., torch.Tensor]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype (itself when it already is: this file is also the engine's hot path)."""
    return t if t.dtype is dtype else t.to(dtype)


def _attention_ref(q, k, v, q_offsets, kv_offsets, scale):
    return candidate_attention_ref(q, k, v, q_offsets, kv_offsets, scale, upcast=False)


def candidate_tower_layer_ref(
    z: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: TowerLayerParams,
    q_offsets: torch.Tensor | None = None,
    kv_offsets: torch.Tensor | None = None,
    *,
    q: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
    attention: Attention | None = None,
    eps: float = LAYER_NORM_EPS,
) -> torch.Tensor:
    """One pre-LN cross-attention layer of the candidate tower::

        q = LN1(z) @ wq.T + bq                        # unless given (the folded q0)
        z = z + attention(q, k, v) @ wo.T + bo        # per user and head
        z = z + gelu(LN2(z) @ w1.T + b1) @ w2.T + b2  # exact (erf) GELU

    Args:
        z: [Nq, d] candidate states, d = H * Dh.
        k, v: [Nkv, H, Dh] the users' cached keys and values for this layer.
        params: the layer's weights (see :class:`TowerLayerParams`).
        q_offsets, kv_offsets: int64 [B+1] as in ``candidate_attention_ref``; None: one user.
        q: [Nq, d] this layer's queries when already known (the engine folds the first layer's
            ``LN1(z0) Wq + bq`` into a per-item table); None: computed from z.
        scale: score scale, default 1/sqrt(Dh) (1.0 where it is folded into wq, bq and q).
        upcast: compute in fp32 (the definition; fp64 stays fp64). False: in z's dtype, as the
            engine's torch backend scores in bf16/fp16 (softmax in fp32 either way).
        attention: the attention primitive (default :func:`candidate_attention_ref`); the ONNX
            scorer graph passes one that exports to MatMul/Softmax or to the ONNX Attention op.
        eps: LayerNorm epsilon.

    Returns:
        [Nq, d] in z's dtype.
    """
    n, d = z.shape
    out_dtype = z.dtype
    heads, head_dim = k.shape[1], k.shape[2]
    compute = torch.promote_types(z.dtype, torch.float32) if upcast else z.dtype
    p = params
    for t in params:
        if t.dtype is not compute:
            p = params.to(compute)
            break
    z = _cast(z, compute)
    if q is None:
        q = F.linear(F.layer_norm(z, (d,), p.ln1_w, p.ln1_b, eps=eps), p.wq, p.bq)  # (N, d)
    attend = _attention_ref if attention is None else attention
    a = attend(_cast(q, compute).view(n, heads, head_dim), _cast(k, compute), _cast(v, compute),
               q_offsets, kv_offsets, head_dim ** -0.5 if scale is None else scale)  # (N, H, Dh)
    z = torch.addmm(z + p.bo, a.reshape(n, d), p.wo.t())  # (N, d)
    h = F.layer_norm(z, (d,), p.ln2_w, p.ln2_b, eps=eps)
    z = torch.addmm(z + p.b2, F.gelu(F.linear(h, p.w1, p.b1)), p.w2.t())
    return _cast(z, out_dtype)


def candidate_tower_ref(
    z: torch.Tensor,
    kv_per_layer: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params_per_layer: Sequence[TowerLayerParams],
    q_offsets: torch.Tensor | None = None,
    kv_offsets: torch.Tensor | None = None,
    *,
    q0: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
    attention: Attention | None = None,
    eps: float = LAYER_NORM_EPS,
) -> torch.Tensor:
    """The whole tower from z^0: ``candidate_tower_layer_ref`` once per layer, in order.

    ``q0`` [Nq, d]: the first layer's queries when folded (see ``candidate_tower_layer_ref``'s
    ``q``); the other arguments as there. Returns z^n [Nq, d] in z's dtype.
    """
    if len(kv_per_layer) != len(params_per_layer):
        raise ValueError(f"{len(kv_per_layer)} (k, v) pairs for {len(params_per_layer)} layers")
    for i, ((k, v), params) in enumerate(zip(kv_per_layer, params_per_layer)):
        z = candidate_tower_layer_ref(z, k, v, params, q_offsets, kv_offsets,
                                      q=q0 if i == 0 else None, scale=scale, upcast=upcast,
                                      attention=attention, eps=eps)
    return z
