"""A gradient-boosted tree baseline (LightGBM) on statistics of the behaviour history.

The samples are exactly the deep models' (:class:`~srp4ctr.data.samples.CTRDataset` of each
split, with the training config's ``negatives`` and ``seed``): the same rows, candidates and
labels, and each sample's history is the same window, the up to ``max_len`` interactions of its
user before it in the prepared (user, timestamp, raw item id) order. Every feature of a sample is
computed from that window, from the sample's own candidate and context, and from the training
split's rows:

- history (``hist_*``): length, mean label, mean value (the rating, where the dataset's value
  field is numeric), the same means over the last ``k`` interactions for every ``k`` of
  ``GBDTConfig.windows``; ``time_since_prev`` / ``time_since_first``: seconds from the latest /
  the oldest interaction of the window to the candidate (missing with an empty history);
- context: the candidate interaction's ``hour`` (0..23, UTC) and ``weekday`` (1..7), where the
  dataset has those behaviour fields;
- candidate item statistics over the **training split**: ``item_count``, ``item_label_mean`` and
  ``item_rating_mean``, the means smoothed towards the training split's global mean with
  ``prior_weight`` pseudo-rows. A *training* sample's own label never enters them: its
  statistics leave rows out. ``GBDTConfig.item_stats="kfold"`` (the default): the flat rows are
  dealt into ``n_folds`` random folds (from the seed, never the labels) and a training sample's
  statistics (counts, sums and the global mean) come from the training rows of the *other*
  folds, the count scaled by K / (K - 1) to the scale of the whole split.
  ``item_stats="loo"``: leave-one-out, only the sample's own row is left out (when the
  candidate is that row's item). Validation and test samples see every training row, and
  training rows only. Leave-one-out, though it never reads the own label, hands it over by
  its complement: within one item the encoding is ``(p - y) / (n - 1)``, lower for the
  positives, so (``item_count``, ``item_label_mean``) separate a training item's labels
  exactly (AUC 1 within items) and the trees learn a pattern that validation rows do not have.
  Out-of-fold statistics do not have that pattern; on MovieLens-100k (seed 0) they gave
  validation AUC 0.810 against 0.800 for leave-one-out;
- candidate side fields from ``item_table``: single-valued fields as categorical features
  (``year`` as an ordered number), multi-valued fields (genre) as one 0/1 column per value when
  the vocabulary has at most ``max_multi_hot`` values, else their first value (categorical) and
  their count;
- affinity (``aff_<field>_*``, for the item id and every item side field): over the history
  items that share a value of the field with the candidate, summed over the candidate's values
  (an item sharing two genres counts twice): ``count``, ``share`` (count / history length), mean
  label and mean value;
- user fields from ``user_table`` (``age`` as an ordered number, the others categorical).

Nothing at or after the sample's position in its user's sequence enters its history features,
and its own label enters none of its features. The item statistics are target encodings over
the whole training split (as the deep models' item embeddings are trained on the whole training
split), so for a *training* sample they include other training rows of the same item, also later
ones; validation and test samples' features never depend on a validation or test label other
than the earlier ones of their own history (which the deep models see too, as ratings).

With ``negatives="uni100"`` the model trains on one draw of the training negatives (the seed's;
the deep models redraw them every epoch) and is evaluated on the same validation and test draws
as the deep models. A string value field (Taobao's pv/cart/fav/buy) gives no value features (the
label already says cart/fav/buy).

LightGBM (``pip install 'srp4ctr[gbdt]'``) is imported when a model is trained, not before.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from srp4ctr.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "ITEM_STAT_FEATURES",
    "FeatureTable",
    "GBDTConfig",
    "ctr_features",
    "fold_of_rows",
    "lightgbm_params",
    "require_lightgbm",
    "train_gbdt",
]

#: the candidate-item target statistics (training samples' own rows left out)
ITEM_STAT_FEATURES = ("item_count", "item_label_mean", "item_rating_mean")
#: how training samples' item statistics leave their own label out (see GBDTConfig)
ITEM_STATS = ("kfold", "loo")
#: bucketed fields whose token order is the value order: numeric features, not categorical
ORDINAL_FIELDS = ("year", "age")


@dataclass(frozen=True)
class GBDTConfig:
    """LightGBM hyper-parameters and the feature settings of the GBDT baseline.

    ``num_rounds`` is the most boosting rounds; training stops after ``early_stopping_rounds``
    rounds without a better validation AUC and keeps the best round. The seed and the thread
    count come from the training config (:class:`~srp4ctr.train.config.TrainConfig`).
    Features: ``windows`` (the last-k history means), ``prior_weight`` (pseudo-rows of the
    smoothed item means), ``max_multi_hot`` (the largest multi-valued vocabulary spread into 0/1
    columns), ``item_stats`` and ``n_folds`` (how training samples' item statistics leave their
    own label out: ``"kfold"`` out-of-fold, or ``"loo"`` leave-one-out; see the module).
    """

    num_leaves: int = 31
    learning_rate: float = 0.05
    num_rounds: int = 2000
    early_stopping_rounds: int = 100
    min_data_in_leaf: int = 20
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    # features
    windows: tuple[int, ...] = (5, 20)
    prior_weight: float = 20.0
    max_multi_hot: int = 64
    item_stats: str = "kfold"  # or "loo"
    n_folds: int = 5

    def __post_init__(self) -> None:
        if self.item_stats not in ITEM_STATS:
            raise InputError(f"item_stats must be one of {ITEM_STATS}, got {self.item_stats!r}")
        if isinstance(self.n_folds, bool) or not isinstance(self.n_folds, int) or self.n_folds < 2:
            raise InputError(f"n_folds must be an integer >= 2, got {self.n_folds!r}")
        for name in ("num_leaves", "num_rounds", "early_stopping_rounds", "min_data_in_leaf",
                     "max_multi_hot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.bagging_freq, bool) or not isinstance(self.bagging_freq, int) \
                or self.bagging_freq < 0:
            raise InputError(f"bagging_freq must be an integer >= 0, got {self.bagging_freq!r}")
        for name in ("learning_rate", "feature_fraction", "bagging_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= \
                    (1 if name != "learning_rate" else np.inf):
                raise InputError(f"{name} must be a number in (0, 1], got {v!r}"
                                 if name != "learning_rate" else
                                 f"learning_rate must be a number > 0, got {v!r}")
        for name in ("lambda_l2", "prior_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < np.inf:
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        w = tuple(self.windows)
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in w):
            raise InputError(f"windows must be positive integers, got {self.windows!r}")
        object.__setattr__(self, "windows", w)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["windows"] = list(self.windows)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GBDTConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown GBDT setting(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if "windows" in d:
            d["windows"] = tuple(d["windows"])
        return cls(**d)


def require_lightgbm():
    """The ``lightgbm`` module, or :class:`~srp4ctr.errors.InputError` naming the extra."""
    try:
        import lightgbm
    except ImportError as e:
        raise InputError(f"the gbdt baseline needs LightGBM ({e}): pip install 'srp4ctr[gbdt]'"
                         ) from None
    return lightgbm


# ------------------------------------------------------------------------------ features
@dataclass
class FeatureTable:
    """The feature matrix of one sample set: ``X`` float64 [n, F] (NaN = missing), its column
    ``names``, the ``categorical`` ones (non-negative integer codes, 0 = padding/unknown), and
    the samples' ``label`` (float32 [n]) and ``user`` (int64 [n])."""

    X: np.ndarray
    names: list[str]
    categorical: list[str]
    label: np.ndarray
    user: np.ndarray

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def column(self, name: str) -> np.ndarray:
        return self.X[:, self.names.index(name)]

    def subset(self, index: np.ndarray) -> FeatureTable:
        """The samples ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        return FeatureTable(X=self.X[index], names=list(self.names),
                            categorical=list(self.categorical), label=self.label[index],
                            user=self.user[index])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {n: self.X[:, j] for j, n in enumerate(self.names)}


def _value_field(ds) -> np.ndarray | None:
    """The numeric value (rating) of every row, float64 [N], or None (no or string values)."""
    if ds.kind is None or ds.kind not in ds.behaviour or not ds.value_vocab:
        return None
    vocab = list(ds.value_vocab)
    if isinstance(vocab[0], str):
        return None
    table = np.concatenate([[np.nan], np.asarray(vocab, dtype=np.float64)])
    return table[ds.behaviour[ds.kind]]


def _prefix(x: np.ndarray) -> np.ndarray:
    """Prefix sums with a leading 0: ``sum(x[s:e]) = p[e] - p[s]``."""
    out = np.zeros(x.shape[0] + 1, dtype=np.float64)
    np.cumsum(x, out=out[1:])
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _field_table(ds, f: str) -> np.ndarray:
    """Values of item field ``f`` per internal item id, [n_items + 2, G] (0 = none)."""
    if f == "item":
        return np.arange(ds.n_items + 2, dtype=np.int64)[:, None]
    t = np.asarray(ds.item_table[f], dtype=np.int64)
    return t if t.ndim == 2 else t[:, None]


def _field_names(ds, f: str) -> list[str] | None:
    fv = ds.meta.get("field_values") if isinstance(ds.meta, dict) else None
    if isinstance(fv, dict) and isinstance(fv.get(f), list):
        return [str(x) for x in fv[f]]
    return None


def _affinity(tab: np.ndarray, hist_item: np.ndarray, label: np.ndarray,
              value: np.ndarray | None, start: np.ndarray, end: np.ndarray,
              cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per sample: over the rows ``start..end-1`` whose item shares a value of the field with
    the candidate, summed over the candidate's values: count, label sum, value sum.

    Rows of one user are contiguous, so a window never leaves its user: every (value, row)
    pair of the flat arrays gets the key ``value * (N + 1) + row``, sorted; a window's pairs of
    one value are then one key range, found by binary search, and its sums are differences of
    prefix sums over the sorted pairs.
    """
    n_rows = hist_item.shape[0]
    hv = tab[hist_item]  # [N, G]
    has = hv > 0
    rows = np.broadcast_to(np.arange(n_rows, dtype=np.int64)[:, None], hv.shape)[has]
    key = hv[has] * (n_rows + 1) + rows
    order = np.argsort(key, kind="stable")
    key, rows = key[order], rows[order]
    cl = _prefix(label[rows].astype(np.float64))
    cv = _prefix(value[rows]) if value is not None else None
    qv = tab[cand]  # [n, G]
    qm = qv > 0
    base = qv * (n_rows + 1)
    lo = np.searchsorted(key, base + start[:, None])
    hi = np.searchsorted(key, base + end[:, None])
    count = np.where(qm, hi - lo, 0).sum(axis=1).astype(np.float64)
    lsum = np.where(qm, cl[hi] - cl[lo], 0.0).sum(axis=1)
    vsum = None if cv is None else np.where(qm, cv[hi] - cv[lo], 0.0).sum(axis=1)
    return count, lsum, vsum


