"""Torch-facing samples over a :class:`~srp4ctr.data.dataset.PreparedDataset`.

Every sample is a window of one user's flat, time-ordered rows: the history is the row range
``[start, end)`` of that user, oldest first. Three sample sets:

- :class:`PretrainDataset` -- the training part of each user's sequence (pre-training input);
- :class:`CTRDataset` -- one sample per interaction of a split (history: the rows before it in
  the time order, or with ``strict_time=True`` only those of a strictly earlier timestamp);
- :class:`NextItemDataset` -- the first validation (or test) interaction of each user as a
  next-item target.

Each is a ``torch.utils.data.Dataset`` (``__getitem__`` gives a dict of numpy values; batch with
:func:`collate`, works with any sampler, e.g. ``DistributedSampler``) and also builds whole
batches directly with vectorised numpy gathers: ``for batch in samples.batches(256,
shuffle=True, seed=epoch): ...`` -- the fast path for training loops.

Batch keys (torch tensors): ``hist_item [B, L]`` int64 right-padded with 0 (``L`` = the longest
history in the batch, at least 1, or ``pad_to``), ``hist_<f> [B, L]`` for every behaviour field,
``hist_len [B]``, ``user [B]``, ``user_<f> [B]`` per user field; CTR: ``cand_item [B]``,
``label [B]`` float32; next-item: ``target_item [B]`` (and ``neg_item [B, n]``). With
``item_features=True`` also ``hist_<g>`` ([B, L] or [B, L, G]) and ``cand_<g>`` /
``target_<g>`` for every item side field g; with ``return_rows=True`` also ``hist_row [B, L]``
(flat row index, -1 = padding) and ``row [B]`` (the candidate's / target's row).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from srp4ctr.data import features as F
from srp4ctr.data.dataset import PreparedDataset, split_index
from srp4ctr.errors import DataError, InputError

__all__ = [
    "CTRDataset",
    "NextItemDataset",
    "PretrainDataset",
    "collate",
    "same_second_history_share",
    "sample_negatives",
    "strict_history_end",
    "subset_indices",
]

_FLOAT_KEYS = ("label", "cand_stats")


def _sorted_unique(k: np.ndarray) -> np.ndarray:
    """``np.unique(k)`` by a sort: numpy 2's ``unique`` of integers hashes, ~20× slower at
    tens of millions of keys."""
    k = np.sort(k)
    keep = np.ones(k.size, dtype=bool)
    keep[1:] = k[1:] != k[:-1]
    return k[keep]


def _user_item_keys(ds: PreparedDataset, users: np.ndarray | None = None) -> np.ndarray:
    """Sorted unique ``user * (n_items + 2) + item`` of every interaction (cached on ``ds``), or
    only of the interactions of ``users`` when they are a small part of the users (an
    evaluation subset: its own rows, not the whole log)."""
    m = np.int64(ds.n_items + 2)
    if users is not None and np.size(users) * 8 < ds.n_users:  # (their unique ids, fewer)
        u = _sorted_unique(np.asarray(users, dtype=np.int64))
        start, end = ds.user_offsets[u - 1], ds.user_offsets[u]
        lens = end - start
        first = np.cumsum(lens) - lens
        rows = np.repeat(start - first, lens) + np.arange(int(lens.sum()), dtype=np.int64)
        return _sorted_unique(np.repeat(u, lens) * m + ds.item[rows].astype(np.int64))
    keys = getattr(ds, "_ui_keys", None)
    if keys is None:
        keys = _sorted_unique(ds.user.astype(np.int64) * m + ds.item.astype(np.int64))
        ds._ui_keys = keys  # type: ignore[attr-defined]
    return keys


def sample_negatives(
    ds: PreparedDataset, users: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` items per user drawn uniformly (with replacement) from the items that user never
    interacted with (in any split). int64 [len(users), n]; 0 where a user has interacted with
    every item (no negative exists)."""
    users = np.asarray(users, dtype=np.int64)
    m = ds.n_items + 2
    keys = _user_item_keys(ds, users)
    out = rng.integers(1, ds.n_items + 1, size=(users.size, n), dtype=np.int64)

    def seen(u: np.ndarray, it: np.ndarray) -> np.ndarray:
        k = u * m + it
        pos = np.searchsorted(keys, k)
        return keys[np.minimum(pos, keys.size - 1)] == k

    bad = seen(users[:, None], out)
    for _ in range(64):
        nb = int(bad.sum())
        if nb == 0:
            return out
        out[bad] = rng.integers(1, ds.n_items + 1, size=nb, dtype=np.int64)
        bad[bad] = seen(np.broadcast_to(users[:, None], out.shape)[bad], out[bad])
    # users who interacted with nearly every item: draw from the explicit complement
    for r in np.unique(np.nonzero(bad)[0]):
        u = int(users[r])
        own = ds.item[ds.user_rows(u)]
        free = np.setdiff1d(np.arange(1, ds.n_items + 1), own)
        cols = np.nonzero(bad[r])[0]
        out[r, cols] = rng.choice(free, size=cols.size) if free.size else 0
    return out


