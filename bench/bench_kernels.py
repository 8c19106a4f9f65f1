"""The kernel ops of folded inference (:mod:`srp4ctr.kernels`) against what torch offers.

Run explicitly, or through ``srp4ctr bench``::

    python -m pytest bench/bench_kernels.py --benchmark-json=bench/results/kernels.json

Ops and providers (one table per op; the eager-torch baseline in brackets):

- candidate attention (each user's candidates attend to that user's cached K/V) [``sdpa``]:
  ``triton`` (``candidate_attention(backend="triton")``, CUDA only), ``reference`` (the torch
  reference, fp32 inside), ``sdpa`` (``F.scaled_dot_product_attention`` with one batch per user,
  K/V as views) and ``naive`` (every candidate gets its user's K/V copied, then SDPA; skipped
  where the copy would exceed ``NAIVE_MAX_BYTES`` on CPU or half the free memory of the GPU).
- Q-Former pooling (M shared queries over every user's states) [``sdpa``]: ``triton``,
  ``reference``, ``sdpa`` (batched over users).
- the candidate tower (LN -> W_Q -> attention -> W_O -> residual -> LN -> FFN -> residual, every
  layer) [``eager``]: ``triton`` (the fused kernel, one launch per layer), ``reference``,
  ``eager`` (LayerNorm / Linear / SDPA, as a user would write it: ``gpu_bench.eager_tower``).

Shapes: on CPU, fp32 at the serving model's size (d = 64 as 2 heads of 32, history 200,
C = 4096; smaller in a smoke run); on CUDA, bf16 at the shapes of ``../shared/performance.md`` /
``bench/gpu_bench.py`` (d = 128 as 4 heads of 32, history 1024), named as there. The CUDA cases
(and so every ``triton`` case: under the Triton CPU interpreter a kernel's time means nothing) are
skipped without a GPU, with the reason. On a GPU each timed call ends with
``torch.cuda.synchronize()``; ``bench/gpu_bench.py`` remains the careful GPU measurement (L2
flushed before every run, correctness first).

``extra_info``: FLOPs (4·Nq·L·d for attention, 4·users·M·L·d for pooling, per tower layer
C·(4d² + 4Ld + 4d·d_ff)), the minimum bytes moved (inputs and outputs once, K/V once), shapes and
dtype, so that the report gives fractions of the GEMM rate and of the copy bandwidth.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see conftest)
from dataclasses import dataclass

import benchlib
import pytest
import torch
import torch.nn.functional as F

NAIVE_MAX_BYTES = 1 << 30  # on CPU; on CUDA half the free memory
ATTENTION, POOL, TOWER = "candidate attention", "Q-Former pooling", "candidate tower"
BASELINES = {ATTENTION: "sdpa", POOL: "sdpa", TOWER: "eager"}
PROVIDERS = {ATTENTION: ("triton", "reference", "sdpa", "naive"),
             POOL: ("triton", "reference", "sdpa"),
             TOWER: ("triton", "reference", "eager")}


@dataclass(frozen=True)
class Case:
    """One shape: ``users`` users with ``c`` candidates (attention, tower) or ``c`` = M queries
    (pooling) each, history ``length``, ``heads`` x ``head_dim``."""

    name: str
    op: str
    device: str
    users: int
    c: int
    length: int
    heads: int
    head_dim: int
    layers: int = 1

    @property
    def d(self) -> int:
        return self.heads * self.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32


_S = benchlib.SMOKE
CASES = [
    Case("1 user, C=4096, L=200, d=64" if not _S else "smoke 1 user", ATTENTION, "cpu",
         1, 4096 if not _S else 64, 200 if not _S else 33, 2, 32),
    Case("16 users x C=256, L=200, d=64" if not _S else "smoke 3 users", ATTENTION, "cpu",
         16 if not _S else 3, 256 if not _S else 9, 200 if not _S else 17, 2, 32),
    Case("M=4, 256 users, L=200, d=64" if not _S else "smoke pool", POOL, "cpu",
         256 if not _S else 4, 4, 200 if not _S else 17, 2, 32),
    Case("2 layers, C=4096, L=200, d=64" if not _S else "smoke tower", TOWER, "cpu",
         1, 4096 if not _S else 64, 200 if not _S else 33, 2, 32, layers=2),
    # CUDA, bf16: performance.md's shapes (gpu_bench.ATTENTION_CASES / QFORMER_CASE / TOWER_CASE)
    Case("1 user, C=4096, L=1024", ATTENTION, "cuda", 1, 4096, 1024, 4, 32),
    Case("16 users x C=4096, L=1024", ATTENTION, "cuda", 16, 4096, 1024, 4, 32),
    Case("Q-Former M=32, 1024 users, L=1024", POOL, "cuda", 1024, 32, 1024, 4, 32),
    Case("tower 2 layers, C=4096, L=200, d=64, H=2", TOWER, "cuda", 1, 4096, 200, 2, 32,
         layers=2),
]
PARAMS = [pytest.param(case, p, id=f"{case.device}-{case.op}-{case.name}-{p}")
          for case in CASES for p in PROVIDERS[case.op] if case.device == "cuda" or p != "triton"]


def _flops_bytes(case: Case) -> tuple[int, int]:
    elt = torch.empty((), dtype=case.dtype).element_size()
    n_q, n_kv, d = case.users * case.c, case.users * case.length, case.d
    if case.op == ATTENTION:
        return 4 * n_q * case.length * d, elt * d * (2 * n_q + 2 * n_kv)
    if case.op == POOL:
        return 4 * n_kv * case.c * d, elt * d * (2 * n_kv + case.users * case.c + case.c)
    d_ff = 4 * d
    flops = case.layers * n_q * (4 * d * d + 4 * case.length * d + 4 * d * d_ff)
    return flops, elt * case.layers * (2 * n_q * d + 2 * case.length * d)


def _inputs(case: Case):
    from srp4ctr.kernels.testing import offsets_from_lengths

    g = torch.Generator().manual_seed(0)
    dev, dt, H, Dh = case.device, case.dtype, case.heads, case.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt)

    n_q, n_kv = case.users * case.c, case.users * case.length
    x = {"k": rnd(n_kv, H, Dh), "v": rnd(n_kv, H, Dh)}
    if case.op == POOL:
        x["q"] = rnd(case.c, H, Dh)
    elif case.op == ATTENTION:
        x["q"] = rnd(n_q, H, Dh)
    if case.users > 1:
        x["q_off"] = offsets_from_lengths([case.c] * case.users, dev)
        x["kv_off"] = offsets_from_lengths([case.length] * case.users, dev)
    else:
        x["q_off"] = x["kv_off"] = None
    if case.op == TOWER:
        from srp4ctr.kernels.testing import random_tower_params

        x["z"] = rnd(case.c, case.d)
        x["kvs"] = [(rnd(case.length, H, Dh), rnd(case.length, H, Dh))
                    for _ in range(case.layers)]
        x["params"] = [random_tower_params(case.d, 4 * case.d, dt, dev, g)
                       for _ in range(case.layers)]
    return x


def _callable(case: Case, provider: str):
    """The timed call of ``provider`` on ``case`` (inputs built once, outside the timing)."""
    from srp4ctr import kernels

    x = _inputs(case)
    U, C, L, H, Dh = case.users, case.c, case.length, case.heads, case.head_dim
    k, v = x["k"], x["v"]
    if case.op == ATTENTION:
        q = x["q"]
        if provider in ("triton", "reference"):
            backend = "triton" if provider == "triton" else "torch"
            return lambda: kernels.candidate_attention(q, k, v, x["q_off"], x["kv_off"],
                                                       backend=backend, validate=False)
        q4 = q.view(U, C, H, Dh).transpose(1, 2)
        k4, v4 = (t.view(U, L, H, Dh).transpose(1, 2) for t in (k, v))
        if provider == "sdpa":
            return lambda: F.scaled_dot_product_attention(q4, k4, v4)
        copied = 2 * U * C * L * case.d * k.element_size()
        limit = NAIVE_MAX_BYTES if case.device == "cpu" else torch.cuda.mem_get_info()[0] // 2
        if copied > limit:
            pytest.skip(f"naive: would copy {copied / 2**30:.1f} GiB of K/V "
                        f"(limit {limit / 2**30:.1f} GiB)")
        user_of = torch.arange(U, device=case.device).repeat_interleave(C)

        def naive():
            kb = k.view(U, L, H, Dh).index_select(0, user_of).transpose(1, 2)
            vb = v.view(U, L, H, Dh).index_select(0, user_of).transpose(1, 2)
            return F.scaled_dot_product_attention(q[:, :, None, :], kb, vb)

        return naive
    if case.op == POOL:
        qs = x["q"]
        if provider in ("triton", "reference"):
            backend = "triton" if provider == "triton" else "torch"
            kv_off = x["kv_off"]
            return lambda: kernels.query_pool(qs, k, v, kv_off, backend=backend, validate=False)
        q4 = qs.transpose(0, 1)[None].expand(U, H, C, Dh)
        k4, v4 = (t.view(U, L, H, Dh).transpose(1, 2) for t in (k, v))
        return lambda: F.scaled_dot_product_attention(q4, k4, v4)
    z, kvs, params = x["z"], x["kvs"], x["params"]
    if provider == "eager":
        from gpu_bench import eager_tower

        return lambda: eager_tower(z, kvs, params)
    backend = "triton" if provider == "triton" else "torch"
    return lambda: kernels.candidate_tower(z, kvs, params, backend=backend, validate=False)


@pytest.mark.parametrize(("case", "provider"), PARAMS)
def test_kernel(benchmark, case, provider):
    """One op, shape and provider, timed by pytest-benchmark (median over the rounds)."""
    if case.device == "cuda" and (reason := benchlib.cuda_unavailable()) is not None:
        pytest.skip(reason)
    if provider == "triton":
        from srp4ctr.kernels import triton_available

        if not triton_available():
            pytest.skip("triton is not installed")
    fn = _callable(case, provider)
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    def timed():
        out = fn()
        sync()
        return out

    with torch.no_grad():
        benchlib.timed(benchmark, timed, 10 if provider == "naive" else 20, 2)
    flops, nbytes = _flops_bytes(case)
    benchlib.record(
        benchmark, table=f"{case.op} ({case.device}, {str(case.dtype).removeprefix('torch.')})",
        case=case.name, provider=provider, baseline=BASELINES[case.op], flops=flops,
        min_bytes=nbytes, dtype=str(case.dtype).removeprefix("torch."), device=case.device,
        users=case.users, c=case.c, history=case.length, heads=case.heads,
        head_dim=case.head_dim, layers=case.layers,
    )
