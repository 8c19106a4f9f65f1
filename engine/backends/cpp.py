"""Backend ``cpp``: the C++ CPU kernels (``srp4ctr._C``, built from ``csrc/`` by ``pip install``).

Candidate side (:class:`CppBackend`): the whole candidate side of a request (tower and head) in
one call, candidates in tiles over a thread pool, AVX-512 when the CPU has it (a portable path
otherwise). Precision follows the engine's dtype: ``float32`` is exact (fp32 FMA), ``bfloat16``
runs the products on AMX tiles where the CPU has them, else with AVX512-BF16 dot products (bf16
weights, K/V and activations, fp32 sums; softmax, LayerNorm, GELU and residuals in fp32).

User side (:class:`CppUserSide`, fp32): FG-BERT's layers over one user's embedded history
(writing the per-layer K/V the cache keeps), the final LayerNorm, the Q-Former and the head's
user block — one call instead of ~40 small torch ops. The embeddings (table look-ups) and the
Q-Former's per-user query offset stay in torch. Needs the uni cross-attention (``use_xattn``):
the pooled-history ablation is served by torch.

Options (:class:`~srp4ctr.engine.backends.BackendOptions`): ``isa``, ``tile``, ``threads`` /
``user_threads``. Every constant of the computation (the LayerNorm epsilon included) comes from
the model, through Python.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from srp4ctr.errors import CacheError
from srp4ctr.kernels import BackendUnavailableError

from ..cache import UserCache
from ..folded import FoldedModel
from ._base import BackendOptions, Scorer, UserSide, UserTensors, intra_op_threads, register
from .torch import item_rows

__all__ = ["CppBackend", "CppUserSide"]


@contextlib.contextmanager
def _isa_errors():
    """The extension refusing an instruction set this CPU lacks (``RuntimeError``) or a
    precision it cannot run it in (``ValueError``): a :class:`BackendUnavailableError`."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        if "isa=" not in str(e):
            raise
        raise BackendUnavailableError(f"backend='cpp': {e}") from None


#: the extension's message for a cache holding NaN / inf
_NON_FINITE = re.compile(r"users\[\d+\]\.(k|v|head_user): NaN or inf$")


