"""Evaluation metrics: AUC, gAUC, logloss (CTR) and HR@k, NDCG@k (next-item ranking).

Inputs may be numpy arrays, lists or torch tensors (moved to the CPU). Ranks are 1-based: rank 1
means the target scored highest.

- :func:`auc` -- ROC AUC by the rank (Mann-Whitney) formula, tied scores counting one half:
  equal to scikit-learn's ``roc_auc_score`` (tested), without needing it.
- :func:`gauc` -- per-user AUC weighted by the user's number of samples, over users having both
  classes (users with one class are skipped): the FuxiCTR / BARS definition.
- :func:`logloss` -- mean binary cross-entropy with probabilities clipped to [eps, 1 - eps].
- :func:`rank_of_target` (full ranking over all items) and :func:`sampled_rank` (target against
  sampled negatives) -- ``ties="pessimistic"`` (default: every other candidate scoring equal to
  the target is counted as ranked above it) or ``"average"`` (expected rank under random tie
  breaking) or ``"optimistic"``.
- :func:`hit_rate_at_k`, :func:`ndcg_at_k` -- from the ranks; one relevant item per query, so
  NDCG@k = 1 / log2(rank + 1) if rank <= k else 0, averaged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from srp4ctr.errors import InputError

__all__ = [
    "auc",
    "ctr_metrics",
    "gauc",
    "hit_rate_at_k",
    "logloss",
    "ndcg_at_k",
    "rank_of_target",
    "ranking_metrics",
    "sampled_rank",
]

_TIES = ("pessimistic", "average", "optimistic")


def _np(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu")
            if x.dtype == torch.bfloat16:
                x = x.float()
            x = x.numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        a = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: cannot convert to numbers: {e}") from None
    return a


def _labels(labels: Any) -> np.ndarray:
    y = _np(labels, "labels").reshape(-1)
    if y.size and not np.all((y == 0) | (y == 1)):
        raise InputError("labels must be 0 or 1")
    return y


def _scores(scores: Any, name: str = "scores") -> np.ndarray:
    s = _np(scores, name)
    if s.size and not np.all(np.isfinite(s)):
        raise InputError(f"{name} contain NaN or inf")
    return s


def _same_len(*arrs: np.ndarray) -> None:
    n = {a.shape[0] for a in arrs}
    if len(n) != 1:
        raise InputError(f"inputs have different lengths: {[a.shape[0] for a in arrs]}")
    if n.pop() == 0:
        raise InputError("empty input")


def auc(labels: Any, scores: Any) -> float:
    """ROC AUC. NaN when only one class is present (AUC is undefined there)."""
    y = _labels(labels)
    s = _scores(scores).reshape(-1)
    _same_len(y, s)
    if y.min() == y.max():
        return float("nan")
    return gauc(np.zeros(y.shape[0], dtype=np.int64), y, s)  # one group: the rank formula


def gauc(users: Any, labels: Any, scores: Any) -> float:
    """Group AUC: ``sum_u n_u * AUC_u / sum_u n_u`` over users u whose samples include both
    classes (n_u = the user's number of samples); users with one class are skipped. Ties count
    one half, as in :func:`auc`. NaN when no user has both classes.
    """
    u = np.asarray(_np(users, "users", None)).reshape(-1)
    y = _labels(labels)
    s = _scores(scores).reshape(-1)
    _same_len(u, y, s)
    _, g = np.unique(u, return_inverse=True)
    g = g.reshape(-1)
    # sort by (group, score); average ranks over ties of equal (group, score)
    order = np.lexsort((s, g))
    g, s, y = g[order], s[order], y[order]
    n = g.size
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    new_tie = new_group.copy()
    new_tie[1:] |= s[1:] != s[:-1]
    tie_id = np.cumsum(new_tie) - 1
    tie_first = np.flatnonzero(new_tie)
    tie_last = np.append(tie_first[1:], n) - 1
    # 1-based ranks within the user of the first and last member of each tie run
    base = group_start[tie_first]
    avg_rank = ((tie_first - base + 1) + (tie_last - base + 1)) / 2.0
    rank = avg_rank[tie_id]
    n_groups = int(g.max()) + 1
    n_pos = np.bincount(g, weights=y, minlength=n_groups)
    n_all = np.bincount(g, minlength=n_groups).astype(np.float64)
    n_neg = n_all - n_pos
    r_pos = np.bincount(g, weights=rank * y, minlength=n_groups)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    auc_u = (r_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    w = n_all[ok]
    return float((auc_u * w).sum() / w.sum())


def logloss(labels: Any, probs: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to [eps, 1 - eps]."""
    y = _labels(labels)
    p = _scores(probs, "probs").reshape(-1)
    _same_len(y, p)
    if np.any((p < 0) | (p > 1)):
        raise InputError("probs must lie in [0, 1]")
    if y.size == 0:
        raise InputError("logloss of no samples")
    q = np.clip(p.astype(np.float64), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


def _ranks(ranks: Any, k: int) -> np.ndarray:
    r = _np(ranks, "ranks").reshape(-1)
    if r.size == 0:
        raise InputError("empty ranks")
    if not np.all(np.isfinite(r)) or np.any(r < 1):
        raise InputError("ranks must be finite and >= 1 (1-based)")
    if int(k) < 1:
        raise InputError("k must be >= 1")
    return r


def hit_rate_at_k(ranks: Any, k: int) -> float:
    """Fraction of queries whose target has rank <= k."""
    r = _ranks(ranks, k)
    return float(np.mean(r <= k))


def ndcg_at_k(ranks: Any, k: int) -> float:
    """Mean of 1 / log2(rank + 1) over queries with rank <= k (0 otherwise)."""
    r = _ranks(ranks, k)
    return float(np.mean(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)))


def _rank_from_counts(greater: Any, equal: Any, ties: str) -> Any:
    if ties == "pessimistic":
        return 1 + greater + equal
    if ties == "optimistic":
        return 1 + greater
    if ties == "average":
        return 1 + greater + equal / 2.0
    raise InputError(f"ties must be one of {_TIES}, got {ties!r}")


def rank_of_target(scores: Any, target_idx: Any, ties: str = "pessimistic") -> Any:
    """1-based rank of ``scores[b, target_idx[b]]`` among the row ``scores[b]`` (full ranking).

    ``ties`` (see the module docstring) decides how other candidates with exactly the target's
    score count. Mask candidates that must not compete (padding id 0, already-seen items) with
    ``-inf`` before calling. Torch tensors in give a torch tensor out (on their device, no
    copy to the host); otherwise a numpy array (int64, float64 for "average").
    """
    if ties not in _TIES:
        raise InputError(f"ties must be one of {_TIES}, got {ties!r}")
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(scores, torch.Tensor):
        if scores.dim() != 2:
            raise InputError(f"scores must be [B, n], got {tuple(scores.shape)}")
        t = torch.as_tensor(target_idx, device=scores.device).long().reshape(-1)
        if t.shape[0] != scores.shape[0]:
            raise InputError("target_idx must have one entry per row of scores")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= scores.shape[1]):
            raise InputError("target_idx out of range")
        if torch.isnan(scores).any():
            raise InputError("scores contain NaN")
        tgt = scores.gather(1, t[:, None])
        if torch.isinf(tgt).any():
            raise InputError("the target's score is infinite (masked target?)")
        greater = (scores > tgt).sum(1)
        equal = (scores == tgt).sum(1) - 1
        return _rank_from_counts(greater, equal, ties)
    s = _np(scores, "scores")
    if s.ndim != 2:
        raise InputError(f"scores must be [B, n], got shape {s.shape}")
    if np.isnan(s).any():
        raise InputError("scores contain NaN")
    t = _np(target_idx, "target_idx", np.int64).reshape(-1)
    if t.shape[0] != s.shape[0]:
        raise InputError("target_idx must have one entry per row of scores")
    if t.size and (t.min() < 0 or t.max() >= s.shape[1]):
        raise InputError("target_idx out of range")
    tgt = s[np.arange(s.shape[0]), t][:, None]
    if np.isinf(tgt).any():
        raise InputError("the target's score is infinite (masked target?)")
    greater = (s > tgt).sum(1)
    equal = (s == tgt).sum(1) - 1
    return _rank_from_counts(greater, equal, ties)


def sampled_rank(target_score: Any, negative_scores: Any, ties: str = "pessimistic") -> Any:
    """1-based rank of the target among itself and its sampled negatives.

    ``target_score [B]``, ``negative_scores [B, m]`` -> ranks in 1..m+1 (``ties`` as in
    :func:`rank_of_target`). Torch in, torch out; else numpy.
    """
    if ties not in _TIES:
        raise InputError(f"ties must be one of {_TIES}, got {ties!r}")
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(negative_scores, torch.Tensor):
        ts = torch.as_tensor(target_score, device=negative_scores.device).reshape(-1, 1)
        if negative_scores.dim() != 2 or ts.shape[0] != negative_scores.shape[0]:
            raise InputError("need target_score [B] and negative_scores [B, m]")
        if torch.isnan(negative_scores).any() or torch.isnan(ts).any():
            raise InputError("scores contain NaN")
        greater = (negative_scores > ts).sum(1)
        equal = (negative_scores == ts).sum(1)
        return _rank_from_counts(greater, equal, ties)
    neg = _np(negative_scores, "negative_scores")
    ts = _np(target_score, "target_score").reshape(-1, 1)
    if neg.ndim != 2 or ts.shape[0] != neg.shape[0]:
        raise InputError("need target_score [B] and negative_scores [B, m]")
    if np.isnan(neg).any() or np.isnan(ts).any():
        raise InputError("scores contain NaN")
    greater = (neg > ts).sum(1)
    equal = (neg == ts).sum(1)
    return _rank_from_counts(greater, equal, ties)


def ranking_metrics(ranks: Any, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """``{"hr@k": ..., "ndcg@k": ...}`` for every k, plus ``"mrr"``."""
    r = _ranks(ranks, 1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate_at_k(r, k)
        out[f"ndcg@{k}"] = ndcg_at_k(r, k)
    out["mrr"] = float(np.mean(1.0 / r))
    return out


def ctr_metrics(labels: Any, probs: Any, users: Any | None = None) -> dict[str, float]:
    """``{"auc", "logloss"[, "gauc"]}`` of predicted click probabilities."""
    out = {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}
    if users is not None:
        out["gauc"] = gauc(users, labels, probs)
    return out
