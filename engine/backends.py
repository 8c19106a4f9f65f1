"""Scoring backends: the candidate side of folded inference on one kind of hardware.

A backend turns (user caches, internal item ids) into logits. The engine does everything else
(input checks, raw-id encoding, chunking, the sigmoid), so a new backend only implements::

    class MyBackend(ScoringBackend):
        name = "mine"
        @classmethod
        def unavailable_reason(cls, device) -> str | None: ...   # None when it can run
        def score_one(self, cache, item_ids) -> logits [C]        # one user, K/V read in place
        def score_many(self, caches, item_ids, counts) -> logits [N]  # jagged, no padding

``item_ids`` are int64 internal ids on the engine's device (``counts[b]`` of them per user b,
one user after another); every tensor of the caches is on that device in the engine's dtype.
Backends hold no mutable state outside a lock, so the engine may call them from many threads.

- ``torch`` (:class:`TorchBackend`): the reference, everywhere; uses the folded item tables.
- ``triton`` (:class:`TritonBackend`): the fused candidate-tower kernels of
  :mod:`srp4ctr.kernels` on CUDA (on CPU only under ``TRITON_INTERPRET=1``, for tests).
- ``cpp`` (:class:`CppBackend`): the C++ CPU path from ``csrc/`` (``srp4ctr._C``); not built yet,
  so asking for it raises :class:`~srp4ctr.kernels.BackendUnavailableError`.
"""

from __future__ import annotations

import abc

import threading
from collections.abc import Sequence

import torch

from srp4ctr.errors import InputError
from srp4ctr.kernels import BackendUnavailableError, candidate_tower, triton_available
from srp4ctr.kernels._backend import interpreting

from .cache import UserCache
from .folded import FoldedModel, tower_torch

__all__ = [
    "BACKENDS",
    "CppBackend",
    "ScoringBackend",
    "TorchBackend",
    "TritonBackend",
    "resolve_backend",
]


