"""Triton kernel for Q-Former query pooling: M queries (shared, or each user's) attend to each
user's states.

The operation is memory-bound (intensity ~M FLOP/byte), so the only thing that matters is reading
each user's K/V exactly once: one program per (user, head[, query tile]) holds all the queries of
its tile in registers and streams the user's K/V once with the same online-softmax loop as
candidate attention (``_attend``). Many users go in one launch; the grid is (B, H, query tiles),
so no host synchronisation is needed. With M <= 128 there is a single query tile.

Differences from the reference: products in the input dtype with fp32 accumulation (see
``candidate_attention``); empty users get zeros, like the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _attend,
    autotune,
    dot_precision,
    head_block,
    length_bucket,
    scaled_log2,
    strides,
)

MAX_BLOCK_Q = 128  # queries per program; more queries add programs (each re-reads K/V)


def query_block(n_queries: int) -> int:
    return min(MAX_BLOCK_Q, max(16, triton.next_power_of_2(n_queries)))


def _configs():
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(64, 8, 3), (32, 8, 3), (128, 8, 3), (32, 4, 3), (64, 4, 3)]
    ]


def _prune(configs, named_args, **kwargs):
    """Large query tiles with 4 warps spill registers (sm_90 reports): keep 8 warps there."""
    args = {**named_args, **kwargs}
    tile = query_block(args["n_queries"]) * head_block(args["HEAD_DIM"])
    if tile >= 32 * 128:
        configs = [c for c in configs if c.num_warps == 8]
    if args["DOT_PRECISION"] == "ieee":  # fp32 (exact mode): slow to compile, not the fast path
        configs = configs[:1]
    return configs


INTERPRETER_BLOCKS = {"BLOCK_N": 16}


@triton.heuristics(
    {
        "BLOCK_D": lambda a: head_block(a["HEAD_DIM"]),
        "EVEN_D": lambda a: head_block(a["HEAD_DIM"]) == a["HEAD_DIM"],
        "BLOCK_Q": lambda a: query_block(a["n_queries"]),
        "IS_JAGGED": lambda a: a["KVOff"] is not None,
    }
)
@autotune(
    configs=_configs(),
    key=["AUTOTUNE_L", "HEAD_DIM", "BLOCK_Q"],
    interpreter_config=triton.Config(INTERPRETER_BLOCKS, num_warps=4, num_stages=1),
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["n_kv"])
def _query_pool_fwd_kernel(
    Qry,
    K,
    V,
    Out,
    KVOff,
    n_queries,
    n_kv,
    qk_scale,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_qd,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    AUTOTUNE_L,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    IS_JAGGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    user = tl.program_id(0)
    head = tl.program_id(1)
    q_tile = tl.program_id(2)
    if IS_JAGGED:
        kv_start = tl.load(KVOff + user)
        kv_len = (tl.load(KVOff + user + 1) - kv_start).to(tl.int32)
    else:
        kv_start = 0
        kv_len = n_kv

    rows = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_queries
    if EVEN_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = Qry + user.to(tl.int64) * stride_qb + rows[:, None] * stride_qm + head * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # (BLOCK_Q, BLOCK_D)

    k_base = K + kv_start * stride_kn + head * stride_kh
    v_base = V + kv_start * stride_vn + head * stride_vh
    out = _attend(
        q, k_base, v_base, kv_len, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_Q, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION,
    )  # fmt: skip

    o_ptrs = (
        Out
        + user.to(tl.int64) * stride_ob
        + rows[:, None] * stride_om
        + head * stride_oh
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=io_mask)


def query_pool_fwd(
    queries: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Launch the kernel on validated inputs (see ``srp4ctr.kernels.query_pool``); queries
    [M, H, Dh] shared by every user (user stride 0) or [B, M, H, Dh]."""
    n_queries, heads, head_dim = queries.shape[-3:]
    n_kv = k.shape[0]
    n_users = 1 if kv_offsets is None else kv_offsets.numel() - 1
    out = torch.empty(
        (n_users, n_queries, heads, head_dim), dtype=queries.dtype, device=queries.device
    )
    if n_queries == 0:
        return out
    grid = (n_users, heads, triton.cdiv(n_queries, query_block(n_queries)))
    _query_pool_fwd_kernel[grid](
        Qry=queries,
        K=k,
        V=v,
        Out=out,
        KVOff=kv_offsets,
        n_queries=n_queries,
        n_kv=n_kv,
        qk_scale=scaled_log2(scale),
        **(strides("q", queries, "bmhd") if queries.dim() == 4
           else {"stride_qb": 0, **strides("q", queries, "mhd")}),
        **strides("k", k, "nhd"),
        **strides("v", v, "nhd"),
        **strides("o", out, "bmhd"),
        AUTOTUNE_L=length_bucket(n_kv // n_users),
        HEAD_DIM=head_dim,
        DOT_PRECISION=dot_precision(queries.dtype),
    )
    return out
