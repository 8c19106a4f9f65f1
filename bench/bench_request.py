"""One whole serving request end to end: a user's raw history and raw candidate ids in, click
probabilities out — ``engine.encode_user(history)`` + ``engine.score(cache, ids)`` and its
counterparts — at C = 1, 100, 1000 and 4096 candidates (1 and 100 in a smoke run).

Run explicitly, or through ``srp4ctr bench``::

    python -m pytest bench/bench_request.py --benchmark-json=bench/results/request.json

Model and data: the ``served`` fixture (``bench/conftest.py``; d = 64, 2 layers, 2 heads,
4 Q-Former queries, head 384 -> 200 -> 80 -> 1, history 200, random weights, a synthetic
MovieLens-1M-format dataset). Every timed call starts from the raw history dict (raw item ids,
ratings, unix seconds) and raw item ids, so each provider also pays for its feature encoding.

CPU providers (table "CPU"; baseline ``eager_folded``):

- ``eager_folded``: the data pipeline's ``encode_user_history`` + ``encode_items``, then the
  model's own folded forward (``encode_users`` + ``score_candidates_one_user``), eager torch.
- ``engine`` / ``engine_bf16``: the engine, torch backend, fp32 / bfloat16.
- ``engine_cpp`` / ``engine_cpp_bf16``: the engine's C++ backend, fp32 / its bf16 mode (skipped,
  with the reason, where the C++ extension is not available).
- ``ort``: the torch-free ``srp4ctr.serving.Scorer`` (the pipeline's history encoding,
  ``user_encoder.onnx`` + ``scorer.onnx`` in ONNX Runtime, the MatMul/Softmax export).

CUDA providers (table "CUDA"; baseline ``eager_folded_cuda``; skipped without a GPU): the engine
with the Triton backend in fp32 and bf16 (``engine_triton_cuda``, ``engine_triton_cuda_bf16``),
the eager folded forward on the GPU (``eager_folded_cuda``) and its
``torch.compile(mode="reduce-overhead")`` (``eager_compiled_cuda``); every timed call ends with
``torch.cuda.synchronize()``.

``extra_info``: analytic FLOPs of the request (:func:`srp4ctr.models.flops_per_request`: user
side once + C candidates, before folding), ``min_bytes`` (a lower bound on the bytes a request
moves: the dense weights once, the user's K/V once, the candidates' folded item rows and the
outputs), ``max_abs_diff`` against the eager fp32 probabilities, shapes, threads, machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see conftest)
import copy

import benchlib
import numpy as np
import pytest
import torch
from benchlib import HIST, Unavailable
from torch import nn

CANDIDATES = benchlib.pick((1, 100, 1000, 4096), (1, 100))
CPU, CUDA = "CPU", "CUDA"
TABLES = {"eager_folded": CPU, "engine": CPU, "engine_bf16": CPU, "engine_cpp": CPU,
          "engine_cpp_bf16": CPU, "ort": CPU, "eager_folded_cuda": CUDA,
          "eager_compiled_cuda": CUDA, "engine_triton_cuda": CUDA, "engine_triton_cuda_bf16": CUDA}
BASELINES = {CPU: "eager_folded", CUDA: "eager_folded_cuda"}
BF16 = ("engine_bf16", "engine_cpp_bf16", "engine_triton_cuda_bf16")
EXACT_CPU = ("eager_folded", "engine", "engine_cpp", "ort")  # fp32 on CPU: must agree to 1e-5
ENGINE_OF = {"engine": "torch", "engine_bf16": "torch_bf16", "engine_cpp": "cpp",
             "engine_cpp_bf16": "cpp_bf16"}


def _eager(model, ds, history, raw, device="cpu"):
    batch = {k: v.to(device) for k, v in benchlib.history_batch(ds, history, HIST).items()}
    cand = torch.as_tensor(ds.encode_items(raw)).to(device)
    with torch.no_grad():
        return torch.sigmoid(model.score_candidates_one_user(model.encode_users(batch), cand))


def _onnx_server(served):
    return benchlib.serving_scorer(served.onnx_dir("matmul"), {
        "user_encoder": served.session("matmul", "user_encoder"),
        "scorer": served.session("matmul", "scorer")})


@pytest.fixture(scope="module")
def cuda_parts(served):
    """The model's GPU copies (an eager one and engines), built once when a GPU is there."""
    parts: dict = {}
    if benchlib.cuda_unavailable() is None:
        from srp4ctr.engine import Engine

        parts["model"] = copy.deepcopy(served.model).to("cuda").eval()
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            try:
                parts[name] = Engine.from_model(copy.deepcopy(served.model), served.ds,
                                                device="cuda", backend="triton", dtype=dtype)
            except Exception as e:  # noqa: BLE001 - reported as the skip reason
                parts[name] = Unavailable(f"{type(e).__name__}: {e}")
    return parts


