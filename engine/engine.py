"""The serving engine: load a fine-tuned SRP4CTR checkpoint, encode users once, score candidates.

::

    engine = Engine.load("runs/srp4ctr", data_dir="data")
    cache = engine.encode_user({"item_id": [...], "rating": [...], "timestamp": [...]})
    probs = engine.score(cache, [1193, 661, 914])          # float32 [3]

Raw histories go through the dataset's own ``encode_user_history`` (the function training used
to build its samples) and raw candidate ids through its ``encode_items``, so serving cannot drift
from training. Per request FG-BERT runs once (:meth:`Engine.encode_user`); each candidate then
costs only the candidate tower and the head, with one-sided work folded away (see
:mod:`srp4ctr.engine.folded`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srp4ctr.errors import CacheError, CheckpointError, InputError, UnknownItemError
from srp4ctr.kernels import BackendUnavailableError

from .backends import CppBackend, CppUserEncoder, ScoringBackend, cpp_threads, resolve_backend
from .cache import UserCache
from .folded import DEFAULT_MAX_TABLE_BYTES, FoldedModel
from .inputs import as_history_dict, as_raw_ids

__all__ = ["DEFAULT_MAX_CHUNK_BYTES", "Engine"]

#: working memory of one scoring chunk, per device type. On CPU a small budget keeps a chunk's
#: scores and FFN activations in the caches: ≈ 800 candidates at history 200, d = 64, measured
#: 1.2-1.5x faster than one 4096-candidate pass with 1 or 2 threads (400-2000 are all close);
#: on a GPU larger chunks keep the launches few.
DEFAULT_MAX_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 512 << 20}
SERVING_KIND = "srp4ctr"
_THREADS = threading.local()


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    """Run the block with at most ``n`` torch intra-op threads on the calling thread (``None``:
    unchanged) and restore that thread's count afterwards.

    Torch keeps the count per thread once a thread has used it (OpenMP builds); a
    ``set_num_threads`` call also sets the default that threads pick up on their first parallel
    op. So the block lowers only the calling thread's count, each thread restores its own, and a
    thread that starts using torch while another is inside the block may start with ``n``.
    Nested blocks on one thread: the outermost one rules.
    """
    depth = getattr(_THREADS, "depth", 0)
    saved = torch.get_num_threads()
    change = n is not None and depth == 0 and n < saved
    _THREADS.depth = depth + 1
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        _THREADS.depth = depth
        if change:
            torch.set_num_threads(saved)


_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _as_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.strip().lower().replace("torch.", "")]
    raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


def _as_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"not a device: {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device='cuda' was asked for but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise InputError(f"the engine runs on 'cpu' or 'cuda', got {device!r}")
    return dev


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes, bytes): the identity used when a
    model does not come from a checkpoint (checkpoints use their weights file's sha256)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def serving_view(ds: Any, max_len: int | None = None) -> Any:
    """A copy of a prepared dataset that keeps only what serving needs (id maps, vocabularies,
    user table, behaviour-value rules), not the interaction arrays."""
    from srp4ctr.data import PreparedDataset

    empty32, empty64 = np.zeros(0, np.int32), np.zeros(0, np.int64)
    view = PreparedDataset(
        name=ds.name, user=empty32, item=empty32, timestamp=empty64,
        label=np.zeros(0, np.int8), split=np.zeros(0, np.int8),
        user_offsets=np.zeros(1, np.int64),
        behaviour={f: empty64 for f in ds.behaviour},
        item_table=ds.item_table, user_table=ds.user_table,
        item_raw=ds.item_raw, user_raw=ds.user_raw, meta=ds.meta,
        max_len=ds.max_len if max_len is None else max_len,
    )
    view.fingerprint = ds.fingerprint
    view.path = getattr(ds, "path", None)
    return view


def _find_prepared(root: Path, name: str, fingerprint: str) -> Path | None:
    """The folder under ``root`` holding a prepared ``name`` dataset with ``fingerprint``."""
    if not root.is_dir():
        return None
    for sub in sorted(root.iterdir()):
        meta = sub / "meta.json"
        if not (sub.is_dir() and meta.is_file()):
            continue
        try:
            m = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and m.get("fingerprint") == fingerprint and m.get("name") == name:
            return sub
    return None


def _resolve_dataset(where: Path, info: dict, dataset: Any, data_dir: Any) -> Any:
    from srp4ctr.data import PreparedDataset, default_data_dir, load_prepared, prepare

    name, fingerprint = info.get("name"), info.get("fingerprint")
    if not name or not fingerprint:
        raise CheckpointError(f"{where}: config.json does not name the dataset it was trained on")
    if isinstance(dataset, PreparedDataset):
        ds = dataset
    elif isinstance(dataset, (str, os.PathLike)):
        ds = load_prepared(dataset)
    elif dataset is not None:
        raise InputError(
            f"dataset must be a PreparedDataset or its folder, got {type(dataset).__name__}"
        )
    else:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        found = _find_prepared(root, name, fingerprint)
        if found is not None:
            ds = load_prepared(found)
        elif name == "ml-100k":  # the one dataset prepare() can fetch by itself
            ds = prepare(name, data_dir=root, progress=False)
        else:
            raise CheckpointError(
                f"{where}: trained on the prepared dataset {name!r} (fingerprint "
                f"{fingerprint[:12]}…), which is not in {root}; pass dataset= (the prepared "
                "dataset or its folder) or data_dir= (where it was prepared)"
            )
    if ds.fingerprint != fingerprint:
        raise CheckpointError(
            f"{where}: trained on dataset {name!r} with fingerprint {fingerprint[:12]}…, but the "
            f"dataset given is {ds.name!r} with fingerprint {ds.fingerprint[:12]}…"
        )
    return ds


class Engine:
    """Folded-inference serving of one SRP4CTR model. Build with :meth:`load` (from a checkpoint)
    or :meth:`from_model`.

    Attributes:
        model: the SRP4CTR model (fp32, eval mode) that encodes users.
        dataset: the dataset's serving view (id maps, vocabularies, behaviour rules).
        fingerprint: identity of the model (the checkpoint's weights sha256); caches carry it.
        device, dtype: where and in what precision candidates are scored (caches are kept in it).
        backend: the scoring backend's name (``"torch"``, ``"triton"``, ``"cpp"``).
        max_len: histories are cut to their last ``max_len`` interactions.
        max_chunk_bytes, chunk_size: the memory budget for one scoring chunk (or a fixed number
            of candidates per chunk); results depend on them only through the fp32 rounding of
            matrix products of other row counts (BLAS picks kernels by size).
        user_threads: at most this many torch intra-op threads while the model's forward runs the
            user side on CPU (``None``: torch's count, unchanged). With passive OpenMP waiting
            one user's ~40 small ops each wake the other threads: history 200, d = 64, 2 threads
            measured 4.8 ms, against 1.65 ms with ``user_threads=1``. The calling thread's count
            is lowered for the call and restored after it (see :func:`_intra_op_threads`).
        user_side: who runs the user side: ``"torch"`` (the model's own forward), ``"cpp"`` (the
            C++ encoder, :class:`~srp4ctr.engine.backends.CppUserEncoder`; CPU, fp32, models
            with the uni cross-attention), ``"auto"``: ``cpp`` with the ``cpp`` scoring backend
            where it can serve the model, else torch.
    """

    def __init__(self, model, dataset, *, fingerprint: str, device: Any = "cpu",
                 backend: str = "auto", dtype: Any = torch.float32,
                 max_chunk_bytes: int | None = None, chunk_size: int | None = None,
                 fold_items: bool | str = "auto", max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
                 user_threads: int | None = None, user_side: str = "auto",
                 checkpoint: str | None = None):
        from srp4ctr.models import SRP4CTR

        if not isinstance(model, SRP4CTR):
            raise InputError(f"the engine serves SRP4CTR models, got {type(model).__name__}")
        self.device = _as_device(device)
        self.dtype = _as_dtype(dtype)
        self._backend_cls = resolve_backend(backend, self.device, self.dtype)
        if max_chunk_bytes is None:
            max_chunk_bytes = DEFAULT_MAX_CHUNK_BYTES[self.device.type]
        for name, val in (("max_chunk_bytes", max_chunk_bytes), ("chunk_size", chunk_size),
                          ("user_threads", user_threads)):
            if val is None:
                continue
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise InputError(f"{name} must be a positive int, got {val!r}")
        if dataset.fingerprint != model.spec.fingerprint and model.spec.fingerprint:
            raise CheckpointError(
                f"the model was built for dataset fingerprint {model.spec.fingerprint[:12]}…, "
                f"the dataset has {dataset.fingerprint[:12]}…"
            )
        if dataset.n_items != model.spec.n_items:
            raise CheckpointError(
                f"the model knows {model.spec.n_items} items, the dataset {dataset.n_items}"
            )
        self.model = model.to(self.device, torch.float32).eval()
        self.config = model.config
        self.max_len = int(model.config.max_len)
        self.dataset = serving_view(dataset, self.max_len)
        self.fingerprint = str(fingerprint)
        self.checkpoint = checkpoint
        self.max_chunk_bytes = max_chunk_bytes
        self.chunk_size = chunk_size
        self.user_threads = user_threads
        with torch.no_grad():
            self.folded = FoldedModel(model, self.dtype, self.device, fold_items, max_table_bytes)
        self._backend: ScoringBackend = self._backend_cls(self.folded)
        self._user_encoder = self._pick_user_side(user_side)
        self._string_ids = self.dataset.item_raw.dtype.kind not in "iu"

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike, *, device: Any = "cpu",
             backend: str = "auto", dtype: Any = torch.float32, dataset: Any = None,
             data_dir: str | os.PathLike | None = None,
             max_chunk_bytes: int | None = None, chunk_size: int | None = None,
             fold_items: bool | str = "auto",
             max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
             user_threads: int | None = None, user_side: str = "auto") -> Engine:
        """An engine for the fine-tuning checkpoint ``checkpoint_dir`` (kind ``srp4ctr``).

        Args:
            device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``...).
            backend: ``"auto"`` (Triton on CUDA, the C++ kernels on CPU, else torch),
                ``"torch"``, ``"triton"``, ``"cpp"``.
            dtype: the scoring precision, ``torch.float32`` (exact), ``float16`` or ``bfloat16``.
            dataset: the prepared dataset the model was trained on (a ``PreparedDataset`` or its
                folder); by default it is found by the checkpoint's dataset name and fingerprint
                under ``data_dir`` (default: ``$SRP4CTR_DATA_DIR``, else the user cache folder).
            max_chunk_bytes / chunk_size: working-memory budget of one scoring chunk (default
                :data:`DEFAULT_MAX_CHUNK_BYTES` of the device type), or a fixed number of
                candidates per chunk. Results do not depend on them beyond fp32 rounding.
            fold_items: build the per-item tables (``"auto"``: when they fit ``max_table_bytes``).
            user_threads, user_side: the user side's threads and implementation (see the class
                docstring).

        Raises:
            CheckpointError: not a checkpoint, truncated or altered weights, another kind than
                ``srp4ctr``, or a dataset whose fingerprint is not the checkpoint's.
            BackendUnavailableError: the requested backend cannot run here.
        """
        from srp4ctr.train.checkpoint import read_config
        from srp4ctr.train.loop import load_model

        path = Path(checkpoint_dir)
        cfg = read_config(path)
        kind = cfg.get("kind")
        if kind != SERVING_KIND:
            hint = (" (a pre-training checkpoint: fine-tune it first)"
                    if kind in ("fgbert", "bert") else "")
            raise CheckpointError(
                f"{path}: a {kind!r} checkpoint{hint}; the engine serves SRP4CTR fine-tuning "
                f"checkpoints (kind {SERVING_KIND!r})"
            )
        resolve_backend(backend, _as_device(device), _as_dtype(dtype))  # fail before loading
        ds = _resolve_dataset(path, cfg.get("dataset") or {}, dataset, data_dir)
        model, cfg = load_model(path, dataset_fingerprint=ds.fingerprint)
        return cls(model, ds, fingerprint=cfg["weights_sha256"], device=device, backend=backend,
                   dtype=dtype, max_chunk_bytes=max_chunk_bytes, chunk_size=chunk_size,
                   fold_items=fold_items, max_table_bytes=max_table_bytes,
                   user_threads=user_threads, user_side=user_side, checkpoint=str(path))

    @classmethod
    def from_model(cls, model, dataset, *, fingerprint: str | None = None, **kwargs) -> Engine:
        """An engine for an in-memory SRP4CTR ``model`` and its prepared ``dataset``.

        The engine takes the model over: it is moved to the engine's device (fp32) and put in
        eval mode. ``fingerprint`` defaults to the sha256 of the model's state dict; ``kwargs``
        as :meth:`load`.
        """
        fp = model_fingerprint(model) if fingerprint is None else fingerprint
        return cls(model, dataset, fingerprint=fp, **kwargs)

    # ------------------------------------------------------------------ info
    @property
    def backend(self) -> str:
        """Name of the scoring backend in use."""
        return self._backend.name

    @property
    def n_items(self) -> int:
        return self.dataset.n_items

    @property
    def oov_item(self) -> int:
        return self.dataset.oov_item

    def describe(self) -> dict[str, Any]:
        """What this engine is: model, dataset, backend, precision, folding, memory settings."""
        return {
            "checkpoint": self.checkpoint,
            "model_fingerprint": self.fingerprint,
            "dataset": {"name": self.dataset.name, "fingerprint": self.dataset.fingerprint,
                        "n_items": self.dataset.n_items, "n_users": self.dataset.n_users},
            "model_config": self.config.to_dict(),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "backend": self.backend,
            "max_len": self.max_len,
            "max_chunk_bytes": self.max_chunk_bytes,
            "chunk_size": self.chunk_size,
            "user_threads": self.user_threads,
            "user_side": self.user_side,
            "folded": self.folded.describe(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        }

    def __repr__(self) -> str:
        return (f"Engine(backend={self.backend!r}, device={str(self.device)!r}, "
                f"dtype={str(self.dtype).replace('torch.', '')}, dataset={self.dataset.name!r}, "
                f"model={self.fingerprint[:12]})")

    # ------------------------------------------------------------------ ids
    def encode_items(self, candidates: Any, strict: bool = False) -> torch.Tensor:
        """Raw item ids (list, numpy array or tensor, 1-D) -> internal ids, int64 on the device.

        Unknown ids map to the out-of-vocabulary id (``n_items + 1``), or raise
        :class:`~srp4ctr.errors.UnknownItemError` when ``strict``. Negative ids, fractional floats,
        NaN, booleans, strings (for integer-id datasets) and non-1-D input always raise
        :class:`~srp4ctr.errors.InputError`.
        """
        raw = as_raw_ids(candidates, string_ids=self._string_ids)
        ids = self.dataset.encode_items(raw, strict=False)
        if strict:
            unknown = ids == self.dataset.oov_item
            if unknown.any():
                shown = raw[unknown][:5].tolist()
                raise UnknownItemError(
                    f"{int(unknown.sum())} unknown item id(s), e.g. {shown} (strict=True)"
                )
        t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    # ------------------------------------------------------------------ users
    def _history_arrays(self, history: Any, user_id: Any = None) -> dict[str, np.ndarray]:
        d = history if isinstance(history, _Normalised) else as_history_dict(history, user_id)
        try:
            return self.dataset.encode_user_history(d, max_len=self.max_len)
        except InputError:
            raise
        except (ValueError, TypeError, OverflowError) as e:
            raise InputError(f"invalid history: {e}") from None

    def _batch(self, arrays: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Right-padded model batch (the training layout) of encoded histories."""
        ds = self.dataset
        lens = [int(a["hist_len"]) for a in arrays]
        width = max(1, max(lens))
        B = len(arrays)

        def padded(key: str) -> torch.Tensor:
            out = np.zeros((B, width), dtype=np.int64)
            for r, a in enumerate(arrays):
                out[r, : lens[r]] = a[key]
            return torch.from_numpy(out)

        batch = {"hist_item": padded("hist_item"),
                 "hist_len": torch.tensor(lens, dtype=torch.int64)}
        for f in ds.behaviour_fields:
            batch[f"hist_{f}"] = padded(f"hist_{f}")
        batch["user"] = torch.tensor([int(a.get("user", 0)) for a in arrays], dtype=torch.int64)
        for f, table in ds.user_table.items():
            batch[f"user_{f}"] = torch.tensor(
                [int(a[f"user_{f}"]) if f"user_{f}" in a else int(table[0]) for a in arrays],
                dtype=torch.int64,
            )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _pick_user_side(self, user_side: Any) -> CppUserEncoder | None:
        key = user_side.strip().lower() if isinstance(user_side, str) else None
        if key not in ("auto", "torch", "cpp"):
            raise InputError(f"user_side must be 'auto', 'torch' or 'cpp', got {user_side!r}")
        if key == "torch" or self.device.type != "cpu":
            if key == "cpp":
                raise BackendUnavailableError(
                    f"user_side='cpp' runs on CPU; the engine is on {self.device}")
            return None
        if key == "auto" and (not isinstance(self._backend, CppBackend)
                              or not self.config.use_xattn):
            return None
        try:
            return CppUserEncoder(self.model)
        except BackendUnavailableError:
            if key == "cpp":
                raise
            return None  # auto: e.g. an extension built before it had the user side

    @property
    def user_side(self) -> str:
        """Who runs the user side: ``"cpp"`` or ``"torch"``."""
        return "cpp" if self._user_encoder is not None else "torch"

    def _user_side_threads(self) -> int | None:
        """Intra-op threads for the model's user side (None: leave torch's count)."""
        return self.user_threads if self.device.type == "cpu" else None

    def _cache(self, k, v, head_user, qtokens, pooled, user_id) -> UserCache:
        """A checked cache in the engine's dtype from one user's user-side tensors."""
        def own(t):
            return None if t is None else t.detach().to(self.dtype).contiguous()

        c = UserCache(own(k), own(v), own(head_user), own(qtokens), own(pooled),
                      fingerprint=self.fingerprint, user_id=user_id)
        c.check_finite()
        return c

    def _caches(self, arrays, user_ids) -> list[UserCache]:
        if self._user_encoder is not None:  # one C++ call per user, no padding
            threads = cpp_threads(self.user_threads or getattr(self._backend, "threads", None))
            out = []
            for a, uid in zip(arrays, user_ids):
                with _intra_op_threads(self._user_side_threads()):  # the embedding look-ups
                    k, v, qtokens, head_user = self._user_encoder.encode_one(
                        self._batch([a]), threads)
                out.append(self._cache(k, v, head_user, qtokens, None, uid))
            return out
        batch = self._batch(arrays)
        with torch.no_grad(), _intra_op_threads(self._user_side_threads()):
            state = self.model.encode_users(batch)
        fm, out = self.folded, []
        for i, a in enumerate(arrays):
            n = int(a["hist_len"])
            if fm.n_layers:
                k = torch.stack([t[i, :n] for t in state.k])
                v = torch.stack([t[i, :n] for t in state.v])
            else:
                k = v = torch.zeros(0, n, fm.n_heads, fm.head_dim, device=self.device)
            out.append(self._cache(k, v, state.head_user[i], _row(state.qtokens, i),
                                   _row(state.pooled, i), user_ids[i]))
        return out

    def encode_user(self, history: Any, *, user_id: Any = None) -> UserCache:
        """Run the user side once: FG-BERT over the last ``max_len`` interactions, the Q-Former
        and the head's user block -> a :class:`UserCache`.

        Args:
            history: a :class:`~srp4ctr.engine.History` or a mapping of equal-length sequences
                ``item_id`` (raw ids), ``timestamp`` (unix seconds) and the dataset's behaviour
                value (``rating`` for MovieLens, ``behavior`` for Taobao), optionally
                ``user_id``. May be empty. Unknown items are kept as the OOV item.
            user_id: the raw user id (overrides ``history``'s) for the user features; None or
                an unknown id: no user features.

        Raises:
            InputError: mismatched lengths, non-numeric timestamps, negative or non-integer item
                ids, unknown behaviour values, non-1-D sequences.
        """
        d = _Normalised(as_history_dict(history, user_id))
        return self._caches([self._history_arrays(d)], [_jsonable(d.get("user_id"))])[0]

    def encode_users(self, histories: Sequence[Any]) -> list[UserCache]:
        """:meth:`encode_user` for many users in one padded FG-BERT batch (the training layout);
        each cache keeps only its user's valid positions."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise InputError("histories must be a sequence of histories")
        if not histories:
            return []
        norm = [_Normalised(as_history_dict(h)) for h in histories]
        arrays = [self._history_arrays(d) for d in norm]
        return self._caches(arrays, [_jsonable(d.get("user_id")) for d in norm])

    # ------------------------------------------------------------------ caches
    def check_cache(self, cache: Any, *, move: bool = True, where: str = "") -> UserCache:
        """Verify that ``cache`` was built by this engine's model and is usable; returns it (on
        the engine's device when ``move``). Raises :class:`CacheError` otherwise."""
        pre = f"{where}: " if where else ""
        if not isinstance(cache, UserCache):
            raise CacheError(f"{pre}expected a UserCache, got {type(cache).__name__}")
        if cache.fingerprint != self.fingerprint:
            raise CacheError(
                f"{pre}the cache was built by model {cache.fingerprint[:12]}…, this engine "
                f"serves model {self.fingerprint[:12]}…; encode the user again"
            )
        fm = self.folded
        want = (fm.n_layers, fm.n_heads, fm.head_dim)
        got = (cache.n_layers, cache.n_heads, cache.head_dim)
        if got != want or tuple(cache.head_user.shape) != (fm.h1,):
            raise CacheError(f"{pre}cache shapes {got}/{tuple(cache.head_user.shape)} do not fit "
                             f"the model ({want}/{(fm.h1,)})")
        if cache.length > self.max_len:
            raise CacheError(f"{pre}cache length {cache.length} exceeds max_len {self.max_len}")
        if cache.dtype != self.dtype:
            raise CacheError(f"{pre}cache dtype {cache.dtype} but the engine scores in "
                             f"{self.dtype}")
        cache.check_finite()
        return cache.to(self.device) if move else cache

    # ------------------------------------------------------------------ scoring
    def chunk_candidates(self, length: int) -> int:
        """Candidates per scoring chunk for a history of ``length`` (from the memory budget)."""
        if self.chunk_size is not None:
            return self.chunk_size
        fm = self.folded
        elt = torch.empty((), dtype=self.dtype).element_size()
        per = elt * (2 * fm.n_heads * max(length, 1)  # scores + probabilities
                     + (2 * self.config.ffn_mult + 8) * fm.d_model  # FFN and the states
                     + 3 * fm.h1 + sum(w.shape[0] for w, _ in fm.rest)) + 8
        return max(1, self.max_chunk_bytes // per)

    def _logits_one(self, cache: UserCache, ids: torch.Tensor) -> torch.Tensor:
        step = self.chunk_candidates(cache.length)
        C = ids.shape[0]
        if C <= step:
            return self._backend.score_one(cache, ids)
        out = torch.empty(C, dtype=self.dtype, device=self.device)
        for s in range(0, C, step):
            out[s : s + step] = self._backend.score_one(cache, ids[s : s + step])
        return out

    def score(self, cache: UserCache, candidates: Any, strict: bool = False, *,
              logits: bool = False) -> torch.Tensor:
        """Click probabilities of ``candidates`` for the user of ``cache``.

        Args:
            cache: from :meth:`encode_user` of this engine's model.
            candidates: raw item ids, 1-D (list, numpy array or integer tensor); may be empty.
            strict: unknown ids raise :class:`~srp4ctr.errors.UnknownItemError` instead of being
                scored as the out-of-vocabulary item.
            logits: return logits instead of probabilities.

        Returns:
            float32 ``[C]`` on the engine's device, in the order of ``candidates``. Large lists
            are scored in chunks (see :meth:`chunk_candidates`) with the same results (up to the
            fp32 rounding of matrix products with other row counts).

        Raises:
            CacheError: a cache from another model, or with NaN/inf.
            InputError: malformed candidate ids (see :meth:`encode_items`).
        """
        cache = self.check_cache(cache)
        ids = self.encode_items(candidates, strict)
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            out = self._logits_one(cache, ids).float()
        return out if logits else torch.sigmoid(out)

    def score_many(self, caches: Sequence[UserCache], candidate_lists: Sequence[Any],
                   strict: bool = False, *, logits: bool = False) -> list[torch.Tensor]:
        """:meth:`score` for many users in one call: ``caches[b]`` with ``candidate_lists[b]``.

        Users are batched jagged (offsets; nothing padded to the longest user or list) into
        chunks under the same memory budget. Returns one float32 tensor per user, equal to
        ``score(caches[b], candidate_lists[b])`` (up to fp32 rounding). Every input is checked
        before any work, so a bad one fails the call with nothing computed.
        """
        if isinstance(caches, UserCache) or not isinstance(caches, Sequence):
            raise InputError("score_many takes a sequence of caches (use score for one user)")
        if isinstance(candidate_lists, (str, bytes)) or not isinstance(candidate_lists, Sequence):
            raise InputError("candidate_lists must be a sequence of candidate id lists")
        if len(caches) != len(candidate_lists):
            raise InputError(
                f"{len(caches)} caches but {len(candidate_lists)} candidate lists"
            )
        checked = [self.check_cache(c) for c in caches]
        ids = [self.encode_items(c, strict) for c in candidate_lists]
        results: list[torch.Tensor | None] = [None] * len(checked)
        group: list[int] = []
        budget = self.chunk_candidates(0)

        def flush() -> None:
            if not group:
                return
            counts = [ids[b].shape[0] for b in group]
            with torch.no_grad():
                out = self._backend.score_many([checked[b] for b in group],
                                               torch.cat([ids[b] for b in group]), counts)
            for b, part in zip(group, out.float().split(counts)):
                results[b] = part
            group.clear()

        total, max_len = 0, 0
        for b in range(len(checked)):
            C = ids[b].shape[0]
            if C == 0:
                results[b] = torch.zeros(0, dtype=torch.float32, device=self.device)
                continue
            n = checked[b].length
            budget = self.chunk_candidates(max(max_len, n))
            if C > self.chunk_candidates(n):  # one big list: this user alone, in chunks
                with torch.no_grad():
                    results[b] = self._logits_one(checked[b], ids[b]).float()
                continue
            if group and total + C > budget:
                flush()
                total, max_len = 0, 0
            group.append(b)
            total += C
            max_len = max(max_len, n)
        flush()
        return [r if logits else torch.sigmoid(r) for r in results]


class _Normalised(dict):
    """A history already through :func:`as_history_dict`."""


def _row(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """Row i of an optional per-user state tensor."""
    return None if t is None else t[i]


def _jsonable(user_id: Any) -> Any:
    """A raw user id as a JSON-able value (numpy scalars -> Python), else None."""
    if user_id is None:
        return None
    if isinstance(user_id, np.generic):
        user_id = user_id.item()
    if isinstance(user_id, (str, int, float)) and not isinstance(user_id, bool):
        return user_id
    return None