def fold_of_rows(n_rows: int, n_folds: int, seed: int) -> np.ndarray:
    """The fold (0..n_folds-1) of every flat row for ``item_stats="kfold"``: uniform, drawn
    from ``seed`` and the row count only (never from labels). int64 [n_rows]."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x9BD7]).integers(
        0, n_folds, size=n_rows, dtype=np.int64)


def _item_stats(ds, row: np.ndarray, cand: np.ndarray, label: np.ndarray,
                value: np.ndarray | None, cfg: GBDTConfig, seed: int) -> dict[str, np.ndarray]:
    """``item_count``, ``item_label_mean`` (and ``item_rating_mean``) of every sample's
    candidate over the training split, less the rows excluded for that sample: for a training
    sample its fold's training rows (``"kfold"``, counts scaled by K / (K - 1)) or its own row
    (``"loo"``, when the candidate is its row's item); nothing for validation and test."""
    tr = ds.split == 0
    size = ds.n_items + 2
    items = ds.item.astype(np.int64)
    w_val = value if value is not None else np.zeros(label.shape[0])
    cnt = np.bincount(items[tr], minlength=size).astype(np.float64)
    pos = np.bincount(items[tr], weights=label[tr], minlength=size)
    vsum = np.bincount(items[tr], weights=w_val[tr], minlength=size)
    tot_n, tot_p, tot_v = float(tr.sum()), float(label[tr].sum()), float(w_val[tr].sum())
    in_train = ds.split[row] == 0
    scale = np.ones(row.shape[0])
    if cfg.item_stats == "loo":
        ex = (in_train & (items[row] == cand)).astype(np.float64)
        ex_cnt, ex_pos, ex_v = ex, ex * label[row], ex * w_val[row]
        ex_n, ex_p, ex_tv = ex, ex_pos, ex_v
    else:
        k_folds = cfg.n_folds
        fold = fold_of_rows(label.shape[0], k_folds, seed)
        key = fold[tr] * size + items[tr]
        f_cnt = np.bincount(key, minlength=k_folds * size).astype(np.float64)
        f_pos = np.bincount(key, weights=label[tr], minlength=k_folds * size)
        f_v = np.bincount(key, weights=w_val[tr], minlength=k_folds * size)
        fn = np.bincount(fold[tr], minlength=k_folds).astype(np.float64)
        fp = np.bincount(fold[tr], weights=label[tr], minlength=k_folds)
        fv = np.bincount(fold[tr], weights=w_val[tr], minlength=k_folds)
        k = fold[row]
        q = k * size + cand
        z = in_train.astype(np.float64)
        ex_cnt, ex_pos, ex_v = z * f_cnt[q], z * f_pos[q], z * f_v[q]
        ex_n, ex_p, ex_tv = z * fn[k], z * fp[k], z * fv[k]
        scale = np.where(in_train, k_folds / (k_folds - 1), 1.0)
    ic = cnt[cand] - ex_cnt
    rest = np.maximum(tot_n - ex_n, 1.0)
    m = float(cfg.prior_weight)
    den = np.maximum(ic + m, 1e-12)
    out = {"item_count": ic * scale,
           "item_label_mean": (pos[cand] - ex_pos + m * (tot_p - ex_p) / rest) / den}
    if value is not None:
        out["item_rating_mean"] = (vsum[cand] - ex_v + m * (tot_v - ex_tv) / rest) / den
    if m == 0:  # unsmoothed: no training row left -> missing
        for name in ("item_label_mean", "item_rating_mean"):
            if name in out:
                out[name] = np.where(ic > 0, out[name], np.nan)
    return out


def ctr_features(samples, config: GBDTConfig | None = None, *, seed: int | None = None
                 ) -> FeatureTable:
    """The GBDT features of every sample of ``samples`` (a
    :class:`~srp4ctr.data.samples.CTRDataset`), in sample order (see the module docstring).

    ``seed`` (default: the samples' seed) draws the folds of ``item_stats="kfold"``.
    Vectorised: prefix sums over the flat, user-grouped arrays and binary searches, no loop
    over samples. Example::

        from srp4ctr.data.samples import CTRDataset
        table = ctr_features(CTRDataset(ds, "valid", max_len=50))
        table.X.shape  # (n_samples, n_features)
    """
    cfg = config or GBDTConfig()
    ds = samples.ds
    s = samples.start.astype(np.int64)
    e = samples.end.astype(np.int64)
    row = samples.rows.astype(np.int64)
    cand = samples.extras["cand_item"].astype(np.int64)
    y = samples.extras["label"].astype(np.float32)
    users = samples.users.astype(np.int64)
    label = ds.label.astype(np.float64)
    value = _value_field(ds)
    ts = ds.timestamp
    cols: dict[str, np.ndarray] = {}
    categorical: list[str] = []

    # --- history window [s, e)
    n_hist = (e - s).astype(np.float64)
    pl = _prefix(label)
    pv = _prefix(value) if value is not None else None
    cols["hist_count"] = n_hist
    cols["hist_label_mean"] = _ratio(pl[e] - pl[s], n_hist)
    if pv is not None:
        cols["hist_rating_mean"] = _ratio(pv[e] - pv[s], n_hist)
    for k in cfg.windows:
        if k >= samples.max_len:  # the whole window already
            continue
        sk = np.maximum(s, e - k)
        cols[f"hist_label_mean_last{k}"] = _ratio(pl[e] - pl[sk], e - sk)
        if pv is not None:
            cols[f"hist_rating_mean_last{k}"] = _ratio(pv[e] - pv[sk], e - sk)
    some = e > s
    t_now = ts[row].astype(np.float64)
    cols["time_since_prev"] = np.where(some, t_now - ts[np.maximum(e - 1, 0)], np.nan)
    cols["time_since_first"] = np.where(some, t_now - ts[np.minimum(s, len(ts) - 1)], np.nan)

    # --- context of the candidate interaction
    if "hour" in ds.behaviour:
        cols["hour"] = (ds.behaviour["hour"][row] - 1).astype(np.float64)
    if "weekday" in ds.behaviour:
        cols["weekday"] = ds.behaviour["weekday"][row].astype(np.float64)

    # --- candidate item statistics over training rows, out-of-fold for training samples
    cols.update(_item_stats(ds, row, cand, label, value, cfg,
                            int(getattr(samples, "seed", 0)) if seed is None else int(seed)))

    # --- candidate side fields
    for f, t in ds.item_table.items():
        t = np.asarray(t, dtype=np.int64)
        v = t[cand]
        if t.ndim == 1:
            cols[f"item_{f}"] = v.astype(np.float64)
            if f not in ORDINAL_FIELDS:
                categorical.append(f"item_{f}")
            continue
        vocab = int(ds.vocab.get(f, int(t.max()) + 1))
        if vocab - 1 <= cfg.max_multi_hot:
            names = _field_names(ds, f)
            for j in range(1, vocab):
                tag = names[j] if names is not None and j < len(names) else str(j)
                cols[f"item_{f}={tag}"] = (v == j).any(axis=1).astype(np.float64)
        else:
            cols[f"item_{f}_first"] = v[:, 0].astype(np.float64)
            categorical.append(f"item_{f}_first")
        cols[f"item_{f}_n"] = (v > 0).sum(axis=1).astype(np.float64)

    # --- affinity: history items sharing the candidate's field values
    for f in ["item", *ds.item_table]:
        c, lsum, vsum = _affinity(_field_table(ds, f), ds.item.astype(np.int64), label, value,
                                  s, e, cand)
        cols[f"aff_{f}_count"] = c
        cols[f"aff_{f}_share"] = _ratio(c, n_hist)
        cols[f"aff_{f}_label_mean"] = _ratio(lsum, c)
        if vsum is not None:
            cols[f"aff_{f}_rating_mean"] = _ratio(vsum, c)

    # --- user fields
    for f, t in ds.user_table.items():
        cols[f"user_{f}"] = np.asarray(t, dtype=np.int64)[users].astype(np.float64)
        if f not in ORDINAL_FIELDS:
            categorical.append(f"user_{f}")

    names = list(cols)
    X = np.empty((len(row), len(names)), dtype=np.float64)
    for j, n in enumerate(names):
        X[:, j] = cols[n]
    return FeatureTable(X=X, names=names, categorical=categorical, label=y, user=users)


# ------------------------------------------------------------------------------ training
def _metrics(user: np.ndarray, label: np.ndarray, prob: np.ndarray) -> dict:
    """The deep models' CTR metrics, same keys."""
    from srp4ctr.train.loop import ctr_metrics

    return ctr_metrics({"user": user, "label": label, "prob": prob})


def _threads(train_config) -> int:
    if train_config.num_threads:
        return int(train_config.num_threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def lightgbm_params(config: GBDTConfig, seed: int, threads: int) -> dict:
    """The LightGBM parameters of a run: binary objective, fixed seeds, deterministic."""
    return {
        "objective": "binary",
        "metric": ["auc", "binary_logloss"],
        "first_metric_only": True,
        "num_leaves": config.num_leaves,
        "learning_rate": config.learning_rate,
        "min_data_in_leaf": config.min_data_in_leaf,
        "feature_fraction": config.feature_fraction,
        "bagging_fraction": config.bagging_fraction,
        "bagging_freq": config.bagging_freq,
        "lambda_l2": config.lambda_l2,
        "seed": int(seed),
        "bagging_seed": int(seed),
        "feature_fraction_seed": int(seed),
        "data_random_seed": int(seed),
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": int(threads),
        "verbosity": -1,
    }


def train_gbdt(
    ds, out_dir: str | os.PathLike | None, *, model_config=None, train_config=None,
    gbdt_config: GBDTConfig | None = None, name: str | None = None, kind: str = "gbdt",
    pretrained: None = None, strict_time: bool = False,
) -> dict:
    """Train and evaluate the GBDT baseline; the result has the deep models' shape
    (:func:`srp4ctr.train.loop.finetune`): ``valid`` and ``test`` metric dicts (``auc``,
    ``gauc``, ``logloss``, ``n``), ``train_seconds``, ``history`` (validation AUC and logloss
    per round), ``best_iteration`` and ``best_valid_auc``, plus ``feature_importance`` (every
    feature, by total gain). ``model_config.max_len`` is the history window;
    ``train_config`` gives ``seed``, ``num_threads``, ``negatives`` (and ``eval_max_samples``,
    the same evaluated subset as the deep models', where the config has it). ``out_dir`` (if given)
    gets ``model.txt`` (LightGBM's text format), ``features.json`` and ``metrics.json``.
    ``strict_time``: the samples' histories (so every history feature) hold only interactions
    strictly earlier than the candidate, as the deep models' with the same flag
    (:class:`~srp4ctr.data.samples.CTRDataset`); ``test_by_popularity`` as theirs
    (:func:`srp4ctr.train.experiment.metrics_by_popularity`).
    """
    from srp4ctr.data.recorded import dataset_record
    from srp4ctr.data.samples import CTRDataset
    from srp4ctr.models import ModelConfig
    from srp4ctr.train.config import TrainConfig
    from srp4ctr.train.loop import eval_indices, require_two_classes

    if pretrained is not None:
        raise InputError("the gbdt baseline takes no pre-trained encoder")
    lgb = require_lightgbm()
    tcfg = train_config or TrainConfig()
    mcfg = model_config or ModelConfig()
    gcfg = gbdt_config or GBDTConfig()
    require_two_classes(ds, tcfg.negatives)
    threads = _threads(tcfg)
    t0 = time.perf_counter()
    strict_time = bool(strict_time)
    tables, cands = {}, {}
    for split in ("train", "valid", "test"):
        samples = CTRDataset(ds, split, max_len=mcfg.max_len, negatives=tcfg.negatives,
                             seed=tcfg.seed, strict_time=strict_time)
        tables[split] = ctr_features(samples, gcfg)
        cands[split] = samples.extras["cand_item"].astype(np.int64)
    for split in ("valid", "test"):  # the deep models' evaluated subset, where they take one
        keep = eval_indices(len(tables[split]), tcfg)
        if keep is not None:
            tables[split] = tables[split].subset(keep)
            cands[split] = cands[split][keep]
    feature_seconds = time.perf_counter() - t0
    tr, va, te = tables["train"], tables["valid"], tables["test"]
    if len(tr) == 0 or len(va) == 0:
        raise InputError(f"{ds.name!r}: the gbdt baseline needs training and validation samples "
                         f"(got {len(tr)} and {len(va)})")
    log.info(f"{name or kind}: {len(tr.names)} features of {len(tr)} / {len(va)} / {len(te)} "
             f"samples in {feature_seconds:.1f} s; training LightGBM with {threads} threads")
    params = lightgbm_params(gcfg, tcfg.seed, threads)
    dtrain = lgb.Dataset(tr.X, tr.label, feature_name=tr.names,
                         categorical_feature=tr.categorical, free_raw_data=False,
                         params={"verbosity": -1})
    dvalid = lgb.Dataset(va.X, va.label, reference=dtrain, free_raw_data=False)
    evals: dict = {}
    t1 = time.perf_counter()
    booster = lgb.train(
        params, dtrain, num_boost_round=gcfg.num_rounds, valid_sets=[dvalid],
        valid_names=["valid"],
        callbacks=[lgb.early_stopping(gcfg.early_stopping_rounds, first_metric_only=True,
                                      verbose=False),
                   lgb.record_evaluation(evals)])
    train_seconds = time.perf_counter() - t1
    best = int(booster.best_iteration) or booster.current_iteration()
    valid = _metrics(va.user, va.label, booster.predict(va.X, num_iteration=best))
    test_prob = booster.predict(te.X, num_iteration=best) if len(te) else np.zeros(0)
    test = _metrics(te.user, te.label, test_prob) if len(te) \
        else {"auc": float("nan"), "gauc": float("nan"), "logloss": float("nan"), "n": 0}
    from srp4ctr.train.experiment import metrics_by_popularity

    by_popularity = metrics_by_popularity(ds, te.user, te.label, test_prob, cands["test"])
    rec = evals.get("valid", {})
    history = [{"round": i + 1, "auc": float(a), "logloss": float(ll)}
               for i, (a, ll) in enumerate(zip(rec.get("auc", []),
                                               rec.get("binary_logloss", [])))]
    gain = booster.feature_importance("gain", iteration=best)
    split_counts = booster.feature_importance("split", iteration=best)
    order = np.argsort(-gain, kind="stable")
    importance = [{"feature": tr.names[j], "gain": float(gain[j]),
                   "splits": int(split_counts[j])} for j in order]
    result = {
        "kind": kind,
        "name": name or kind,
        "dataset": dataset_record(ds),
        "pretrained": None,
        "strict_time": strict_time,
        "valid": valid,
        "test": test,
        "test_by_popularity": by_popularity,
        "history": history,
        "train_seconds": train_seconds + feature_seconds,
        "feature_seconds": feature_seconds,
        "best_iteration": best,
        "rounds_run": len(history),
        "best_valid_auc": valid["auc"],
        "num_threads": threads,
        "n_features": len(tr.names),
        "gbdt_config": gcfg.to_dict(),
        "negatives": tcfg.negatives,
        "seed": tcfg.seed,
        "feature_importance": importance,
    }
    from srp4ctr.train.loop import metrics_text

    log.info(f"{name or kind}: best round {best} of {len(history)}; validation "
             f"{metrics_text(valid)}; test {metrics_text(test)}")
    if out_dir is not None:
        _save(Path(out_dir), booster, best, tr, result)
    return result


def _save(out: Path, booster, best: int, table: FeatureTable, result: dict) -> None:
    from srp4ctr._files import atomic_write_dir

    def write(tmp: Path) -> None:
        booster.save_model(str(tmp / "model.txt"), num_iteration=best)
        (tmp / "features.json").write_text(json.dumps(
            {"names": table.names, "categorical": table.categorical}, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    atomic_write_dir(out, write)
    log.info(f"wrote {out}: model.txt (LightGBM), features.json, metrics.json")
