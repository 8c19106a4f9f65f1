"""The serving engine: load a fine-tuned SRP4CTR checkpoint, encode users once, score candidates.

::

    engine = Engine.load("runs/srp4ctr", data_dir="data", backend="cpp", threads=2)
    cache = engine.encode_user({"item_id": [...], "rating": [...], "timestamp": [...]})
    probs = engine.score(cache, [1193, 661, 914])          # float32 [3]

Raw histories go through the dataset's own ``encode_user_history`` (the function training used
to build its samples) and raw candidate ids through its ``encode_items``, so serving cannot drift
from training. Per request the user side runs once (:meth:`Engine.encode_user`, on the backend's
user side); each candidate then costs only the candidate tower and the head, with one-sided work
folded away (see :mod:`srp4ctr.engine.folded`). Serving choices are one
:class:`~srp4ctr.engine.EngineConfig`; the backends are :mod:`srp4ctr.engine.backends`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srp4ctr.errors import CacheError, CheckpointError, InputError
from srp4ctr.serving.inputs import as_history_dict, encode_candidates, encode_history

from .backends import (
    BackendOptions,
    Scorer,
    UserSide,
    explain_backend,
    resolve_backend,
    resolve_user_side,
)
from .cache import UserCache
from .config import DEFAULT_MAX_CHUNK_BYTES, EngineConfig
from .folded import FoldedModel
from .inputs import model_batch
from .loading import load_serving_model, model_fingerprint, serving_view

__all__ = ["DEFAULT_MAX_CHUNK_BYTES", "Engine", "model_fingerprint"]


def _dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Engine:
    """Folded-inference serving of one SRP4CTR model. Build with :meth:`load` (from a checkpoint)
    or :meth:`from_model`.

    Attributes:
        config: the resolved :class:`~srp4ctr.engine.EngineConfig` (device, dtype, backend,
            threads...; :meth:`describe` reports it).
        model: the SRP4CTR model (fp32, eval mode) whose weights are served.
        model_config: its :class:`~srp4ctr.models.ModelConfig`.
        dataset: the dataset's serving view (id maps, vocabularies, behaviour rules).
        fingerprint: identity of the model (the checkpoint's weights sha256); caches carry it.
        device, dtype: where and in what precision candidates are scored (caches are kept in it).
        backend, user_side: the names of the scoring backend and of the user side in use.
        max_len: histories are cut to their last ``max_len`` interactions.
        folded: the serving weights and per-item tables (:class:`~srp4ctr.engine.FoldedModel`).
    """

    def __init__(self, model, dataset, *, fingerprint: str,
                 config: EngineConfig | Mapping[str, Any] | None = None,
                 checkpoint: str | None = None, **overrides: Any):
        from srp4ctr.models import SRP4CTR

        if not isinstance(model, SRP4CTR):
            raise InputError(f"the engine serves SRP4CTR models, got {type(model).__name__}")
        cfg = EngineConfig.make(config, **overrides).resolved()
        self.config = cfg
        self.device, self.dtype = cfg.device, cfg.dtype
        scorer_cls, self._backend_reason = explain_backend(cfg.backend, self.device, self.dtype)
        if dataset.fingerprint != model.spec.fingerprint and model.spec.fingerprint:
            raise CheckpointError(
                f"the model was built for dataset fingerprint {model.spec.fingerprint[:12]}…, "
                f"the dataset has {dataset.fingerprint[:12]}…"
            )
        if dataset.n_items != model.spec.n_items:
            raise CheckpointError(
                f"the model knows {model.spec.n_items} items, the dataset {dataset.n_items}"
            )
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"model weight {name!r} holds NaN or inf: refusing to "
                                      "serve it (every score touching it would be NaN or wrong)")
        self.model = model.to(self.device, torch.float32).eval()
        self.model_config = model.config
        self.max_len = int(model.config.max_len)
        self.dataset = serving_view(dataset, self.max_len)
        self.fingerprint = str(fingerprint)
        self.checkpoint = checkpoint
        user_cls = resolve_user_side(cfg.user_side, self.model, self.device, scorer_cls)
        options = BackendOptions.from_config(cfg)
        with torch.no_grad():
            self.folded = FoldedModel(model, self.dtype, self.device, cfg.fold_items,
                                      cfg.max_table_bytes, fold_q0=scorer_cls.uses_q0)
        for name in ("z0", "q0", "hz0", "head_z0", "item_bias"):
            t = getattr(self.folded, name, None)
            if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"the folded item table {name} holds NaN or inf in "
                                      f"{_dtype_label(self.dtype)} (a weight too large for it)")
        self._backend: Scorer = scorer_cls(self.folded, options)
        self._user_side: UserSide = user_cls(self.model, options)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike,
             config: EngineConfig | Mapping[str, Any] | None = None, *, dataset: Any = None,
             data_dir: str | os.PathLike | None = None, **overrides: Any) -> Engine:
        """An engine for the fine-tuning checkpoint ``checkpoint_dir`` (kind ``srp4ctr``).

        Args:
            config: an :class:`~srp4ctr.engine.EngineConfig` (or a mapping of its fields);
                ``overrides`` are more of its fields (``backend="cpp"``, ``threads=2``...), which
                win over ``config``'s.
            dataset: the prepared dataset the model was trained on (a ``PreparedDataset`` or its
                folder); by default it is found by the checkpoint's dataset name and fingerprint
                under ``data_dir`` (default: ``$SRP4CTR_DATA_DIR``, else the user cache folder).

        Raises:
            CheckpointError: not a checkpoint, truncated or altered weights, another kind than
                ``srp4ctr``, or a dataset whose fingerprint is not the checkpoint's.
            BackendUnavailableError: the requested backend cannot run here.
            InputError: an unknown or invalid option.
        """
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise InputError(f"checkpoint_dir must be a path, got {type(checkpoint_dir).__name__}")
        cfg = EngineConfig.make(config, **overrides)
        checked = cfg.resolved()
        resolve_backend(checked.backend, checked.device, checked.dtype)  # fail before loading
        model, ds, fingerprint = load_serving_model(checkpoint_dir, dataset, data_dir)
        return cls(model, ds, fingerprint=fingerprint, config=cfg,
                   checkpoint=str(Path(checkpoint_dir)))

    @classmethod
    def from_model(cls, model, dataset, *, fingerprint: str | None = None,
                   config: EngineConfig | Mapping[str, Any] | None = None,
                   **overrides: Any) -> Engine:
        """An engine for an in-memory SRP4CTR ``model`` and its prepared ``dataset``.

        The engine takes the model over: it is moved to the engine's device (fp32) and put in
        eval mode. ``fingerprint`` defaults to the sha256 of the model's state dict; ``config``
        and ``overrides`` as in :meth:`load`.
        """
        fp = model_fingerprint(model) if fingerprint is None else fingerprint
        return cls(model, dataset, fingerprint=fp, config=config, **overrides)

    # ------------------------------------------------------------------ info
    @property
    def backend(self) -> str:
        """Name of the scoring backend in use."""
        return self._backend.name

    @property
    def user_side(self) -> str:
        """Name of the user side in use (``"torch"``, ``"cpp"``, ``"triton"``)."""
        return self._user_side.name

    @property
    def n_items(self) -> int:
        return self.dataset.n_items

    @property
    def oov_item(self) -> int:
        return self.dataset.oov_item

    def describe(self) -> dict[str, Any]:
        """What this engine is: model, dataset, the resolved config, what each backend chose."""
        cfg = self.config
        return {
            "checkpoint": self.checkpoint,
            "model_fingerprint": self.fingerprint,
            "dataset": {"name": self.dataset.name, "fingerprint": self.dataset.fingerprint,
                        "n_items": self.dataset.n_items, "n_users": self.dataset.n_users},
            "model_config": self.model_config.to_dict(),
            "config": cfg.to_dict(),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "backend": self.backend,
            "backend_reason": self._backend_reason,
            "scorer": self._backend.describe(),
            "user_side": self.user_side,
            "user_encoder": self._user_side.describe(),
            "max_len": self.max_len,
            "max_chunk_bytes": cfg.max_chunk_bytes,
            "chunk_size": cfg.chunk_size,
            "threads": cfg.threads,
            "user_threads": cfg.user_threads,
            "folded": self.folded.describe(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
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
        t = torch.from_numpy(encode_candidates(self.dataset, candidates, strict))
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    # ------------------------------------------------------------------ users
    def history_arrays(self, history: Any, user_id: Any = None) -> dict[str, np.ndarray]:
        """A raw history -> the model's input arrays (``hist_item``, ``hist_<f>``,
        ``hist_len``, and the user fields with a user id), exactly as :meth:`encode_user`
        builds them; :class:`~srp4ctr.errors.InputError` for bad input. With
        :meth:`encode_arrays` a caller can key a state store by what the model reads."""
        return encode_history(self.dataset, history, user_id, max_len=self.max_len)

    _history_arrays = history_arrays

    def encode_arrays(self, arrays: Sequence[Mapping[str, np.ndarray]],
                      user_ids: Sequence[Any] | None = None) -> list[UserCache]:
        """The user side on histories already through :meth:`history_arrays`, all in one
        call; ``user_ids`` are recorded in the caches (default None)."""
        if not arrays:
            return []
        ids = [None] * len(arrays) if user_ids is None else [_jsonable(u) for u in user_ids]
        return self._caches(list(arrays), ids)

    def _caches(self, arrays, user_ids) -> list[UserCache]:
        """Checked caches in the engine's dtype from the user side's output."""
        def own(t):
            return None if t is None else t.detach().to(self.dtype).contiguous()

        out = []
        states = self._user_side.encode(model_batch(self.dataset, arrays, self.device))
        for s, uid in zip(states, user_ids):
            c = UserCache(own(s.k), own(s.v), own(s.head_user), own(s.qtokens), own(s.pooled),
                          fingerprint=self.fingerprint, user_id=uid)
            c.check_finite()
            out.append(c)
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
        d = as_history_dict(history, user_id)
        return self._caches([self._history_arrays(d)], [_jsonable(d.get("user_id"))])[0]

    def encode_users(self, histories: Sequence[Any]) -> list[UserCache]:
        """:meth:`encode_user` for many users in one call (the torch user side runs them as one
        padded FG-BERT batch); each cache keeps only its user's valid positions."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise InputError("histories must be a sequence of histories")
        if not histories:
            return []
        norm = [as_history_dict(h) for h in histories]
        arrays = [self._history_arrays(d) for d in norm]
        return self._caches(arrays, [_jsonable(d.get("user_id")) for d in norm])

    # ------------------------------------------------------------------ caches
    def load_cache(self, path: str | os.PathLike) -> UserCache:
        """Read a cache file written by :meth:`UserCache.save` and check that this engine's
        model built it; it is placed on the engine's device.

        Raises:
            CacheError: missing, truncated or altered file, another format, NaN/inf, a cache of
                another model or of another dtype.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"path must be a path, got {type(path).__name__}")
        cache = UserCache.load(path)
        return self.check_cache(cache, where=str(path))

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
        if not self._backend.checks_finite:  # (the C++ scorer checks in its own pass)
            cache.check_finite()
        return cache.to(self.device) if move else cache

    # ------------------------------------------------------------------ scoring
    def chunk_candidates(self, length: int) -> int:
        """Candidates per scoring chunk for a history of ``length`` (from the memory budget)."""
        if self.config.chunk_size is not None:
            return self.config.chunk_size
        fm = self.folded
        elt = torch.empty((), dtype=self.dtype).element_size()
        per = elt * (2 * fm.n_heads * max(length, 1)  # scores + probabilities
                     + (2 * self.model_config.ffn_mult + 8) * fm.d_model  # FFN and the states
                     + 3 * fm.h1 + sum(w.shape[0] for w, _ in fm.rest)) + 8
        return max(1, self.config.max_chunk_bytes // per)

    def _with_bias(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits, plus the model's per-item bias where it has one (ModelConfig.item_bias;
        the backends score the tower and the head)."""
        logits = logits.float()
        bias = self.folded.item_bias
        return logits if bias is None else logits + bias.index_select(0, ids)

    def _logits_one(self, cache: UserCache, ids: torch.Tensor) -> torch.Tensor:
        step = self.chunk_candidates(cache.length)
        C = ids.shape[0]
        if C <= step:
            return self._with_bias(self._backend.score_one(cache, ids), ids)
        out = torch.empty(C, dtype=self.dtype, device=self.device)
        for s in range(0, C, step):
            out[s : s + step] = self._backend.score_one(cache, ids[s : s + step])
        return self._with_bias(out, ids)

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
        return self._score_many_ids(checked, ids, logits)

    def score_many_ids(self, caches: Sequence[UserCache], item_ids: Sequence[torch.Tensor], *,
                       logits: bool = False) -> list[torch.Tensor]:
        """:meth:`score_many` for candidates already encoded by :meth:`encode_items` (internal
        ids, int64 1-D tensors on the engine's device): a caller that checked a request's ids
        once (a server) does not pay for encoding them again. Ids outside ``0..n_items + 1``
        raise :class:`~srp4ctr.errors.InputError`."""
        if isinstance(caches, UserCache) or not isinstance(caches, Sequence):
            raise InputError("score_many_ids takes a sequence of caches")
        if not isinstance(item_ids, Sequence) or len(item_ids) != len(caches):
            raise InputError("item_ids must be a sequence of id tensors, one per cache")
        top = self.n_items + 1
        for t in item_ids:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1 \
                    or t.device != self.device:
                raise InputError("item_ids must be 1-D int64 tensors on the engine's device "
                                 "(as encode_items returns them)")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) > top):
                raise InputError(f"internal item ids must lie in 0..{top}")
        return self._score_many_ids([self.check_cache(c) for c in caches], list(item_ids),
                                    logits)

    def _score_many_ids(self, checked: list[UserCache], ids: list[torch.Tensor],
                        logits: bool) -> list[torch.Tensor]:
        results: list[torch.Tensor | None] = [None] * len(checked)
        group: list[int] = []
        budget = self.chunk_candidates(0)

        def flush() -> None:
            if not group:
                return
            counts = [ids[b].shape[0] for b in group]
            with torch.no_grad():
                flat = torch.cat([ids[b] for b in group])
                out = self._with_bias(self._backend.score_many(
                    [checked[b] for b in group], flat, counts), flat)
            for b, part in zip(group, out.split(counts)):
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


def _jsonable(user_id: Any) -> Any:
    """A raw user id as a JSON-able value (numpy scalars -> Python), else None."""
    if user_id is None:
        return None
    if isinstance(user_id, np.generic):
        user_id = user_id.item()
    if isinstance(user_id, (str, int, float)) and not isinstance(user_id, bool):
        return user_id
    return None
