"""The candidate tower of folded inference: cross-attention layers over the user's cached K/V."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from srp4ctr.errors import InputError

from . import _validate as check
from ._backend import Backend, select
from ._params import LAYER_NORM_EPS, TowerLayerParams
from .reference.candidate_tower import candidate_tower_layer_ref

OP = "candidate_tower_layer"
MAX_FUSED_D_MODEL = 256  # wider models run the composed path (torch linears + Triton attention)


def _check_params(op: str, params: TowerLayerParams, d: int, device: torch.device) -> None:
    if not isinstance(params, TowerLayerParams):
        raise InputError(f"{op}: params must be a TowerLayerParams, got {type(params).__name__}")
    d_ff = params.w1.shape[0] if params.w1.dim() == 2 else -1
    expected = {
        "ln1_w": (d,), "ln1_b": (d,), "wq": (d, d), "bq": (d,), "wo": (d, d), "bo": (d,),
        "ln2_w": (d,), "ln2_b": (d,), "w1": (d_ff, d), "b1": (d_ff,), "w2": (d, d_ff), "b2": (d,),
    }  # fmt: skip
    for name, shape in expected.items():
        t = getattr(params, name)
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{op}: params.{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or d_ff < 1:
            raise InputError(
                f"{op}: params.{name} has shape {tuple(t.shape)}, expected {shape} "
                f"(d = H * Dh = {d}, FFN width from w1)"
            )
        if t.dtype not in check.FLOAT_DTYPES:
            raise InputError(f"{op}: params.{name} has dtype {t.dtype}; expected a float dtype")
        if t.device != device:
            raise InputError(f"{op}: params.{name} is on {t.device} but z is on {device}")


def _check_layer(op, z, k, v, params, q_offsets, kv_offsets, validate) -> None:
    check.check_float(op, "z", z, 2)
    check.check_kv(op, k, v)
    check.check_same(op, {"z": z, "k": k, "v": v})
    d = z.shape[1]
    if k.shape[1] * k.shape[2] != d:
        raise InputError(
            f"{op}: z has width {d} but k/v are [Nkv, H, Dh] = {tuple(k.shape)}; need H * Dh == d"
        )
    _check_params(op, params, d, z.device)
    check.check_offset_pair(op, q_offsets, kv_offsets, z.shape[0], k.shape[0], z.device, validate)


def _needs_grad(z, k, v, params) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (z, k, v, *params))


def _triton_attention(q, k, v, q_offsets, kv_offsets, scale):
    from ._triton.candidate_attention import candidate_attention_fwd

    return candidate_attention_fwd(q, k, v, q_offsets, kv_offsets, scale)


def _composed_layer(z, k, v, params, q_offsets, kv_offsets, eps):
    """Wide models: the reference layer in z's dtype with the Triton attention kernel as its
    attention primitive (torch linears around it; still no K/V copies)."""
    return candidate_tower_layer_ref(z, k, v, params.to(z.dtype), q_offsets, kv_offsets,
                                     upcast=False, attention=_triton_attention, eps=eps)


def _layer(z, k, v, params, q_offsets, kv_offsets, chosen: Backend, eps: float) -> torch.Tensor:
    if chosen is Backend.TORCH:
        return candidate_tower_layer_ref(z, k, v, params, q_offsets, kv_offsets, eps=eps)
    check.check_triton_head_dim(OP, k.shape[2])
    if z.shape[1] > MAX_FUSED_D_MODEL:
        return _composed_layer(z, k, v, params, q_offsets, kv_offsets, eps)
    from ._triton.candidate_tower import candidate_tower_layer_fwd

    return candidate_tower_layer_fwd(z, k, v, params, q_offsets, kv_offsets, eps)


def candidate_tower_layer(
    z: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: TowerLayerParams,
    q_offsets: torch.Tensor | None = None,
    kv_offsets: torch.Tensor | None = None,
    *,
    backend: Backend | str | None = None,
    validate: bool = True,
    eps: float = LAYER_NORM_EPS,
) -> torch.Tensor:
    """One candidate-tower layer, fused into a single Triton launch for d <= 256.

    Computes, with exact (erf) GELU and LayerNorm epsilon ``eps`` (default 1e-5)::

        q = LN1(z) @ wq.T + bq                        # viewed [Nq, H, Dh]
        z = z + candidate_attention(q, k, v) @ wo.T + bo
        z = z + gelu(LN2(z) @ w1.T + b1) @ w2.T + b2

    Args:
        z: [Nq, d] candidate states (d = H * Dh); users' candidates one after another.
        k, v: [Nkv, H, Dh] this layer's cached keys/values of the users.
        params: :class:`TowerLayerParams` (``nn.Linear`` layout); any float dtype, rounded to z's
            dtype for the matmuls on the Triton backend.
        q_offsets, kv_offsets: int64 [B+1] as in :func:`candidate_attention`; None: one user.
        backend: ``"triton"`` or ``"torch"`` for this call; default the process-wide backend.
        validate: check the offsets' values (a device synchronisation on GPU).
        eps: the LayerNorm epsilon (the model's own; the engine passes it).

    Returns:
        [Nq, d] in z's dtype.

    Example::

        >>> d, f = 32, 64
        >>> p = TowerLayerParams(torch.ones(d), torch.zeros(d), torch.randn(d, d), torch.zeros(d),
        ...     torch.randn(d, d), torch.zeros(d), torch.ones(d), torch.zeros(d),
        ...     torch.randn(f, d), torch.zeros(f), torch.randn(d, f), torch.zeros(d))
        >>> z = torch.randn(5, d); k = torch.randn(7, 2, 16); v = torch.randn(7, 2, 16)
        >>> candidate_tower_layer(z, k, v, p, backend="torch").shape
        torch.Size([5, 32])
    """
    _check_layer(OP, z, k, v, params, q_offsets, kv_offsets, validate)
    chosen = select(backend, z.device, _needs_grad(z, k, v, params), OP)
    return _layer(z, k, v, params, q_offsets, kv_offsets, chosen, eps)


def candidate_tower(
    z: torch.Tensor,
    kv_per_layer: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params_per_layer: Sequence[TowerLayerParams],
    q_offsets: torch.Tensor | None = None,
    kv_offsets: torch.Tensor | None = None,
    *,
    backend: Backend | str | None = None,
    validate: bool = True,
    eps: float = LAYER_NORM_EPS,
) -> torch.Tensor:
    """The whole candidate tower: :func:`candidate_tower_layer` for each layer, in order.

    Args:
        z: [Nq, d] the candidates' initial states z^0.
        kv_per_layer: one (k, v) pair per layer, each [Nkv, H, Dh], same users and offsets.
        params_per_layer: one :class:`TowerLayerParams` per layer.
        q_offsets, kv_offsets, backend, validate, eps: as in :func:`candidate_tower_layer`;
            inputs are checked once, the backend chosen once, for the whole stack.

    Returns:
        [Nq, d] the final states z^n, in z's dtype.
    """
    op = "candidate_tower"
    if len(kv_per_layer) != len(params_per_layer):
        raise InputError(
            f"{op}: {len(kv_per_layer)} (k, v) pairs for {len(params_per_layer)} layers' params"
        )
    for i, ((k, v), params) in enumerate(zip(kv_per_layer, params_per_layer)):
        if k.shape[0] != kv_per_layer[0][0].shape[0]:
            raise InputError(
                f"{op}: layer {i} has {k.shape[0]} k/v rows, layer 0 has "
                f"{kv_per_layer[0][0].shape[0]}; every layer covers the same users"
            )
        _check_layer(f"{op} layer {i}", z, k, v, params, q_offsets, kv_offsets, validate and i == 0)
    needs_grad = any(
        _needs_grad(z, k, v, params) for (k, v), params in zip(kv_per_layer, params_per_layer)
    )
    chosen = select(backend, z.device, needs_grad, op)
    for (k, v), params in zip(kv_per_layer, params_per_layer):
        z = _layer(z, k, v, params, q_offsets, kv_offsets, chosen, eps)
    return z
