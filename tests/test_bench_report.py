"""bench/report.py (behind ``srp4ctr bench``) on small synthetic pytest-benchmark JSON: per-suite
files, speed-ups and roofline fractions, goal verdicts, plots, the ``srp4ctr bench --report-only``
command, and the command's error outside a source checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from srp4ctr import cli
from srp4ctr.cli import find_bench_dir, load_bench_report, main

BENCH_DIR = find_bench_dir(str(Path(__file__).resolve().parents[1] / "bench"))
br = load_bench_report(BENCH_DIR)

CACHED = "candidate side (user cached)"
REQUEST = "whole request (raw history -> probabilities)"
USER_FLOPS, CAND_FLOPS = 6.0e7, 4.0e5
# the GPU script's case names, as the goals read them
GPU_ATTENTION = br.goal("attention-vs-sdpa").params["case"]
GPU_16USERS = br.goal("attention-gemm-fraction").params["case"]
GPU_POOL = br.goal("pooling-copy-fraction").params["case"]


def bench(fullname: str, median_s: float, **extra) -> dict:
    """One pytest-benchmark entry as ``--benchmark-json`` writes it."""
    return {"fullname": fullname, "name": fullname.split("::")[-1], "group": None,
            "params": {}, "extra_info": extra,
            "stats": {"median": median_s, "mean": median_s, "rounds": 5}}


def ceilings() -> list[dict]:
    """fp32 GEMM 200 GFLOP/s, bf16 400 GFLOP/s, copy 10 GB/s."""
    f = "bench/bench_ceilings.py::test_gemm_rate"
    return [
        bench(f"{f}[gemm-float32-cpu]", 0.01, ceiling="gemm", flops=2e9, dtype="float32",
              device="cpu", case="gemm 2048 float32"),
        bench(f"{f}[gemm-bfloat16-cpu]", 0.005, ceiling="gemm", flops=2e9, dtype="bfloat16",
              device="cpu", case="gemm 2048 bfloat16"),
        bench("bench/bench_ceilings.py::test_copy_bandwidth[cpu]", 0.1, ceiling="copy",
              min_bytes=1e9, dtype="float32", device="cpu", case="copy"),
    ]


def engine_row(provider: str, C: int, median_s: float, table: str = CACHED, **extra) -> dict:
    flops = C * CAND_FLOPS if table == CACHED else USER_FLOPS + C * CAND_FLOPS
    if provider == "naive":
        flops = C * (USER_FLOPS + CAND_FLOPS)
    base = "eager_folded_cached" if table == CACHED else "eager_folded"
    return bench(f"bench/bench_engine_cpu.py::test_request_latency[{provider}-{C}]", median_s,
                 table=table, case=f"C={C}", provider=provider, baseline=base, x=C,
                 flops=flops, dtype="bfloat16" if "bf16" in provider else "float32",
                 device="cpu", flops_user=USER_FLOPS, flops_per_candidate=CAND_FLOPS, **extra)


def raw_run(benchmarks: list[dict], skipped=(), smoke=False) -> dict:
    return {
        "machine_info": {"node": "x"}, "commit_info": {}, "datetime": "2026-01-01T00:00:00",
        "version": "5.2.3", "benchmarks": benchmarks,
        "srp4ctr": {"smoke": smoke, "threads": 2, "date": "2026-01-01T00:00:00+00:00",
                    "pytest_command": "python -m pytest bench/...",
                    "machine": {"cpu": "Test CPU 9000", "cores": 2, "torch": "2.13.0",
                                "onnxruntime": "1.32.0", "platform": "Linux", "threads": 2},
                    "skipped": list(skipped), "failed": []},
    }


def engine_benchmarks() -> list[dict]:
    """C=4096 and C=100: eager 30 ms, cpp 10 ms (3x), cpp bf16 8 ms (3.75x), ORT matmul 12 ms,
    ORT attention 15 ms; whole-request rows for the folded-vs-naive plot."""
    out = []
    for C, scale in ((100, 0.1), (4096, 1.0)):
        out += [
            engine_row("eager_folded_cached", C, 0.030 * scale),
            engine_row("engine_cpp_cached", C, 0.010 * scale, max_abs_diff=5e-8),
            engine_row("engine_cpp_bf16_cached", C, 0.008 * scale, max_abs_diff=3e-4),
            engine_row("ort_matmul", C, 0.012 * scale),
            engine_row("ort_attention", C, 0.015 * scale),
            engine_row("naive", C, 5.0 * scale, table=REQUEST),
            engine_row("eager_folded", C, 0.035 * scale, table=REQUEST),
            engine_row("engine", C, 0.040 * scale, table=REQUEST),
        ]
    return out


def write_results(tmp_path: Path, benchmarks: list[dict], suites=("ceilings", "engine_cpu"),
                  skipped=(), smoke=False) -> Path:
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(raw_run(ceilings() + benchmarks, skipped, smoke)))
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    br.split_run(raw, results, list(suites), command="srp4ctr bench")
    return results


def verdicts(results: Path, gpu: dict | None = None) -> dict[tuple[int, str], br.Verdict]:
    suites, _ = br.load_results(results)
    return {(g.issue, g.text): v for g, v in br.evaluate_goals(br.Context(suites, gpu))}


def find(vs: dict, issue: int, words: str) -> br.Verdict:
    hits = [v for (i, text), v in vs.items() if i == issue and words in text]
    assert len(hits) >= 1, (issue, words)
    return hits[0]


def test_split_run_writes_one_file_per_suite_with_the_run_ceilings(tmp_path):
    skipped = [{"nodeid": "bench/bench_request.py::test_request[engine_triton_cuda-4096]",
                "suite": "request", "reason": "needs a CUDA GPU"}]
    results = write_results(tmp_path, engine_benchmarks(), ("ceilings", "engine_cpu", "request"),
                            skipped=skipped)
    assert sorted(p.name for p in results.glob("*.json")) == [
        "ceilings.json", "engine_cpu.json", "request.json"]
    suites, ignored = br.load_results(results)
    assert not ignored
    engine, request = suites["engine_cpu"], suites["request"]
    assert len(engine.rows) == len(engine_benchmarks()) and not engine.skipped
    assert not request.rows and request.skipped[0]["reason"] == "needs a CUDA GPU"
    assert engine.ceiling("cpu", "gemm", "float32") == pytest.approx(2e11)
    assert engine.ceiling("cpu", "gemm", "bfloat16") == pytest.approx(4e11)
    assert engine.ceiling("cpu", "copy") == pytest.approx(1e10)
    assert engine.meta["command"] == "srp4ctr bench"


def test_speedups_and_roofline_fractions(tmp_path):
    results = write_results(tmp_path, engine_benchmarks())
    suites, _ = br.load_results(results)
    res = suites["engine_cpu"]
    rows = {(r.provider, r.case): r for r in res.rows}
    cpp = rows[("engine_cpp_cached", "C=4096")]
    eager = rows[("eager_folded_cached", "C=4096")]
    assert br.speedup(eager.median_s, cpp.median_s) == pytest.approx(3.0)
    # 4096 * 4e5 FLOPs in 10 ms = 163.84 GFLOP/s of a 200 GFLOP/s fp32 GEMM
    assert br.roofline_fraction(res, cpp) == pytest.approx(4096 * CAND_FLOPS / 0.01 / 2e11)
    bf16 = rows[("engine_cpp_bf16_cached", "C=4096")]
    assert br.roofline_fraction(res, bf16) == pytest.approx(4096 * CAND_FLOPS / 0.008 / 4e11)
    lines = "\n".join(br.suite_section(res, "Engine"))
    cpp_line = next(line for line in lines.splitlines()
                    if "`engine_cpp_cached`" in line and "C=4096" in line)
    assert "| 10.0 |" in cpp_line and "3.00×" in cpp_line and "81.9% (float32)" in cpp_line
    assert "5.0e-08" in cpp_line
    ort_line = next(line for line in lines.splitlines()
                    if "`ort_attention`" in line and "C=4096" in line)
    assert "2.00×" in ort_line  # 30 / 15
    # tables are ordered by candidate count
    cases = [line.split("|")[1].strip() for line in lines.splitlines()
             if line.startswith("| C=")]
    assert cases.index("C=100") < cases.index("C=4096")


def test_goals_met_and_not_met(tmp_path):
    vs = verdicts(write_results(tmp_path, engine_benchmarks()))
    v = find(vs, 6, "fp32: ≥ 2× faster than the eager torch")
    assert v.status == "met" and "3.00×" in v.figure
    v = find(vs, 6, "best ONNX Runtime")
    assert v.status == "not met" and "1.20×" in v.figure and "`ort_matmul`" in v.figure
    v = find(vs, 6, "bf16 mode")
    assert v.status == "met" and "3.75×" in v.figure and "3.0e-04" in v.figure
    v = find(vs, 6, "fraction of the machine")
    assert v.status == "reported" and "81.9%" in v.figure and "51.2%" in v.figure
    v = find(vs, 5, "naive")
    assert v.status == "reported" and "125× faster than naive" in v.figure
    assert "0.88× vs eager folded" in v.figure
    # no GPU result anywhere: the GPU goals say so
    for issue in (4, 9):
        for (i, _), verdict in vs.items():
            if i == issue:
                assert verdict.status.startswith("not measured"), verdict
    assert find(vs, 7, "ONNX").status.startswith("not measured")  # onnx_cpu suite not run


def test_interleaved_medians_are_preferred_for_goals(tmp_path):
    inter = bench("bench/bench_engine_cpu.py::test_interleaved_ratios[4096]", 0.01,
                  table="interleaved", case="C=4096", provider="interleaved", x=4096,
                  interleaved=True, device="cpu",
                  medians_ms={"eager_folded_cached": 20.0, "engine_cpp_cached": 12.5},
                  provider_tables={"eager_folded_cached": CACHED, "engine_cpp_cached": CACHED},
                  baselines={CACHED: "eager_folded_cached"},
                  flops_by_provider={"engine_cpp_cached": 4096 * CAND_FLOPS},
                  dtype_by_provider={"engine_cpp_cached": "float32"},
                  unavailable={"engine_cpp_bf16_cached": "bf16 mode needs AVX512-BF16"})
    vs = verdicts(write_results(tmp_path, [inter]))
    v = find(vs, 6, "fp32: ≥ 2× faster than the eager torch")
    assert v.status == "not met" and "1.60×" in v.figure and "interleaved" in v.figure
    v = find(vs, 6, "bf16 mode")
    assert v.status == "not measured: bf16 mode needs AVX512-BF16"
    suites, _ = br.load_results(tmp_path / "results")
    text = "\n".join(br.suite_section(suites["engine_cpu"], "Engine"))
    assert "1.60× vs `eager_folded_cached`" in text
    assert "`engine_cpp_bf16_cached` not measured: bf16 mode needs AVX512-BF16" in text


def test_skip_reasons_reach_the_goals(tmp_path):
    keep = [b for b in engine_benchmarks() if "cpp" not in b["fullname"]]
    reason = "backend='cpp': the C++ CPU kernels are not built in this installation"
    skipped = [{"nodeid": f"bench/bench_engine_cpu.py::test_request_latency[{p}-{C}]",
                "suite": "engine_cpu", "reason": reason}
               for p in ("engine_cpp_cached", "engine_cpp_bf16_cached") for C in (100, 4096)]
    vs = verdicts(write_results(tmp_path, keep, skipped=skipped))
    assert find(vs, 6, "fp32: ≥ 2× faster than the eager torch").status == \
        f"not measured: {reason}"
    assert find(vs, 6, "bf16 mode").status == f"not measured: {reason}"


def gpu_doc(smoke: bool = False) -> dict:
    rows = [
        {"case": GPU_ATTENTION, "provider": "ours (triton)", "median_us": 20.0,
         "frac_gemm": 0.5, "frac_copy": 0.1},
        {"case": GPU_ATTENTION, "provider": "SDPA per user", "median_us": 40.0},
        {"case": GPU_16USERS, "provider": "ours (triton)", "median_us": 300.0,
         "frac_gemm": 0.54, "frac_copy": 0.2},
        {"case": GPU_POOL, "provider": "ours (triton)", "median_us": 600.0,
         "frac_gemm": 0.05, "frac_copy": 0.8},
        {"case": "tower 2 layers, C=4096, L=200, d=64, H=2", "provider": "ours + CUDA graph",
         "median_us": 50.0},
        {"case": "tower 2 layers, C=4096, L=200, d=64, H=2", "provider": "eager torch",
         "median_us": 400.0},
    ]
    return {"meta": {"gpu": "NVIDIA H200", "driver": "580", "torch": "2.11", "triton": "3.6",
                     "date": "2026-01-02", "smoke": smoke},
            "ceilings": {"gemm_bf16_tflops": 790.0, "copy_gbps": 4300.0},
            "correctness": [{"op": "candidate_attention", "ok": True}], "rows": rows}


def test_gpu_goals_from_the_gpu_script(tmp_path):
    results = write_results(tmp_path, engine_benchmarks())
    (results / "gpu_bench-smoke-20260103-000000.json").write_text(json.dumps(gpu_doc(True)))
    assert br.newest_gpu_result(results) is None  # smoke results are never used
    (results / "gpu_bench-20260102-000000.json").write_text(json.dumps(gpu_doc()))
    path, doc = br.newest_gpu_result(results)
    assert path.name == "gpu_bench-20260102-000000.json"
    vs = verdicts(results, doc)
    v = find(vs, 4, "1.5× faster than SDPA")
    assert v.status == "met" and "2.00×" in v.figure
    assert find(vs, 4, "60% of the measured bf16 GEMM").status == "not met"
    assert find(vs, 4, "70% of the measured copy").status == "met"
    assert find(vs, 9, "1.5× faster than SDPA").status == "met"
    v = find(vs, 9, "≥ 3× faster than the eager torch")
    assert v.status.startswith("not measured") and "candidate tower only" in v.figure
    assert "8.00×" in v.figure
    report = br.build_report(results, tmp_path / "out", plots=False).read_text()
    assert "NVIDIA H200" in report and "1/1 ok" in report


def test_gpu_request_goals_from_cuda_rows(tmp_path):
    f = "bench/bench_ceilings.py::test_"
    cuda_ceilings = [
        bench(f"{f}gemm_rate[gemm-bfloat16-cuda]", 1e-3, ceiling="gemm", flops=8e11,
              dtype="bfloat16", device="cuda", case="gemm"),  # 800 TFLOP/s
        bench(f"{f}copy_bandwidth[cuda]", 1e-3, ceiling="copy", min_bytes=4e9,
              dtype="float32", device="cuda", case="copy"),  # 4 TB/s
    ]

    def row(provider, median_s, dtype="bfloat16"):
        return bench(f"bench/bench_request.py::test_request[{provider}-4096]", median_s,
                     table="CUDA", case="C=4096", provider=provider,
                     baseline="eager_folded_cuda", x=4096, flops=8e9, min_bytes=4e6,
                     dtype=dtype, device="cuda")

    rows = [row("engine_triton_cuda_bf16", 100e-6), row("engine_triton_cuda", 150e-6, "float32"),
            row("eager_folded_cuda", 1e-3, "float32"),
            row("eager_compiled_cuda", 120e-6, "float32")]
    vs = verdicts(write_results(tmp_path, cuda_ceilings + rows, ("ceilings", "request")))
    # floors: 8e9 / 8e14 = 10 us compute + 4e6 / 4e12 = 1 us memory; 100 us = 9.1x
    v = find(vs, 9, "roofline floors")
    assert v.status == "not met" and "9.1×" in v.figure and "engine_triton_cuda_bf16" in v.figure
    v = find(vs, 9, "≥ 3× faster than the eager torch")
    assert v.status == "met" and "10.00×" in v.figure
    v = find(vs, 9, "reduce-overhead")
    assert v.status == "not met" and "1.20×" in v.figure


def test_report_and_plots_are_written(tmp_path):
    results = write_results(tmp_path, engine_benchmarks())
    (results / "engine_cpu_old.json").write_text(json.dumps({"benchmarks": []}))  # old format
    out = tmp_path / "out"
    report = br.build_report(results, out, command="srp4ctr bench --out X")
    text = report.read_text()
    assert report == out / "report.md"
    assert "`srp4ctr bench --out X`" in text and "Test CPU 9000" in text
    assert "## Goals" in text and "**met**" in text and "**not met**" in text
    assert "ignored (not written by `srp4ctr bench`): `engine_cpu_old.json`" in text
    assert "Smoke run" not in text
    for name in ("latency_vs_candidates.png", "folded_vs_naive.png"):
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in text
    pts = br.folded_vs_naive_points(br.load_results(results)[0])
    assert pts["efficiency_flops"] == USER_FLOPS + CAND_FLOPS
    assert pts["inference_flops_naive"] == 100 * (USER_FLOPS + CAND_FLOPS)
    assert pts["inference_flops_folded"] == USER_FLOPS + 100 * CAND_FLOPS
    assert [c for c, _ in pts["measured"]["naive"]] == [100, 4096]


def test_smoke_results_are_flagged(tmp_path):
    results = write_results(tmp_path, engine_benchmarks(), smoke=True)
    vs = verdicts(results)
    assert find(vs, 6, "fp32: ≥ 2× faster than the eager torch").status == \
        "met (smoke run: not a measurement)"
    text = br.build_report(results, tmp_path / "out", plots=False).read_text()
    assert "**Smoke run**" in text


def test_cli_report_only(tmp_path, capsys):
    write_results(tmp_path, engine_benchmarks())
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file()
    assert "srp4ctr bench --report-only --out" in (tmp_path / "report.md").read_text()
    assert "wrote" in capsys.readouterr().out
    assert main(["bench", "--report-only", "--out", str(tmp_path / "nothing")]) == 2


def test_suite_names():
    assert br.parse_suites(None) == list(br.RUNNABLE)
    assert br.parse_suites("training,bench_engine_cpu.py") == ["ceilings", "engine_cpu",
                                                                "training"]
    with pytest.raises(br.BenchError, match="unknown suite"):
        br.parse_suites("engine,gpu")
    with pytest.raises(br.BenchError, match="bench/ folder"):
        find_bench_dir(str(Path("/nonexistent-bench-dir")))


def test_every_suite_file_exists():
    for suite in br.RUNNABLE:
        assert (BENCH_DIR / f"bench_{suite}.py").is_file()


def test_goals_file():
    goals = br.load_goals()
    assert len(goals) == 28 and len({g.id for g in goals}) == 28
    assert all(g.metric in br.METRICS for g in goals)


def _load_case(store, state, mode, clients, candidates, **kw):
    base = {"store": store, "state": state, "mode": mode, "clients": clients,
            "candidates": candidates, "requests": 100, "errors": 0, "rps": 50.0,
            "p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 25.0, "server_mean_ms": 8.0,
            "engine_mean_ms": 7.5, "users_per_engine_call": 1.0, "rss_growth": 0.01}
    return {**base, **kw}


def test_load_test_goals_and_section(tmp_path):
    """The serving goals read bench/load_test.py's JSON: the batching ratio and tail at 32
    clients and C = 1000, errors and RSS over every case, the server's own time, the Redis
    hit's share; each verdict flips with its figure, and a missing file or case says so."""
    cases = [_load_case("memory", "warm", "batching", 32, 1000, rps=110.0, p50_ms=300.0,
                        p99_ms=600.0),
             _load_case("memory", "warm", "one_at_a_time", 32, 1000, rps=50.0),
             _load_case("memory", "warm", "batching", 1, 100, server_mean_ms=4.0,
                        engine_mean_ms=3.2, server_overhead_ms=0.8),
             _load_case("redis", "warm", "batching", 1, 100, server_mean_ms=5.0,
                        store_get_mean_ms=1.5, store_get_share=0.3)]
    doc = {"machine": {"cpu": "X", "isa": "avx2", "cores": 2}, "client": "wrk",
           "duration_s": 10, "server_threads": 1, "cases": cases}
    (tmp_path / "load_test.json").write_text(json.dumps(doc))
    ctx = br.Context({}, load_test=br.load_load_test(tmp_path))
    got = {g.id: g.evaluate(ctx) for g in br.load_goals() if g.issue == 16}
    assert got["serve-batching"].status == "met" and "2.20×" in got["serve-batching"].figure
    assert got["serve-health"].status == "met"
    assert got["serve-overhead"].status == "met" and "0.80 ms" in got["serve-overhead"].figure
    assert got["serve-redis-hit"].status == "not met" and "30.0%" in got["serve-redis-hit"].figure
    cases[0]["p99_ms"] = 1000.0  # p99 / p50 = 3.33
    cases[1]["errors"] = 1
    ctx = br.Context({}, load_test=br.load_load_test(tmp_path))  # (re-read: same objects)
    ctx.load_test = doc
    assert br.goal("serve-batching").evaluate(ctx).status == "not met"
    assert br.goal("serve-health").evaluate(ctx).status == "not met"
    for gid in ("serve-batching", "serve-health", "serve-overhead", "serve-redis-hit"):
        assert br.goal(gid).evaluate(br.Context({})).status.startswith("not measured")
    doc["cases"] = cases[1:]
    assert "has no 32-client" in br.goal("serve-batching").evaluate(ctx).status
    section = "\n".join(br.load_test_lines(doc))
    assert "| memory warm | one at a time | 1000 | 32 | 50 |" in section and "wrk" in section
    assert "Not run" in "\n".join(br.load_test_lines(None))


