"""CPU latency of one request through the engine vs. what a user would otherwise run.

Run explicitly (bench/ is not in the default test paths), or through ``srp4ctr bench``::

    python -m pytest bench/bench_engine_cpu.py --benchmark-json=bench/results/engine_cpu.json

Model (the ``served`` fixture of ``bench/conftest.py``): d = 64, 2 layers, 2 heads, 4 Q-Former
queries, head 384 -> 200 -> 80 -> 1, L = 200, random weights (timing only), on a synthetic
MovieLens-1M-format dataset written to a temporary folder (nothing is downloaded). One user with a
200-interaction history; C candidates (100, 1000, 4096; 100 in a smoke run).

Table "whole request" (the user is encoded inside the timed call; baseline ``eager_folded``):

- ``naive``: the training model's forward with the history repeated once per candidate (a batch
  of C identical histories, in chunks of ``NAIVE_CHUNK``): FG-BERT and the Q-Former run C times.
- ``eager_folded``: ``model.encode_users`` once + ``model.score_candidates_one_user`` (eager
  torch, the user's K/V read in place, no precomputed item tables).
- ``engine``: ``engine.encode_user(raw history)`` + ``engine.score(cache, raw ids)`` (torch
  backend): the whole request from raw data, including id mapping and behaviour features.
- ``engine_cpp`` / ``engine_cpp_bf16``: the same with the C++ backend (``backend="cpp"``), in fp32
  and in its bf16 mode; skipped, with the reason, where the C++ extension is not available.

Table "candidate side" (the user state already computed, a cache hit; baseline
``eager_folded_cached``): issue 6's comparison, in one run with the same thread count:

- ``eager_folded_cached``: ``model.score_candidates_one_user`` on the kept user state (eager
  torch folded forward).
- ``engine_cached`` / ``engine_bf16_cached``: ``engine.score(cache, raw ids)``, torch backend in
  fp32 / bfloat16 (bf16 is not exact: its largest difference from fp32 is ``max_abs_diff``).
- ``engine_cpp_cached`` / ``engine_cpp_bf16_cached``: the C++ backend, fp32 / bf16 mode (the
  instruction set ``auto`` picks: AMX where the CPU has it).
- ``engine_cpp_bf16_avx512_cached``: the bf16 mode forced onto AVX512-BF16; only where ``auto``
  picks AMX (elsewhere it is the row above), so the two bf16 paths are compared in one run.
- ``engine_cpp_generic_cached``: the C++ fp32 path forced onto its portable build (what a CPU
  without AVX2 + FMA runs), beside the instruction set ``auto`` picks; only where that differs.
- ``ort_matmul`` / ``ort_attention``: ONNX Runtime on the exported ``scorer.onnx`` (export as in
  ``bench_onnx_cpu.py``: MatMul/Softmax attention, or the ONNX ``Attention`` op; opset 23), fed
  the engine's cache tensors and internal item ids; all graph optimisations on.
- ``openvino_cached``: OpenVINO (``pip install openvino``) on the same MatMul ``scorer.onnx``,
  compiled for the CPU in fp32 (``INFERENCE_PRECISION_HINT=f32``, the latency hint, one stream,
  the same threads); ``openvino_bf16_cached``: OpenVINO's own precision, bf16 where the CPU has
  AVX512-BF16 or AMX (skipped elsewhere, where it is the fp32 row).
- ``compiled_cached``: ``torch.compile(mode="max-autotune")`` of the eager folded candidate side
  (``model.score_candidates_one_user``), compiled once per candidate count before timing.

``test_request_latency`` times each provider on its own (pytest-benchmark rows);
``test_interleaved_ratios`` times all available ones round-robin (rotating the order each round)
and stores the medians and ratios in ``extra_info`` — the figures to quote on a shared machine.
Every case records shapes, the analytic FLOPs the provider executes (:func:`_flops`: model FLOPs for
eager torch, folded ones for the engine and ONNX), the provider, threads and machine
(``benchlib.record``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see conftest)
from functools import partial

import benchlib
import numpy as np
import pytest
import torch
from benchlib import HIST, Unavailable

CANDIDATES = benchlib.pick((100, 1000, 4096), (100,))
NAIVE_CHUNK = 256
REQUEST = "whole request (raw history -> probabilities)"
CACHED = "candidate side (user cached)"
TABLES = {
    "naive": REQUEST, "eager_folded": REQUEST, "engine": REQUEST,
    "engine_cpp": REQUEST, "engine_cpp_bf16": REQUEST,
    "eager_folded_cached": CACHED, "engine_cached": CACHED, "engine_bf16_cached": CACHED,
    "engine_cpp_cached": CACHED, "engine_cpp_bf16_cached": CACHED,
    "engine_cpp_bf16_avx512_cached": CACHED, "engine_cpp_generic_cached": CACHED,
    "ort_matmul": CACHED, "ort_attention": CACHED, "openvino_cached": CACHED,
    "openvino_bf16_cached": CACHED, "compiled_cached": CACHED,
}  # fmt: skip
PROVIDERS = tuple(TABLES)
BASELINES = {REQUEST: "eager_folded", CACHED: "eager_folded_cached"}
BF16 = ("engine_cpp_bf16", "engine_bf16_cached", "engine_cpp_bf16_cached",
        "engine_cpp_bf16_avx512_cached", "openvino_bf16_cached")
ENGINE_OF = {"engine": "torch", "engine_cached": "torch", "engine_bf16_cached": "torch_bf16",
             "engine_cpp": "cpp", "engine_cpp_cached": "cpp", "engine_cpp_bf16": "cpp_bf16",
             "engine_cpp_bf16_cached": "cpp_bf16",
             "engine_cpp_bf16_avx512_cached": "cpp_bf16_avx512",
             "engine_cpp_generic_cached": "cpp_fp32_generic"}
# pairs (faster, slower) whose ratio median(slower) / median(faster) the interleaved test reports
RATIOS = (("engine", "naive"), ("engine", "eager_folded"),
          ("engine_cached", "eager_folded_cached"), ("engine_bf16_cached", "engine_cached"),
          ("engine_cpp_cached", "eager_folded_cached"), ("engine_cpp_cached", "ort_matmul"),
          ("engine_cpp_cached", "ort_attention"), ("engine_cpp_bf16_cached", "eager_folded_cached"),
          ("engine_cpp_bf16_cached", "engine_cpp_bf16_avx512_cached"),
          ("engine_cpp_cached", "engine_cpp_generic_cached"),
          ("engine_cpp_cached", "openvino_cached"), ("engine_cpp_cached", "compiled_cached"),
          ("engine_cpp_bf16_cached", "openvino_bf16_cached"),
          ("ort_matmul", "engine_cached"))


def _naive(model, batch1, cand):
    out = []
    for s in range(0, cand.shape[0], NAIVE_CHUNK):
        c = cand[s : s + NAIVE_CHUNK]
        b = {k: v.expand(c.shape[0], *v.shape[1:]) for k, v in batch1.items()}
        b["cand_item"] = c
        out.append(torch.sigmoid(model(b)))
    return torch.cat(out)


def _eager_folded(model, batch1, cand, state=None):
    if state is None:
        state = model.encode_users(batch1)
    return torch.sigmoid(model.score_candidates_one_user(state, cand))


def _call(served, provider: str, C: int):
    """The timed callable of ``provider`` for C candidates; raises ``Unavailable``."""
    model, batch1, history = served.model, served.batch1, served.history
    raw = served.candidates(C)
    cand = torch.as_tensor(served.ds.encode_items(raw))
    if provider == "naive":
        return partial(_naive, model, batch1, cand)
    if provider == "eager_folded":
        return partial(_eager_folded, model, batch1, cand)
    if provider == "eager_folded_cached":
        with torch.no_grad():
            state = model.encode_users(batch1)
        return partial(_eager_folded, model, batch1, cand, state)
    if provider.startswith(("ort_", "openvino")):
        cache = served.engine("torch").encode_user(history)
        feed = {"k": cache.k.numpy(), "v": cache.v.numpy(), "head_user": cache.head_user.numpy(),
                "cand_item": cand.numpy()}
        if provider.startswith("openvino"):
            return partial(served.openvino(bf16=provider == "openvino_bf16_cached"), feed)
        session = served.session(provider.removeprefix("ort_"))
        return lambda: session.run(["probs"], feed)[0]
    if provider == "compiled_cached":
        with torch.no_grad():
            state = model.encode_users(batch1)
        compiled = served.compiled_candidate_side()
        return partial(compiled, state, cand)
    engine = served.engine(ENGINE_OF[provider])
    if provider.endswith("_cached"):
        return partial(engine.score, engine.encode_user(history), raw)
    return lambda: engine.score(engine.encode_user(history), raw)


def _reference(served, C: int) -> np.ndarray:
    """The eager folded forward's probabilities (every fp32 provider must match them)."""
    cand = torch.as_tensor(served.ds.encode_items(served.candidates(C)))
    with torch.no_grad():
        return benchlib.to_numpy(_eager_folded(served.model, served.batch1, cand))


