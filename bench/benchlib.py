"""What the benchmark suites share: settings from the environment, machine facts, the synthetic
MovieLens-format data, the ``extra_info`` every case records and the interleaved timing loop.

Environment:

- ``SRP4CTR_BENCH_THREADS`` (default 2): torch threads and ONNX Runtime intra-op threads, the
  same for every provider.
- ``SRP4CTR_BENCH_SMOKE=1``: one round per case and the smallest shapes; checks that the suites
  run, measures nothing (``srp4ctr bench --smoke`` sets it).
- ``SRP4CTR_BENCH_ORT_SPIN=1``: let ONNX Runtime's workers spin (off by default, like
  ``OMP_WAIT_POLICY=PASSIVE`` for torch: on a shared machine spinning workers wait for a busy core).

Every case stores in ``benchmark.extra_info`` the keys the report (``srp4ctr bench``,
``bench/report.py``) reads: ``table`` (a table of the suite), ``case`` (its row),
``provider``, ``baseline`` (the eager-torch provider of that table, if any), ``x`` (the number
of candidates, for the latency plot), ``flops`` (analytic FLOPs of one timed call), ``dtype`` and
``device`` (which measured GEMM rate is its roofline), ``items``/``unit`` (throughput), shapes,
``threads`` and ``machine``.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

THREADS = int(os.environ.get("SRP4CTR_BENCH_THREADS", "2"))
SMOKE = os.environ.get("SRP4CTR_BENCH_SMOKE", "0") == "1"
ORT_SPIN = os.environ.get("SRP4CTR_BENCH_ORT_SPIN", "0")

# The serving model of the engine, ONNX and request suites (issue 6's shape): d = 64, 2 layers,
# 2 heads, 4 Q-Former queries, head 384 -> 200 -> 80 -> 1, history 200.
HIST = 200
N_ITEMS = 3000
CONFIG = {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_queries": 4, "max_len": HIST,
          "head_hidden": (200, 80), "dropout": 0.0}


class Unavailable(Exception):
    """A provider that cannot run here; its cases are skipped with this reason."""


def pick(full, smoke):
    """``full`` normally, ``smoke`` in a smoke run."""
    return smoke if SMOKE else full


def rounds(full: int) -> int:
    """Timed rounds of a case: ``full``, or 1 in a smoke run."""
    return 1 if SMOKE else full


def warmups(full: int) -> int:
    return 0 if SMOKE else full


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: the vector instruction sets the kernels and the runtimes branch on, as /proc/cpuinfo names them
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str:
    """The CPU's vector instruction sets that matter here (``/proc/cpuinfo`` flags, e.g.
    ``avx2 fma``), or ``unknown``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(
                    ISA_FLAGS)
    except OSError:
        pass
    return "unknown"


def machine() -> dict:
    """Platform, CPU model, cores, library versions, threads and the load when the case ran."""
    import torch

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    info = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "threads": THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def record(benchmark, *, table: str, case: str, provider: str, baseline: str | None = None,
           x: float | None = None, flops: float | None = None, min_bytes: float | None = None,
           dtype: str = "float32", device: str = "cpu", items: int | None = None,
           unit: str | None = None, **shapes) -> None:
    """Group the case and store the report's keys (module docstring) plus ``shapes``."""
    import torch

    benchmark.group = f"{table} | {case}"
    benchmark.extra_info.update(
        table=table, case=case, provider=provider, baseline=baseline, x=x, flops=flops,
        min_bytes=min_bytes, dtype=dtype, device=device, items=items, unit=unit,
        threads=torch.get_num_threads(), smoke=SMOKE, machine=machine(), **shapes,
    )


def timed(benchmark, fn: Callable, full_rounds: int, full_warmup: int = 1):
    """pytest-benchmark's timing of ``fn`` (one call per round; the median is what the report
    quotes): ``full_rounds`` rounds, or one in a smoke run."""
    return benchmark.pedantic(fn, rounds=rounds(full_rounds), warmup_rounds=warmups(full_warmup),
                              iterations=1)


def interleave(calls: dict[str, Callable], n_rounds: int,
               max_rounds: dict[str, int] | None = None) -> tuple[dict[str, float], dict[str, int]]:
    """Every callable once per round, the order rotated each round, so that load changes on a
    shared machine hit every provider alike. One warm-up call each first. Returns the medians
    (ms) and the number of rounds of each (``max_rounds`` caps slow ones)."""
    names = list(calls)
    cap = max_rounds or {}
    times: dict[str, list[float]] = {p: [] for p in names}
    for fn in calls.values():
        fn()
    for r in range(n_rounds):
        k = r % len(names)
        for p in names[k:] + names[:k]:
            if len(times[p]) >= cap.get(p, n_rounds):
                continue
            t0 = time.perf_counter()
            calls[p]()
            times[p].append(time.perf_counter() - t0)
    medians = {p: 1e3 * float(np.median(t)) for p, t in times.items()}
    return medians, {p: len(t) for p, t in times.items()}