def _as_buffer(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the typed numpy array the C++ side takes (sharing its memory; a
    contiguous copy where it is not contiguous): float32 as is, bfloat16 as its uint16 bits,
    int64 as is."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.numpy()


def _cache_buffers(c: UserCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, v, head_user)`` of a cache as :func:`_as_buffer` arrays, kept on the cache while
    its tensors stay the same objects (the arrays share their memory, so writes show; the
    extension checks the values on every call)."""
    key = (id(c.k), id(c.v), id(c.head_user))
    held = c.__dict__.get("_cpp_buffers")
    if held is None or held[0] != key:
        held = (key, (_as_buffer(c.k), _as_buffer(c.v), _as_buffer(c.head_user)))
        c.__dict__["_cpp_buffers"] = held
    return held[1]


def _np_f32(t: torch.Tensor) -> np.ndarray:
    """A CPU float32 contiguous numpy view (or copy) of a weight, for the C++ packers."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _extension(what: str):
    from srp4ctr._ext import extension, unavailable_reason

    ext = extension()
    if ext is None:
        raise BackendUnavailableError(f"{what}='cpp': {unavailable_reason()}")
    return ext


def _portable_only() -> str | None:
    """Why ``auto`` leaves the C++ path alone on this CPU (None: it does not). ``auto`` takes
    only what a benchmark measured faster than the torch backend: the AVX2, AVX-512 and AMX
    paths (faster at every candidate count on AMD EPYC Zen 3, Zen 4 and an Intel Xeon with AMX,
    bench/report.md and bench/archive/). The portable build measured 1.6-5x slower than torch at
    100-4096 candidates and its user side 1.5x slower (EPYC Zen 3, 2 threads). The NEON path
    (aarch64) is checked for parity under emulation only; its speed has not been measured on an
    Arm CPU, so ``auto`` does not pick it (``backend="cpp"`` does)."""
    from srp4ctr._ext import extension

    feats = extension().cpu_features()
    if feats.get("avx2") or feats.get("avx512"):
        return None
    if feats.get("neon"):
        return ("the C++ NEON path has not been measured against torch on an Arm CPU (ask for "
                "backend='cpp' to use it)")
    return ("this CPU has neither AVX2 + FMA nor AVX-512, and the portable C++ path is slower "
            "than torch")


class CppBackend(Scorer):
    """The C++ candidate side (see the module docstring)."""

    name = "cpp"
    checks_finite = True  # the extension refuses non-finite caches before it scores
    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, folded: FoldedModel, options: BackendOptions | None = None):
        super().__init__(folded, options)
        reason = self.unavailable_reason(folded.device, folded.dtype)
        if reason is not None:  # resolve_backend checked; only a direct construction gets here
            raise BackendUnavailableError(reason)
        ext = _extension("backend")
        fm, f32 = folded, _np_f32
        layers = [{name: f32(getattr(p, name)) for name in p._fields} for p in fm.layers]
        rest = [(f32(w), f32(b)) for w, b in fm.rest]
        precision = "bf16" if fm.dtype == torch.bfloat16 else "fp32"
        self._tables: tuple | None = None
        with _isa_errors():
            self._tower = ext.Tower(fm.d_model, fm.n_heads, layers,
                                    None if fm.head_zn is None else f32(fm.head_zn), rest,
                                    fm.h1, precision, self.options.isa, fm.eps)

    @classmethod
    def hardware_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"backend='cpp' runs on CPU; the engine is on {device}"
        if dtype not in cls.DTYPES:
            return f"backend='cpp' scores in float32 or bfloat16, not {dtype}"
        return None

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        from srp4ctr._ext import unavailable_reason

        reason = cls.hardware_reason(device, dtype)
        if reason is None and unavailable_reason() is not None:
            reason = f"backend='cpp': {unavailable_reason()}"
        return reason

    @classmethod
    def slower_than_torch_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        return _portable_only()

    def _run(self, item_ids: torch.Tensor, users: list[tuple[UserCache, int]]) -> torch.Tensor:
        fm = self.folded
        N = int(item_ids.shape[0])
        out = torch.empty(N, dtype=torch.float32)
        arr = _as_buffer
        if fm.tables:
            ids = item_ids.contiguous()
            if self._tables is None:  # the folded tables never change: converted once
                self._tables = tuple(None if t is None else arr(t)
                                     for t in (fm.z0, fm.q0, fm.hz0))
            tables = self._tables
        else:  # no per-item tables (huge catalogue): this request's rows, computed in torch
            tables = tuple(None if t is None else arr(t) for t in item_rows(fm, item_ids))
            ids = torch.arange(N, dtype=torch.int64)
        users_arg = [_cache_buffers(c) for c, _ in users]
        counts = np.fromiter((n for _, n in users), dtype=np.int64, count=len(users))
        try:
            self._tower.score(arr(ids), tables, users_arg, counts, out.numpy(),
                              self.options.pool_threads(), self.options.tile)
        except ValueError as e:
            m = _NON_FINITE.match(str(e))
            if m is None:
                raise
            raise CacheError(f"UserCache.{m.group(1)} holds NaN or inf") from None
        return out if fm.dtype == torch.float32 else out.to(fm.dtype)

    def score_one(self, cache: UserCache, item_ids: torch.Tensor) -> torch.Tensor:
        return self._run(item_ids, [(cache, int(item_ids.shape[0]))])

    def score_many(self, caches, item_ids, counts):
        return self._run(item_ids, [(c, int(n)) for c, n in zip(caches, counts)])

    def describe(self) -> dict:
        return {"backend": self.name, "isa": self._tower.isa,
                "precision": self._tower.precision, "threads": self.options.pool_threads(),
                "tile": self.options.tile}


