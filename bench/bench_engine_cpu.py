"""CPU latency of one request through the engine vs. what a user would otherwise run.

Run explicitly (bench/ is not in the default test paths)::

    python -m pytest bench/bench_engine_cpu.py --benchmark-json=bench/results/engine_cpu.json

Model: d = 64, 2 layers, 2 heads, 4 Q-Former queries, head 384 -> 200 -> 80 -> 1, L = 200,
random weights (timing only), on a synthetic MovieLens-1M-format dataset written to a temporary
folder (nothing is downloaded). One user with a 200-interaction history; C candidates.

Providers (every one with ``torch.set_num_threads(THREADS)``):

- ``naive``: the training model's forward with the history repeated once per candidate (a batch
  of C identical histories, in chunks of ``NAIVE_CHUNK``): FG-BERT and the Q-Former run C times.
- ``eager_folded``: ``model.encode_users`` once + ``model.score_candidates_one_user`` (eager
  torch, the user's K/V read in place, no precomputed item tables).
- ``engine``: ``engine.encode_user(raw history)`` + ``engine.score(cache, raw ids)``: the
  whole request from raw data, including id mapping and behaviour features.
- ``eager_folded_cached`` / ``engine_cached``: the candidate side only, the user state already
  computed (a cache hit).
- ``engine_bf16_cached``: ``engine_cached`` in the engine's bfloat16 mode (not exact: its largest
  probability difference from fp32 is recorded as ``max_abs_diff``).

``test_request_latency`` times each provider on its own (pytest-benchmark rows);
``test_interleaved_ratios`` times all of them round-robin in one loop and stores the medians and
the ratios in ``extra_info`` — the figures to quote on a shared machine.

``benchmark.extra_info`` records shapes, analytic FLOPs (:func:`srp4ctr.models.flops_per_request`),
the provider, thread count (``SRP4CTR_BENCH_THREADS``, default 2), ``OMP_WAIT_POLICY``, the load
average, machine and versions. Compare ratios within one run: the machines are shared and noisy.
"""

from __future__ import annotations

import os

# The build machines are shared: with spinning OpenMP workers, an oversubscribed core turns every
# small parallel op into a wait of milliseconds (measured: 150 ms instead of 1 ms for C=100), so
# the timings would measure the neighbours. Passive waiting is set for every provider alike, and
# only if the caller did not choose (it must be set before torch loads its OpenMP runtime).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from srp4ctr import data
from srp4ctr.engine import Engine
from srp4ctr.models import SRP4CTR, ModelConfig, ModelSpec, flops_per_request

THREADS = int(os.environ.get("SRP4CTR_BENCH_THREADS", "2"))
HIST = 200
N_ITEMS = 3000
NAIVE_CHUNK = 256
CANDIDATES = (100, 1000, 4096)
CONFIG = {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_queries": 4, "max_len": HIST,
          "head_hidden": (200, 80), "dropout": 0.0}


def _write_ml1m(folder: Path, n_users: int = 8, n_items: int = N_ITEMS, seed: int = 0) -> Path:
    """A synthetic dataset in the MovieLens-1M ``::`` format; every user has > HIST ratings."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Thriller"]
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        for i in range(1, n_items + 1):
            g = "|".join(rng.choice(genres, size=int(rng.integers(1, 4)), replace=False))
            f.write(f"{i}::Movie {i} ({1930 + i % 70})::{g}\n")
    with open(folder / "users.dat", "w") as f:
        f.writelines(f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 20}::0000{u}\n" for u in range(1, n_users + 1))
    lines = []
    for u in range(1, n_users + 1):
        t = 978300000 + int(rng.integers(0, 10**6))
        for it in rng.choice(np.arange(1, n_items + 1), size=HIST + 60, replace=False):
            t += int(rng.integers(1, 50000))
            lines.append(f"{u}::{it}::{int(rng.integers(1, 6))}::{t}\n")
    (folder / "ratings.dat").write_text("".join(lines))
    return folder


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="srp4ctr-bench-") as tmp:
        root = Path(tmp)
        ds = data.prepare("ml-1m", path=str(_write_ml1m(root / "ml-1m")),
                          data_dir=str(root / "cache"), progress=False, max_len=HIST)
        torch.manual_seed(0)
        cfg = ModelConfig(**CONFIG)
        spec = ModelSpec.from_dataset(ds)
        model = SRP4CTR(spec, cfg).eval()
        engine = Engine.from_model(model, ds)
        engine_bf16 = Engine.from_model(model, ds, dtype=torch.bfloat16)

        # one user's raw history (the dataset's own last HIST+ interactions)
        rows = ds.user_rows(1)
        values = np.asarray(ds.value_vocab)
        history = {
            "item_id": ds.item_raw[ds.item[rows]],
            "rating": values[ds.behaviour["rating"][rows] - 1],
            "timestamp": ds.timestamp[rows],
            "user_id": int(ds.user_raw[1]),
        }
        arrays = ds.encode_user_history(history, max_len=HIST)
        assert int(arrays["hist_len"]) == HIST
        batch1 = {k: torch.as_tensor(v).reshape(1, -1) for k, v in arrays.items()
                  if k.startswith("hist_") and k != "hist_len"}
        batch1["hist_len"] = torch.tensor([HIST])
        for f in ds.user_fields:
            batch1[f"user_{f}"] = torch.as_tensor(arrays[f"user_{f}"]).reshape(1)
        rng = np.random.default_rng(1)
        raw_cands = {C: ds.item_raw[rng.integers(1, ds.n_items + 1, size=C)] for C in CANDIDATES}
        yield {"ds": ds, "model": model, "engine": engine, "engine_bf16": engine_bf16,
               "history": history,
               "batch1": batch1, "raw": raw_cands, "cfg": cfg}


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


PROVIDERS = ("naive", "eager_folded", "engine", "eager_folded_cached", "engine_cached",
             "engine_bf16_cached")
EXACT = tuple(p for p in PROVIDERS if p != "engine_bf16_cached")
# pairs (faster, slower) whose ratio the interleaved test reports
RATIOS = (("engine", "naive"), ("engine", "eager_folded"),
          ("engine_cached", "eager_folded_cached"), ("engine_bf16_cached", "engine_cached"))


def _calls(setup, C):
    """The providers' callables for C candidates, and the reference probabilities."""
    model, engine, bf16, ds = setup["model"], setup["engine"], setup["engine_bf16"], setup["ds"]
    raw, batch1, history = setup["raw"][C], setup["batch1"], setup["history"]
    cand = torch.as_tensor(ds.encode_items(raw))
    cache, cache16 = engine.encode_user(history), bf16.encode_user(history)
    with torch.no_grad():
        state = model.encode_users(batch1)
        reference = _eager_folded(model, batch1, cand, state)
    calls = {
        "naive": partial(_naive, model, batch1, cand),
        "eager_folded": partial(_eager_folded, model, batch1, cand),
        "eager_folded_cached": partial(_eager_folded, model, batch1, cand, state),
        "engine": lambda: engine.score(engine.encode_user(history), raw),
        "engine_cached": partial(engine.score, cache, raw),
        "engine_bf16_cached": partial(bf16.score, cache16, raw),
    }
    return calls, reference


