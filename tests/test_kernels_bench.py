"""bench/gpu_bench.py can only measure on a GPU; here: it imports, parses its arguments, prints
its table, refuses clearly without CUDA, and (under the interpreter) runs end to end on tiny
shapes with --smoke."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(bench, tmp_path):
    args = bench.parse_args([])
    assert args.out.name == "results" and args.budget_s > 0 and not args.smoke
    args = bench.parse_args(
        ["--out", str(tmp_path), "--skip-compile", "--smoke", "--budget-s", "60"]
    )
    assert args.out == tmp_path and args.skip_compile and args.smoke and args.budget_s == 60


SAMPLE = {
    "meta": {"gpu": "NVIDIA H200", "driver": "580.00", "torch": "2.11", "triton": "3.6", "date": "2026-01-01"},
    "ceilings": {"gemm_bf16_tflops": 790.0, "copy_gbps": 4300.0},
    "correctness": [
        {"op": "candidate_attention", "case": "1 cand", "dtype": "bfloat16", "max_abs_err": 1e-3, "ok": True},
        {"op": "query_pool", "case": "M=1", "dtype": "float16", "max_abs_err": 0.5, "ok": False},
    ],
    "rows": [
        {"case": "1 user, C=4096, L=1024", "provider": "ours (triton)", "median_us": 20.0, "tflops": 429.5,
         "frac_gemm": 0.54, "gbps": 524.0, "frac_copy": 0.12, "note": ""},
        {"case": "1 user, C=4096, L=1024", "provider": "K/V per candidate + SDPA", "median_us": None,
         "note": "skipped: would copy 99 GiB"},
    ],
    "skipped": ["tower: time budget"],
}  # fmt: skip


def test_table(bench):
    table = bench.format_table(SAMPLE)
    lines = table.splitlines()
    assert "NVIDIA H200" in lines[0] and "790 TFLOP/s" in lines[1]
    assert "1/2 ok" in table and "FAILED query_pool M=1 float16" in table
    ours = next(line for line in lines if "ours (triton)" in line)
    assert "20.0" in ours and "429.5" in ours and "54.0" in ours
    assert "skipped: would copy 99 GiB" in table and "skipped: tower: time budget" in table


def test_from_json_prints_the_table(bench, tmp_path, capsys):
    path = tmp_path / "result.json"
    path.write_text(json.dumps(SAMPLE))
    assert bench.main(["--from-json", str(path)]) == 0
    assert "ours (triton)" in capsys.readouterr().out


def test_refuses_without_cuda(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert bench.main(["--out", str(tmp_path)]) == bench.NO_CUDA_EXIT
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.interpreter
def test_smoke_run_end_to_end(bench, tmp_path, capsys):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu_bench-smoke-*.json")
    result = json.loads(path.read_text())
    assert result["correctness"] and all(c["ok"] for c in result["correctness"])
    assert {"ours (triton)", "SDPA per user", "eager torch"} <= {
        r["provider"] for r in result["rows"]
    }
    assert capsys.readouterr().out.rstrip().endswith(bench.format_table(result).rstrip())