def cpp_unavailable() -> str | None:
    """Why the engine's C++ backend cannot run here (None when it can)."""
    import torch

    from srp4ctr.engine.backends import CppBackend

    return CppBackend.unavailable_reason(torch.device("cpu"), torch.float32)


def cuda_unavailable() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    return None


def ort_session(path: Path):
    """An ONNX Runtime CPU session with ``THREADS`` intra-op threads, one inter-op thread and
    spinning as ``SRP4CTR_BENCH_ORT_SPIN`` says."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # its best
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", ORT_SPIN)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def serving_scorer(folder: Path, sessions: dict):
    """``srp4ctr.serving.Scorer`` of an export folder whose graphs run in the bench's own ONNX
    Runtime sessions (``sessions``: role -> :func:`ort_session`, the same spinning setting as
    every other provider)."""
    from srp4ctr.serving import Scorer

    class _Session:
        def __init__(self, s):
            self._s = s

        def run(self, feed, outputs):
            return self._s.run(list(outputs), dict(feed))

    scorer = Scorer.load(folder, threads=THREADS)
    for role, sess in sessions.items():
        setattr(scorer, {"user_encoder": "encoder", "scorer": "scorer",
                         "scorer_multi": "multi"}[role], _Session(sess))
    return scorer


def openvino_bf16_reason() -> str | None:
    """Why OpenVINO would not run bf16 on this CPU (None: it would; it picks bf16 by itself on
    CPUs with AVX512-BF16 or AMX)."""
    try:
        import openvino as ov
    except ImportError as e:
        return f"OpenVINO is not installed ({e})"
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        return f"OpenVINO has no bf16 on this CPU (capabilities {', '.join(caps)})"
    return None


def openvino_model(path: Path, precision: str | None = "f32"):
    """``feed -> probabilities`` of an ONNX graph compiled by OpenVINO for the CPU with
    ``THREADS`` inference threads, one stream, the latency hint, and ``precision`` (``"f32"``; None:
    OpenVINO's own choice, bf16 where the CPU has it)."""
    try:
        import openvino as ov
    except ImportError as e:
        raise Unavailable(f"OpenVINO is not installed ({e}); pip install openvino") from None
    config = {"INFERENCE_NUM_THREADS": THREADS, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request, out = compiled.create_infer_request(), compiled.output("probs")
    return lambda feed: request.infer(feed)[out]


def to_numpy(x) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def write_ml1m(folder: Path, n_users: int = 8, n_items: int = N_ITEMS,
               per_user: int = HIST + 60, seed: int = 0) -> Path:
    """A synthetic dataset in the MovieLens-1M ``::`` format (``movies.dat``, ``users.dat``,
    ``ratings.dat``): ``per_user`` distinct random items per user, random ratings, increasing
    timestamps. Nothing is downloaded."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Thriller"]
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        for i in range(1, n_items + 1):
            g = "|".join(rng.choice(genres, size=int(rng.integers(1, 4)), replace=False))
            f.write(f"{i}::Movie {i} ({1930 + i % 70})::{g}\n")
    with open(folder / "users.dat", "w") as f:
        f.writelines(f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 20}::0000{u}\n"
                     for u in range(1, n_users + 1))
    lines = []
    for u in range(1, n_users + 1):
        t = 978300000 + int(rng.integers(0, 10**6))
        for it in rng.choice(np.arange(1, n_items + 1), size=per_user, replace=False):
            t += int(rng.integers(1, 50000))
            lines.append(f"{u}::{it}::{int(rng.integers(1, 6))}::{t}\n")
    (folder / "ratings.dat").write_text("".join(lines))
    return folder


def raw_history(ds, user: int, end: int | None = None) -> dict:
    """User ``user``'s raw history (raw ids, ratings, unix seconds), as a caller has it: all of
    it, or its rows before flat row ``end`` (a sample's own history)."""
    rows = ds.user_rows(user)
    if end is not None:
        rows = slice(rows.start, end)
    return {
        "item_id": ds.item_raw[ds.item[rows]],
        "rating": np.asarray(ds.value_vocab)[ds.behaviour["rating"][rows].astype(np.int64) - 1],
        "timestamp": ds.timestamp[rows],
        "user_id": int(ds.user_raw[user]),
    }


def history_batch(ds, history: dict, max_len: int) -> dict:
    """The model's batch of one user (``[1, n]`` tensors) from a raw history, by the data
    pipeline's own encoding."""
    import torch

    arrays = ds.encode_user_history(history, max_len=max_len)
    batch = {k: torch.as_tensor(v).reshape(1, -1) for k, v in arrays.items()
             if k.startswith("hist_") and k != "hist_len"}
    batch["hist_len"] = torch.tensor([int(arrays["hist_len"])])
    for f in ds.user_fields:
        batch[f"user_{f}"] = torch.as_tensor(arrays[f"user_{f}"]).reshape(1)
    return batch
