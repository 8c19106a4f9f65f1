"""Triton kernel for one whole candidate-tower layer in a single launch.

Per program: BLOCK_M candidates of one user (tiles located as in candidate attention), all d
columns of their state in registers (d <= 256). In order, without leaving the program:

    h  = LN1(z)                                        (BLOCK_M, d)  fp32 statistics
    for each head:  q_h = h @ Wq[h]^T + bq[h]          (BLOCK_M, Dh)
                    a_h = softmax(q_h K_h^T * s) V_h   (the shared ``_attend`` loop over the user's K/V)
                    o  += a_h @ Wo[:, h]^T             (BLOCK_M, d)  the O projection, head by head
    z  = z + o + bo
    for each BLOCK_F slice of the FFN:  o2 += gelu(LN2(z) @ W1[f]^T + b1[f]) @ W2[:, f]^T
    z  = z + o2 + b2                                   stored once

so the only HBM traffic is z in, z out, the user's K/V (hot in L2 across a user's tiles) and the
weights (hot in L2 across all tiles). The [BLOCK_M, 4d] FFN intermediate never exists in full.

Differences from the reference (fp32 throughout): the matmul operands h, q, p, a, LN2(z) and the
GELU output are rounded to the input dtype before each tl.dot (fp32 accumulation); weights of
another float dtype are rounded to the input dtype when loaded. In fp32 the kernel matches the
reference to rounding. Widths above 256 are not handled here: the public op then composes torch
linear layers around the Triton attention kernel instead.
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

BLOCK_B = 256


def model_block(d_model: int) -> int:
    return max(16, triton.next_power_of_2(d_model))


def _configs():
    # From sm_90 register reports: 8 warps keep the three [BLOCK_M, d] fp32 tiles out of local
    # memory; at d = 256 only 32x32 (or smaller) slices avoid spilling.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_F": bf}, num_warps=w, num_stages=2)
        for bm, bn, bf, w in [
            (64, 64, 64, 8),
            (64, 64, 32, 8),
            (32, 64, 32, 8),
            (32, 32, 32, 8),
            (16, 32, 32, 8),
            (16, 64, 32, 4),
        ]
    ]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block_dm = model_block(args["D_MODEL"])
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm * block_dm > 64 * 128 or (block_dm >= 256 and bn > 32):
            continue
        if args["AUTOTUNE_Q"] <= 16 and bm > 32:
            continue
        kept.append(c)
    kept = kept or configs[-2:-1]
    if args["DOT_PRECISION"] == "ieee":  # fp32 (exact mode): slow to compile, not the fast path
        kept = [c for c in kept if c.kwargs["BLOCK_N"] == 32][:1] or kept[-1:]
    return kept


INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_F": 16}


@triton.jit
def _layer_norm_rows(x, W, B, cols, col_ok, eps, D_MODEL: tl.constexpr):
    """LayerNorm over the first D_MODEL columns of x (BLOCK_M, BLOCK_DM) fp32, padding zero."""
    mean = tl.sum(x, 1) / D_MODEL
    xc = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / D_MODEL
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * w[None, :] + b[None, :]  # padded columns: w = b = 0


@triton.heuristics(
    {
        "BLOCK_D": lambda a: head_block(a["HEAD_DIM"]),
        "EVEN_D": lambda a: head_block(a["HEAD_DIM"]) == a["HEAD_DIM"],
        "BLOCK_DM": lambda a: model_block(a["D_MODEL"]),
        "IS_JAGGED": lambda a: a["QOff"] is not None,
    }
)
@autotune(
    configs=_configs(),
    key=["AUTOTUNE_Q", "AUTOTUNE_L", "D_MODEL", "HEAD_DIM", "D_FF", "IS_JAGGED"],
    interpreter_config=triton.Config(INTERPRETER_BLOCKS, num_warps=4, num_stages=1),
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["n_q", "n_kv", "n_users"])
def _candidate_tower_layer_fwd_kernel(
    Z,
    K,
    V,
    Out,
    QOff,
    KVOff,
    LN1W,
    LN1B,
    WQ,
    BQ,
    WO,
    BO,
    LN2W,
    LN2B,
    W1,
    B1,
    W2,
    B2,
    n_q,
    n_kv,
    n_users,
    qk_scale,
    eps,
    stride_zm,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_om,
    AUTOTUNE_Q,
    AUTOTUNE_L,
    D_MODEL: tl.constexpr,
    N_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_FF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_DM: tl.constexpr,
    IS_JAGGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    if IS_JAGGED:
        user, tile = _locate_tile(QOff, n_users, pid, BLOCK_M, BLOCK_B)
        if user < 0:
            return
        q_end = tl.load(QOff + user + 1)
        kv_start = tl.load(KVOff + user)
        kv_len = (tl.load(KVOff + user + 1) - kv_start).to(tl.int32)
        row0 = tl.load(QOff + user) + tile * BLOCK_M
    else:
        q_end = n_q
        kv_start = 0
        kv_len = n_kv
        row0 = pid * BLOCK_M
    dt = Z.dtype.element_ty

    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_DM)
    row_ok = rows < q_end
    col_ok = cols < D_MODEL
    io_mask = row_ok[:, None] & col_ok[None, :]
    z = tl.load(Z + rows[:, None] * stride_zm + cols[None, :], mask=io_mask, other=0.0)
    z = z.to(tl.float32)  # (BLOCK_M, BLOCK_DM) the residual stream, kept in fp32

    # --- attention block: z += (softmax(LN1(z) Wq^T K^T) V) Wo^T + bo, one head at a time ---
    h = _layer_norm_rows(z, LN1W, LN1B, cols, col_ok, eps, D_MODEL).to(dt)
    offs_hd = tl.arange(0, BLOCK_D)
    hd_ok = offs_hd < HEAD_DIM
    proj = tl.zeros([BLOCK_M, BLOCK_DM], tl.float32)
    for hh in range(N_HEADS):
        feat = hh * HEAD_DIM + offs_hd  # this head's columns of q / rows of Wq
        wq_t = tl.load(
            WQ + feat[None, :] * D_MODEL + cols[:, None],
            mask=col_ok[:, None] & hd_ok[None, :],
            other=0.0,
        ).to(dt)  # (BLOCK_DM, BLOCK_D) = Wq[feat, :]^T
        bq = tl.load(BQ + feat, mask=hd_ok, other=0.0).to(tl.float32)
        q = tl.dot(h, wq_t, input_precision=DOT_PRECISION) + bq[None, :]  # (BLOCK_M, BLOCK_D)
        a = _attend(
            q.to(dt),
            K + kv_start * stride_kn + hh * stride_kh,
            V + kv_start * stride_vn + hh * stride_vh,
            kv_len, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION,
        )  # fmt: skip
        wo_t = tl.load(
            WO + cols[None, :] * D_MODEL + feat[:, None],
            mask=hd_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(dt)  # (BLOCK_D, BLOCK_DM) = Wo[:, feat]^T
        proj = tl.dot(a.to(dt), wo_t, proj, input_precision=DOT_PRECISION)
    bo = tl.load(BO + cols, mask=col_ok, other=0.0).to(tl.float32)
    z = z + proj + bo[None, :]

    # --- FFN block: z += gelu(LN2(z) W1^T + b1) W2^T + b2, BLOCK_F hidden units at a time ---
    h = _layer_norm_rows(z, LN2W, LN2B, cols, col_ok, eps, D_MODEL).to(dt)
    offs_f = tl.arange(0, BLOCK_F)
    proj = tl.zeros([BLOCK_M, BLOCK_DM], tl.float32)
    for f0 in range(0, D_FF, BLOCK_F):
        f = f0 + offs_f
        f_ok = f < D_FF
        w1_t = tl.load(
            W1 + f[None, :] * D_MODEL + cols[:, None],
            mask=col_ok[:, None] & f_ok[None, :],
            other=0.0,
        ).to(dt)  # (BLOCK_DM, BLOCK_F) = W1[f, :]^T
        b1 = tl.load(B1 + f, mask=f_ok, other=0.0).to(tl.float32)
        u = tl.dot(h, w1_t, input_precision=DOT_PRECISION) + b1[None, :]
        u = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))  # exact GELU: x * Phi(x)
        w2_t = tl.load(
            W2 + cols[None, :] * D_FF + f[:, None],
            mask=f_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(dt)  # (BLOCK_F, BLOCK_DM) = W2[:, f]^T
        proj = tl.dot(u.to(dt), w2_t, proj, input_precision=DOT_PRECISION)
    b2 = tl.load(B2 + cols, mask=col_ok, other=0.0).to(tl.float32)
    z = z + proj + b2[None, :]

    tl.store(Out + rows[:, None] * stride_om + cols[None, :], z.to(dt), mask=io_mask)


def candidate_tower_layer_fwd(
    z: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params,
    q_offsets: torch.Tensor | None,
    kv_offsets: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Launch the fused layer on validated inputs (meant for d <= 256, see the module docstring)."""
    n_q, d_model = z.shape
    n_kv, heads, head_dim = k.shape
    if z.stride(1) != 1:
        z = z.contiguous()
    p = [t.contiguous() for t in params]
    out = torch.empty((n_q, d_model), dtype=z.dtype, device=z.device)
    if n_q == 0:
        return out
    n_users = 1 if q_offsets is None else q_offsets.numel() - 1

    def grid(meta):
        return (triton.cdiv(n_q, meta["BLOCK_M"]) + (n_users if q_offsets is not None else 0),)

    _candidate_tower_layer_fwd_kernel[grid](
        Z=z,
        K=k,
        V=v,
        Out=out,
        QOff=q_offsets,
        KVOff=kv_offsets,
        LN1W=p[0],
        LN1B=p[1],
        WQ=p[2],
        BQ=p[3],
        WO=p[4],
        BO=p[5],
        LN2W=p[6],
        LN2B=p[7],
        W1=p[8],
        B1=p[9],
        W2=p[10],
        B2=p[11],
        n_q=n_q,
        n_kv=n_kv,
        n_users=n_users,
        qk_scale=scaled_log2(head_dim**-0.5),
        eps=eps,
        stride_zm=z.stride(0),
        **strides("k", k, "nhd"),
        **strides("v", v, "nhd"),
        stride_om=out.stride(0),
        AUTOTUNE_Q=length_bucket(n_q // n_users),
        AUTOTUNE_L=length_bucket(n_kv // n_users),
        D_MODEL=d_model,
        N_HEADS=heads,
        HEAD_DIM=head_dim,
        D_FF=p[8].shape[0],
        DOT_PRECISION=dot_precision(z.dtype),
        BLOCK_B=BLOCK_B,
    )
    return out
