"""Candidate cross-attention: many candidates per user attend to that user's cached keys/values."""

from __future__ import annotations

import torch

from srp4ctr.errors import InputError

from . import _validate as check
from ._backend import Backend, select
from .reference.candidate_attention import candidate_attention_ref

OP = "candidate_attention"


def candidate_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor | None = None,
    kv_offsets: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: Backend | str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per user and head; candidates never attend to each other.

    Args:
        q: [Nq, H, Dh] candidate queries; with offsets, the users' candidates one after another.
        k, v: [Nkv, H, Dh] cached keys and values; with offsets, one user after another. They are
            read in place, never copied per candidate.
        q_offsets, kv_offsets: int64 [B+1], both or neither. User b's candidates
            q[q_offsets[b]:q_offsets[b+1]] attend to k/v[kv_offsets[b]:kv_offsets[b+1]].
            Neither: one user, every q row attends to all of k/v.
        scale: score scale; default 1/sqrt(Dh).
        backend: ``"triton"`` or ``"torch"`` for this call; default the process-wide backend
            (:func:`srp4ctr.kernels.get_backend`).
        validate: check the offsets' values (reads them on the host: a device synchronisation on
            GPU). Shapes, dtypes and devices are always checked.

    Returns:
        [Nq, H, Dh] in the input dtype (fp32, fp16 or bf16; fp32 accumulation). Candidates of a
        user with no history (empty k/v range) get zeros.

    Head dims: the Triton kernel takes any Dh <= 256 (padded inside to a power of two >= 16,
    with masked loads); the torch reference takes any.

    Raises:
        srp4ctr.errors.InputError: bad shapes, dtypes, devices or offsets, or autograd requested
            on the Triton backend (the kernels are inference-only).

    Example::

        >>> q = torch.randn(6, 2, 16); k = torch.randn(9, 2, 16); v = torch.randn(9, 2, 16)
        >>> q_off = torch.tensor([0, 4, 6]); kv_off = torch.tensor([0, 5, 9])
        >>> candidate_attention(q, k, v, q_off, kv_off, backend="torch").shape
        torch.Size([6, 2, 16])
    """
    check.check_float(OP, "q", q, 3)
    check.check_kv(OP, k, v)
    check.check_same(OP, {"q": q, "k": k, "v": v})
    if q.shape[1:] != k.shape[1:]:
        raise InputError(
            f"{OP}: q is [Nq, H, Dh] = {tuple(q.shape)} but k/v are {tuple(k.shape)}; "
            "H and Dh must match"
        )
    check.check_offset_pair(OP, q_offsets, kv_offsets, q.shape[0], k.shape[0], q.device, validate)
    scale = check.check_scale(OP, scale, q.shape[2])

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if select(backend, q.device, needs_grad, OP) is Backend.TORCH:
        return candidate_attention_ref(q, k, v, q_offsets, kv_offsets, scale)

    check.check_triton_head_dim(OP, q.shape[2])
    from ._triton.candidate_attention import candidate_attention_fwd

    return candidate_attention_fwd(q, k, v, q_offsets, kv_offsets, scale)