def strict_history_end(ds: PreparedDataset, rows: np.ndarray) -> np.ndarray:
    """Per flat row: the end of its strict-time history, the first row of the same user whose
    timestamp is not earlier than the row's (int64, same shape as ``rows``). Rows before it are
    exactly that user's interactions strictly earlier in time; ``end == row`` unless interactions
    of the same second precede the row in the (timestamp, raw item id) order.

    Vectorised: a binary search within each row's user (``ds.user_offsets``), run for all rows
    at once (``np.searchsorted(ts[user_start:row], ts[row], "left")`` per row), over the rows
    that have a same-second predecessor only; about log2(longest user) numpy passes, no loop
    over rows or users.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = rows.copy()
    if rows.size == 0:
        return out
    ts = ds.timestamp
    ustart = np.asarray(ds.user_offsets)[ds.user[rows].astype(np.int64) - 1]
    prev = np.maximum(rows - 1, 0)
    tie = (rows > ustart) & (ts[prev] == ts[rows])
    if not tie.any():
        return out
    t = ts[rows[tie]]
    lo = ustart[tie].copy()  # every row of the user before lo is earlier than t
    hi = prev[tie].copy()  # row hi has timestamp t (the answer is <= hi)
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) >> 1  # lo <= mid <= hi: a row of the user
        earlier = ts[mid] < t
        lo = np.where(active & earlier, mid + 1, lo)
        hi = np.where(active & ~earlier, mid, hi)
    out[tie] = lo
    return out


def same_second_history_share(ds: PreparedDataset, split: str | int) -> float:
    """The share of the interactions of ``split`` (the CTR samples without sampled negatives)
    whose default history holds at least one interaction of the same user with the same
    timestamp as the candidate (rated in the same second, ordered before it by raw item id):
    the samples whose history ``strict_time=True`` shortens. NaN for an empty split."""
    rows = np.flatnonzero(ds.split == split_index(split)).astype(np.int64)
    if rows.size == 0:
        return float("nan")
    return float(np.mean(strict_history_end(ds, rows) < rows))


class _WindowSamples(torch.utils.data.Dataset):
    """Samples = (user, history rows [start, end)) plus per-sample extras."""

    kind = "base"

    def __init__(
        self,
        ds: PreparedDataset,
        max_len: int,
        *,
        pad_to: int | None = None,
        item_features: bool = False,
        return_rows: bool = False,
    ):
        if not isinstance(ds, PreparedDataset):
            raise InputError(f"expected a PreparedDataset, got {type(ds).__name__}")
        max_len = int(max_len)
        if max_len < 1:
            raise InputError("max_len must be >= 1")
        if pad_to is not None and int(pad_to) < max_len:
            raise InputError(f"pad_to ({pad_to}) must be >= max_len ({max_len})")
        self.ds = ds
        self.max_len = max_len
        self.pad_to = None if pad_to is None else int(pad_to)
        self.item_features = bool(item_features)
        self.return_rows = bool(return_rows)
        self.users = np.zeros(0, dtype=np.int64)
        self.start = np.zeros(0, dtype=np.int64)
        self.end = np.zeros(0, dtype=np.int64)
        self.rows = np.zeros(0, dtype=np.int64)  # candidate / target row; -1 if none
        self.extras: dict[str, np.ndarray] = {}

    def _set(self, users: np.ndarray, end: np.ndarray, rows: np.ndarray | None = None) -> None:
        users = np.asarray(users, dtype=np.int64)
        end = np.asarray(end, dtype=np.int64)
        ustart = self.ds.user_offsets[users - 1]
        self.users = users
        self.end = end
        self.start = np.maximum(ustart, end - self.max_len)
        self.rows = np.full(users.size, -1, np.int64) if rows is None else np.asarray(rows, np.int64)

    # --------------------------------------------------------------------- Dataset API
    def __len__(self) -> int:
        return int(self.users.size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        ds = self.ds
        s, e = int(self.start[i]), int(self.end[i])
        u = int(self.users[i])
        out: dict[str, Any] = {"hist_item": ds.item[s:e].astype(np.int64)}
        for f in ds.behaviour_fields:
            out[f"hist_{f}"] = ds.behaviour[f][s:e].astype(np.int64)
        if self.item_features:
            for f, t in ds.item_table.items():
                out[f"hist_{f}"] = t[ds.item[s:e]]
        if self.return_rows:
            out["hist_row"] = np.arange(s, e, dtype=np.int64)
            out["row"] = int(self.rows[i])
        out["hist_len"] = e - s
        out["user"] = u
        for f, t in ds.user_table.items():
            out[f"user_{f}"] = int(t[u])
        for k, v in self.extras.items():
            out[k] = v[i]
            if self.item_features and k in ("cand_item", "target_item"):
                pre = k.split("_")[0]
                for f, t in ds.item_table.items():
                    out[f"{pre}_{f}"] = t[int(v[i])]
        return out

    def hist_lengths(self) -> np.ndarray:
        """History length of every sample (int64 [len(self)])."""
        return self.end - self.start

    @staticmethod
    def collate(samples: Sequence[dict[str, Any]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """:func:`collate` (also reachable from the dataset object)."""
        return collate(samples, pad_to=pad_to)

    # --------------------------------------------------------------------- fast batches
    def batch(self, index: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of samples ``index``, built with vectorised gathers (same as collate)."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        ds = self.ds
        start, end, users = self.start[idx], self.end[idx], self.users[idx]
        lens = end - start
        width = self.pad_to if self.pad_to is not None else max(1, int(lens.max()) if lens.size else 1)
        ar = np.arange(width, dtype=np.int64)
        mask = ar[None, :] < lens[:, None]
        rows = np.where(mask, start[:, None] + ar[None, :], 0)
        out: dict[str, torch.Tensor] = {}
        items = np.where(mask, ds.item[rows], 0).astype(np.int64)
        out["hist_item"] = torch.from_numpy(items)
        for f in ds.behaviour_fields:
            out[f"hist_{f}"] = torch.from_numpy(np.where(mask, ds.behaviour[f][rows], 0)
                                                .astype(np.int64, copy=False))
        if self.item_features:
            for f, t in ds.item_table.items():
                out[f"hist_{f}"] = torch.from_numpy(t[items])  # row 0 of every table is 0
        if self.return_rows:
            out["hist_row"] = torch.from_numpy(np.where(mask, rows, -1))
            out["row"] = torch.from_numpy(self.rows[idx].copy())
        out["hist_len"] = torch.from_numpy(lens.copy())
        out["user"] = torch.from_numpy(users.copy())
        for f, t in ds.user_table.items():
            out[f"user_{f}"] = torch.from_numpy(t[users])
        for k, v in self.extras.items():
            a = v[idx]
            out[k] = torch.from_numpy(a.astype(np.float32) if k in _FLOAT_KEYS else a.astype(np.int64))
            if self.item_features and k in ("cand_item", "target_item"):
                pre = k.split("_")[0]
                for f, t in ds.item_table.items():
                    out[f"{pre}_{f}"] = torch.from_numpy(t[a.astype(np.int64)])
        return out

    get_batch = batch

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate over whole batches (shuffled with ``seed`` if asked)."""
        batch_size = int(batch_size)
        if batch_size < 1:
            raise InputError("batch_size must be >= 1")
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        stop = n - (n % batch_size) if drop_last else n
        for b in range(0, stop, batch_size):
            yield self.batch(order[b : b + batch_size])

    def n_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)