def test_bench_outside_a_source_checkout(tmp_path, monkeypatch, capsys):
    """From a folder with no bench/ above it, and a package not installed from a checkout: one
    line on stderr that says what the command needs, exit code 2, no traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_source_root", lambda: tmp_path)
    assert main(["bench", "--smoke"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("srp4ctr: error: srp4ctr bench runs the benchmark suites of a source "
                          "checkout")
    assert "clone" in err and "--bench-dir" in err


def test_experiment_time_goal(tmp_path):
    """The experiment's wall time comes from the committed results.json of the clone."""
    goal = br.goal("experiment-time")
    assert goal.evaluate(br.Context({})).status.startswith("not measured")
    base = {"seeds": [0, 1, 2, 3, 4], "runs": {"din": {}, "bst": {}},
            "machine": {"cpu_count": 2}, "parallel": {"jobs": 2}}
    ok = goal.evaluate(br.Context({}, None, (tmp_path, {**base, "wall_seconds_this_call": 3156})))
    assert ok.status == "met" and "52.6 min" in ok.figure
    slow = goal.evaluate(br.Context({}, None, (tmp_path,
                                               {**base, "wall_seconds_this_call": 3700})))
    assert slow.status == "not met"
    few = goal.evaluate(br.Context({}, None, (tmp_path, {**base, "seeds": [0],
                                                         "wall_seconds_this_call": 60})))
    assert few.status == "not met"
    # found from the results folder's clone
    exp = tmp_path / "clone" / br.EXPERIMENT_JSON
    exp.parent.mkdir(parents=True)
    exp.write_text(json.dumps({**base, "wall_seconds_this_call": 100}))
    found = br.find_experiment(tmp_path / "clone" / "bench" / "results")
    assert found is not None and found[1]["wall_seconds_this_call"] == 100
