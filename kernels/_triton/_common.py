"""Pieces shared by the Triton kernels.

- :func:`autotune` wraps ``triton.autotune`` once: under the interpreter it keeps a single small
  config (timing configs on CPU would be pointless and slow; read when a kernel module is
  imported). On a GPU, ``SRP4CTR_TRITON_AUTOTUNE=0`` or :func:`set_autotuning` (False) keeps only
  the first config that survives pruning.
- :func:`_locate_tile` maps a program id to (user, candidate tile of that user) for jagged batches,
  in the kernel, so the launcher needs neither a host synchronisation nor an extra launch.
- :func:`_attend` is the FlashAttention-2 style inner loop over one user's keys and values, shared
  by candidate attention, query pooling and the fused tower layer.

Every dot accumulates in fp32. fp32 inputs use ``input_precision="ieee"`` (exact fp32 products,
the project's exact mode); fp16/bf16 inputs use the tensor cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._backend import interpreting

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the cheap instruction


_AUTOTUNERS: list = []  # every kernel wrapped by autotune(), for set_autotuning()
_TUNING = {"enabled": os.environ.get("SRP4CTR_TRITON_AUTOTUNE", "1") != "0"}


def autotune(configs, key, interpreter_config, prune_configs_by=None):
    """``triton.autotune`` with one config under the interpreter (see the module docstring)."""
    if interpreting():
        return triton.autotune(configs=[interpreter_config], key=key)
    user_prune = (prune_configs_by or {}).get("early_config_prune")

    def prune(configs, named_args, **kwargs):
        kept = user_prune(configs, named_args, **kwargs) if user_prune else configs
        return kept if _TUNING["enabled"] else kept[:1]

    def decorate(fn):
        tuner = triton.autotune(
            configs=configs, key=key, prune_configs_by={"early_config_prune": prune}
        )(fn)
        _AUTOTUNERS.append(tuner)
        return tuner

    return decorate


def set_autotuning(enabled: bool) -> None:
    """Switch autotuning on or off (off: the first config that survives pruning, no timing) and
    forget the configs chosen so far. Checks of many shapes run faster with it off."""
    _TUNING["enabled"] = bool(enabled)
    for tuner in _AUTOTUNERS:
        getattr(tuner, "cache", {}).clear()


def length_bucket(n: int) -> int:
    """Lengths rounded up to a power of two (>= 16): the autotune keys, so tuning happens per
    bucket rather than per length."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def head_block(head_dim: int) -> int:
    """The padded head dim a kernel works on: a power of two (tl.arange) and >= 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    return (
        "ieee" if dtype == torch.float32 else "tf32"
    )  # tf32 is only the default: unused for 16-bit


def scaled_log2(scale: float) -> float:
    """The score scale with log2(e) folded in, for exp2."""
    return float(scale) * LOG2E


def strides(name: str, t: torch.Tensor, axes: str) -> dict[str, int]:
    """Launch keywords ``stride_<name><axis>=t.stride(i)`` for the first ``len(axes)`` dims of
    ``t``: ``strides("k", k, "nhd")`` gives ``stride_kn``, ``stride_kh``, ``stride_kd``."""
    return {f"stride_{name}{a}": st for a, st in zip(axes, t.stride())}


@triton.jit
def _locate_tile(Offsets, n_users, pid, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """The user owning candidate tile ``pid`` and the tile's index inside that user.

    User b owns ceil(C_b / BLOCK_M) consecutive tiles, C_b = Offsets[b+1] - Offsets[b]. Returns
    user -1 for a pid past the last tile (the grid is an upper bound on the tile count).
    """
    user = tl.full([], -1, tl.int32)
    tile = tl.full([], 0, tl.int32)
    base = tl.full([], 0, tl.int32)  # tiles owned by the users before this chunk
    for start in range(0, n_users, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        valid = b < n_users
        lo = tl.load(Offsets + b, mask=valid, other=0)
        hi = tl.load(Offsets + b + 1, mask=valid, other=0)
        n_tiles = tl.where(valid, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0).to(tl.int32)
        end = base + tl.cumsum(n_tiles, 0)  # one past each user's last tile
        hit = (pid < end) & (pid >= end - n_tiles)
        user = tl.maximum(user, tl.max(tl.where(hit, b, -1), 0))
        tile += tl.sum(tl.where(hit, pid - (end - n_tiles), 0), 0)
        base += tl.sum(n_tiles, 0)
    return user, tile


@triton.jit
def _attend_step(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    start_n,
    kv_len,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    MASK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One BLOCK_N slice of keys/values folded into the running (acc, max, sum) of online softmax."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (BLOCK_D, BLOCK_N)
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)
    if MASK_N:
        n_ok = offs_n < kv_len
        if EVEN_D:
            kt = tl.load(kt_ptrs, mask=n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            d_ok = offs_d < HEAD_DIM
            kt = tl.load(kt_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d < HEAD_DIM
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)

    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every slice holds at least one real key
    alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max (0 at the start)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend(
    q,
    K,
    V,
    kv_len,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """softmax(q K^T * scale) V for one tile of queries against one user's K/V of one head.

    q: (BLOCK_M, BLOCK_D) in the input dtype, columns past HEAD_DIM zero. K, V: pointers to the
    user's first key/value row of this head; kv_len rows. qk_scale includes log2(e).
    Returns (BLOCK_M, BLOCK_D) fp32; rows are zero when kv_len == 0 (a user with no history).
    """
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Full slices without a length mask, then at most one masked tail slice.
    n_full = (kv_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_step(
            acc, m_i, l_i, q, K, V, start_n, kv_len,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_N, BLOCK_D, EVEN_D, False, DOT_PRECISION,
        )  # fmt: skip
    if n_full < kv_len:
        acc, m_i, l_i = _attend_step(
            acc, m_i, l_i, q, K, V, n_full, kv_len,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_N, BLOCK_D, EVEN_D, True, DOT_PRECISION,
        )  # fmt: skip
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # no history: acc is all zeros and stays so
    return acc / l_i[:, None]
