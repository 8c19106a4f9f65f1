"""Comparing a kernel's output with its fp32 reference: one tolerance table, one verbose check.

Used by the test suite and by ``bench/gpu_bench.py`` (correctness on the GPU), so both judge with
the same numbers.

The tolerances were sized from the error of *plain low-precision torch* (the references with
``upcast=False``) against the fp32 reference on random normal inputs, then given a margin of about
4x: a kernel may round differently from torch, but not be much worse. Part of the 16-bit budget is
the final rounding of the output itself (half an ulp: 2^-9 relative in bf16, 2^-12 in fp16). The
tower gets more room than attention: it rounds h, q, p, a, LN2(z) and the GELU output to the
input dtype before its matmuls, and its outputs are larger (|z| ~ 5).
"""

from __future__ import annotations

import torch

#: TOLERANCES[op][dtype] = (atol, rtol); an element passes if |actual - expected| <= atol + rtol*|expected|.
TOLERANCES: dict[str, dict[torch.dtype, tuple[float, float]]] = {
    "attention": {  # candidate_attention, query_pool
        torch.float32: (2e-5, 2e-5),
        torch.float16: (5e-3, 5e-3),
        torch.bfloat16: (2e-2, 2e-2),
    },
    "tower": {  # candidate_tower_layer, candidate_tower
        torch.float32: (1e-4, 1e-4),
        torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (6e-2, 3e-2),
    },
}


def tolerance(op: str, dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[op][dtype]


def mismatch_report(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    rtol: float,
    name: str = "output",
    limit: int = 8,
) -> str | None:
    """None when ``actual`` matches ``expected``; else a message listing the mismatches.

    NaN/inf in ``actual`` where ``expected`` is finite (an unwritten, NaN-poisoned tile, say)
    always counts as a mismatch.
    """
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN compares False, so NaN/inf errors count as bad
    bad &= ~(torch.isnan(a) & torch.isnan(e))  # NaN where the reference has NaN is agreement
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    finite = err[torch.isfinite(err)]
    lines = [
        f"{name}: {n_bad} of {a.numel()} elements differ beyond atol={atol:g}, rtol={rtol:g} "
        f"(max finite abs error {float(finite.max()) if finite.numel() else float('nan'):.3e}, "
        f"{int(torch.isnan(a).sum())} NaN in actual)"
    ]
    for idx in bad.nonzero()[:limit].tolist():
        i = tuple(idx)
        lines.append(f"  at {i}: actual {float(a[i]):+.6g}, expected {float(e[i]):+.6g}")
    if n_bad > limit:
        lines.append(f"  ... and {n_bad - limit} more")
    return "\n".join(lines)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    op: str = "attention",
    dtype: torch.dtype | None = None,
    name: str = "output",
) -> None:
    """Assert ``actual`` matches ``expected`` within ``TOLERANCES[op][dtype]`` (dtype defaults to
    actual's); the failure message lists the first mismatches."""
    atol, rtol = tolerance(op, dtype or actual.dtype)
    report = mismatch_report(actual, expected, atol, rtol, name)
    if report is not None:
        raise AssertionError(report)


def offsets_from_lengths(lengths, device=None) -> torch.Tensor:
    """int64 [B+1] offsets from per-user lengths: [0, l0, l0+l1, ...]."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0)
    return out.to(device) if device is not None else out


def random_tower_params(d: int, d_ff: int, dtype=torch.float32, device=None, generator=None):
    """Random :class:`~srp4ctr.kernels.TowerLayerParams` scaled like a trained layer (unit-ish
    activations): weights ~ N(0, 1/fan_in), LayerNorm gains near 1, small biases."""
    from ._params import TowerLayerParams

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=generator) * std + mean

    params = TowerLayerParams(
        ln1_w=randn(d, std=0.1, mean=1.0),
        ln1_b=randn(d, std=0.1),
        wq=randn(d, d, std=d**-0.5),
        bq=randn(d, std=0.1),
        wo=randn(d, d, std=d**-0.5),
        bo=randn(d, std=0.1),
        ln2_w=randn(d, std=0.1, mean=1.0),
        ln2_b=randn(d, std=0.1),
        w1=randn(d_ff, d, std=d**-0.5),
        b1=randn(d_ff, std=0.1),
        w2=randn(d, d_ff, std=d_ff**-0.5),
        b2=randn(d, std=0.1),
    )
    return params.to(device=device, dtype=dtype)
