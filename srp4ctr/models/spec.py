"""What a model is built from: the dataset's :class:`ModelSpec` and the :class:`ModelConfig`.

``ModelSpec`` describes the data a model sees (vocabularies, field lists, the item side-feature
table); ``ModelConfig`` holds the hyperparameters. Both round-trip through plain JSON-safe dicts
(``to_dict`` / ``from_dict``) so a checkpoint's ``config.json`` can rebuild the model.

The item side-feature table is large (one row per item), so ``ModelSpec.to_dict()`` records only
its shapes by default; the table itself is a model buffer and travels in the weights file. A spec
rebuilt from such a dict has zero tables of the right shapes, filled by ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from srp4ctr.errors import InputError

__all__ = ["ModelConfig", "ModelSpec", "check_batch"]


@dataclass
class ModelSpec:
    """The data side of a model.

    Attributes:
        vocab: vocabulary size (padding id 0 included) of ``"item"`` (= n_items + 2; the last id,
            n_items + 1, is the out-of-vocabulary item used in serving), of every item side field,
            every behaviour field and every user field.
        item_fields: ``["item", *side fields]``; the side fields are the keys of ``item_table``.
        behaviour_fields: per-behaviour fields (batch keys ``hist_<f>``).
        multi_fields: the multi-valued item side fields (rows of ``item_table[f]`` are 0-padded
            id lists).
        user_fields: user features (batch keys ``user_<f>``); may be empty.
        item_table: side field -> int64 array with ``n_items + 2`` rows, indexed by item id
            (``[n_items + 2]`` for a single-valued field, ``[n_items + 2, G]`` for a multi-valued one).
        n_items, n_users: counts of real items and users (ids 1..n).
        fingerprint: the prepared dataset's fingerprint, checked when a checkpoint is loaded.
    """

    vocab: dict[str, int]
    item_fields: list[str]
    behaviour_fields: list[str]
    multi_fields: list[str] = field(default_factory=list)
    user_fields: list[str] = field(default_factory=list)
    item_table: dict[str, np.ndarray] = field(default_factory=dict)
    n_items: int = 0
    n_users: int = 0
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.vocab = {str(k): int(v) for k, v in self.vocab.items()}
        self.item_fields = list(self.item_fields)
        self.behaviour_fields = list(self.behaviour_fields)
        self.multi_fields = list(self.multi_fields)
        self.user_fields = list(self.user_fields)
        self.item_table = {k: np.asarray(v, dtype=np.int64) for k, v in self.item_table.items()}
        self.n_items = int(self.n_items)
        self.n_users = int(self.n_users)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def side_fields(self) -> list[str]:
        """Item fields other than the id itself."""
        return self.item_fields[1:]

    @property
    def n_item_ids(self) -> int:
        """Rows of the item vocabulary: padding 0, items 1..n_items, OOV n_items + 1."""
        return self.vocab["item"]

    @property
    def oov_item(self) -> int:
        return self.vocab["item"] - 1

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if not self.item_fields or self.item_fields[0] != "item":
            raise InputError(f"item_fields must start with 'item', got {self.item_fields}")
        names = self.item_fields + self.behaviour_fields + self.user_fields
        if len(set(self.item_fields + self.behaviour_fields)) != len(
            self.item_fields + self.behaviour_fields
        ):
            raise InputError(f"duplicate field names in {names}")
        for f in names:
            if not f or "." in f:
                raise InputError(f"field name {f!r} is empty or holds a '.'")
            if f not in self.vocab:
                raise InputError(f"vocab has no size for field {f!r}")
            if self.vocab[f] < 2:
                raise InputError(f"vocab[{f!r}] = {self.vocab[f]} < 2 (padding id 0 plus values)")
        if self.n_items and self.vocab["item"] != self.n_items + 2:
            raise InputError(
                f"vocab['item'] = {self.vocab['item']} but n_items + 2 = {self.n_items + 2}"
            )
        if set(self.item_table) != set(self.side_fields):
            raise InputError(
                f"item_table keys {sorted(self.item_table)} != side fields {self.side_fields}"
            )
        for f in self.multi_fields:
            if f not in self.side_fields:
                raise InputError(f"multi-valued field {f!r} is not an item side field")
        for f, t in self.item_table.items():
            if t.shape[0] != self.vocab["item"]:
                raise InputError(
                    f"item_table[{f!r}] has {t.shape[0]} rows, expected vocab['item'] = "
                    f"{self.vocab['item']}"
                )
            want_dim = 2 if f in self.multi_fields else 1
            if t.ndim != want_dim:
                raise InputError(f"item_table[{f!r}] has {t.ndim} dims, expected {want_dim}")
            if t.size and (t.min() < 0 or t.max() >= self.vocab[f]):
                raise InputError(
                    f"item_table[{f!r}] holds ids outside [0, {self.vocab[f]}): "
                    f"min {t.min()}, max {t.max()}"
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dataset(cls, ds: Any) -> ModelSpec:
        """Build from a prepared dataset (duck-typed: ``vocab``, ``item_fields``,
        ``behaviour_fields``, ``multi_fields``, ``item_table``, ``user_table``, ``n_items``,
        ``n_users``, ``fingerprint``)."""
        user_table = getattr(ds, "user_table", None) or {}
        return cls(
            vocab=dict(ds.vocab),
            item_fields=list(ds.item_fields),
            behaviour_fields=list(ds.behaviour_fields),
            multi_fields=list(getattr(ds, "multi_fields", []) or []),
            user_fields=list(user_table.keys()),
            item_table={k: np.asarray(v) for k, v in ds.item_table.items()},
            n_items=int(ds.n_items),
            n_users=int(ds.n_users),
            fingerprint=str(getattr(ds, "fingerprint", "")),
        )

    def to_dict(self, include_tables: bool = False) -> dict[str, Any]:
        """JSON-safe dict. The item table is recorded by shape only unless ``include_tables``."""
        d: dict[str, Any] = {
            "vocab": dict(self.vocab),
            "item_fields": list(self.item_fields),
            "behaviour_fields": list(self.behaviour_fields),
            "multi_fields": list(self.multi_fields),
            "user_fields": list(self.user_fields),
            "n_items": self.n_items,
            "n_users": self.n_users,
            "fingerprint": self.fingerprint,
            "item_table_shapes": {k: list(v.shape) for k, v in self.item_table.items()},
        }
        if include_tables:
            d["item_table"] = {k: v.tolist() for k, v in self.item_table.items()}
        return d

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], item_table: Mapping[str, np.ndarray] | None = None
    ) -> ModelSpec:
        """Inverse of :meth:`to_dict`. Tables come from ``item_table``, else from the dict, else
        zeros of the recorded shapes (to be filled by the model's ``load_state_dict``)."""
        try:
            if item_table is None:
                if "item_table" in d:
                    item_table = {k: np.asarray(v, dtype=np.int64) for k, v in d["item_table"].items()}
                else:
                    item_table = {
                        k: np.zeros(tuple(s), dtype=np.int64)
                        for k, s in d["item_table_shapes"].items()
                    }
            return cls(
                vocab=dict(d["vocab"]),
                item_fields=list(d["item_fields"]),
                behaviour_fields=list(d["behaviour_fields"]),
                multi_fields=list(d.get("multi_fields", [])),
                user_fields=list(d.get("user_fields", [])),
                item_table=dict(item_table),
                n_items=int(d.get("n_items", 0)),
                n_users=int(d.get("n_users", 0)),
                fingerprint=str(d.get("fingerprint", "")),
            )
        except KeyError as e:
            raise InputError(f"model spec dict is missing {e}") from None


#: the values of :attr:`ModelConfig.softmax`
SOFTMAX_MODES = ("auto", "full", "sampled")


@dataclass
class ModelConfig:
    """Hyperparameters of FG-BERT, SRP4CTR and the baselines (defaults: DESIGN.md §4).

    item_only: BERT4Rec-style variant; tokens carry only the item id (+ position), no side or
        behaviour fields, and masking predicts only the item id.
    use_xattn: the candidate tower (uni cross-attention); False is the "-uni-cross-attention"
        ablation (a mean-pooled user vector replaces the tower output in the head).
    use_qformer: the Q-Former tokens in the head; False is the "-querying transformer" ablation.
    qformer_user_offset: offset the learnable queries by an MLP of the user features.
    freeze_encoder: the pre-trained FG-BERT (its embeddings included) is not trained in fine-tuning.
    softmax: FG-BERT's pre-training heads of single-valued fields: ``"full"`` (every value
        scored), ``"sampled"`` (:mod:`srp4ctr.models.sampled_softmax`), or ``"auto"``: sampled
        for a field whose vocabulary exceeds ``sampled_softmax_above``, full below.
        ``sampled_softmax_above`` also sizes the embedding tables: a single-valued field's table
        with more rows is a sparse-gradient table (a step's gradient holds only the rows it
        touched) in every model, pre-trained or fine-tuned, and training steps it with
        ``SparseAdam`` (lazy Adam, no weight decay: a warning says so when it is set).
    sampled_softmax_above: the vocabulary size above which ``"auto"`` samples.
    sampler: ``"log_uniform"`` (Zipf over training-frequency ranks), ``"uniform"`` or
        ``"in_batch"``; ``n_sampled``: negatives per step (not used by ``"in_batch"``).
        Pre-training settings only: the trained weights do not depend on them structurally.
    loss_weights: FG-BERT's pre-training loss is the weighted mean of its fields' masked losses
        over the fields with a masked target in the batch; a field not named weighs 1 (None:
        every field 1, the plain mean). A pre-training setting.
    head_user_features: the user-feature embedding (age, gender, occupation, ...) also goes to
        the CTR head's user part (it is otherwise only the Q-Former's query offset, so the
        ``use_qformer=False`` ablation would see no user features at all).
    item_bias: a learned per-item scalar added to the CTR logit (one row per item id, zero
        initialised).
    item_stats: the candidate item's training-split statistics (count, label and rating means;
        out-of-fold for training samples: :mod:`srp4ctr.train.item_stats`) as an input of the
        CTR head (SRP4CTR: its candidate part, folded into the per-item head table in serving).
"""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 200
    dropout: float = 0.1
    ffn_mult: int = 4
    n_queries: int = 4
    qformer_blocks: int = 1
    head_hidden: tuple[int, ...] = (200, 80)
    mask_rate: float = 0.2
    item_only: bool = False
    use_xattn: bool = True
    use_qformer: bool = True
    qformer_user_offset: bool = True
    freeze_encoder: bool = False
    softmax: str = "auto"
    sampled_softmax_above: int = 100_000
    sampler: str = "log_uniform"
    n_sampled: int = 1024
    loss_weights: dict[str, float] | None = None
    head_user_features: bool = False
    item_bias: bool = False
    item_stats: bool = False

    def __post_init__(self) -> None:
        self.head_hidden = tuple(int(h) for h in self.head_hidden)
        for name in ("d_model", "n_layers", "n_heads", "max_len", "ffn_mult", "n_queries",
                     "qformer_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads:
            raise InputError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.mask_rate <= 1.0:
            raise InputError(f"mask_rate must be in (0, 1], got {self.mask_rate}")
        if not self.head_hidden or any(h < 1 for h in self.head_hidden):
            raise InputError(f"head_hidden must be positive sizes, got {self.head_hidden}")
        if self.softmax not in SOFTMAX_MODES:
            raise InputError(f"softmax must be one of {SOFTMAX_MODES}, got {self.softmax!r}")
        from srp4ctr.models.sampled_softmax import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("sampled_softmax_above", "n_sampled"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, Mapping):
                raise InputError("ModelConfig.loss_weights must be a mapping of field -> weight, "
                                 f"got {self.loss_weights!r}")
            weights = {}
            for f, w in self.loss_weights.items():
                if not isinstance(f, str) or isinstance(w, bool) or \
                        not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise InputError("ModelConfig.loss_weights: a field name and a finite weight "
                                     f">= 0 each, got {f!r}: {w!r}")
                weights[f] = float(w)
            self.loss_weights = weights
        for name in ("head_user_features", "item_bias", "item_stats"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"ModelConfig.{name} must be true or false, got "
                                 f"{getattr(self, name)!r}")

    def sampled(self, vocab: int) -> bool:
        """Whether a single-valued pre-training head over ``vocab`` values is sampled."""
        if self.softmax == "auto":
            return int(vocab) > self.sampled_softmax_above
        return self.softmax == "sampled"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def check_batch(spec: ModelSpec, config: ModelConfig, batch: Mapping[str, torch.Tensor],
                ctr: bool = True) -> None:
    """Validate a batch against the data contract; raise :class:`InputError` naming the problem.

    Not called on the training hot path (the data pipeline produces valid batches); meant for
    entry points that take batches from callers.
    """

    def need(key: str, ndim: int, float_ok: bool = False) -> torch.Tensor:
        if key not in batch:
            raise InputError(f"batch has no {key!r}")
        t = batch[key]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"batch[{key!r}] is not a tensor")
        if t.dim() != ndim:
            raise InputError(f"batch[{key!r}] has {t.dim()} dims, expected {ndim}")
        if not float_ok and t.dtype != torch.int64:
            raise InputError(f"batch[{key!r}] has dtype {t.dtype}, expected int64")
        return t

    def in_range(key: str, t: torch.Tensor, hi: int) -> None:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
            raise InputError(
                f"batch[{key!r}] holds ids outside [0, {hi}): min {int(t.min())}, max {int(t.max())}"
            )

    hist = need("hist_item", 2)
    B, L = hist.shape
    if L > config.max_len:
        raise InputError(f"history width {L} exceeds max_len {config.max_len}")
    in_range("hist_item", hist, spec.vocab["item"])
    hl = need("hist_len", 1)
    if hl.shape[0] != B:
        raise InputError(f"hist_len has {hl.shape[0]} rows, hist_item has {B}")
    if hl.numel() and (int(hl.min()) < 0 or int(hl.max()) > L):
        raise InputError(f"hist_len outside [0, {L}]")
    for f in spec.behaviour_fields:
        t = need(f"hist_{f}", 2)
        if t.shape != hist.shape:
            raise InputError(f"hist_{f} has shape {tuple(t.shape)}, hist_item {tuple(hist.shape)}")
        in_range(f"hist_{f}", t, spec.vocab[f])
    for f in spec.user_fields:
        t = need(f"user_{f}", 1)
        if t.shape[0] != B:
            raise InputError(f"user_{f} has {t.shape[0]} rows, expected {B}")
        in_range(f"user_{f}", t, spec.vocab[f])
    if ctr:
        c = need("cand_item", 1)
        if c.shape[0] != B:
            raise InputError(f"cand_item has {c.shape[0]} rows, expected {B}")
        in_range("cand_item", c, spec.vocab["item"])
