#!/usr/bin/env python
"""GPU benchmark of the srp4ctr kernels against what a user would otherwise run.

    python bench/gpu_bench.py --out bench/results/          # on a CUDA machine, ~3-5 minutes
    python bench/gpu_bench.py --from-json RESULT.json       # reprint a saved result (any machine)

In order:

1. Ceilings, measured here: the bf16 GEMM rate (8192^3 torch.matmul) and the device copy bandwidth
   (a 1 GiB device-to-device copy), which the kernels' figures are then compared with.
2. Correctness on the GPU: every op (candidate_attention, query_pool, candidate_tower_layer,
   candidate_tower) in bf16 and fp16 against the fp32 torch reference (autotuning off there),
   on several shapes including awkward ones (1 candidate, history 1, lengths off every block size,
   empty histories, unequal users, odd head dims, widths past the fused limit). Judged with
   ``srp4ctr.kernels.testing.TOLERANCES``; every check is recorded in the JSON.
3. Candidate attention on the performance.md shapes (d=128, 4 heads, bf16): ours, SDPA with one
   batch per user, K/V broadcast per candidate + SDPA (the naive way; skipped where it would not
   fit in memory) and torch.compile of the reference math; Q-Former pooling likewise (ours, SDPA,
   compiled reference). Medians of triton.testing.do_bench (which flushes L2 before every run).
4. The fused candidate tower for one whole request (2 layers, C=4096, L=200, d=64, 2 heads, bf16):
   ours, ours replayed through a CUDA graph, eager torch (LayerNorm/Linear/SDPA), torch.compile.

The table (us, TFLOP/s, fraction of the measured GEMM rate and of the copy bandwidth) is printed
last; the JSON (GPU name, driver, torch/triton/CUDA versions, date, every figure) goes to --out.
A time budget (--budget-s) skips what is left, saying so, rather than overrun.

``--smoke`` runs the same script on tiny shapes, on CUDA or, without one, on CPU under the Triton
interpreter (``TRITON_INTERPRET=1``) with wall-clock timing: it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA_EXIT = 2

# performance.md: d = 128 as 4 heads of 32, bf16.  (name, users, candidates per user, history)
ATTENTION_CASES = [
    ("1 user, C=4096, L=1024", 1, 4096, 1024),
    ("1 user, C=4096, L=256", 1, 4096, 256),
    ("1 user, C=4096, L=64", 1, 4096, 64),
    ("16 users x C=4096, L=1024", 16, 4096, 1024),
    ("64 users x C=512, L=1024", 64, 512, 1024),
]
QFORMER_CASE = ("Q-Former M=32, 1024 users, L=1024", 1024, 32, 1024)  # (name, users, M, history)
TOWER_CASE = ("tower 2 layers, C=4096, L=200, d=64, H=2", 4096, 200)  # (name, candidates, history)
HEADS, HEAD_DIM = 4, 32
TOWER_HEADS, TOWER_HEAD_DIM, TOWER_LAYERS = 2, 32, 2

# Correctness shapes, awkward on purpose. Attention: (case, candidates per user, history per user,
# heads, head_dim); pooling: (case, M, history per user, heads, head_dim); tower: attention's + d_ff.
CHECK_ATTENTION = [
    ("1 cand, L=1", [1], [1], 1, 16),
    ("C=4097 L=1025 Dh=128", [4097], [1025], 4, 128),
    (
        "7 unequal users incl. empty",
        [1, 0, 300, 65, 1000, 17, 129],
        [0, 5, 1023, 64, 2000, 1, 300],
        2,
        64,
    ),
    ("odd Dh=24, block+-1", [63, 129], [65, 127], 2, 24),
    ("Dh=40, 3 users", [33, 1, 200], [31, 200, 0], 4, 40),
]
CHECK_POOL = [
    ("M=32, 100 users incl. empty", 32, [0] + [(37 * i) % 1100 + 1 for i in range(99)], 4, 32),
    ("M=1, L=1", 1, [1], 1, 16),
    ("M=200 (2 tiles), Dh=128", 200, [129, 64, 0], 2, 128),
]
CHECK_TOWER = [
    ("C=4096 L=200 d=64", [4096], [200], 2, 32, 256),
    ("5 users d=64", [1, 0, 700, 65, 33], [200, 3, 0, 129, 1], 2, 32, 256),
    ("d=256 (4x64)", [300, 5], [64, 17], 4, 64, 1024),
    ("d=48 odd Dh", [129], [77], 2, 24, 96),
    ("d=272 composed", [100, 3], [50, 9], 2, 136, 544),
]

# --smoke: the same code paths on shapes the Triton interpreter gets through in seconds.
SMOKE = dict(
    attention=[("smoke 1 user", 1, 20, 33), ("smoke 3 users", 3, 17, 9)],
    qformer=("smoke Q-Former", 5, 4, 18),
    tower=("smoke tower", 19, 21),
    check_attention=[CHECK_ATTENTION[0], ("smoke unequal", [3, 0, 17], [0, 5, 16], 2, 24)],
    check_pool=[("smoke pool", 4, [0, 17, 3], 2, 16)],
    check_tower=[("smoke tower", [3, 0, 17], [4, 2, 0], 2, 16, 64), ("smoke 5 users d=64", [1, 0, 7, 6, 3], [20, 3, 0, 12, 1], 2, 32, 256)],
)  # fmt: skip


# ----------------------------------------------------------------------------------- CPU-safe part


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON"
    )
    p.add_argument(
        "--budget-s", type=float, default=270.0, help="stop starting new measurements after this"
    )
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument(
        "--skip-compile", action="store_true", help="leave out the torch.compile baselines"
    )
    p.add_argument("--from-json", type=Path, help="print the table of a saved result and exit")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes, CPU allowed (checks the script)"
    )
    return p.parse_args(argv)


def _fmt(x, spec):
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def format_table(result: dict) -> str:
    """The summary table of a result dict (as written to the JSON)."""
    meta, ceil = result.get("meta", {}), result.get("ceilings", {})
    gemm, copy = ceil.get("gemm_bf16_tflops"), ceil.get("copy_gbps")
    lines = [
        f"{meta.get('gpu', '?')} | driver {meta.get('driver', '?')} | torch {meta.get('torch', '?')} "
        f"| triton {meta.get('triton', '?')} | {meta.get('date', '?')}",
        f"measured ceilings: bf16 GEMM {_fmt(gemm, '.0f')} TFLOP/s, device copy {_fmt(copy, '.0f')} GB/s",
    ]
    checks = result.get("correctness", [])
    if checks:
        bad = [c for c in checks if not c["ok"]]
        lines.append(f"correctness vs fp32 reference: {len(checks) - len(bad)}/{len(checks)} ok")
        lines += [
            f"  FAILED {c['op']} {c['case']} {c['dtype']}: max err {c['max_abs_err']:.3e}"
            for c in bad
        ]
    header = f"{'case':<36} {'provider':<26} {'median us':>10} {'TFLOP/s':>8} {'%GEMM':>6} {'GB/s':>7} {'%copy':>6}  note"
    lines += ["", header, "-" * len(header)]
    for row in result.get("rows", []):
        lines.append(
            f"{row['case']:<36} {row['provider']:<26} {_fmt(row.get('median_us'), '10.1f')} "
            f"{_fmt(row.get('tflops'), '8.1f')} {_fmt(row.get('frac_gemm') and 100 * row['frac_gemm'], '6.1f')} "
            f"{_fmt(row.get('gbps'), '7.0f')} {_fmt(row.get('frac_copy') and 100 * row['frac_copy'], '6.1f')}  "
            f"{row.get('note', '')}"
        )
    for s in result.get("skipped", []):
        lines.append(f"skipped: {s}")
    return "\n".join(lines)


def import_kernels():
    """srp4ctr.kernels, installed or straight from this checkout."""
    try:
        from srp4ctr import kernels
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT))
        import srp4ctr  # noqa: F401

        spec = importlib.util.spec_from_file_location(
            "srp4ctr.kernels", ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")],
        )  # fmt: skip
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["srp4ctr.kernels"] = kernels
        spec.loader.exec_module(kernels)
    return kernels


# --------------------------------------------------------------------------------------- GPU part


class Run:
    """Where and what to measure: the full plan on a GPU, or the smoke plan."""

    def __init__(self, args):
        import torch

        self.smoke = args.smoke
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs on CPU
        self.device = "cuda" if torch.cuda.is_available() and not interpreting else "cpu"
        self.end = time.monotonic() + args.budget_s
        self.use_compile = not args.skip_compile and not self.smoke
        self.skipped: list[str] = []
        pick = (lambda key, full: SMOKE[key]) if self.smoke else (lambda key, full: full)
        self.attention_cases = pick("attention", ATTENTION_CASES)
        self.qformer_case = pick("qformer", QFORMER_CASE)
        self.tower_case = pick("tower", TOWER_CASE)
        self.check_attention = pick("check_attention", CHECK_ATTENTION)
        self.check_pool = pick("check_pool", CHECK_POOL)
        self.check_tower = pick("check_tower", CHECK_TOWER)
        # The interpreter's bf16 dot is wrong: on CPU the smoke run uses fp16 throughout.
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float16
        self.check_dtypes = (
            (torch.bfloat16, torch.float16)
            if self.device == "cuda"
            else (torch.float16, torch.float32)
        )

    def left(self) -> float:
        return self.end - time.monotonic()

    def free_bytes(self) -> int:
        import torch

        return torch.cuda.mem_get_info()[0] if self.device == "cuda" else 2**31

    def timeit(self, fn) -> dict:
        """Median (20th, 80th percentile) microseconds: triton.testing.do_bench on CUDA (it flushes
        L2 before each run), plain wall clock over a few calls on CPU."""
        if self.device == "cuda":
            from triton.testing import do_bench

            med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            return {"median_us": med * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        times.sort()
        return {"median_us": times[1], "p20_us": times[0], "p80_us": times[2]}


def environment(run: Run) -> dict:
    import torch
    import triton

    meta = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "smoke": run.smoke,
    }
    if run.device != "cuda":
        return {"gpu": "none (CPU, Triton interpreter)", "driver": "-", **meta}
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout.strip().splitlines()[0]  # fmt: skip
    except (OSError, IndexError, subprocess.SubprocessError):  # no nvidia-smi, or no output
        driver = "unknown"
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "driver": driver,
        **meta,
    }


def measure_ceilings(run: Run) -> dict:
    import torch

    n = 256 if run.smoke else 8192
    a, b = (torch.randn(n, n, device=run.device, dtype=run.dtype) for _ in range(2))
    t_gemm = run.timeit(lambda: torch.matmul(a, b))["median_us"]
    src = torch.randn(2**16 if run.smoke else 2**28, device=run.device)  # 1 GiB of fp32 on GPU
    dst = torch.empty_like(src)
    t_copy = run.timeit(lambda: dst.copy_(src))["median_us"]
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    return {
        "gemm_bf16_tflops": 2 * n**3 / (t_gemm * 1e-6) / 1e12,
        "gemm_shape": [n, n, n],
        "gemm_dtype": str(run.dtype).replace("torch.", ""),
        "copy_gbps": nbytes / (t_copy * 1e-6) / 1e9,
        "copy_bytes": nbytes,
    }


def _offsets(lengths, device):
    from srp4ctr.kernels.testing import offsets_from_lengths

    return offsets_from_lengths(lengths, device)


def run_correctness(K, run: Run) -> list:
    import torch

    from srp4ctr.kernels.reference import (
        candidate_attention_ref,
        candidate_tower_layer_ref,
        candidate_tower_ref,
        query_pool_ref,
    )
    from srp4ctr.kernels.testing import mismatch_report, random_tower_params, tolerance

    dev = run.device
    g = torch.Generator().manual_seed(0)
    checks = []

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    def offsets(c_lens, kv_lens):
        if len(c_lens) == 1:
            return None, None
        return _offsets(c_lens, dev), _offsets(kv_lens, dev)

    def record(op, case, dtype, got, want, kind):
        atol, rtol = tolerance(kind, dtype)
        report = mismatch_report(got, want, atol, rtol, f"{op} {case}")
        err = (got.float() - want.float()).abs().nan_to_num(float("inf"))
        checks.append({
            "op": op, "case": case, "dtype": str(dtype).replace("torch.", ""),
            "max_abs_err": float(err.max()) if err.numel() else 0.0,
            "atol": atol, "rtol": rtol, "ok": report is None, "report": report,
        })  # fmt: skip

    for dtype in run.check_dtypes:
        if run.left() < 60:
            run.skipped.append(f"correctness in {dtype} and later: time budget")
            break
        for case, c_lens, kv_lens, heads, dh in run.check_attention:
            q = rnd(sum(c_lens), heads, dh, dtype=dtype)
            k, v = (
                rnd(sum(kv_lens), heads, dh, dtype=dtype),
                rnd(sum(kv_lens), heads, dh, dtype=dtype),
            )
            qo, ko = offsets(c_lens, kv_lens)
            got = K.candidate_attention(q, k, v, qo, ko, backend="triton")
            record(
                "candidate_attention",
                case,
                dtype,
                got,
                candidate_attention_ref(q, k, v, qo, ko),
                "attention",
            )
        for case, m, kv_lens, heads, dh in run.check_pool:
            qs = rnd(m, heads, dh, dtype=dtype)
            k, v = (
                rnd(sum(kv_lens), heads, dh, dtype=dtype),
                rnd(sum(kv_lens), heads, dh, dtype=dtype),
            )
            ko = _offsets(kv_lens, dev)
            got = K.query_pool(qs, k, v, ko, backend="triton")
            record("query_pool", case, dtype, got, query_pool_ref(qs, k, v, ko), "attention")
        for case, c_lens, kv_lens, heads, dh, d_ff in run.check_tower:
            d = heads * dh
            z = rnd(sum(c_lens), d, dtype=dtype)
            k, v = (
                rnd(sum(kv_lens), heads, dh, dtype=dtype),
                rnd(sum(kv_lens), heads, dh, dtype=dtype),
            )
            p = random_tower_params(d, d_ff, dtype, dev, g)
            qo, ko = offsets(c_lens, kv_lens)
            got = K.candidate_tower_layer(z, k, v, p, qo, ko, backend="triton")
            record(
                "candidate_tower_layer",
                case,
                dtype,
                got,
                candidate_tower_layer_ref(z, k, v, p, qo, ko),
                "tower",
            )
            if "5 users" in case:
                layers, ps = [(k, v), (v, k)], [p, random_tower_params(d, d_ff, dtype, dev, g)]
                got = K.candidate_tower(z, layers, ps, qo, ko, backend="triton")
                want = candidate_tower_ref(z, layers, ps, qo, ko)
                record("candidate_tower", case + ", 2 layers", dtype, got, want, "tower")
    return checks


def _row(case, provider, t, flops, nbytes, ceil, note=""):
    secs = t["median_us"] * 1e-6
    tflops, gbps = flops / secs / 1e12, nbytes / secs / 1e9
    return {
        "case": case, "provider": provider, **t, "flops": flops, "min_bytes": nbytes,
        "tflops": tflops, "gbps": gbps, "note": note,
        "frac_gemm": tflops / ceil["gemm_bf16_tflops"], "frac_copy": gbps / ceil["copy_gbps"],
    }  # fmt: skip


def _skip_row(case, provider, note):
    return {"case": case, "provider": provider, "median_us": None, "note": note}


def dense_reference(q, k, v, scale):
    """The reference's math for equal-length users, batched: q [B, C, H, Dh], k/v [B, L, H, Dh],
    fp32 inside (what torch.compile is given)."""
    import torch

    s = torch.einsum("bchd,blhd->bhcl", q.float(), k.float()) * scale  # (B, H, C, L)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhcl,blhd->bchd", p, v.float()).to(q.dtype)  # (B, C, H, Dh)


def attention_case(K, run: Run, ceil: dict, compiled, case, users, c, length) -> list:
    """One candidate-attention shape: ours, SDPA per user, the naive broadcast, compiled reference."""
    import torch
    import torch.nn.functional as F

    dev, dt, d = run.device, run.dtype, HEADS * HEAD_DIM
    scale = HEAD_DIM**-0.5
    n_q, n_kv = users * c, users * length
    q = torch.randn(n_q, HEADS, HEAD_DIM, device=dev, dtype=dt)
    k = torch.randn(n_kv, HEADS, HEAD_DIM, device=dev, dtype=dt)
    v = torch.randn(n_kv, HEADS, HEAD_DIM, device=dev, dtype=dt)
    flops = 4 * n_q * length * d
    nbytes = 2 * d * (2 * n_q + 2 * n_kv)  # q in, out, k and v once (2 bytes each)
    rows = []

    def add(provider, fn, note=""):
        rows.append(_row(case, provider, run.timeit(fn), flops, nbytes, ceil, note))

    qo, ko = (None, None)
    if users > 1:
        qo, ko = _offsets([c] * users, dev), _offsets([length] * users, dev)
    add(
        "ours (triton)",
        lambda: K.candidate_attention(
            q, k, v, qo, ko, scale=scale, backend="triton", validate=False
        ),
    )

    # SDPA with one batch per user (equal lengths here: no padding needed); views, no copies
    q4 = q.view(users, c, HEADS, HEAD_DIM).transpose(1, 2)
    k4 = k.view(users, length, HEADS, HEAD_DIM).transpose(1, 2)
    v4 = v.view(users, length, HEADS, HEAD_DIM).transpose(1, 2)
    add("SDPA per user", lambda: F.scaled_dot_product_attention(q4, k4, v4))

    # the naive way: every candidate its own batch, its user's K/V copied for it
    copied = 2 * n_q * length * d * 2
    if 1.2 * copied > 0.6 * run.free_bytes():
        note = f"skipped: would copy {copied / 2**30:.0f} GiB"
        rows.append(_skip_row(case, "K/V per candidate + SDPA", note))
    else:
        user_of = torch.arange(users, device=dev).repeat_interleave(c)

        def naive():
            kb = k.view(users, length, HEADS, HEAD_DIM).index_select(0, user_of).transpose(1, 2)
            vb = v.view(users, length, HEADS, HEAD_DIM).index_select(0, user_of).transpose(1, 2)
            return F.scaled_dot_product_attention(q[:, :, None, :], kb, vb)

        add("K/V per candidate + SDPA", naive, f"copies {copied / 2**30:.2f} GiB")

    if compiled is not None and run.left() > 60:
        qb = q.view(users, c, HEADS, HEAD_DIM)
        kb, vb = k.view(users, length, HEADS, HEAD_DIM), v.view(users, length, HEADS, HEAD_DIM)
        compiled(qb, kb, vb, scale)  # compile outside the timing
        add("torch.compile(reference)", lambda: compiled(qb, kb, vb, scale))
    elif compiled is not None:
        rows.append(_skip_row(case, "torch.compile(reference)", "skipped: time budget"))
    return rows


def pool_case(K, run: Run, ceil: dict, compiled, case, users, m, length) -> list:
    """Q-Former pooling: ours, SDPA batched over users, compiled reference."""
    import torch
    import torch.nn.functional as F

    dev, dt, d = run.device, run.dtype, HEADS * HEAD_DIM
    scale = HEAD_DIM**-0.5
    qs = torch.randn(m, HEADS, HEAD_DIM, device=dev, dtype=dt)
    k = torch.randn(users * length, HEADS, HEAD_DIM, device=dev, dtype=dt)
    v = torch.randn(users * length, HEADS, HEAD_DIM, device=dev, dtype=dt)
    ko = _offsets([length] * users, dev)
    flops = 4 * users * m * length * d
    nbytes = 2 * d * (2 * users * length + users * m + m)
    rows = []

    def add(provider, fn, note=""):
        rows.append(_row(case, provider, run.timeit(fn), flops, nbytes, ceil, note))

    add(
        "ours (triton)",
        lambda: K.query_pool(qs, k, v, ko, scale=scale, backend="triton", validate=False),
    )
    q4 = qs.transpose(0, 1)[None].expand(users, HEADS, m, HEAD_DIM)
    k4 = k.view(users, length, HEADS, HEAD_DIM).transpose(1, 2)
    v4 = v.view(users, length, HEADS, HEAD_DIM).transpose(1, 2)
    add("SDPA batched over users", lambda: F.scaled_dot_product_attention(q4, k4, v4))
    rows.append(
        _skip_row(case, "K/V per candidate + SDPA", "n/a: the queries are shared by all users")
    )
    if compiled is not None and run.left() > 60:
        qb = qs[None].expand(users, m, HEADS, HEAD_DIM)
        kb, vb = k.view(users, length, HEADS, HEAD_DIM), v.view(users, length, HEADS, HEAD_DIM)
        compiled(qb, kb, vb, scale)
        add("torch.compile(reference)", lambda: compiled(qb, kb, vb, scale))
    return rows


def run_attention(K, run: Run, ceil: dict) -> list:
    import torch

    compiled = torch.compile(dense_reference, dynamic=True) if run.use_compile else None
    rows = []
    for case in [*run.attention_cases, run.qformer_case]:
        if run.left() < 20:
            run.skipped.append(f"{case[0]}: time budget")
            continue
        measure = pool_case if case is run.qformer_case else attention_case
        rows += measure(K, run, ceil, compiled, *case)
        if run.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def eager_tower(z, kv_per_layer, params_per_layer):
    """What a user would write in plain torch: LayerNorm / Linear / SDPA, in z's dtype."""
    import torch.nn.functional as F

    n, d = z.shape
    for (k, v), p in zip(kv_per_layer, params_per_layer):
        heads, dh = k.shape[1], k.shape[2]
        h = F.layer_norm(z, (d,), p.ln1_w, p.ln1_b, eps=1e-5)
        q = F.linear(h, p.wq, p.bq).view(1, n, heads, dh).transpose(1, 2)  # (1, H, N, Dh)
        a = F.scaled_dot_product_attention(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        z = z + F.linear(a.transpose(1, 2).reshape(n, d), p.wo, p.bo)
        h = F.layer_norm(z, (d,), p.ln2_w, p.ln2_b, eps=1e-5)
        z = z + F.linear(F.gelu(F.linear(h, p.w1, p.b1)), p.w2, p.b2)
    return z


def run_tower(K, run: Run, ceil: dict) -> list:
    import torch

    from srp4ctr.kernels.testing import random_tower_params

    case, c, length = run.tower_case
    if run.left() < 20:
        run.skipped.append(f"{case}: time budget")
        return []
    dev, dt = run.device, run.dtype
    heads, dh, n_layers = TOWER_HEADS, TOWER_HEAD_DIM, TOWER_LAYERS
    d = heads * dh
    d_ff = 4 * d
    g = torch.Generator().manual_seed(1)
    z = torch.randn(c, d, generator=g).to(dev, dt)
    kvs = [
        tuple(torch.randn(length, heads, dh, generator=g).to(dev, dt) for _ in range(2))
        for _ in range(n_layers)
    ]
    ps = [random_tower_params(d, d_ff, dt, dev, g) for _ in range(n_layers)]
    flops = n_layers * c * (4 * d * d + 4 * length * d + 4 * d * d_ff)
    nbytes = 2 * n_layers * (2 * c * d + 2 * length * d)  # z in and out, K and V, per layer

    def add(provider, fn, note=""):
        rows.append(_row(case, provider, run.timeit(fn), flops, nbytes, ceil, note))

    def ours(x):
        return K.candidate_tower(x, kvs, ps, backend="triton", validate=False)

    rows: list = []
    add("ours (triton, fused)", lambda: ours(z), f"{n_layers} launches")
    if dev == "cuda":
        graphed = K.GraphedCall(ours, z)
        add("ours + CUDA graph", lambda: graphed(z))
    add("eager torch", lambda: eager_tower(z, kvs, ps))
    if run.use_compile and run.left() > 60:
        compiled = torch.compile(eager_tower)
        compiled(z, kvs, ps)
        add("torch.compile(eager)", lambda: compiled(z, kvs, ps))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        print(format_table(json.loads(args.from_json.read_text())))
        return 0
    import torch

    if not torch.cuda.is_available() and not (
        args.smoke and os.environ.get("TRITON_INTERPRET") == "1"
    ):
        print(
            "gpu_bench.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was "
            "measured. On CPU only '--smoke' runs, under TRITON_INTERPRET=1; '--from-json' "
            "prints a saved result.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    run = Run(args)
    K = import_kernels()
    from srp4ctr.kernels._triton._common import set_autotuning

    result = {"meta": environment(run)}
    print(f"[gpu_bench] {result['meta']['gpu']}: measuring ceilings", flush=True)
    result["ceilings"] = ceil = measure_ceilings(run)
    if run.device == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_correctness:
        print("[gpu_bench] correctness vs the fp32 reference", flush=True)
        set_autotuning(False)  # one config per kernel variant: many shapes, little compiling
        result["correctness"] = run_correctness(K, run)
        set_autotuning(True)
    print("[gpu_bench] candidate attention and Q-Former pooling", flush=True)
    result["rows"] = run_attention(K, run, ceil)
    print("[gpu_bench] fused candidate tower", flush=True)
    result["rows"] += run_tower(K, run, ceil)
    result["skipped"] = run.skipped

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"gpu_bench{'-smoke' if run.smoke else ''}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"[gpu_bench] wrote {path}\n", flush=True)
    print(format_table(result))
    return 1 if any(not c["ok"] for c in result.get("correctness", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
