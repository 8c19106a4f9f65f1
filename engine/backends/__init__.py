"""Scoring backends: each runs folded inference on one kind of hardware, both halves of it.

A backend module owns a candidate scorer (:class:`Scorer`: user caches + internal item ids ->
logits) and a user side (:class:`UserSide`: a model batch -> per-user K/V, Q-Former tokens, head
block) and registers them under its name; the engine does everything else (input checks, raw-id
encoding, chunking, the cache, the sigmoid). One vocabulary everywhere: ``auto``, ``torch``,
``triton``, ``cpp``.

- ``torch`` (:mod:`.torch`): the reference, everywhere: the kernels' reference tower on the
  folded item tables; the model's own forward for users.
- ``triton`` (:mod:`.triton`): the fused candidate-tower kernels on CUDA (CPU only under
  ``TRITON_INTERPRET=1``, for tests); the Q-Former's cross-attention on ``query_pool``.
- ``cpp`` (:mod:`.cpp`): the C++ CPU kernels (``srp4ctr._C``), fp32 or bf16; the user side in
  C++ (fp32).

**The resolution rule** (:func:`resolve_backend`, :func:`resolve_user_side`):

- ``auto`` scores with ``triton`` on CUDA and with ``cpp`` on CPU (float32 and bfloat16) where
  they can run and are not measured slower than torch there (the C++ path needs AVX2 + FMA or
  AVX-512 for that: its portable build is slower than torch), else with ``torch``; its user side is the scoring backend's own where that can
  encode the model (e.g. not the C++ one for the pooled-history ablation), else torch's.
- A backend named explicitly must run: where it cannot (``triton`` without CUDA, ``cpp`` on CUDA
  or in float16, ``user_side="cpp"`` for a model without the uni cross-attention) the engine
  raises :class:`~srp4ctr.kernels.BackendUnavailableError` saying why.
- One exception, the fallback: when the only thing missing is the C++ extension's build (not
  compiled, or cannot be loaded), ``cpp`` and ``auto`` score with ``torch`` after one
  ``RuntimeWarning`` per process.
"""

from ._base import (
    BACKENDS,
    BackendOptions,
    Scorer,
    UserSide,
    UserTensors,
    explain_backend,
    intra_op_threads,
    register,
    resolve_backend,
    resolve_user_side,
)
from .cpp import CppBackend, CppUserSide
from .torch import TorchBackend, TorchUserSide
from .triton import TritonBackend, TritonUserSide

__all__ = [
    "BACKENDS",
    "BackendOptions",
    "CppBackend",
    "CppUserSide",
    "Scorer",
    "TorchBackend",
    "TorchUserSide",
    "TritonBackend",
    "TritonUserSide",
    "UserSide",
    "UserTensors",
    "explain_backend",
    "intra_op_threads",
    "register",
    "resolve_backend",
    "resolve_user_side",
]