def _info(setup, C, provider=None) -> dict:
    cfg, ds, engine = setup["cfg"], setup["ds"], setup["engine"]
    flops = flops_per_request("srp4ctr", cfg, HIST, C, n_user_fields=len(ds.user_fields))
    info = {
        "C": C,
        "history": HIST,
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "n_queries": cfg.n_queries, "head_hidden": list(cfg.head_hidden),
        "flops_user": flops.user, "flops_per_candidate": flops.per_candidate,
        "engine_backend": engine.backend, "engine_chunk": engine.chunk_candidates(HIST),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1m": os.getloadavg()[0],
        "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if provider is not None:
        info["provider"] = provider
        info["flops_model"] = (C * (flops.user + flops.per_candidate) if provider == "naive"
                               else flops.per_candidate * C if provider.endswith("_cached")
                               else flops.total)
    return info


@pytest.mark.parametrize("C", CANDIDATES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_request_latency(benchmark, setup, provider, C):
    """One provider, timed by pytest-benchmark (median over the rounds)."""
    torch.set_num_threads(THREADS)
    calls, reference = _calls(setup, C)
    fn = calls[provider]
    with torch.no_grad():
        max_abs_diff = (fn() - reference).abs().max().item()
        if provider in EXACT:
            assert max_abs_diff <= 1e-5  # every exact provider computes the same
        slow = provider == "naive" and C >= 1000
        benchmark.pedantic(fn, rounds=3 if slow else 15, warmup_rounds=1, iterations=1)
    benchmark.group = f"C={C}"
    benchmark.extra_info.update(_info(setup, C, provider), max_abs_diff=max_abs_diff)


@pytest.mark.parametrize("C", CANDIDATES)
def test_interleaved_ratios(benchmark, setup, C):
    """All providers in one loop, round-robin (rotating the order each round), so that load
    changes on a shared machine hit every provider alike; medians and ratios go to
    ``extra_info`` (``medians_ms``, ``ratios``: slower / faster). The benchmark row itself is
    one timed call of ``engine_cached``."""
    torch.set_num_threads(THREADS)
    calls, _ = _calls(setup, C)
    rounds = 15
    naive_rounds = 15 if C <= 100 else 3
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            fn()
        for r in range(rounds):
            order = PROVIDERS[r % len(PROVIDERS):] + PROVIDERS[: r % len(PROVIDERS)]
            for p in order:
                if p == "naive" and r >= naive_rounds:
                    continue
                t0 = time.perf_counter()
                calls[p]()
                times[p].append(time.perf_counter() - t0)
        benchmark.pedantic(calls["engine_cached"], rounds=1, iterations=1)
    med = {p: 1e3 * float(np.median(t)) for p, t in times.items()}
    benchmark.group = f"interleaved C={C}"
    benchmark.extra_info.update(
        _info(setup, C),
        provider="interleaved",
        rounds={p: len(t) for p, t in times.items()},
        medians_ms=med,
        ratios={f"{slow}/{fast}": med[slow] / med[fast] for fast, slow in RATIOS},
    )
