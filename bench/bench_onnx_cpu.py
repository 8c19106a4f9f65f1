"""CPU latency of the exported scorer graph in ONNX Runtime beside the engine's torch backend.

Run explicitly (bench/ is not in the default test paths), or through ``srp4ctr bench``::

    python -m pytest bench/bench_onnx_cpu.py --benchmark-json=bench/results/onnx_cpu.json

Model and data: the ``served`` fixture (``bench/conftest.py``), as ``bench_engine_cpu.py``:
d = 64, 2 layers, 2 heads, 4 Q-Former queries, head 384 -> 200 -> 80 -> 1, L = 200, random
weights (timing only), a synthetic MovieLens-1M-format dataset in a temporary folder. The model is
exported twice with :func:`srp4ctr.engine.onnx_export.export_engine` (scorer attention
``"attention"``: the ONNX ``Attention`` op, opset 23; ``"matmul"``: MatMul/Softmax, also at opset
23 so that only the attention differs). One user with a 200-interaction history, its cache
already computed (a cache hit); C candidates (100, 1000, 4096; 100 in a smoke run).

Providers (torch with ``torch.set_num_threads(THREADS)``, ONNX Runtime with
``intra_op_num_threads = THREADS``, ``inter_op_num_threads = 1``; baseline ``engine_backend``):

- ``ort_attention`` / ``ort_matmul``: ``scorer.onnx`` alone (``InferenceSession.run``), internal
  item ids in, probabilities out.
- ``engine_backend``: the engine's torch backend on the same internal ids, in the engine's
  chunks (``Engine._logits_one`` + sigmoid): the graph's eager-torch counterpart.
- ``engine_score``: ``Engine.score(cache, raw ids)``, the engine's whole public call (id mapping,
  cache checks, chunks).
- ``onnx_server``: ``srp4ctr.serving.Scorer.score(cache, raw ids)``, the torch-free serving
  call (id mapping, input validation, the Attention-op graph).

``test_scorer_latency`` times each provider on its own (pytest-benchmark rows);
``test_interleaved_ratios`` times them all round-robin (rotating the order every round) and
stores the medians and ratios in ``extra_info`` — the figures to quote on a shared machine.
``extra_info`` records shapes, analytic FLOPs of the candidate side
(:func:`srp4ctr.models.flops_per_request`), the provider, ONNX Runtime's execution provider,
threads, spinning and the machine.

ONNX Runtime's worker threads do not spin by default here (``session.intra_op.allow_spinning =
0``, the counterpart of the ``OMP_WAIT_POLICY=PASSIVE`` the torch providers get): on a shared
machine spinning workers wait for a busy core. ``SRP4CTR_BENCH_ORT_SPIN=1`` turns spinning on.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see conftest)

import benchlib
import numpy as np
import pytest
import torch
from benchlib import HIST

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

CANDIDATES = benchlib.pick((100, 1000, 4096), (100,))
TABLE = "scorer graph (user cached)"
PROVIDERS = ("ort_attention", "ort_matmul", "engine_backend", "engine_score", "onnx_server")
BASELINE = "engine_backend"
# pairs (a, b) whose ratio median(b) / median(a) the interleaved test reports
RATIOS = (("ort_attention", "ort_matmul"), ("ort_attention", "engine_backend"),
          ("ort_matmul", "engine_backend"), ("onnx_server", "engine_score"))


@pytest.fixture(scope="module")
def setup(served):
    engine = served.engine("torch")
    server = benchlib.serving_scorer(served.onnx_dir("attention"),
                                     {"scorer": served.session("attention")})
    cache = engine.encode_user(served.history)
    assert cache.length == HIST
    return {"engine": engine, "cache": cache, "server": server,
            "server_cache": server.encode_user(served.history)}


def _calls(served, setup, C):
    """The providers' callables for C candidates, and the engine's probabilities."""
    engine, cache = setup["engine"], setup["cache"]
    raw = served.candidates(C)
    ids = served.ds.encode_items(raw).astype(np.int64)
    ids_t = torch.as_tensor(ids)
    feed = {"k": cache.k.numpy(), "v": cache.v.numpy(), "head_user": cache.head_user.numpy(),
            "cand_item": ids}
    att, mm = served.session("attention"), served.session("matmul")
    server, server_cache = setup["server"], setup["server_cache"]

    def backend():
        with torch.no_grad():
            return torch.sigmoid(engine._logits_one(cache, ids_t))

    calls = {
        "ort_attention": lambda: att.run(["probs"], feed)[0],
        "ort_matmul": lambda: mm.run(["probs"], feed)[0],
        "engine_backend": backend,
        "engine_score": lambda: engine.score(cache, raw),
        "onnx_server": lambda: server.score(server_cache, raw),
    }
    return calls, backend().numpy()


def _info(served, C) -> dict:
    cfg, f = served.cfg, served.flops(C)
    return {
        "C": C, "history": HIST, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads, "n_queries": cfg.n_queries, "head_hidden": list(cfg.head_hidden),
        "flops_per_candidate": f.per_candidate, "flops_candidates": f.per_candidate * C,
        "ort_execution_provider": "CPUExecutionProvider", "ort_intra_op_threads": benchlib.THREADS,
        "ort_allow_spinning": benchlib.ORT_SPIN,
        "engine_chunk": served.engine("torch").chunk_candidates(HIST),
    }


@pytest.mark.parametrize("C", CANDIDATES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_scorer_latency(benchmark, served, setup, provider, C):
    """One provider, timed by pytest-benchmark (median over the rounds)."""
    calls, reference = _calls(served, setup, C)
    fn = calls[provider]
    max_abs_diff = float(np.abs(benchlib.to_numpy(fn()) - reference).max())
    assert max_abs_diff <= 1e-5  # every provider computes the same probabilities
    benchlib.timed(benchmark, fn, 20, 2)
    info = _info(served, C)
    benchlib.record(benchmark, table=TABLE, case=f"C={C}", provider=provider, baseline=BASELINE,
                    x=C, flops=info["flops_candidates"], max_abs_diff=max_abs_diff, **info)


@pytest.mark.parametrize("C", CANDIDATES)
def test_interleaved_ratios(benchmark, served, setup, C):
    """All providers round-robin (the order rotated every round), so that load changes on a
    shared machine hit every provider alike; ``extra_info``: ``medians_ms``, ``gflops`` (model
    FLOPs of the candidates / median time) and ``ratios`` (``b/a``: how much longer b takes).
    The benchmark row itself is one timed call of ``ort_attention``."""
    calls, _ = _calls(served, setup, C)
    for fn in calls.values():  # a second warm-up call (interleave makes one)
        fn()
    med, counts = benchlib.interleave(calls, benchlib.rounds(40))
    benchlib.timed(benchmark, calls["ort_attention"], 1, 0)
    info = _info(served, C)
    benchlib.record(
        benchmark, table="interleaved", case=f"C={C}", provider="interleaved", x=C,
        interleaved=True, medians_ms=med, rounds=counts,
        provider_tables=dict.fromkeys(calls, TABLE), baselines={TABLE: BASELINE},
        flops_by_provider=dict.fromkeys(calls, info["flops_candidates"]),
        dtype_by_provider=dict.fromkeys(calls, "float32"),
        gflops={p: info["flops_candidates"] / (m * 1e6) for p, m in med.items()},
        ratios={f"{b}/{a}": med[b] / med[a] for a, b in RATIOS},
        **info,
    )