def _flops(served, provider: str, C: int) -> int:
    """FLOPs one call executes (analytic): the naive way runs the user side per candidate; eager
    torch the model's candidate side; the engine's backends and the ONNX scorer the candidate side
    with the item-only terms folded into tables (:func:`served_flops_per_candidate`)."""
    from srp4ctr.models import served_flops_per_candidate

    f = served.flops(C)
    if provider == "naive":
        return C * (f.user + f.per_candidate)
    per = (served_flops_per_candidate(served.cfg, HIST)
           if provider.startswith(("engine", "ort", "openvino")) else f.per_candidate)
    return C * per if TABLES[provider] == CACHED else f.user + C * per


def _shapes(served, C: int) -> dict:
    cfg, f = served.cfg, served.flops(C)
    return {"C": C, "history": HIST, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads, "n_queries": cfg.n_queries,
            "head_hidden": list(cfg.head_hidden), "flops_user": f.user,
            "flops_per_candidate": f.per_candidate,
            "engine_chunk": served.engine("torch").chunk_candidates(HIST)}


@pytest.mark.parametrize("C", CANDIDATES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_request_latency(benchmark, served, provider, C):
    """One provider, timed by pytest-benchmark (median over the rounds)."""
    try:
        fn = _call(served, provider, C)
    except Unavailable as e:
        pytest.skip(str(e))
    with torch.no_grad():
        max_abs_diff = float(np.abs(benchlib.to_numpy(fn()) - _reference(served, C)).max())
        if provider not in BF16:
            assert max_abs_diff <= 1e-5  # every exact provider computes the same
        slow = provider == "naive" and C >= 1000
        benchlib.timed(benchmark, fn, 3 if slow else 15)
    table = TABLES[provider]
    benchlib.record(
        benchmark, table=table, case=f"C={C}", provider=provider, baseline=BASELINES[table],
        x=C, flops=_flops(served, provider, C),
        dtype="bfloat16" if provider in BF16 else "float32",
        max_abs_diff=max_abs_diff, **_shapes(served, C),
    )


@pytest.mark.parametrize("C", CANDIDATES)
def test_interleaved_ratios(benchmark, served, C):
    """All available providers in one loop, round-robin (rotating the order each round), so that
    load changes on a shared machine hit every provider alike; ``extra_info``: ``medians_ms``,
    ``ratios`` (slower / faster, the pairs of ``RATIOS``), ``unavailable`` (provider: reason)
    and what the report needs to place each provider (``provider_tables``, ``baselines``,
    ``flops_by_provider``, ``dtype_by_provider``). The benchmark row itself is one timed call
    of ``engine_cached``."""
    calls, unavailable = {}, {}
    for p in PROVIDERS:
        try:
            calls[p] = _call(served, p, C)
        except Unavailable as e:
            unavailable[p] = str(e)
    naive_rounds = 15 if C <= 100 else 3
    with torch.no_grad():
        med, counts = benchlib.interleave(calls, benchlib.rounds(15),
                                          {"naive": benchlib.rounds(naive_rounds)})
        benchlib.timed(benchmark, calls["engine_cached"], 1, 0)
    benchlib.record(
        benchmark, table="interleaved", case=f"C={C}", provider="interleaved", x=C,
        interleaved=True, medians_ms=med, rounds=counts, unavailable=unavailable,
        provider_tables={p: TABLES[p] for p in calls}, baselines=BASELINES,
        flops_by_provider={p: _flops(served, p, C) for p in calls},
        dtype_by_provider={p: "bfloat16" if p in BF16 else "float32" for p in calls},
        ratios={f"{slow}/{fast}": med[slow] / med[fast] for fast, slow in RATIOS
                if fast in med and slow in med},
        **_shapes(served, C),
    )