class CppUserSide(UserSide):
    """The C++ user side (see the module docstring); equal to the model's ``encode_users`` to
    fp32 rounding (``tests/test_engine.py``)."""

    name = "cpp"

    @classmethod
    def unavailable_reason(cls, model, device: torch.device) -> str | None:
        from srp4ctr._ext import extension, unavailable_reason

        if device.type != "cpu":
            return f"user_side='cpp' runs on CPU; the engine is on {device}"
        ext = extension()
        if ext is None:
            return f"user_side='cpp': {unavailable_reason()}"
        if not hasattr(ext, "UserEncoder"):
            return ("user_side='cpp': srp4ctr._C predates the C++ user side; rebuild it "
                    "(pip install -e .)")
        if not model.config.use_xattn:
            return ("user_side='cpp' serves models with the uni cross-attention; this one pools "
                    "the history (use_xattn=False)")
        return None

    @classmethod
    def slower_than_torch_reason(cls, model, device: torch.device) -> str | None:
        return _portable_only()

    def __init__(self, model, options: BackendOptions | None = None):
        super().__init__(model, options)
        reason = self.unavailable_reason(model, torch.device("cpu"))
        if reason is not None:
            raise BackendUnavailableError(reason)
        ext = _extension("user_side")
        cfg, f32 = model.config, _np_f32

        def attn(a, prefix=""):
            out = {}
            for n in ("q", "k", "v", "o"):
                lin = getattr(a, f"w{n}")
                out[f"{prefix}w{n}"], out[f"{prefix}b{n}"] = f32(lin.weight), f32(lin.bias)
            return out

        def ffn(f):
            return {"w1": f32(f.w1.weight), "b1": f32(f.w1.bias),
                    "w2": f32(f.w2.weight), "b2": f32(f.w2.bias)}

        eps = set()

        def ln(m, name):
            eps.add(float(m.eps))
            return {f"{name}_w": f32(m.weight), f"{name}_b": f32(m.bias)}

        layers = [{**ln(L.ln1, "ln1"), **ln(L.ln2, "ln2"), **attn(L.attn), **ffn(L.ffn)}
                  for L in model.encoder.layers]
        enc, qf, w1 = model.encoder, model.qformer, model.head.first
        final_ln = tuple(ln(enc.final_ln, "f").values())
        if qf is not None:
            blocks = [{**ln(b.ln1, "ln1"), **ln(b.ln2, "ln2"), **ln(b.ln3, "ln3"),
                       **attn(b.self_attn, "self_"), **attn(b.cross_attn, "cross_"), **ffn(b.ffn)}
                      for b in qf.blocks]
            q_ln = tuple(ln(qf.ln, "q").values())
            n_queries = int(qf.queries.shape[0])
            c0 = model.head.cand_dim  # the Q-Former tokens' columns; user features after them
            head_user = (f32(w1.weight[:, c0 : c0 + n_queries * cfg.d_model]), f32(w1.bias))
        else:
            blocks, q_ln, n_queries = [], None, 0
            head_user = (None, f32(w1.bias))
        if len(eps) != 1:
            raise BackendUnavailableError(
                f"user_side='cpp' needs one LayerNorm epsilon for the whole user side, the model "
                f"has {sorted(eps)}")
        with _isa_errors():
            self._enc = ext.UserEncoder(cfg.d_model, cfg.n_heads, layers, final_ln, blocks,
                                        q_ln, head_user, n_queries, int(w1.weight.shape[0]),
                                        self.options.isa, eps.pop())
        self.n_queries = n_queries
        self.isa = self._enc.isa
        # head_user_features: the user-feature embedding's columns of the head's first layer,
        # added to the C++ head block per user (a [h1, u] product; the tokens' block is C++'s)
        self._head_user_feat = (w1.weight[:, -model.user_emb.out_dim:].detach()
                                if model.head_user_features else None)

    def encode_one(self, batch: Mapping[str, torch.Tensor], threads: int):
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
            extra = (F.linear(m.user_emb(batch)[0], self._head_user_feat)
                     if self._head_user_feat is not None else None)
        k, v, qt, hu = self._enc.encode(x, queries, threads)
        hu = torch.from_numpy(hu)
        if extra is not None:
            hu += extra
        shape = (k.shape[0], k.shape[1], cfg.n_heads, cfg.d_model // cfg.n_heads)
        return (torch.from_numpy(k).reshape(shape), torch.from_numpy(v).reshape(shape),
                torch.from_numpy(qt) if self.n_queries else None, hu)

    def encode(self, batch: Mapping[str, torch.Tensor]) -> list[UserTensors]:
        """One C++ call per user, no padding."""
        threads = self.options.pool_threads(user_side=True)
        out = []
        for i, n in enumerate(batch["hist_len"].tolist()):
            one = {key: t[i : i + 1, : max(n, 1)] if t.dim() == 2 else t[i : i + 1]
                   for key, t in batch.items()}
            with intra_op_threads(self.options.call_threads(user_side=True)):  # the look-ups
                k, v, qtokens, head_user = self.encode_one(one, threads)
            out.append(UserTensors(k, v, head_user, qtokens, None))
        return out

    def describe(self) -> dict:
        return {"user_side": self.name, "isa": self.isa,
                "threads": self.options.pool_threads(user_side=True)}


register("cpp", CppBackend, CppUserSide, needs_extension=True)