class ScoringBackend(abc.ABC):
    """Base class of the scoring backends (see the module docstring for the contract)."""

    name = "base"

    def __init__(self, folded: FoldedModel):
        self.folded = folded

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` here, or None when it can."""
        return None

    @abc.abstractmethod
    def score_one(self, cache: UserCache, item_ids: torch.Tensor) -> torch.Tensor:
        """Logits of ``item_ids`` (internal ids, [C]) for one user."""

    @abc.abstractmethod
    def score_many(self, caches: Sequence[UserCache], item_ids: torch.Tensor,
                   counts: Sequence[int]) -> torch.Tensor:
        """Logits of the concatenated ``item_ids``; user i owns the next ``counts[i]``."""

    def describe(self) -> dict:
        return {"backend": self.name}


def _user_block(caches: Sequence[UserCache], counts: Sequence[int], device) -> torch.Tensor:
    """[N, h1]: each user's head block repeated for that user's candidates (h1 numbers each;
    the K/V are never repeated)."""
    hu = torch.stack([c.head_user for c in caches])
    return hu.repeat_interleave(torch.as_tensor(list(counts), device=device), dim=0)


class TorchBackend(ScoringBackend):
    """Plain torch on any device: folded item tables, one GEMM per projection, attention with
    the user's K/V read in place (``[C, H, Dh] x [n, H, Dh]``)."""

    name = "torch"

    def score_one(self, cache: UserCache, item_ids: torch.Tensor) -> torch.Tensor:
        fm = self.folded
        z0, q0, hz0 = fm.item_rows(item_ids)
        zn = None
        if fm.n_layers:
            kv = [cache.layer_kv(i) for i in range(fm.n_layers)]
            zn = tower_torch(fm, z0, q0, kv)
        return fm.head(zn, hz0, cache.head_user)

    def score_many(self, caches, item_ids, counts):
        fm = self.folded
        z0, q0, hz0 = fm.item_rows(item_ids)
        zn = None
        if fm.n_layers:
            segments, qs, ks = [], 0, 0
            for c, n in zip(caches, counts):
                segments.append((qs, qs + n, ks, ks + c.length))
                qs, ks = qs + n, ks + c.length
            k = torch.cat([c.k for c in caches], dim=1)  # [NL, Σn, H, Dh]: once per call
            v = torch.cat([c.v for c in caches], dim=1)
            zn = tower_torch(fm, z0, q0, [(k[i], v[i]) for i in range(fm.n_layers)], segments)
        return fm.head(zn, hz0, _user_block(caches, counts, item_ids.device))


class TritonBackend(ScoringBackend):
    """The fused Triton candidate-tower kernels (one launch per layer, jagged users by offsets);
    the head in torch with the folded z0 block. Inference only."""

    name = "triton"

    def __init__(self, folded: FoldedModel):
        super().__init__(folded)
        # The interpreter patches triton.language while it runs and autotuning fills shared
        # caches: one launch sequence at a time.
        self._lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if not triton_available():
            return ("backend='triton' needs triton installed and either a CUDA device or "
                    "TRITON_INTERPRET=1 (set before triton is imported)")
        if device.type == "cuda" and not interpreting():
            return None
        if device.type == "cpu" and interpreting():
            return None
        where = "CPU only under TRITON_INTERPRET=1" if interpreting() else "CUDA devices"
        return f"backend='triton' runs on {where}; the engine is on {device}"

    def _tower(self, z0, kv, q_offsets=None, kv_offsets=None):
        with self._lock:
            return candidate_tower(z0, kv, self.folded.layers, q_offsets, kv_offsets,
                                   backend="triton", validate=False)

    def score_one(self, cache: UserCache, item_ids: torch.Tensor) -> torch.Tensor:
        fm = self.folded
        z0, _, hz0 = fm.item_rows(item_ids)
        zn = None
        if fm.n_layers:
            zn = self._tower(z0, [cache.layer_kv(i) for i in range(fm.n_layers)])
        return fm.head(zn, hz0, cache.head_user)

    def score_many(self, caches, item_ids, counts):
        fm = self.folded
        z0, _, hz0 = fm.item_rows(item_ids)
        zn = None
        if fm.n_layers:
            dev = item_ids.device
            zero = torch.zeros(1, dtype=torch.int64)
            q_off = torch.cat([zero, torch.as_tensor(list(counts)).cumsum(0)]).to(dev)
            kv_off = torch.cat([zero, torch.as_tensor([c.length for c in caches]).cumsum(0)])
            k = torch.cat([c.k for c in caches], dim=1)
            v = torch.cat([c.v for c in caches], dim=1)
            zn = self._tower(z0, [(k[i], v[i]) for i in range(fm.n_layers)], q_off,
                             kv_off.to(dev))
        return fm.head(zn, hz0, _user_block(caches, counts, item_ids.device))


class CppBackend(ScoringBackend):
    """The C++ CPU kernels (``srp4ctr._C``, built from ``csrc/``). Not built yet: this class is
    the slot it will fill, with the same ``score_one`` / ``score_many`` contract."""

    name = "cpp"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        try:
            import srp4ctr._C as ext
        except ImportError:
            return ("backend='cpp': the C++ CPU kernels (srp4ctr._C, built from csrc/) are not "
                    "built in this installation; use backend='torch' (or 'auto')")
        if not hasattr(ext, "candidate_tower"):
            return ("backend='cpp': srp4ctr._C does not provide the candidate tower this engine "
                    "needs; use backend='torch' (or 'auto')")
        return "backend='cpp' is not wired into the engine yet; use backend='torch' (or 'auto')"


BACKENDS: dict[str, type[ScoringBackend]] = {
    "torch": TorchBackend,
    "triton": TritonBackend,
    "cpp": CppBackend,
}


def resolve_backend(name: str, device: torch.device) -> type[ScoringBackend]:
    """The backend class for ``name`` (``auto``, ``torch``, ``triton`` or ``cpp``) on ``device``.

    ``auto``: Triton on CUDA when it can run there, else torch. An explicit backend that cannot
    run raises :class:`~srp4ctr.kernels.BackendUnavailableError` saying why.
    """
    if not isinstance(name, str):
        raise InputError(f"backend must be a name, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "auto":
        if device.type == "cuda" and TritonBackend.unavailable_reason(device) is None:
            return TritonBackend
        return TorchBackend
    if key not in BACKENDS:
        raise InputError(
            f"unknown engine backend {name!r}; expected one of auto, {', '.join(BACKENDS)}"
        )
    cls = BACKENDS[key]
    reason = cls.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return cls
