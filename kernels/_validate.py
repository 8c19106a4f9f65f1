"""Input checks shared by the kernel ops; every failure is an :class:`srp4ctr.errors.InputError`.

Shape, dtype and device checks read only tensor metadata. Checking the *values* of the offsets
(starting at 0, ending at the row count, never decreasing) reads them on the host, which on a GPU
is a device-to-host synchronisation: the ops do it unless called with ``validate=False``.
"""

from __future__ import annotations

import math

import torch

from srp4ctr.errors import InputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The Triton kernels keep a [rows, head_dim] tile per program in registers; past 256 they would
# spill badly. The torch references take any size.
MAX_TRITON_HEAD_DIM = 256


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_float(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise InputError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(_name(d) for d in FLOAT_DTYPES)
        raise InputError(f"{op}: {name} has dtype {_name(t.dtype)}; expected one of {allowed}")


def check_same(op: str, named: dict[str, torch.Tensor], *, dtype: bool = True) -> None:
    """All tensors on one device (and, with ``dtype``, of one dtype)."""
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise InputError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on one device"
            )
        if dtype and t.dtype != first.dtype:
            raise InputError(
                f"{op}: {name} has dtype {_name(t.dtype)} but {first_name} has "
                f"{_name(first.dtype)}; all inputs must share one dtype"
            )


def check_kv(op: str, k: torch.Tensor, v: torch.Tensor) -> None:
    check_float(op, "k", k, 3)
    check_float(op, "v", v, 3)
    if k.shape != v.shape:
        raise InputError(
            f"{op}: k and v must have the same shape [Nkv, H, Dh], got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    if k.shape[1] < 1 or k.shape[2] < 1:
        raise InputError(
            f"{op}: k/v need at least one head and head_dim >= 1, got {tuple(k.shape)}"
        )


def check_offsets(
    op: str,
    name: str,
    offsets: torch.Tensor,
    n_rows: int,
    device: torch.device,
    validate: bool,
) -> None:
    """``offsets``: int64 [B+1] on ``device`` with offsets[0] == 0, offsets[-1] == n_rows, monotone."""
    if not isinstance(offsets, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise InputError(f"{op}: {name} must be int64, got {_name(offsets.dtype)}")
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise InputError(
            f"{op}: {name} must have shape [B+1] with B >= 1, got {tuple(offsets.shape)}"
        )
    if offsets.device != device:
        raise InputError(f"{op}: {name} is on {offsets.device} but the inputs are on {device}")
    if not validate:
        return
    host = offsets.tolist()
    if host[0] != 0 or host[-1] != n_rows:
        raise InputError(
            f"{op}: {name} must start at 0 and end at the number of rows ({n_rows}), "
            f"got {host[0]} ... {host[-1]}"
        )
    for b in range(len(host) - 1):
        if host[b + 1] < host[b]:
            raise InputError(
                f"{op}: {name} must be non-decreasing, but {name}[{b + 1}] = {host[b + 1]} < "
                f"{name}[{b}] = {host[b]}"
            )


def check_offset_pair(
    op: str,
    q_offsets: torch.Tensor | None,
    kv_offsets: torch.Tensor | None,
    n_q: int,
    n_kv: int,
    device: torch.device,
    validate: bool,
) -> None:
    if (q_offsets is None) != (kv_offsets is None):
        raise InputError(f"{op}: give both q_offsets and kv_offsets, or neither (one user)")
    if q_offsets is None:
        return
    if q_offsets.dim() == 1 and kv_offsets.dim() == 1 and q_offsets.numel() != kv_offsets.numel():
        raise InputError(
            f"{op}: q_offsets and kv_offsets must describe the same users: lengths "
            f"{q_offsets.numel()} and {kv_offsets.numel()} differ"
        )
    check_offsets(op, "q_offsets", q_offsets, n_q, device, validate)
    check_offsets(op, "kv_offsets", kv_offsets, n_kv, device, validate)


def check_scale(op: str, scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"{op}: scale must be a number, got {scale!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{op}: scale must be finite, got {scale!r}")
    return value


def check_triton_head_dim(op: str, head_dim: int) -> None:
    if head_dim > MAX_TRITON_HEAD_DIM:
        raise InputError(
            f"{op}: the Triton kernels support head_dim <= {MAX_TRITON_HEAD_DIM}, got {head_dim}; "
            "use backend='torch'"
        )
