"""Fixtures and hooks of the benchmark suites (``bench/bench_*.py``; not in the default test run).

- Every case runs with ``torch.set_num_threads(SRP4CTR_BENCH_THREADS)`` (default 2).
- ``served`` (session): the serving model of the engine, ONNX and request suites, built once per
  run: a synthetic MovieLens-1M-format dataset in a temporary folder, an SRP4CTR model with random
  weights (seed 0; timing only), one user's raw 200-interaction history, engines by backend and
  precision, and the model exported to ONNX (both scorer-attention variants), all on demand.
- The JSON written by ``--benchmark-json`` gets an ``srp4ctr`` section: smoke or not, threads,
  the machine, the pytest command, and every skipped case with its reason and every failed one,
  so that the report can say what was not measured and why.
"""

from __future__ import annotations

import os

# On a shared machine spinning OpenMP workers wait for busy cores (measured: a 1 ms scoring call
# took 150 ms); passive waiting for every provider alike, set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime as _dt
import sys
import tempfile
from pathlib import Path

import benchlib
import numpy as np
import pytest
import torch
from benchlib import Unavailable

from srp4ctr import data

_OUTCOMES: dict[str, list] = {"skipped": [], "failed": []}


@pytest.fixture(autouse=True)
def _pin_threads():
    torch.set_num_threads(benchlib.THREADS)
    yield


