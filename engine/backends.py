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
- ``cpp`` (:class:`CppBackend`): the C++ CPU path from ``csrc/`` (``srp4ctr._C``), fp32 or
  bf16; when the extension is not built, the engine falls back to torch with one warning.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Sequence

import numpy as np
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


def _np_f32(t: torch.Tensor) -> np.ndarray:
    """A CPU float32 contiguous numpy view (or copy) of a weight, for the C++ packers."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def cpp_threads(explicit: int | None = None) -> int:
    """Threads for a C++ call: ``explicit`` if set, else ``SRP4CTR_CPP_THREADS``, else
    ``torch.get_num_threads()`` now."""
    if explicit:
        return int(explicit)
    env = os.environ.get("SRP4CTR_CPP_THREADS")
    return int(env) if env else torch.get_num_threads()


class CppBackend(ScoringBackend):
    """The C++ CPU kernels (``srp4ctr._C``, built from ``csrc/``): the whole candidate side of a
    request (tower and head) in one call, candidates in tiles over a thread pool, AVX-512 when
    the CPU has it (a portable path otherwise).

    Precision follows the engine's dtype: ``float32`` is exact (fp32 FMA), ``bfloat16`` runs the
    products on AMX tiles where the CPU has them, else with AVX512-BF16 dot products (bf16
    weights, K/V and activations, fp32 sums; softmax, LayerNorm, GELU and residuals in fp32).
    Threads: ``threads`` if set, else ``SRP4CTR_CPP_THREADS``, else ``torch.get_num_threads()``
    at call time. ``SRP4CTR_CPP_ISA`` (``auto``, ``amx`` (bf16 only), ``avx512``, ``generic``)
    forces the instruction set; ``SRP4CTR_CPP_TILE`` (default 48) sets the candidates per work
    item.
    """

    name = "cpp"
    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, folded: FoldedModel):
        super().__init__(folded)
        from srp4ctr._ext import extension

        ext = extension()
        if ext is None:  # resolve_backend checked; only a direct construction gets here
            raise BackendUnavailableError(self.unavailable_reason(folded.device))
        if folded.dtype not in self.DTYPES:
            raise BackendUnavailableError(
                f"backend='cpp' scores in float32 or bfloat16, not {folded.dtype}")
        fm = folded
        f32 = _np_f32
        layers = [{name: f32(getattr(p, name)) for name in p._fields} for p in fm.layers]
        rest = [(f32(w), f32(b)) for w, b in fm.rest]
        precision = "bf16" if fm.dtype == torch.bfloat16 else "fp32"
        isa = os.environ.get("SRP4CTR_CPP_ISA", "auto")
        self._tower = ext.Tower(fm.d_model, fm.n_heads, layers,
                                None if fm.head_zn is None else f32(fm.head_zn), rest, fm.h1,
                                precision, isa)
        self.threads: int | None = None
        self.tile = int(os.environ.get("SRP4CTR_CPP_TILE", "48"))  # candidates per work item
        self._dtype_name = str(fm.dtype).replace("torch.", "")
        self._dummy = torch.zeros(1, dtype=fm.dtype)  # a valid address for absent tables

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        from srp4ctr._ext import unavailable_reason

        if device.type != "cpu":
            return f"backend='cpp' runs on CPU; the engine is on {device}"
        reason = unavailable_reason()
        if reason is not None:
            return f"backend='cpp': {reason}"
        return None

    def _threads(self) -> int:
        return cpp_threads(self.threads)

    def _run(self, item_ids: torch.Tensor, users: list[tuple[UserCache, int]]) -> torch.Tensor:
        fm = self.folded
        N = int(item_ids.shape[0])
        out = torch.empty(N, dtype=torch.float32)
        if fm.tables:
            ids = item_ids.contiguous()
            z0, q0, hz0 = fm.z0, fm.q0, fm.hz0
        else:  # no per-item tables (huge catalogue): this request's rows, computed in torch
            z0, q0, hz0 = (t.contiguous() if t is not None else None
                           for t in fm.item_rows(item_ids))
            ids = torch.arange(N, dtype=torch.int64)
        q0 = self._dummy if q0 is None else q0
        rows = int(z0.shape[0])
        keep = []  # contiguous copies must outlive the call
        table = np.empty((len(users), 5), dtype=np.int64)
        for b, (c, count) in enumerate(users):
            k, v, hu = c.k.contiguous(), c.v.contiguous(), c.head_user.contiguous()
            keep.append((k, v, hu))
            table[b] = (k.data_ptr(), v.data_ptr(), hu.data_ptr(), c.length, count)
        self._tower.score(ids.data_ptr(), N, (z0.data_ptr(), q0.data_ptr(), hz0.data_ptr(), rows,
                                              str(z0.dtype).replace("torch.", "")),
                          table, self._dtype_name, out.data_ptr(), self._threads(), self.tile)
        del keep
        return out if fm.dtype == torch.float32 else out.to(fm.dtype)

    def score_one(self, cache: UserCache, item_ids: torch.Tensor) -> torch.Tensor:
        return self._run(item_ids, [(cache, int(item_ids.shape[0]))])

    def score_many(self, caches, item_ids, counts):
        return self._run(item_ids, [(c, int(n)) for c, n in zip(caches, counts)])

    def describe(self) -> dict:
        return {"backend": self.name, "isa": self._tower.isa,
                "precision": self._tower.precision, "threads": self._threads()}


class CppUserEncoder:
    """The user side of one model in C++ (``srp4ctr._C.UserEncoder``, fp32): FG-BERT's layers over
    one user's embedded history (writing the per-layer K/V the cache keeps), the final
    LayerNorm, the Q-Former and the head's user block — one call instead of ~40 small torch ops.
    The embeddings (table look-ups) and the Q-Former's per-user query offset stay in torch.

    Equal to the model's ``encode_users`` to fp32 rounding (``tests/test_engine.py``). Needs the
    uni cross-attention (``use_xattn``): the pooled-history ablation is served by torch.
    """

    def __init__(self, model):
        from srp4ctr._ext import extension

        ext = extension()
        if ext is None:
            from srp4ctr._ext import unavailable_reason

            raise BackendUnavailableError(f"user_side='cpp': {unavailable_reason()}")
        if not hasattr(ext, "UserEncoder"):
            raise BackendUnavailableError(
                "user_side='cpp': srp4ctr._C predates the C++ user side; rebuild it "
                "(pip install -e .)")
        cfg = model.config
        if not cfg.use_xattn:
            raise BackendUnavailableError(
                "user_side='cpp' serves models with the uni cross-attention; this one pools the "
                "history (use_xattn=False)")
        self.model = model
        f32 = _np_f32
        def attn(a, prefix=""):
            out = {}
            for n in ("q", "k", "v", "o"):
                lin = getattr(a, f"w{n}")
                out[f"{prefix}w{n}"], out[f"{prefix}b{n}"] = f32(lin.weight), f32(lin.bias)
            return out

        def ffn(f):
            return {"w1": f32(f.w1.weight), "b1": f32(f.w1.bias),
                    "w2": f32(f.w2.weight), "b2": f32(f.w2.bias)}

        def ln(m, name):
            return {f"{name}_w": f32(m.weight), f"{name}_b": f32(m.bias)}

        layers = [{**ln(L.ln1, "ln1"), **ln(L.ln2, "ln2"), **attn(L.attn), **ffn(L.ffn)}
                  for L in model.encoder.layers]
        enc = model.encoder
        qf = model.qformer
        w1 = model.head.first
        d = cfg.d_model
        if qf is not None:
            blocks = [{**ln(b.ln1, "ln1"), **ln(b.ln2, "ln2"), **ln(b.ln3, "ln3"),
                       **attn(b.self_attn, "self_"), **attn(b.cross_attn, "cross_"), **ffn(b.ffn)}
                      for b in qf.blocks]
            q_ln = (f32(qf.ln.weight), f32(qf.ln.bias))
            n_queries = int(qf.queries.shape[0])
            head_user = (f32(w1.weight[:, model.head.cand_dim:]), f32(w1.bias))
        else:
            blocks, q_ln, n_queries = [], None, 0
            head_user = (None, f32(w1.bias))
        isa = os.environ.get("SRP4CTR_CPP_ISA", "auto")
        self._enc = ext.UserEncoder(d, cfg.n_heads, layers,
                                    (f32(enc.final_ln.weight), f32(enc.final_ln.bias)), blocks,
                                    q_ln, head_user, n_queries, int(w1.weight.shape[0]), isa)
        self.n_queries = n_queries
        self.isa = self._enc.isa

    def encode_one(self, batch: dict, threads: int):
        """One user's ``batch`` (``[1, n]`` tensors, n = its history length) -> ``(k, v, qtokens,
        head_user)``: k, v ``[n_layers, n, H, Dh]``, qtokens ``[M, d]`` or None, head_user
        ``[h1]``, float32 tensors on the CPU."""
        m, cfg = self.model, self.model.config
        with torch.no_grad():
            x, _ = m.encoder.embed(batch)
            queries = None
            if self.n_queries:
                queries = m.qformer.queries
                if m.query_offset is not None:
                    queries = queries + m.query_offset(m.user_emb(batch)).reshape(
                        self.n_queries, cfg.d_model)
                queries = queries.detach().contiguous().numpy()
            x = x[0, : int(batch["hist_len"][0])].detach().contiguous().numpy()
        k, v, qt, hu = self._enc.encode(x, queries, threads)
        shape = (k.shape[0], k.shape[1], cfg.n_heads, cfg.d_model // cfg.n_heads)
        return (torch.from_numpy(k).reshape(shape), torch.from_numpy(v).reshape(shape),
                torch.from_numpy(qt) if self.n_queries else None, torch.from_numpy(hu))


BACKENDS: dict[str, type[ScoringBackend]] = {
    "torch": TorchBackend,
    "triton": TritonBackend,
    "cpp": CppBackend,
}


def resolve_backend(name: str, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> type[ScoringBackend]:
    """The backend class for ``name`` (``auto``, ``torch``, ``triton`` or ``cpp``) on ``device``.

    ``auto``: Triton on CUDA when it can run there; on CPU the C++ kernels for float32 and
    bfloat16 (they measure faster than torch at every candidate count, bench/report.md), else
    torch. When the C++ extension is wanted (``auto`` on CPU, or ``cpp``) but is not built or
    cannot be loaded, torch is used with one warning per process. Other backends that cannot run
    (Triton without CUDA, ``cpp`` on CUDA or in float16) raise
    :class:`~srp4ctr.kernels.BackendUnavailableError` saying why.
    """
    from srp4ctr._ext import unavailable_reason, warn_fallback

    if not isinstance(name, str):
        raise InputError(f"backend must be a name, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in ("auto", *BACKENDS):
        raise InputError(
            f"unknown engine backend {name!r}; expected one of auto, {', '.join(BACKENDS)}"
        )
    if key == "auto":
        if device.type == "cuda" and TritonBackend.unavailable_reason(device) is None:
            return TritonBackend
        if device.type == "cpu" and dtype in CppBackend.DTYPES:
            if unavailable_reason() is None:
                return CppBackend
            warn_fallback("backend='auto' on CPU")
        return TorchBackend
    if key == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(CppBackend.unavailable_reason(device))
        if dtype not in CppBackend.DTYPES:
            raise BackendUnavailableError(
                f"backend='cpp' scores in float32 or bfloat16, not {dtype}")
        if unavailable_reason() is not None:
            warn_fallback("backend='cpp'")
            return TorchBackend
        return CppBackend
    cls = BACKENDS[key]
    reason = cls.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return cls
