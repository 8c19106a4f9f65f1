"""The inference runtimes the torch-free scorer runs exported graphs in: ONNX Runtime and
OpenVINO, behind one ``run(feed, outputs) -> list of arrays`` call."""

from __future__ import annotations

import abc
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from srp4ctr.errors import InputError

__all__ = ["PRECISIONS", "RUNTIMES", "Session", "open_session"]

RUNTIMES = ("onnxruntime", "openvino")
#: "fp32": the graphs as exported (equal to the engine within 1e-5); "bf16": OpenVINO's bf16
#: inference precision (on CPUs without bf16 instructions OpenVINO keeps fp32); "int8": the
#: int8-quantised scorers of an export made with ``--int8`` (ONNX Runtime)
PRECISIONS = ("fp32", "bf16", "int8")


class Session(abc.ABC):
    """One compiled graph: ``inputs`` (names), ``outputs`` (names) and :meth:`run`."""

    inputs: list[str]
    outputs: list[str]

    @abc.abstractmethod
    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """The named ``outputs`` of one inference on ``feed`` (input name -> array)."""


class _OrtSession(Session):
    def __init__(self, path: Path, threads: int | None, precision: str,
                 providers: Sequence[str] | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("runtime='onnxruntime' needs the onnxruntime package "
                             "(pip install onnxruntime)") from None
        if precision == "bf16":
            raise InputError("ONNX Runtime runs the exported graphs as they are (precision "
                             "'fp32', or 'int8' for the quantised scorers); bf16 inference is "
                             "OpenVINO's (runtime='openvino')")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._s = ort.InferenceSession(str(path), opts,
                                       providers=list(providers or ["CPUExecutionProvider"]))
        self.inputs = [i.name for i in self._s.get_inputs()]
        self.outputs = [o.name for o in self._s.get_outputs()]

    def run(self, feed, outputs):
        return self._s.run(list(outputs), dict(feed))


class _OpenVinoSession(Session):
    def __init__(self, path: Path, threads: int | None, precision: str):
        try:
            import openvino as ov
        except ImportError:
            raise InputError("runtime='openvino' needs the openvino package "
                             "(pip install openvino)") from None
        if precision == "int8":
            raise InputError("the int8 scorers are ONNX Runtime's quantised graphs "
                             "(runtime='onnxruntime')")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16"
                                  else "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        self._c = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.inputs = [p.get_any_name() for p in self._c.inputs]
        self.outputs = [p.get_any_name() for p in self._c.outputs]
        self._local = threading.local()  # an infer request is not shared between threads

    def run(self, feed, outputs):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._c.create_infer_request()
        res = request.infer(dict(feed))
        by_name = {p.get_any_name(): v for p, v in res.items()}
        return [np.asarray(by_name[name]) for name in outputs]


def open_session(path: str | Path, runtime: str, *, threads: int | None = None,
                 precision: str = "fp32", providers: Sequence[str] | None = None) -> Session:
    """Compile the ONNX file ``path`` in ``runtime`` (one of :data:`RUNTIMES`)."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InputError(f"threads must be a positive integer or None, got {threads!r}")
    if runtime == "onnxruntime":
        return _OrtSession(Path(path), threads, precision, providers)
    if providers is not None:
        raise InputError("providers are ONNX Runtime's; OpenVINO runs on its CPU plugin")
    return _OpenVinoSession(Path(path), threads, precision)