class Served:
    """The serving model and what the suites build from it (engines, ONNX exports) on demand."""

    def __init__(self, root: Path):
        from srp4ctr.models import SRP4CTR, ModelConfig, ModelSpec

        self.root = root
        self.ds = data.prepare("ml-1m", path=str(benchlib.write_ml1m(root / "ml-1m")),
                               data_dir=str(root / "cache"), progress=False,
                               max_len=benchlib.HIST)
        torch.manual_seed(0)
        self.cfg = ModelConfig(**benchlib.CONFIG)
        self.model = SRP4CTR(ModelSpec.from_dataset(self.ds), self.cfg).eval()
        self.history = benchlib.raw_history(self.ds, 1)
        self.batch1 = benchlib.history_batch(self.ds, self.history, benchlib.HIST)
        assert int(self.batch1["hist_len"][0]) == benchlib.HIST
        self._engines: dict[str, object] = {}
        self._exports: dict[str, Path] = {}
        self._sessions: dict[object, object] = {}

    def flops(self, C: int):
        """Analytic FLOPs of one request with C candidates (:func:`flops_per_request`)."""
        from srp4ctr.models import flops_per_request

        return flops_per_request("srp4ctr", self.cfg, benchlib.HIST, C,
                                 n_user_fields=len(self.ds.user_fields))

    def candidates(self, C: int, seed: int = 1) -> np.ndarray:
        """C raw item ids drawn at random (with repeats) from the catalogue."""
        rng = np.random.default_rng(seed)
        return self.ds.item_raw[rng.integers(1, self.ds.n_items + 1, size=C)]

    def engine(self, name: str):
        """``torch``, ``torch_bf16``, ``cpp``, ``cpp_bf16``, or ``cpp_<fp32|bf16>_<isa>`` (the C++
        path forced onto an instruction set; only where ``auto`` picks another one) on CPU; an
        unavailable one raises :class:`Unavailable` with the reason."""
        if name not in self._engines:
            from srp4ctr.engine import Engine

            backend, _, low = name.partition("_")
            low, _, isa = low.partition("_")
            if backend == "cpp" and (reason := benchlib.cpp_unavailable()) is not None:
                self._engines[name] = Unavailable(reason)
            else:
                kw = {"dtype": torch.bfloat16} if low == "bf16" else {}
                if isa:
                    kw["isa"] = isa
                try:
                    engine = Engine.from_model(self.model, self.ds, backend=backend, **kw)
                except Exception as e:  # noqa: BLE001 - the reason is reported, not hidden
                    engine = Unavailable(f"{type(e).__name__}: {e}")
                if isa and not isinstance(engine, Unavailable):
                    default = self.engine(f"{backend}_{low}")
                    if default._backend.describe()["isa"] == isa:
                        engine = Unavailable(f"the default {low} path already is {isa} here")
                if not isinstance(engine, Unavailable) and engine.backend != backend:
                    # the engine fell back (e.g. cpp -> torch): that is not this provider
                    engine = Unavailable(f"backend={backend!r} fell back to {engine.backend!r}")
                self._engines[name] = engine
        got = self._engines[name]
        if isinstance(got, Unavailable):
            raise got
        return got

    def engine_or_skip(self, name: str):
        """:meth:`engine`, or skip the case saying why it cannot run."""
        try:
            return self.engine(name)
        except Unavailable as e:
            pytest.skip(str(e))

    def onnx_dir(self, variant: str) -> Path:
        """The model exported with scorer attention ``variant`` (``matmul`` or ``attention``,
        opset 23 for both so that only the attention differs); exported once per run."""
        if variant not in self._exports:
            try:
                import onnx  # noqa: F401
                import onnxruntime  # noqa: F401

                from srp4ctr.engine.onnx_export import export_engine
            except ImportError as e:
                raise Unavailable(f"ONNX export needs the onnx extra ({e})") from None
            out = self.root / f"onnx-{variant}"
            export_engine(self.engine("torch"), out, attention=variant, opset=23, verify=False)
            self._exports[variant] = out
        return self._exports[variant]

    def openvino(self, bf16: bool = False):
        """The MatMul scorer graph compiled by OpenVINO (:func:`benchlib.openvino_model`): fp32,
        or (``bf16``) OpenVINO's own precision where that is bf16; once per run."""
        key = ("openvino", bf16)
        if key not in self._sessions:
            if bf16 and (reason := benchlib.openvino_bf16_reason()) is not None:
                raise Unavailable(reason)
            self._sessions[key] = benchlib.openvino_model(
                self.onnx_dir("matmul") / "scorer.onnx", None if bf16 else "f32")
        return self._sessions[key]

    def compiled_candidate_side(self):
        """``(state, cand) -> probabilities``: the eager folded candidate side under
        ``torch.compile(mode="max-autotune")`` (one function; each candidate count compiles
        once, on its first call)."""
        if "compiled" not in self._sessions:
            model = self.model

            def candidate_side(state, cand):
                return torch.sigmoid(model.score_candidates_one_user(state, cand))

            self._sessions["compiled"] = torch.compile(candidate_side, mode="max-autotune",
                                                       dynamic=False)
        return self._sessions["compiled"]

    def session(self, variant: str, graph: str = "scorer"):
        """An ONNX Runtime session (:func:`benchlib.ort_session`) of ``graph``.onnx of the
        ``variant`` export, created once per run."""
        key = (variant, graph)
        if key not in self._sessions:
            self._sessions[key] = benchlib.ort_session(self.onnx_dir(variant) / f"{graph}.onnx")
        return self._sessions[key]


@pytest.fixture(scope="session")
def served():
    torch.set_num_threads(benchlib.THREADS)
    with tempfile.TemporaryDirectory(prefix="srp4ctr-bench-") as tmp:
        yield Served(Path(tmp))


def _suite(nodeid: str) -> str:
    name = Path(nodeid.split("::", 1)[0]).stem
    return name.removeprefix("bench_")


def pytest_runtest_logreport(report):
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        _OUTCOMES["skipped"].append({"nodeid": report.nodeid, "suite": _suite(report.nodeid),
                                     "reason": reason})
    elif report.failed:
        message = getattr(report.longrepr, "reprcrash", None)
        text = message.message if message is not None else str(report.longrepr)[-500:]
        _OUTCOMES["failed"].append({"nodeid": report.nodeid, "suite": _suite(report.nodeid),
                                    "when": report.when, "message": text})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["srp4ctr"] = {
        "smoke": benchlib.SMOKE,
        "threads": benchlib.THREADS,
        "machine": benchlib.machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pytest_command": " ".join(["python -m pytest", *(
            "--benchmark-json=FILE" if a.startswith("--benchmark-json") else a
            for a in sys.argv[1:])]),
        **_OUTCOMES,
    }
