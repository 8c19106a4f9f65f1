"""Triton kernel for candidate cross-attention over cached per-user keys and values.

Algorithm: FlashAttention-2 forward (online softmax, exp2, fp32 accumulators) where each program
owns BLOCK_M candidates of ONE user and one head, and streams that user's K/V in BLOCK_N slices.
K/V are never copied per candidate: every candidate tile of a user reads the same K/V rows, which
stay hot in L2 because the grid is (candidate tiles, heads) with the tile axis fastest, so the
tiles of one user and head run next to each other (the IKBO ordering).

Jagged batches: user b owns ceil(C_b / BLOCK_M) tiles. The grid has cdiv(Nq, BLOCK_M) + B
programs along axis 0, an upper bound on the tile count, and each program finds its (user, tile)
from the offsets in the kernel (``_locate_tile``); programs past the last tile exit at once. So the
launch needs no host synchronisation and works under CUDA-graph capture.

Differences from the reference: the reference computes in fp32; here the products q·k and p·v use
the input dtype (p is rounded to it) with fp32 accumulation, as every flash kernel does. Rows whose
user has no history are written as zeros, like the reference.

Layouts: q [Nq, H, Dh], k/v [Nkv, H, Dh], out [Nq, H, Dh]; any strides. Head dims that are not a
power of two (or are below 16) are padded inside the kernel with masked loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _attend,
    _locate_tile,
    autotune,
    dot_precision,
    head_block,
    length_bucket,
    scaled_log2,
    strides,
)

BLOCK_B = 256  # users scanned per step while locating a tile


def _configs():
    # Chosen from sm_90 register/shared-memory reports of the compiled variants: at head_dim 64
    # none of these spills; at 128 the 128-row tiles spill a little and the autotuner decides.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3),
            (128, 32, 8, 4),
            (64, 64, 8, 3),
            (64, 64, 4, 3),
            (64, 32, 4, 4),
            (32, 64, 4, 3),
        ]
    ]


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot pay off: tiles much taller than a user's candidate count, small
    tiles for many candidates, and 128-row tiles at head_dim >= 256 (they spill heavily)."""
    args = {**named_args, **kwargs}  # launch arguments may arrive either way
    per_user = args["AUTOTUNE_Q"]
    block_d = head_block(args["HEAD_DIM"])
    kept = []
    for c in configs:
        bm = c.kwargs["BLOCK_M"]
        if bm > max(32, per_user):
            continue
        if per_user >= 256 and bm < 64:
            continue
        if block_d >= 256 and bm > 64:
            continue
        kept.append(c)
    kept = kept or configs[-1:]
    if args["DOT_PRECISION"] == "ieee":  # fp32 (exact mode): slow to compile, not the fast path
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 64][:1] or kept[-1:]
    return kept


# The interpreter runs one Python step per block op: small tiles keep the tests' shapes small
# while still crossing tile boundaries.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


@triton.heuristics(
    {
        "BLOCK_D": lambda a: head_block(a["HEAD_DIM"]),
        "EVEN_D": lambda a: head_block(a["HEAD_DIM"]) == a["HEAD_DIM"],
        "IS_JAGGED": lambda a: a["QOff"] is not None,
    }
)
@autotune(
    configs=_configs(),
    key=["AUTOTUNE_Q", "AUTOTUNE_L", "HEAD_DIM", "IS_JAGGED"],
    interpreter_config=triton.Config(INTERPRETER_BLOCKS, num_warps=4, num_stages=1),
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["n_q", "n_kv", "n_users"])
def _candidate_attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    QOff,
    KVOff,
    n_q,
    n_kv,
    n_users,
    qk_scale,
    stride_qm,
    stride_qh,
    stride_qd,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_om,
    stride_oh,
    stride_od,
    AUTOTUNE_Q,
    AUTOTUNE_L,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    IS_JAGGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    if IS_JAGGED:
        user, tile = _locate_tile(QOff, n_users, pid, BLOCK_M, BLOCK_B)
        if user < 0:
            return
        q_start = tl.load(QOff + user)
        q_end = tl.load(QOff + user + 1)
        kv_start = tl.load(KVOff + user)
        kv_len = (tl.load(KVOff + user + 1) - kv_start).to(tl.int32)
        row0 = q_start + tile * BLOCK_M
    else:  # one user; the grid has exactly cdiv(n_q, BLOCK_M) tiles
        q_end = n_q
        kv_start = 0
        kv_len = n_kv
        row0 = pid * BLOCK_M

    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_end
    if EVEN_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = Q + rows[:, None] * stride_qm + head * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # (BLOCK_M, BLOCK_D)

    k_base = K + kv_start * stride_kn + head * stride_kh
    v_base = V + kv_start * stride_vn + head * stride_vh
    out = _attend(
        q, k_base, v_base, kv_len, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION,
    )  # fmt: skip

    o_ptrs = Out + rows[:, None] * stride_om + head * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=io_mask)


def candidate_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor | None,
    kv_offsets: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Launch the kernel on validated inputs (see ``srp4ctr.kernels.candidate_attention``)."""
    n_q, heads, head_dim = q.shape
    n_kv = k.shape[0]
    out = torch.empty((n_q, heads, head_dim), dtype=q.dtype, device=q.device)
    if n_q == 0:
        return out
    n_users = 1 if q_offsets is None else q_offsets.numel() - 1

    def grid(meta):
        n_tiles = triton.cdiv(n_q, meta["BLOCK_M"]) + (n_users if q_offsets is not None else 0)
        return (n_tiles, heads)

    _candidate_attention_fwd_kernel[grid](
        Q=q,
        K=k,
        V=v,
        Out=out,
        QOff=q_offsets,
        KVOff=kv_offsets,
        n_q=n_q,
        n_kv=n_kv,
        n_users=n_users,
        qk_scale=scaled_log2(scale),
        **strides("q", q, "mhd"),
        **strides("k", k, "nhd"),
        **strides("v", v, "nhd"),
        **strides("o", out, "mhd"),
        AUTOTUNE_Q=length_bucket(n_q // n_users),
        AUTOTUNE_L=length_bucket(n_kv // n_users),
        HEAD_DIM=head_dim,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_B=BLOCK_B,
    )
    return out
