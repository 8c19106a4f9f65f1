"""Shared pytest set-up: marker handling and the NaN-poisoning fixture.

Markers (declared in pyproject.toml):

- ``interpreter``: Triton kernel tests that run on CPU through the Triton interpreter. They need
  ``TRITON_INTERPRET=1`` in the environment *before* triton is imported, so they run in their own
  process: ``TRITON_INTERPRET=1 python -m pytest -m interpreter``. In a run without it they are
  deselected (the header says so). ``-m interpreter`` alone switches the interpreter on, when
  triton has not been imported yet.
- ``gpu``: needs a CUDA device; skipped without one. Checked when the test runs, never at
  collection, so collecting never touches a GPU.
- ``cpp``: needs the C++ extension (``srp4ctr._C``); skipped without it, except under
  ``SRP4CTR_REQUIRE_CPP=1`` (the project's test run sets it), where a missing extension fails
  the test.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_configure(config):
    if (
        (config.getoption("markexpr", default="") or "").strip() == "interpreter"
        and not _interpreting()
        and "triton" not in sys.modules
    ):
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_report_header(config):
    if _interpreting():
        return "Triton interpreter: on (TRITON_INTERPRET=1); interpreter-marked tests run on CPU"
    return (
        "Triton interpreter: off; interpreter-marked tests are deselected "
        "(run them with: TRITON_INTERPRET=1 python -m pytest -m interpreter)"
    )


def pytest_collection_modifyitems(config, items):
    if _interpreting():
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("interpreter") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if item.get_closest_marker("cpp"):
        from srp4ctr import _ext

        if _ext.extension() is None:
            reason = f"needs the C++ extension: {_ext.unavailable_reason()}"
            if os.environ.get("SRP4CTR_REQUIRE_CPP", "0") not in ("", "0"):
                pytest.fail(f"SRP4CTR_REQUIRE_CPP=1 but {reason}")
            pytest.skip(reason)


@pytest.fixture
def nan_poison(monkeypatch):
    """Fill every float tensor from ``torch.empty`` / ``torch.empty_like`` with NaN (ints with a
    large sentinel) for the test's duration, so an output tile a kernel forgets to write shows up
    as NaN instead of passing by luck on zeroed memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if isinstance(t, torch.Tensor):
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))
            elif t.dtype != torch.bool:
                t.fill_(torch.iinfo(t.dtype).max)
        return t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield
