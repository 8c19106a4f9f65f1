"""The candidate item's training-split statistics as an input of the deep CTR models
(``ModelConfig.item_stats``, :class:`srp4ctr.models.layers.ItemStatistics`).

The statistics are the GBDT baseline's (:mod:`srp4ctr.train.gbdt`: ``item_count``,
``item_label_mean``, ``item_rating_mean``, means smoothed towards the training split's global
mean with ``prior_weight`` pseudo-rows). A *training* sample's own label never enters its
statistics: they are out-of-fold (the training rows dealt into ``n_folds`` folds from the seed,
a sample's statistics from the other folds, the count scaled by K / (K - 1)). Validation, test
and serving use every training row (the model's ``table``). Columns ``[log1p(count),
label mean, rating mean]`` (the rating mean 0 without a numeric value field), standardised with
the training samples' means and standard deviations.
"""

from __future__ import annotations

import numpy as np

from srp4ctr.errors import InputError

__all__ = ["item_statistics"]


def item_statistics(ds, train_rows: np.ndarray, train_cand: np.ndarray, *, seed: int,
                    n_folds: int = 5, prior_weight: float = 20.0, standardise: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(train_stats [N, 3], table [n_items + 2, 3])`` float32: the out-of-fold statistics of
    the training samples (flat rows ``train_rows`` with candidates ``train_cand``) and every
    item id's statistics over the whole training split, both standardised alike (unless
    ``standardise`` is False)."""
    from srp4ctr.train.gbdt import GBDTConfig, _item_stats, _value_field

    rows = np.asarray(train_rows, np.int64)
    cand = np.asarray(train_cand, np.int64)
    if rows.shape != cand.shape or rows.ndim != 1:
        raise InputError("train_rows and train_cand must be 1-D arrays of one length")
    if rows.size and not (ds.split[rows] == 0).all():
        raise InputError("item statistics: train_rows must be training-split rows")
    cfg = GBDTConfig(prior_weight=prior_weight, item_stats="kfold", n_folds=n_folds)
    label = ds.label.astype(np.float64)
    value = _value_field(ds)

    def columns(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        s = _item_stats(ds, r, c, label, value, cfg, seed)
        rating = s.get("item_rating_mean", np.zeros(c.shape[0]))
        return np.stack([np.log1p(s["item_count"]), s["item_label_mean"], rating], 1)

    # the table (every item id over the whole training split) in the same pass: paired with a
    # row of another split, a candidate's statistics leave nothing out
    other = np.flatnonzero(ds.split != 0)
    if other.size == 0:
        raise InputError("item statistics need a row outside the training split")
    ids = np.arange(ds.n_items + 2, dtype=np.int64)
    both = columns(np.concatenate([rows, np.full(ids.shape, other[0])]),
                   np.concatenate([cand, ids]))
    train, table = both[: rows.size], both[rows.size :]
    if not standardise:
        return train.astype(np.float32), table.astype(np.float32)
    mu = train.mean(0) if train.size else np.zeros(3)
    sd = train.std(0) if train.size else np.ones(3)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return (((train - mu) / sd).astype(np.float32), ((table - mu) / sd).astype(np.float32))