def _call(served, cuda_parts, provider: str, C: int):
    """The timed callable of ``provider``; raises ``Unavailable``."""
    ds, history, raw = served.ds, served.history, served.candidates(C)
    if TABLES[provider] == CUDA:
        if (reason := benchlib.cuda_unavailable()) is not None:
            raise Unavailable(reason)
        sync = torch.cuda.synchronize
        model = cuda_parts["model"]
        if provider.startswith("engine_"):
            engine = cuda_parts["bf16" if provider.endswith("_bf16") else "fp32"]
            if isinstance(engine, Unavailable):
                raise engine

            def run():
                out = engine.score(engine.encode_user(history), raw)
                sync()
                return out

            return run
        if provider == "eager_compiled_cuda":
            def forward(batch, cand):
                state = model.encode_users(batch)
                return torch.sigmoid(model.score_candidates_one_user(state, cand))

            compiled = torch.compile(forward, mode="reduce-overhead")

            def run():
                batch = {k: v.to("cuda") for k, v in
                         benchlib.history_batch(ds, history, HIST).items()}
                cand = torch.as_tensor(ds.encode_items(raw)).to("cuda")
                with torch.no_grad():
                    out = compiled(batch, cand).clone()
                sync()
                return out

            for _ in range(3):  # compile and record the CUDA graph outside the timing
                run()
            return run

        def run():
            out = _eager(model, ds, history, raw, "cuda")
            sync()
            return out

        return run
    if provider == "eager_folded":
        return lambda: _eager(served.model, ds, history, raw)
    if provider == "ort":
        server = _onnx_server(served)
        return lambda: server.score(server.encode_user(history), raw)
    engine = served.engine(ENGINE_OF[provider])
    return lambda: engine.score(engine.encode_user(history), raw)


def _min_bytes(served, C: int, elt: int) -> int:
    """A lower bound on the bytes one request moves (see the module docstring)."""
    model, cfg = served.model, served.cfg
    dense = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))
                for p in m.parameters(recurse=False))
    kv = 2 * cfg.n_layers * HIST * cfg.d_model
    rows = C * (2 * cfg.d_model + cfg.head_hidden[0] + 1)
    return elt * (dense + kv + rows)


@pytest.mark.parametrize("C", CANDIDATES)
@pytest.mark.parametrize("provider", list(TABLES))
def test_request(benchmark, served, cuda_parts, provider, C):
    """One provider, one request size, timed by pytest-benchmark (median over the rounds)."""
    try:
        fn = _call(served, cuda_parts, provider, C)
    except Unavailable as e:
        pytest.skip(str(e))
    reference = benchlib.to_numpy(_eager(served.model, served.ds, served.history,
                                         served.candidates(C)))
    max_abs_diff = float(np.abs(benchlib.to_numpy(fn()) - reference).max())
    if provider in EXACT_CPU:
        assert max_abs_diff <= 1e-5  # the same probabilities, whichever path computes them
    benchlib.timed(benchmark, fn, 20, 2)
    table, f = TABLES[provider], served.flops(C)
    bf16 = provider in BF16
    cfg = served.cfg
    benchlib.record(
        benchmark, table=table, case=f"C={C}", provider=provider, baseline=BASELINES[table],
        x=C, flops=f.total, min_bytes=_min_bytes(served, C, 2 if bf16 else 4),
        dtype="bfloat16" if bf16 else "float32", device="cuda" if table == CUDA else "cpu",
        max_abs_diff=max_abs_diff, C=C, history=HIST, d_model=cfg.d_model,
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_queries=cfg.n_queries,
        head_hidden=list(cfg.head_hidden), flops_user=f.user, flops_per_candidate=f.per_candidate,
    )