class PretrainDataset(_WindowSamples):
    """Pre-training sequences: per user, the last ``max_len`` interactions of the training part.

    Only rows with ``split == 0`` ever appear (the training part is each user's prefix), so no
    validation or test interaction reaches pre-training as input or target. Users whose
    training part is empty are skipped. ``windows=True`` adds the earlier, non-overlapping
    ``max_len`` windows of long users' training parts (the oldest may be shorter).
    """

    kind = "pretrain"

    def __init__(self, ds: PreparedDataset, max_len: int = 200, *, windows: bool = False, **kw: Any):
        super().__init__(ds, max_len, **kw)
        # the split is positional (SPLIT_RULE): each user's training part is a prefix of
        # floor(0.8 n) rows, so no scan of every row's split is needed (checked below)
        ustart = ds.user_offsets[:-1]
        n_train = F.split_rule_positions(np.diff(ds.user_offsets))[0]
        tr_end = ustart + n_train
        if n_train.size:
            last, nxt = tr_end - 1, np.minimum(tr_end, ds.n_interactions - 1)
            has = n_train > 0
            more = tr_end < ds.user_offsets[1:]
            if np.any(ds.split[last[has]] != 0) or np.any(ds.split[nxt[more]] == 0):
                raise DataError("the split is not the positional rule of this format "
                                f"({ds.meta.get('split_rule')!r}); prepare the dataset again",
                                path=str(ds.path) if ds.path else None)
        users = np.nonzero(n_train > 0)[0].astype(np.int64) + 1
        end = tr_end[users - 1]
        if windows:
            k = -(-n_train[users - 1] // self.max_len)  # windows per user
            rep_users = np.repeat(users, k)
            first = np.repeat(np.cumsum(k) - k, k)
            j = np.arange(rep_users.size) - first  # 0 = the latest window
            end = np.repeat(end, k) - j * self.max_len
            users = rep_users
        self._set(users, end)
        if not np.all(ds.split[self.end - 1] == 0):  # pragma: no cover - invariant
            raise AssertionError("pre-training window reaches past the training part")


class CTRDataset(_WindowSamples):
    """CTR samples of one split (the sample's split is its candidate interaction's split).

    ``negatives=None``: every interaction of the split is a sample; history = the up to
    ``max_len`` interactions of the same user before it in the time order (from any split:
    they happened earlier; ties of equal timestamps are ordered by raw item id), candidate =
    its item, label = its label.

    ``negatives="uni100"``: every interaction of the split whose label is 1 gives one positive
    sample (label 1) followed by ``n_negatives`` negative samples with the same history, whose
    candidates are drawn uniformly (with replacement) from the items the user never interacted
    with in any split (label 0). Interactions with label 0 give no sample. The draw is
    deterministic given ``seed``; ``set_epoch(e)`` redraws with ``seed + e``.

    ``strict_time=True``: each history holds only interactions with a timestamp strictly earlier
    than the candidate interaction's (the up to ``max_len`` latest of them): interactions of the
    same second, which the default order puts before the candidate by raw item id, are left out
    (:func:`strict_history_end`). Samples, candidates and labels are the same either way; a
    history without a same-second predecessor is the same either way.
    ``same_second_share()``: the share of the samples whose default history has such an
    interaction.
    """

    kind = "ctr"

    def __init__(
        self,
        ds: PreparedDataset,
        split: str | int,
        max_len: int = 200,
        negatives: str | None = None,
        seed: int = 0,
        *,
        n_negatives: int = 1,
        strict_time: bool = False,
        **kw: Any,
    ):
        super().__init__(ds, max_len, **kw)
        if not isinstance(strict_time, (bool, np.bool_)):
            raise InputError(f"strict_time must be True or False, got {strict_time!r}")
        self.strict_time = bool(strict_time)
        if negatives not in (None, "uni100"):
            raise InputError(f"negatives must be None or 'uni100', got {negatives!r}")
        if int(n_negatives) < 1:
            raise InputError("n_negatives must be >= 1")
        self.split = split_index(split)
        self.negatives = negatives
        self.n_negatives = int(n_negatives)
        self.seed = int(seed)
        rows = np.flatnonzero(ds.split == self.split).astype(np.int64)
        if negatives is None:
            self._set(ds.user[rows], self._history_end(rows), rows)
            self.extras = {"cand_item": ds.item[rows].astype(np.int64), "label": ds.label[rows].copy()}
        else:
            self._pos_rows = rows[ds.label[rows] == 1]
            self._draw(self.seed)

    def _draw(self, seed: int) -> None:
        ds, k = self.ds, self.n_negatives
        pos = self._pos_rows
        users = ds.user[pos].astype(np.int64)
        neg = sample_negatives(ds, users, k, np.random.default_rng(seed))
        cand = np.concatenate([ds.item[pos].astype(np.int64)[:, None], neg], axis=1).reshape(-1)
        label = np.zeros((pos.size, 1 + k), dtype=np.int8)
        label[:, 0] = 1
        label = label.reshape(-1)
        rows = np.repeat(pos, 1 + k)
        keep = cand > 0  # a user who has seen every item has no negatives
        ends = np.repeat(self._history_end(pos), 1 + k)  # once per positive, not per candidate
        self._set(ds.user[rows][keep], ends[keep], rows[keep])
        self.extras = {"cand_item": cand[keep], "label": label[keep]}

    def _history_end(self, rows: np.ndarray) -> np.ndarray:
        return strict_history_end(self.ds, rows) if self.strict_time else rows

    def same_second_share(self) -> float:
        """The share of these samples whose default (not strict-time) history holds an
        interaction of the candidate's second (NaN without samples)."""
        if len(self) == 0:
            return float("nan")
        return float(np.mean(strict_history_end(self.ds, self.rows) < self.rows))

    def set_epoch(self, epoch: int) -> None:
        """Redraw the uni100 negatives with ``seed + epoch`` (no-op without negatives)."""
        if self.negatives is not None:
            self._draw(self.seed + int(epoch))


class NextItemDataset(_WindowSamples):
    """Next-item targets: per user, the first interaction of ``split`` ("valid" or "test").

    History = everything of that user before the target (valid: the training part; test: the
    training and validation parts), the last ``max_len``. Users without an interaction in the
    split are skipped. ``n_negatives``: also ``neg_item [B, n]``, items the user never
    interacted with (uniform, with replacement, drawn once with ``seed``), for sampled ranking.
    ``strict_time=True``: the history holds only interactions strictly earlier in time than the
    target (as :class:`CTRDataset`'s). ``max_samples``: only the targets
    :func:`subset_indices` keeps (seeded by ``subset_seed``), chosen before any negative is drawn.
    """

    kind = "next_item"

    def __init__(
        self,
        ds: PreparedDataset,
        split: str | int = "valid",
        max_len: int = 200,
        *,
        n_negatives: int | None = None,
        seed: int = 0,
        strict_time: bool = False,
        max_samples: int | None = None,
        subset_seed: int = 0,
        **kw: Any,
    ):
        super().__init__(ds, max_len, **kw)
        if not isinstance(strict_time, (bool, np.bool_)):
            raise InputError(f"strict_time must be True or False, got {strict_time!r}")
        self.strict_time = bool(strict_time)
        s = split_index(split)
        if s == 0:
            raise InputError("NextItemDataset takes split 'valid' or 'test'")
        self.split = s
        rows = np.flatnonzero(ds.split == s).astype(np.int64)
        u = ds.user[rows]
        first = np.ones(rows.size, dtype=bool)
        first[1:] = u[1:] != u[:-1]
        rows = rows[first]
        keep = subset_indices(rows.size, max_samples, subset_seed)
        if keep is not None:  # before the negatives: at 1M users they are 800 MB per split
            rows = rows[keep]
        self._set(ds.user[rows], strict_history_end(ds, rows) if self.strict_time else rows, rows)
        self.extras = {"target_item": ds.item[rows].astype(np.int64)}
        if n_negatives is not None:
            if int(n_negatives) < 1:
                raise InputError("n_negatives must be >= 1")
            self.extras["neg_item"] = sample_negatives(
                ds, self.users, int(n_negatives), np.random.default_rng(seed)
            )


def subset_indices(n: int, max_samples: int | None, seed: int) -> np.ndarray | None:
    """A fixed subset of ``max_samples`` of ``range(n)`` in increasing order, drawn with
    ``seed`` (None: all, also when ``max_samples >= n``): the evaluated samples of a large
    split."""
    if max_samples is None or max_samples >= n:
        return None
    return np.sort(np.random.default_rng([seed, 7]).choice(n, size=int(max_samples),
                                                           replace=False))


def collate(samples: Sequence[dict[str, Any]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Batch samples from ``__getitem__`` into tensors (see the module docstring for keys).

    Histories are right-padded with 0 (``hist_row`` with -1) to the longest in the batch (at
    least 1) or to ``pad_to``.
    """
    if len(samples) == 0:
        raise InputError("collate needs at least one sample")
    lens = np.array([int(s["hist_len"]) for s in samples], dtype=np.int64)
    width = int(pad_to) if pad_to is not None else max(1, int(lens.max()))
    if lens.max() > width:
        raise InputError(f"a history of length {int(lens.max())} does not fit pad_to={width}")
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if key.startswith("hist_") and key != "hist_len":
            first = np.asarray(vals[0])
            fill = -1 if key == "hist_row" else 0
            arr = np.full((len(samples), width, *first.shape[1:]), fill, dtype=np.int64)
            for r, v in enumerate(vals):
                arr[r, : len(v)] = v
            out[key] = torch.from_numpy(arr)
        elif key in _FLOAT_KEYS:
            out[key] = torch.tensor(np.asarray(vals, dtype=np.float32))
        else:
            out[key] = torch.from_numpy(np.stack([np.asarray(v, dtype=np.int64) for v in vals]))
    return out
