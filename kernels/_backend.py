"""Which implementation runs an op: the Triton kernels or the torch references.

The backend is resolved once, at the first call of any op, from

1. ``set_backend(...)`` if it was called,
2. else the environment variable ``SRP4CTR_KERNEL_BACKEND`` (``torch`` or ``triton``),
3. else ``TRITON`` when :func:`triton_available` and ``TORCH`` otherwise,

and every op also takes a per-call ``backend=`` that wins over all three. Nothing here imports
triton or touches a GPU at import time: :func:`triton_available` does both, once, when first asked.

Triton runs on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, which must be set before triton is imported). When the backend was chosen
automatically and the tensors live where Triton cannot run (CPU tensors on a CUDA machine, say),
the op quietly uses the torch reference; when Triton was asked for explicitly it raises instead.
"""

from __future__ import annotations

import enum
import functools
import os

import torch

from srp4ctr.errors import InputError, SRP4CTRError

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "get_backend",
    "interpreting",
    "set_backend",
    "triton_available",
]

ENV_BACKEND = "SRP4CTR_KERNEL_BACKEND"


class Backend(str, enum.Enum):
    """The implementations of a kernel op."""

    TRITON = "triton"
    TORCH = "torch"


class BackendUnavailableError(SRP4CTRError, RuntimeError):
    """Triton was asked for where it cannot run (not installed, or no CUDA and no interpreter)."""


def interpreting() -> bool:
    """True when the Triton CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """True when triton imports and can run: on a CUDA device, or on CPU under the interpreter.

    Computed once (it imports triton and may initialise CUDA), on first use, never at import.
    """
    try:
        import triton  # noqa: F401
    except Exception:  # an absent or broken install both mean "not available"
        return False
    return interpreting() or torch.cuda.is_available()


_chosen: Backend | None = None  # the resolved process-wide backend
_explicit = False  # whether _chosen was asked for (set_backend / env) rather than defaulted


def _coerce(backend: Backend | str) -> Backend:
    if isinstance(backend, Backend):
        return backend
    try:
        return Backend(str(backend).strip().lower())
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise InputError(
            f"unknown kernel backend {backend!r}; expected one of: {choices}"
        ) from None


def _require_triton() -> None:
    if not triton_available():
        raise BackendUnavailableError(
            "the Triton backend was requested but cannot run here: it needs triton installed and "
            "either a CUDA device or TRITON_INTERPRET=1 (set before triton is imported); "
            "use backend='torch' instead"
        )


def get_backend() -> Backend:
    """The process-wide backend, resolved on first call (see the module docstring)."""
    global _chosen, _explicit
    if _chosen is None:
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env:
            chosen = _coerce(env)
            if chosen is Backend.TRITON:
                _require_triton()
            _chosen, _explicit = chosen, True
        else:
            _chosen = Backend.TRITON if triton_available() else Backend.TORCH
            _explicit = False
    return _chosen


def set_backend(backend: Backend | str | None) -> None:
    """Choose the process-wide backend; ``None`` goes back to automatic choice at the next call."""
    global _chosen, _explicit
    if backend is None:
        _chosen, _explicit = None, False
        return
    chosen = _coerce(backend)
    if chosen is Backend.TRITON:
        _require_triton()
    _chosen, _explicit = chosen, True


def _triton_runs_on(device: torch.device) -> bool:
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda"


def select(
    backend: Backend | str | None, device: torch.device, needs_grad: bool, op: str
) -> Backend:
    """The backend one call of ``op`` runs on, given its per-call override and its tensors."""
    if backend is None:
        chosen, explicit = get_backend(), _explicit
    else:
        chosen, explicit = _coerce(backend), True
        if chosen is Backend.TRITON:
            _require_triton()
    if chosen is Backend.TORCH:
        return chosen
    if not _triton_runs_on(device):
        if explicit:
            where = "CPU tensors under TRITON_INTERPRET=1" if interpreting() else "CUDA tensors"
            raise BackendUnavailableError(
                f"{op}: the Triton backend runs on {where}, got tensors on {device}; "
                "move them or use backend='torch'"
            )
        return Backend.TORCH
    if needs_grad:
        raise InputError(
            f"{op}: the Triton kernels are inference-only and do not support autograd; "
            "call under torch.no_grad() / torch.inference_mode(), or use backend='torch'"
        )
    return chosen
