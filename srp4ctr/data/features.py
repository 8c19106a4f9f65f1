"""Token definitions shared by data preparation and serving.

Everything that turns a raw value into a token id lives here, so that :func:`prepare` and the
serving engine cannot drift apart: behaviour fields (rating / behaviour type, time gap, hour,
weekday) come from :func:`behaviour_features`, raw behaviour values from :func:`encode_values`,
and item / user side fields from the bucket functions below. Token id 0 is always padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from srp4ctr.errors import InputError

# --- time gap --------------------------------------------------------------------------------
#: token of a user's first interaction (no previous interaction to measure a gap from)
GAP_FIRST = 1
#: token of a gap of 0 seconds (same timestamp as the previous interaction)
GAP_ZERO = 2
#: gaps of g >= 1 seconds get ``GAP_LOG_BASE + min(floor(log2(g)), GAP_MAX_LOG2)``
GAP_LOG_BASE = 3
GAP_MAX_LOG2 = 21  # 2**21 s ~ 24 days: every longer gap shares the last bucket
GAP_VOCAB = GAP_LOG_BASE + GAP_MAX_LOG2 + 1  # 25 = padding + 24 buckets
HOUR_VOCAB = 25  # padding + UTC hours 0..23 as 1..24
WEEKDAY_VOCAB = 8  # padding + Monday=1 .. Sunday=7

GAP_RULE = (
    "gap: 1 = first interaction of the user, 2 = 0 s since the previous one, "
    f"3 + min(floor(log2(seconds)), {GAP_MAX_LOG2}) otherwise; hour: UTC hour + 1; "
    "weekday: Monday = 1 .. Sunday = 7 (UTC)"
)

TIME_FIELDS = ("gap", "hour", "weekday")

# --- release year (MovieLens) ----------------------------------------------------------------
YEAR_UNKNOWN = 1
YEAR_FIRST = 1920  # years before fall into one bucket
YEAR_LAST = 2029  # years after are clipped into the last bucket
YEAR_STEP = 5
_N_YEAR_BUCKETS = (YEAR_LAST - YEAR_FIRST + 1) // YEAR_STEP  # 22
YEAR_VOCAB = 3 + _N_YEAR_BUCKETS  # padding, unknown, <1920, 22 five-year buckets
YEAR_RULE = (
    f"year: 1 = unknown, 2 = before {YEAR_FIRST}, then {YEAR_STEP}-year buckets from "
    f"{YEAR_FIRST} to {YEAR_LAST} (later years in the last)"
)


def year_labels() -> list[str]:
    """Human-readable name of every year token (index = token id)."""
    out = ["<pad>", "unknown", f"<{YEAR_FIRST}"]
    for b in range(_N_YEAR_BUCKETS):
        lo = YEAR_FIRST + b * YEAR_STEP
        out.append(f"{lo}-{lo + YEAR_STEP - 1}")
    return out


def year_bucket(years: Any) -> np.ndarray:
    """Release years (float, NaN = unknown) -> year tokens (int64)."""
    y = np.asarray(years, dtype=np.float64)
    out = np.full(y.shape, YEAR_UNKNOWN, dtype=np.int64)
    ok = np.isfinite(y)
    yi = np.floor(y[ok]).astype(np.int64)
    tok = np.where(
        yi < YEAR_FIRST,
        2,
        3 + (np.minimum(yi, YEAR_LAST) - YEAR_FIRST) // YEAR_STEP,
    )
    out[ok] = tok
    return out


# --- age (MovieLens users) -------------------------------------------------------------------
AGE_BOUNDS = np.array([18, 25, 35, 45, 50, 56])
AGE_LABELS = ["<pad>", "<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
AGE_VOCAB = len(AGE_LABELS)


def age_bucket(ages: Any) -> np.ndarray:
    """Ages in years (or the ML-1M age codes 1/18/25/35/45/50/56) -> tokens 1..7 (0 = unknown)."""
    a = np.asarray(ages, dtype=np.float64)
    out = np.zeros(a.shape, dtype=np.int64)
    ok = np.isfinite(a)
    out[ok] = 1 + np.searchsorted(AGE_BOUNDS, a[ok], side="right")
    return out


# --- behaviour values ------------------------------------------------------------------------
TAOBAO_BEHAVIOURS = ["pv", "cart", "fav", "buy"]  # tokens 1..4


def _is_string_vocab(vocab: Sequence[Any]) -> bool:
    return len(vocab) > 0 and isinstance(vocab[0], str)


def encode_values(values: Any, vocab: Sequence[Any]) -> np.ndarray:
    """Raw behaviour values -> token ids ``1..len(vocab)`` (int64).

    ``vocab`` lists the raw values in token order (token = index + 1): numbers (ratings, sorted)
    or strings (behaviour types). A value outside the vocabulary raises :class:`InputError`.
    """
    vocab = list(vocab)
    if not vocab:
        raise InputError("empty value vocabulary")
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if _is_string_vocab(vocab):
        strs = arr.astype(str)
        uniq, inv = np.unique(strs, return_inverse=True)
        table = {v: i + 1 for i, v in enumerate(vocab)}
        mapped = np.array([table.get(u, 0) for u in uniq.tolist()], dtype=np.int64)
        bad = mapped == 0
        if bad.any():
            raise InputError(
                f"unknown behaviour value(s) {uniq[bad][:5].tolist()}; known: {vocab}"
            )
        return mapped[inv.reshape(-1)]
    try:
        v = arr.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"behaviour values must be numbers, got {arr.dtype}: {e}") from None
    if not np.all(np.isfinite(v)):
        raise InputError("behaviour values contain NaN or inf")
    voc = np.asarray(vocab, dtype=np.float64)
    idx = np.searchsorted(voc, v)
    idx_c = np.minimum(idx, len(voc) - 1)
    bad = voc[idx_c] != v
    if bad.any():
        raise InputError(f"unknown value(s) {np.unique(v[bad])[:5].tolist()}; known: {vocab}")
    return idx_c.astype(np.int64) + 1


#: the largest timestamp magnitude taken (seconds): exact in float64, and far from int64
#: overflow in the gap arithmetic (about 285 million years)
MAX_ABS_TIMESTAMP = 2**53


def _as_int_timestamps(timestamps: Any) -> np.ndarray:
    ts = np.asarray(timestamps)
    if ts.ndim != 1:
        ts = ts.reshape(-1)
    if ts.dtype.kind in "Mm":
        raise InputError(f"timestamps must be unix seconds (numbers), got {ts.dtype}; convert "
                         "with arr.astype('datetime64[s]').astype('int64')")
    if ts.dtype.kind in "iu":
        if ts.size and (np.any(ts > MAX_ABS_TIMESTAMP) or
                        (ts.dtype.kind == "i" and np.any(ts < -MAX_ABS_TIMESTAMP))):
            raise InputError(f"timestamps out of range (|t| > 2**53 seconds), e.g. "
                             f"{ts[np.abs(ts.astype(np.float64)) > MAX_ABS_TIMESTAMP][:3].tolist()}")
        return ts.astype(np.int64, copy=False)
    if ts.dtype.kind == "f":
        if not np.all(np.isfinite(ts)):
            raise InputError("timestamps contain NaN or inf")
        if ts.size and np.any(np.abs(ts) > MAX_ABS_TIMESTAMP):
            raise InputError(f"timestamps out of range (|t| > 2**53 seconds), e.g. "
                             f"{ts[np.abs(ts) > MAX_ABS_TIMESTAMP][:3].tolist()}")
        return np.floor(ts).astype(np.int64)
    if ts.dtype.kind == "b":
        raise InputError("timestamps must be integers (unix seconds), got bool")
    try:
        f = ts.astype(np.float64)
    except (TypeError, ValueError):
        raise InputError(f"timestamps must be numbers (unix seconds), got {ts.dtype}") from None
    return _as_int_timestamps(f)


def behaviour_features(
    timestamps: Any,
    values: Any = None,
    *,
    kind: str | None = None,
    vocab: Sequence[Any] | None = None,
    offsets: Any = None,
    encoded: bool = False,
) -> dict[str, np.ndarray]:
    """Behaviour-field tokens of time-ordered interactions (the one definition of them).

    ``timestamps`` are unix seconds of one user's interactions in time order, or of many users
    concatenated, with ``offsets`` (int[n_users + 1], user j = ``offsets[j]:offsets[j+1]``).
    ``kind`` names the value field (``"rating"``, ``"behavior"`` or None for none) and ``vocab``
    its raw values in token order; ``values`` are raw values (mapped with :func:`encode_values`)
    or, with ``encoded=True``, token ids already.

    Returns int64 arrays, in this order: ``kind`` (if any), ``"gap"``, ``"hour"``, ``"weekday"``
    (see :data:`GAP_RULE`). Timestamps that go backwards within a user raise :class:`InputError`.
    """
    ts = _as_int_timestamps(timestamps)
    n = ts.shape[0]
    if offsets is None:
        starts = np.zeros(1 if n else 0, dtype=np.int64)
    else:
        off = np.asarray(offsets, dtype=np.int64)
        if off.ndim != 1 or off.size < 1 or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
            raise InputError("offsets must be non-decreasing, start at 0 and end at len(timestamps)")
        starts = off[:-1][np.diff(off) > 0]
    out: dict[str, np.ndarray] = {}
    if kind is not None:
        if values is None:
            raise InputError(f"this dataset needs a {kind!r} value for every interaction")
        if vocab is None:
            raise InputError("behaviour_features needs the value vocabulary (vocab=)")
        if encoded:
            tok = np.asarray(values).astype(np.int64).reshape(-1)
            if tok.size and (tok.min() < 1 or tok.max() > len(vocab)):
                raise InputError(f"encoded {kind} tokens must lie in 1..{len(vocab)}")
        else:
            tok = encode_values(values, vocab)
        if tok.shape[0] != n:
            raise InputError(f"{n} timestamps but {tok.shape[0]} {kind} values")
        out[kind] = tok
    elif values is not None:
        raise InputError("values given but kind is None")
    first = np.zeros(n, dtype=bool)
    first[starts] = True
    gap = np.empty(n, dtype=np.int64)
    if n:
        d = np.empty(n, dtype=np.int64)
        d[0] = 0
        np.subtract(ts[1:], ts[:-1], out=d[1:])
        d[first] = 0
        if np.any(d < 0):
            raise InputError("timestamps must be in non-decreasing order within each user")
        pos = d > 0
        _, e = np.frexp(d[pos].astype(np.float64))  # d = m * 2**e, m in [0.5, 1)
        gap[:] = GAP_ZERO
        gap[pos] = GAP_LOG_BASE + np.minimum(e.astype(np.int64) - 1, GAP_MAX_LOG2)
        gap[first] = GAP_FIRST
    out["gap"] = gap
    out["hour"] = (ts // 3600) % 24 + 1
    out["weekday"] = (ts // 86400 + 3) % 7 + 1  # 1970-01-01 was a Thursday (4)
    return out


def categorical(values: Any) -> tuple[np.ndarray, list[str], Any]:
    """Values -> (tokens 1..K in sorted order of the distinct values, their labels, distinct)."""
    arr = np.asarray(values)
    uniq, inv = np.unique(arr, return_inverse=True)
    return inv.reshape(-1).astype(np.int64) + 1, [str(u) for u in uniq.tolist()], uniq


def split_rule_positions(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train_end, valid_end) positions for users with ``n`` interactions: floor(0.8n), floor(0.9n)."""
    n = np.asarray(n, dtype=np.int64)
    return (8 * n) // 10, (9 * n) // 10
