"""Q-Former query pooling: M learnable queries, shared by all users, attend to each user's states."""

from __future__ import annotations

import torch

from srp4ctr.errors import InputError

from . import _validate as check
from ._backend import Backend, select
from .reference.query_pool import query_pool_ref

OP = "query_pool"


def query_pool(
    queries: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: Backend | str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """``softmax(queries_b k_b^T * scale) v_b`` for every user b, all users in one launch.

    Args:
        queries: [M, H, Dh], the same M queries for every user, or [B, M, H, Dh], each user's own
            (B = the number of users of the offsets).
        k, v: [Nkv, H, Dh], the users' keys and values one after another (read once per user).
        kv_offsets: int64 [B+1]; user b owns rows kv_offsets[b]:kv_offsets[b+1]. None: one user.
        scale: default 1/sqrt(Dh).
        backend: ``"triton"`` or ``"torch"`` for this call; default the process-wide backend.
        validate: check the offsets' values (a device synchronisation on GPU).

    Returns:
        [B, M, H, Dh] in the input dtype (B = 1 without offsets); a user with no states gets zeros.

    Head dims: the Triton kernel takes any Dh <= 256 (padded inside to a power of two >= 16,
    with masked loads); the torch reference takes any.

    Raises:
        srp4ctr.errors.InputError: bad shapes, dtypes, devices or offsets, or autograd on Triton.

    Example::

        >>> qs = torch.randn(4, 2, 16); k = torch.randn(9, 2, 16); v = torch.randn(9, 2, 16)
        >>> query_pool(qs, k, v, torch.tensor([0, 5, 9]), backend="torch").shape
        torch.Size([2, 4, 2, 16])
    """
    per_user = isinstance(queries, torch.Tensor) and queries.dim() == 4
    check.check_float(OP, "queries", queries, 4 if per_user else 3)
    check.check_kv(OP, k, v)
    check.check_same(OP, {"queries": queries, "k": k, "v": v})
    if queries.shape[-2:] != k.shape[1:]:
        raise InputError(
            f"{OP}: queries are [{'B, ' if per_user else ''}M, H, Dh] = {tuple(queries.shape)} "
            f"but k/v are {tuple(k.shape)}; H and Dh must match"
        )
    if kv_offsets is not None:
        check.check_offsets(OP, "kv_offsets", kv_offsets, k.shape[0], k.device, validate)
    n_users = 1 if kv_offsets is None else kv_offsets.shape[0] - 1
    if per_user and queries.shape[0] != n_users:
        raise InputError(f"{OP}: per-user queries for {queries.shape[0]} users but the offsets "
                         f"hold {n_users}")
    scale = check.check_scale(OP, scale, queries.shape[-1])

    needs_grad = torch.is_grad_enabled() and (
        queries.requires_grad or k.requires_grad or v.requires_grad
    )
    if select(backend, queries.device, needs_grad, OP) is Backend.TORCH:
        return query_pool_ref(queries, k, v, kv_offsets, scale)

    check.check_triton_head_dim(OP, queries.shape[-1])
    from ._triton.query_pool import query_pool_fwd

    return query_pool_fwd(queries, k, v, kv_offsets, scale)
