"""CPU latency of the exported scorer graph in ONNX Runtime beside the engine's torch backend.

Run explicitly (bench/ is not in the default test paths)::

    python -m pytest bench/bench_onnx_cpu.py --benchmark-json=bench/results/onnx_cpu.json

Model and data as ``bench_engine_cpu.py``: d = 64, 2 layers, 2 heads, 4 Q-Former queries, head
384 -> 200 -> 80 -> 1, L = 200, random weights (timing only), a synthetic MovieLens-1M-format
dataset in a temporary folder. The model is exported twice with
:func:`srp4ctr.engine.onnx_export.export_engine` (scorer attention ``"attention"``: the ONNX
``Attention`` op, opset 23; ``"matmul"``: MatMul/Softmax, also at opset 23 so that only the attention differs). One user with a 200-interaction
history, its cache already computed (a cache hit); C candidates.

Providers (torch with ``torch.set_num_threads(THREADS)``, ONNX Runtime with
``intra_op_num_threads = THREADS``, ``inter_op_num_threads = 1``):

- ``ort_attention`` / ``ort_matmul``: ``scorer.onnx`` alone (``InferenceSession.run``), internal
  item ids in, probabilities out.
- ``engine_backend``: the engine's torch backend on the same internal ids, in the engine's
  chunks (``Engine._logits_one`` + sigmoid): the graph's torch counterpart.
- ``engine_score``: ``Engine.score(cache, raw ids)``, the engine's whole public call (id mapping,
  cache checks, chunks).
- ``onnx_server``: ``examples/serve_onnx.py``'s ``OnnxServer.score(cache, raw ids)``, the
  torch-free serving call (id mapping, input validation, the Attention-op graph).

``test_scorer_latency`` times each provider on its own (pytest-benchmark rows);
``test_interleaved_ratios`` times them all round-robin (rotating the order every round) and
stores the medians and ratios in ``extra_info`` — the figures to quote on a shared machine.
``extra_info`` records shapes, analytic FLOPs (:func:`srp4ctr.models.flops_per_request`), the
provider, ONNX Runtime's execution provider, threads, spinning, load average, machine and
versions.

ONNX Runtime's worker threads do not spin by default here (``session.intra_op.allow_spinning =
0``, the counterpart of the ``OMP_WAIT_POLICY=PASSIVE`` the torch providers get): on a shared
machine spinning workers wait for a busy core. ``SRP4CTR_BENCH_ORT_SPIN=1`` turns spinning on.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_engine_cpu.py, before torch loads
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_engine_cpu import CONFIG, HIST, THREADS, _write_ml1m  # same model, data, threads

from srp4ctr import data
from srp4ctr.engine import Engine
from srp4ctr.engine.onnx_export import export_engine
from srp4ctr.models import SRP4CTR, ModelConfig, ModelSpec, flops_per_request

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

CANDIDATES = (100, 1000, 4096)
SPIN = os.environ.get("SRP4CTR_BENCH_ORT_SPIN", "0")
PROVIDERS = ("ort_attention", "ort_matmul", "engine_backend", "engine_score", "onnx_server")
# pairs (a, b) whose ratio median(b) / median(a) the interleaved test reports
RATIOS = (("ort_attention", "ort_matmul"), ("ort_attention", "engine_backend"),
          ("ort_matmul", "engine_backend"), ("onnx_server", "engine_score"))


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "serve_onnx.py"
    spec = importlib.util.spec_from_file_location("serve_onnx", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_onnx"] = module
    spec.loader.exec_module(module)
    return module


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", SPIN)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="srp4ctr-bench-onnx-") as tmp:
        root = Path(tmp)
        ds = data.prepare("ml-1m", path=str(_write_ml1m(root / "ml-1m")),
                          data_dir=str(root / "cache"), progress=False, max_len=HIST)
        torch.manual_seed(0)
        cfg = ModelConfig(**CONFIG)
        model = SRP4CTR(ModelSpec.from_dataset(ds), cfg).eval()
        engine = Engine.from_model(model, ds)
        for variant in ("attention", "matmul"):
            export_engine(engine, root / variant, attention=variant, opset=23)
        serve_onnx = _example()
        server = serve_onnx.OnnxServer(root / "attention", threads=THREADS)
        server.scorer = _session(root / "attention" / "scorer.onnx")  # same spinning setting
        rows = ds.user_rows(1)
        history = {
            "item_id": ds.item_raw[ds.item[rows]],
            "rating": np.asarray(ds.value_vocab)[ds.behaviour["rating"][rows] - 1],
            "timestamp": ds.timestamp[rows],
            "user_id": int(ds.user_raw[1]),
        }
        cache = engine.encode_user(history)
        assert cache.length == HIST
        rng = np.random.default_rng(1)
        ids = {C: rng.integers(1, ds.n_items + 1, size=C).astype(np.int64) for C in CANDIDATES}
        yield {
            "ds": ds, "cfg": cfg, "engine": engine, "cache": cache,
            "server": server, "server_cache": server.encode_user(history),
            "sessions": {v: _session(root / v / "scorer.onnx") for v in ("attention", "matmul")},
            "ids": ids,
        }


def _calls(setup, C):
    """The providers' callables for C candidates, and the engine's probabilities."""
    engine, cache, ds = setup["engine"], setup["cache"], setup["ds"]
    ids = setup["ids"][C]
    raw = ds.item_raw[ids]
    ids_t = torch.as_tensor(ids)
    feed = {"k": cache.k.numpy(), "v": cache.v.numpy(), "head_user": cache.head_user.numpy(),
            "cand_item": ids}
    att, mm = setup["sessions"]["attention"], setup["sessions"]["matmul"]
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


def _info(setup, C, provider=None) -> dict:
    cfg, ds = setup["cfg"], setup["ds"]
    flops = flops_per_request("srp4ctr", cfg, HIST, C, n_user_fields=len(ds.user_fields))
    info = {
        "C": C, "history": HIST, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads, "n_queries": cfg.n_queries, "head_hidden": list(cfg.head_hidden),
        "flops_per_candidate": flops.per_candidate, "flops_candidates": flops.per_candidate * C,
        "ort_execution_provider": "CPUExecutionProvider", "ort_intra_op_threads": THREADS,
        "ort_allow_spinning": SPIN, "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "engine_chunk": setup["engine"].chunk_candidates(HIST),
        "loadavg_1m": os.getloadavg()[0], "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__, "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if provider is not None:
        info["provider"] = provider
    return info


@pytest.mark.parametrize("C", CANDIDATES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_scorer_latency(benchmark, setup, provider, C):
    """One provider, timed by pytest-benchmark (median over the rounds)."""
    torch.set_num_threads(THREADS)
    calls, reference = _calls(setup, C)
    fn = calls[provider]
    out = fn()
    max_abs_diff = float(np.abs(np.asarray(out) - reference).max())
    assert max_abs_diff <= 1e-5  # every provider computes the same probabilities
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2, iterations=1)
    benchmark.group = f"C={C}"
    benchmark.extra_info.update(_info(setup, C, provider), max_abs_diff=max_abs_diff)


@pytest.mark.parametrize("C", CANDIDATES)
def test_interleaved_ratios(benchmark, setup, C):
    """All providers round-robin (the order rotated every round), so that load changes on a
    shared machine hit every provider alike; ``extra_info``: ``medians_ms``, ``gflops`` (model
    FLOPs of the candidates / median time) and ``ratios`` (``b/a``: how much longer b takes).
    The benchmark row itself is one timed call of ``ort_attention``."""
    torch.set_num_threads(THREADS)
    calls, _ = _calls(setup, C)
    rounds = 40
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for fn in calls.values():  # warm-up
        fn()
        fn()
    for r in range(rounds):
        k = r % len(PROVIDERS)
        for p in PROVIDERS[k:] + PROVIDERS[:k]:
            t0 = time.perf_counter()
            calls[p]()
            times[p].append(time.perf_counter() - t0)
    benchmark.pedantic(calls["ort_attention"], rounds=1, iterations=1)
    med = {p: 1e3 * float(np.median(t)) for p, t in times.items()}
    info = _info(setup, C)
    benchmark.group = f"interleaved C={C}"
    benchmark.extra_info.update(
        info, provider="interleaved", rounds=rounds, medians_ms=med,
        gflops={p: info["flops_candidates"] / (m * 1e6) for p, m in med.items()},
        ratios={f"{b}/{a}": med[b] / med[a] for a, b in RATIOS},
    )
