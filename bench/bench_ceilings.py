"""The machine's ceilings, measured in the same run as the suites: the roofline the report divides
every case's achieved FLOP rate by.

Run explicitly, or through ``srp4ctr bench`` (which always runs it first)::

    python -m pytest bench/bench_ceilings.py --benchmark-json=bench/results/ceilings.json

Cases (``extra_info["ceiling"]`` names what each measures; rate = ``flops`` / median time):

- ``gemm``: ``torch.matmul`` of two square n x n matrices, n = 2048 on CPU (256 in a smoke run),
  in float32 and bfloat16 — the GEMM rate at the same thread count as every provider
  (``SRP4CTR_BENCH_THREADS``).
- ``skinny``: ``[4096 x 64] x [64 x 256]`` in float32 and bfloat16, the shape of the candidate
  tower's projections at d = 64 (the rate a small-d model can expect from BLAS).
- ``copy``: ``dst.copy_(src)`` of 256 MiB of float32 (read + write bytes / time), the memory
  bandwidth a memory-bound op can reach.

On a CUDA machine the same three are measured on the GPU too (bf16 GEMM at n = 8192, a 1 GiB
copy); without CUDA those cases are skipped with the reason.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see conftest)

import benchlib
import pytest
import torch

TABLE = "ceilings"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _device_or_skip(device: str) -> None:
    if device == "cuda" and (reason := benchlib.cuda_unavailable()) is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["gemm", "skinny"])
def test_gemm_rate(benchmark, kind, dtype, device):
    """``torch.matmul`` rate: square n^3 (``gemm``) or ``[4096x64]x[64x256]`` (``skinny``)."""
    _device_or_skip(device)
    if kind == "gemm":
        n = benchlib.pick(8192 if device == "cuda" else 2048, 256)
        m, k, n_ = n, n, n
    else:
        m, k, n_ = 4096, 64, 256
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device, DTYPES[dtype])
    b = torch.randn(k, n_, generator=g).to(device, DTYPES[dtype])
    sync = _sync(device)

    def fn():
        out = torch.matmul(a, b)
        sync()
        return out

    benchlib.timed(benchmark, fn, 10 if kind == "gemm" else 50, 2)
    benchlib.record(benchmark, table=TABLE, case=f"{kind} {m}x{k}x{n_} {dtype}",
                    provider=f"torch.matmul ({device})", ceiling=kind, flops=2 * m * k * n_,
                    dtype=dtype, device=device, shape=[m, k, n_])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_copy_bandwidth(benchmark, device):
    """``dst.copy_(src)``: bytes read + written per second."""
    _device_or_skip(device)
    numel = benchlib.pick((2**28 if device == "cuda" else 2**26), 2**20)
    src = torch.randn(numel).to(device)
    dst = torch.empty_like(src)
    sync = _sync(device)

    def fn():
        dst.copy_(src)
        sync()

    benchlib.timed(benchmark, fn, 20, 2)
    nbytes = 2 * numel * src.element_size()  # read + written
    benchlib.record(benchmark, table=TABLE, case=f"copy {numel * src.element_size() >> 20} MiB",
                    provider=f"tensor.copy_ ({device})", ceiling="copy", min_bytes=nbytes,
                    dtype="float32", device=device, numel=numel)
