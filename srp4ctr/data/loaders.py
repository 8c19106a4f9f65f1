"""Readers of the supported raw formats into one intermediate form, :class:`RawData`.

Every reader returns raw ids, unix-second timestamps, the behaviour value (rating or behaviour
type), the label, and the side tables; :mod:`srp4ctr.data.pipeline` turns that into a
:class:`~srp4ctr.data.dataset.PreparedDataset`.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from srp4ctr._memory import trim_heap
from srp4ctr.data import features as F
from srp4ctr.data._io import (
    _decode,
    raise_located,
    raise_named,
    read_bytes,
    read_fixed,
    read_header,
    read_named,
)
from srp4ctr.errors import DataError, InputError

POSITIVE_BEHAVIOURS = ("cart", "fav", "buy")


@dataclass
class Side:
    """A side table keyed by raw id: token arrays aligned with the sorted unique ``raw_ids``."""

    raw_ids: np.ndarray
    fields: dict[str, np.ndarray]
    vocab: dict[str, int]
    labels: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)  # token of ids absent from the table
    multi: list[str] = field(default_factory=list)


@dataclass
class RawData:
    """Interactions in file order, plus side information, before any id mapping."""

    user: np.ndarray  # raw user ids: int64 or str
    item: np.ndarray  # raw item ids: int64 (non-negative) or str
    timestamp: np.ndarray  # int64 unix seconds
    label: np.ndarray  # int8 0/1
    label_rule: str
    kind: str | None = None  # "rating" | "behavior" | None
    values: np.ndarray | None = None  # raw values, or token ids if values_encoded
    value_vocab: list[Any] | None = None
    values_encoded: bool = False
    item_side: Side | None = None
    item_row_fields: dict[str, np.ndarray] = field(default_factory=dict)
    user_side: Side | None = None
    files: list[Path] = field(default_factory=list)  # the files read
    display: str = ""  # how errors name the source


# ----------------------------------------------------------------------------- helpers
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
_YEAR_ANYWHERE = re.compile(r"\((\d{4})\)")


def year_from_title(title: str) -> float:
    """Release year from a MovieLens title such as ``"Toy Story (1995)"`` (NaN if none)."""
    t = str(title).strip()
    m = _YEAR_IN_TITLE.search(t) or _YEAR_ANYWHERE.search(t)
    return float(m.group(1)) if m else float("nan")


def _parse_year(v: Any) -> float:
    s = str(v).strip()
    return float(s) if s.isdigit() and len(s) == 4 else float("nan")


def movie_side(ids: np.ndarray, years: np.ndarray, genres: list[list[str]]) -> Side:
    """MovieLens item side table: multi-valued ``genre`` and bucketed ``year``."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if ids.size and np.any(ids[1:] == ids[:-1]):
        dup = ids[1:][ids[1:] == ids[:-1]][0]
        raise DataError(f"movie id {dup} listed twice")
    years = np.asarray(years, dtype=np.float64)[order]
    genres = [genres[i] for i in order.tolist()]
    names = sorted({g for gs in genres for g in gs})
    tok = {g: i + 1 for i, g in enumerate(names)}
    width = max((len(set(gs)) for gs in genres), default=0)
    mat = np.zeros((ids.size, max(width, 1)), dtype=np.int64)
    for r, gs in enumerate(genres):
        t = sorted({tok[g] for g in gs})
        mat[r, : len(t)] = t
    return Side(
        raw_ids=ids,
        fields={"genre": mat, "year": F.year_bucket(years)},
        vocab={"genre": len(names) + 1, "year": F.YEAR_VOCAB},
        labels={"genre": ["<pad>", *names], "year": F.year_labels()},
        missing={"genre": 0, "year": F.YEAR_UNKNOWN},
        multi=["genre"],
    )


def movielens_user_side(ids: Any, ages: Any, genders: Any, occupations: Any) -> Side:
    """MovieLens user side table: bucketed ``age``, ``gender``, ``occupation``."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if ids.size and np.any(ids[1:] == ids[:-1]):
        dup = ids[1:][ids[1:] == ids[:-1]][0]
        raise DataError(f"user id {dup} listed twice")
    g_tok, g_lab, _ = F.categorical(np.asarray(genders).astype(str)[order])
    o_tok, o_lab, _ = F.categorical(np.asarray(occupations).astype(str)[order])
    return Side(
        raw_ids=ids,
        fields={
            "age": F.age_bucket(np.asarray(ages, dtype=np.float64)[order]),
            "gender": g_tok,
            "occupation": o_tok,
        },
        vocab={"age": F.AGE_VOCAB, "gender": len(g_lab) + 1, "occupation": len(o_lab) + 1},
        labels={"age": list(F.AGE_LABELS), "gender": ["<pad>", *g_lab], "occupation": ["<pad>", *o_lab]},
        missing={"age": 0, "gender": 0, "occupation": 0},
    )


def _ratings(df: pd.DataFrame, user: str, item: str, rating: str, ts: str) -> dict[str, Any]:
    r = df[rating].to_numpy(dtype=np.float64)
    t = df[ts].to_numpy()
    t = np.floor(t).astype(np.int64) if t.dtype.kind == "f" else t.astype(np.int64)
    return dict(
        user=df[user].to_numpy(dtype=np.int64),
        item=df[item].to_numpy(dtype=np.int64),
        timestamp=t,
        label=(r >= 4).astype(np.int8),
        label_rule="rating >= 4",
        kind="rating",
        values=r,
        value_vocab=[float(v) for v in np.unique(r)],
    )


def _check_nonneg_items(items: np.ndarray, display: str) -> None:
    if items.size and items.min() < 0:
        raise DataError(f"negative item id {int(items.min())}", path=display)


def _find_file(path: Path, names: list[str], what: str) -> Path:
    """``path`` itself if it is a file, else the first of ``names`` inside the folder."""
    if path.is_file():
        return path
    for n in names:
        if (path / n).is_file():
            return path / n
    raise DataError(f"no {what} ({' or '.join(names)}) in this folder", path=str(path))


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


# ----------------------------------------------------------------------------- MovieLens
def load_ml100k_members(members: Mapping[str, bytes], display: str) -> RawData:
    """ml-100k from the recbole atomic files (``inter``, ``item``, ``user`` as bytes)."""
    inter = read_fixed(
        members["inter"],
        f"{display}:ml-100k.inter",
        sep="\t",
        names=["user", "item", "rating", "timestamp"],
        kinds=["int", "int", "float", "float"],
        header_lines=1,
    )
    items = read_fixed(
        members["item"],
        f"{display}:ml-100k.item",
        sep="\t",
        names=["item", "title", "year", "genres"],
        kinds=["int", "any", "any", "any"],
        header_lines=1,
    )
    users = read_fixed(
        members["user"],
        f"{display}:ml-100k.user",
        sep="\t",
        names=["user", "age", "gender", "occupation", "zip"],
        kinds=["int", "float", "str", "str", "any"],
        header_lines=1,
    )
    d = _ratings(inter, "user", "item", "rating", "timestamp")
    return RawData(
        **d,
        item_side=movie_side(
            items["item"].to_numpy(np.int64),
            np.array([_parse_year(y) for y in items["year"].tolist()]),
            [str(g).split() for g in items["genres"].fillna("").tolist()],
        ),
        user_side=movielens_user_side(
            users["user"], users["age"], users["gender"], users["occupation"]
        ),
        display=display,
    )


def _read_movies_dat(path: Path) -> Side:
    """``movies.dat``: ``MovieID::Title (Year)::Genre|Genre``."""
    text = _decode(read_bytes(path))
    ids, years, genres = [], [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) < 3:
            raise DataError(f"malformed row: expected 3 fields, found {len(parts)}", path=str(path), line=i)
        try:
            mid = int(parts[0].strip())
        except ValueError:
            raise DataError(f"malformed row: {parts[0]!r} is not an integer", path=str(path), line=i) from None
        title = "::".join(parts[1:-1])
        ids.append(mid)
        years.append(year_from_title(title))
        g = parts[-1].strip()
        genres.append([x for x in g.split("|") if x] if g else [])
    return movie_side(np.array(ids, dtype=np.int64), np.array(years), genres)


def load_movielens_dat(path: Path, name: str) -> RawData:
    """ml-1m / ml-10m: ``ratings.dat``, ``movies.dat`` (and ``users.dat`` for ml-1m)."""
    folder = _folder(path)
    rpath = _find_file(folder, ["ratings.dat"], "ratings file")
    mpath = _find_file(folder, ["movies.dat"], "movies file")
    df = read_fixed(
        rpath,
        str(rpath),
        sep="::",
        names=["user", "item", "rating", "timestamp"],
        kinds=["int", "int", "float", "int"],
    )
    d = _ratings(df, "user", "item", "rating", "timestamp")
    _check_nonneg_items(d["item"], str(rpath))
    files = [rpath, mpath]
    user_side = None
    upath = folder / "users.dat"
    if upath.is_file():
        u = read_fixed(
            upath,
            str(upath),
            sep="::",
            names=["user", "gender", "age", "occupation", "zip"],
            kinds=["int", "str", "int", "int", "any"],
        )
        user_side = movielens_user_side(u["user"], u["age"], u["gender"], u["occupation"])
        files.append(upath)
    return RawData(
        **d,
        item_side=_read_movies_dat(mpath),
        user_side=user_side,
        files=files,
        display=str(folder),
    )


def load_movielens_csv(path: Path, name: str) -> RawData:
    """ml-20m / ml-25m / ml-latest(-small): ``ratings.csv`` and ``movies.csv`` with headers."""
    folder = _folder(path)
    rpath = _find_file(folder, ["ratings.csv"], "ratings file")
    mpath = _find_file(folder, ["movies.csv"], "movies file")
    df = read_named(
        rpath,
        str(rpath),
        columns={"userId": "int", "movieId": "int", "rating": "float", "timestamp": "int"},
    )
    d = _ratings(df, "userId", "movieId", "rating", "timestamp")
    _check_nonneg_items(d["item"], str(rpath))
    mv = read_named(mpath, str(mpath), columns={"movieId": "int", "title": "any", "genres": "any"})
    genres = []
    for g in mv["genres"].fillna("").astype(str).tolist():
        g = g.strip()
        genres.append([x for x in g.split("|") if x] if g else [])
    side = movie_side(
        mv["movieId"].to_numpy(np.int64),
        np.array([year_from_title(t) for t in mv["title"].fillna("").astype(str).tolist()]),
        genres,
    )
    return RawData(**d, item_side=side, files=[rpath, mpath], display=str(folder))


# ----------------------------------------------------------------------------- Taobao
def _int_compact(a: np.ndarray) -> np.ndarray:
    if a.size and a.min() >= np.iinfo(np.int32).min and a.max() <= np.iinfo(np.int32).max:
        return a.astype(np.int32)
    return a.astype(np.int64)


def load_taobao(path: Path, chunksize: int = 1_000_000, progress: bool = False) -> RawData:
    """Taobao UserBehavior: ``user,item,category,behavior,timestamp`` without header.

    Read in chunks of ``chunksize`` rows into compact integer arrays (int32 ids, int8
    behaviour), never a frame of the whole file: the reading phase holds about 21 bytes per row
    plus one chunk.
    """
    fpath = _find_file(path, ["UserBehavior.csv"], "UserBehavior.csv") if path.is_dir() else path
    names = ["user", "item", "category", "behavior", "timestamp"]
    kinds = ["int", "int", "int", set(F.TAOBAO_BEHAVIOURS), "int"]
    btok = {b: i + 1 for i, b in enumerate(F.TAOBAO_BEHAVIOURS)}
    cols: dict[str, list[np.ndarray]] = {n: [] for n in names}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"reading {fpath.name}", unit=" rows", unit_scale=True, leave=False,
                   disable=None)  # a bar on a terminal only
    try:
        for df in read_fixed(fpath, str(fpath), sep=",", names=names, kinds=kinds, chunksize=chunksize):
            b = df["behavior"].str.strip().map(btok)
            if b.isna().any():
                raise_located(
                    str(fpath), fpath, sep=",", kinds=kinds, header_lines=0, exact=True,
                    quoted=False, cause="unknown behaviour type",
                )
            cols["behavior"].append(b.to_numpy(dtype=np.int8))
            for n in ("user", "item", "category"):
                cols[n].append(_int_compact(df[n].to_numpy()))
            cols["timestamp"].append(df["timestamp"].to_numpy(dtype=np.int64))
            if bar is not None:
                bar.update(len(df))
    finally:
        if bar is not None:
            bar.close()

    def cat(n: str, dt: Any) -> np.ndarray:  # each column's chunks freed as they are copied
        return _concat(cols.pop(n), dt)

    beh = cat("behavior", np.int8)
    item = cat("item", None)
    _check_nonneg_items(item, str(fpath))
    return RawData(
        user=cat("user", None),
        item=item,
        timestamp=cat("timestamp", np.int64),
        label=(beh >= 2).astype(np.int8),
        label_rule="behavior in {cart, fav, buy}",
        kind="behavior",
        values=beh,
        value_vocab=list(F.TAOBAO_BEHAVIOURS),
        values_encoded=True,
        item_row_fields={"category": cat("category", None)},
        files=[fpath],
        display=str(fpath),
    )


# ----------------------------------------------------------------------------- generic
STANDARD_KEYS = ("user", "item", "timestamp", "rating", "label", "behavior")
RESERVED_FIELDS = {"user", "item", "timestamp", "rating", "label", "behavior", "behaviour",
                   "split", *F.TIME_FIELDS}
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_columns(columns: Any) -> dict[str, str] | None:
    """A column mapping from a dict, a JSON object string, or ``"user=uid,item=iid,..."``.

    Keys: ``user``, ``item``, ``timestamp`` (required), ``rating``, ``label``, ``behavior``
    (optional) and any other name, which maps an item side column (an item field of that name).
    """
    if columns is None:
        return None
    if isinstance(columns, str):
        s = columns.strip()
        if not s:
            return None
        if s.startswith("{"):
            try:
                columns = json.loads(s)
            except ValueError as e:
                raise InputError(f"columns: invalid JSON: {e}") from None
        else:
            out: dict[str, str] = {}
            for part in s.split(","):
                part = part.strip()
                if not part:
                    continue
                if "=" not in part:
                    raise InputError(f"columns: expected key=column, got {part!r}")
                k, v = part.split("=", 1)
                out[k.strip()] = v.strip()
            columns = out
    if not isinstance(columns, Mapping):
        raise InputError(f"columns must be a mapping, JSON or key=value pairs, got {type(columns).__name__}")
    m: dict[str, str] = {}
    for k, v in columns.items():
        k = str(k).strip()
        if k == "behaviour":
            k = "behavior"
        if not isinstance(v, str) or not v:
            raise InputError(f"columns: the column for {k!r} must be a non-empty string")
        if k not in STANDARD_KEYS:
            if not _FIELD_NAME.match(k) or k in RESERVED_FIELDS:
                raise InputError(f"columns: {k!r} cannot name an item field")
        m[k] = v
    missing = [k for k in ("user", "item", "timestamp") if k not in m]
    if missing:
        raise InputError(f"columns: the mapping lacks {missing} (required: user, item, timestamp)")
    return m


def _default_mapping(header: list[str]) -> dict[str, str]:
    m = {k: k for k in STANDARD_KEYS if k in header}
    missing = [k for k in ("user", "item", "timestamp") if k not in m]
    if missing:
        raise DataError(
            f"missing column(s) {missing} and no column mapping given (use columns=, e.g. "
            f"'user=uid,item=iid,timestamp=ts'); the file has {header}"
        )
    return m


def _id_part(s: pd.Series) -> tuple[str, np.ndarray, Any]:
    """One batch of raw ids, before the integer-or-string decision for the whole column.

    ``("str", strings, None)`` when some value is not an integer, or its integer form would
    change it (``"007"``); otherwise integers that can still be turned back into the text that
    reading the whole column at once gives: ``("int", int64, None)`` from an integer column
    (the text is ``str(int)``), ``("float", float64, None)`` from a float column of integral
    values (``"7.0"``), ``("text", int64, patch)`` from text, where ``patch`` is ``None`` or
    ``(rows, text)`` holding the values whose text is not ``str(int)`` (``" 7"``).
    """
    if s.dtype.kind in "iu":
        return "int", _own(s.to_numpy(dtype=np.int64)), None
    if s.dtype.kind == "f":
        a = s.to_numpy(dtype=np.float64)
        if np.all(a == np.floor(a)):
            return "float", _own(a), None
    if s.dtype.kind in "OUT" or str(s.dtype) in ("str", "string"):
        ints = _exact_ints(s)
        if ints is not None and ints.min() > -(2**53) and ints.max() < 2**53:
            return "text", ints, None  # what the general path below gives, ten times faster
        num = pd.to_numeric(s, errors="coerce")
        if not num.isna().any():
            a = num.to_numpy(dtype=np.float64)
            if np.all(a == np.floor(a)) and np.all(np.abs(a) < 2**53):
                text = s.astype(str)
                ints = a.astype(np.int64)
                canon = pd.Series(ints, index=s.index).astype(str)
                # keep string ids when the integer form would change them ("007" -> 7)
                if (text.str.strip() == canon).all():
                    off = (text != canon).to_numpy(dtype=bool)
                    patch = None
                    if off.any():
                        rows = np.flatnonzero(off)
                        patch = (rows, text.to_numpy(dtype=str)[rows])
                    return "text", ints, patch
    return "str", s.astype(str).to_numpy(dtype=str), None


def _exact_ints(s: pd.Series) -> np.ndarray | None:
    """A text column as int64 when every value is written exactly as ``str(int)`` (no "+",
    leading zeros, spaces or exponent), else None. For such text it is what ``pd.to_numeric``
    gives, through pyarrow's cast (about ten times faster)."""
    if not isinstance(s.dtype, pd.StringDtype) or len(s) == 0:
        return None
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:  # pragma: no cover
        return None
    try:
        text = pa.array(s)
        if text.null_count:
            return None
        ints = pc.cast(text, pa.int64())  # refuses "+7", " 7", "1e3", "7.0", overflow
        if not pc.all(pc.equal(pc.cast(ints, text.type), text)).as_py():  # "007", "-0"
            return None
    except (pa.ArrowException, TypeError, ValueError):
        return None
    return np.asarray(ints.to_numpy(zero_copy_only=False), dtype=np.int64)


def _own(a: np.ndarray) -> np.ndarray:
    """``a``, copied if it is a view: a column of a batch's frame can be a view of a block of
    several columns, which would keep the whole batch alive."""
    return a if a.flags.owndata else a.copy()


def _int_text(a: np.ndarray) -> np.ndarray:
    """``str(int)`` of each value, as the narrowest unicode array (what pandas' text gives)."""
    width = max(len(str(int(a.min()))), len(str(int(a.max())))) if a.size else 1
    return a.astype(f"<U{width}")


def _join_ids(parts: list[tuple[str, np.ndarray, Any]]) -> np.ndarray:
    """A whole column's raw ids from its batches (``parts`` is consumed): int64 when every batch
    is integral, else the strings that reading the whole column at once gives."""
    strings = any(k == "str" for k, _, _ in parts)
    arrays: list[np.ndarray] = []
    parts.reverse()
    while parts:
        kind, a, patch = parts.pop()
        if not strings:
            a = a.astype(np.int64, copy=False)
        elif kind == "float":
            a = pd.Series(a).astype(str).to_numpy(dtype=str)
        elif kind != "str":
            a = _int_text(a)
            if patch is not None:
                rows, text = patch
                a = a.astype(np.promote_types(a.dtype, text.dtype), copy=False)
                a[rows] = text
        arrays.append(a)
    return _concat(arrays)


def _concat(parts: list[np.ndarray], dtype: Any = None) -> np.ndarray:
    """``np.concatenate(parts)`` that frees each part once copied (``parts`` is emptied): the
    result's pages are committed as they are written, so the peak is about the result plus one
    part, not twice the column."""
    if dtype is None:
        dtypes = [p.dtype for p in parts]
        dtype = functools.reduce(np.promote_types, dtypes) if dtypes else np.float64
    if len(parts) == 1:
        return parts.pop().astype(dtype, copy=False)
    out = np.empty(sum(len(p) for p in parts), dtype=dtype)
    pos = 0
    parts.reverse()
    while parts:
        p = parts.pop()
        out[pos : pos + len(p)] = p
        pos += len(p)
        del p
    trim_heap()
    return out


class _OutOfRange(ValueError):
    """A timestamp beyond :data:`~srp4ctr.data.features.MAX_ABS_TIMESTAMP` at ``row``."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


def _unix_seconds(s: pd.Series, dates: bool = False) -> tuple[np.ndarray | None, bool | None]:
    """Timestamps as int64 unix seconds (None if some value is neither number nor date), and,
    for text, whether it was read as ISO date-times (True: some value is not a number) or as
    numbers (False); None for a typed column. ``dates`` reads text as date-times regardless."""
    if isinstance(s.dtype, pd.DatetimeTZDtype) or s.dtype.kind == "M":
        t = pd.to_datetime(s, utc=True)
        if t.isna().any():
            return None, None
        return ((t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64), None
    if s.dtype.kind in "iu":
        a = s.to_numpy()
        if a.size and np.any(np.abs(a.astype(np.float64)) > F.MAX_ABS_TIMESTAMP):
            raise _OutOfRange(int(np.flatnonzero(np.abs(a.astype(np.float64))
                                                 > F.MAX_ABS_TIMESTAMP)[0]))
        return a.astype(np.int64), None
    if s.dtype.kind == "f":
        a = s.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(a)):
            return None, None
        if a.size and np.any(np.abs(a) > F.MAX_ABS_TIMESTAMP):
            raise _OutOfRange(int(np.flatnonzero(np.abs(a) > F.MAX_ABS_TIMESTAMP)[0]))
        return np.floor(a).astype(np.int64), None
    if not dates:
        ints = _exact_ints(s)
        if ints is not None:  # the common case, what the line below gives, faster
            return _unix_seconds(pd.Series(ints))[0], False
        num = pd.to_numeric(s, errors="coerce")
        if not num.isna().any():
            return _unix_seconds(num)[0], False
    try:
        t = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")
    except (ValueError, TypeError):
        return None, True
    if t.isna().any():
        return None, True
    return _unix_seconds(t)[0], True


def _first_true(mask: Any) -> int:
    """Position of the first true value (0 if there is none)."""
    hits = np.flatnonzero(np.asarray(mask, dtype=bool))
    return int(hits[0]) if hits.size else 0


def _labels01(s: pd.Series) -> tuple[np.ndarray | None, int]:
    """Labels as int8 0/1, or ``(None, position of the first value that is not 0 or 1)``."""
    if s.dtype.kind == "b":
        return s.to_numpy(dtype=np.int8), 0
    if s.dtype.kind not in "iuf":
        low = s.astype(str).str.strip().str.lower()
        low = low.replace({"true": "1", "false": "0"})
        s = pd.to_numeric(low, errors="coerce")
    a = s.to_numpy(dtype=np.float64, na_value=np.nan)
    ok = (a == 0) | (a == 1)
    if not ok.all():
        return None, _first_true(~ok)
    return a.astype(np.int8), 0


def _open_parquet(path: Path, display: str) -> tuple[Any, list[Any]]:
    """The dataset of a parquet file or folder and its files (fragments), in reading order.

    A folder is read as :func:`pandas.read_parquet` reads it: hive partitions (``key=value``
    folders) give dictionary columns, names starting with ``.`` or ``_`` are skipped.
    """
    try:
        import pyarrow.dataset as pads
    except ImportError:  # pragma: no cover
        raise InputError("reading parquet needs pyarrow: pip install 'srp4ctr[parquet]'") from None
    try:
        if path.is_dir():
            ds = pads.dataset(str(path), format="parquet",
                              partitioning=pads.HivePartitioning.discover(infer_dictionary=True))
        else:
            ds = pads.dataset(str(path), format="parquet")
        fragments = list(ds.get_fragments())
    except Exception as e:  # pyarrow raises several types for bad files
        raise DataError(f"cannot read parquet: {e}", path=display) from None
    if not fragments:
        raise DataError("no parquet files in this folder (names starting with '.' or '_' are "
                        "skipped)", path=display)
    return ds, fragments


def _parquet_batches(
    ds: Any, fragments: list[Any], columns: list[str], batch_rows: int
) -> Iterator[tuple[pd.DataFrame, str]]:
    """(frame, file) of each record batch, file by file; only ``columns`` are read."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    # no pre-buffering of whole row groups: about 100 MB less at the peak for 1M-row batches,
    # and no slower on local files
    options = pads.ParquetFragmentScanOptions(pre_buffer=False)
    for frag in fragments:
        it = None
        while True:
            try:
                if it is None:
                    # one batch read ahead, not the default 16 (16 batches in memory)
                    it = iter(frag.to_batches(schema=ds.schema, columns=columns,
                                              batch_size=batch_rows, batch_readahead=1,
                                              fragment_readahead=1,
                                              fragment_scan_options=options))
                batch = next(it)
                # as pandas.read_parquet converts (same dtypes, the pandas metadata applied),
                # without first joining the columns into blocks (split_blocks)
                df = pa.Table.from_batches([batch]).to_pandas(split_blocks=True)
            except StopIteration:
                break
            except Exception as e:  # pyarrow raises several types for bad files
                raise DataError(f"cannot read parquet: {e}", path=str(frag.path)) from None
            del batch
            yield df, str(frag.path)
            del df
            pa.default_memory_pool().release_unused()  # else mimalloc keeps the freed batches


_NOT_TIME = "timestamp is neither a number nor an ISO date-time"


def load_generic(path: Path, fmt: str, columns: Any, *, batch_rows: int = 1_000_000) -> RawData:
    """A generic interaction table (CSV with a header, or parquet) and a column mapping.

    ``path`` is a CSV file (or a folder holding one), a parquet file, or a parquet dataset
    folder, plain or hive-partitioned (read as :func:`pandas.read_parquet` reads it). The table
    is read ``batch_rows`` rows at a time (CSV in pandas chunks, parquet in record batches, file
    by file and only the mapped columns), each batch turned at once into compact arrays, never a
    frame of the whole table. The reading phase holds, per row: 8 bytes for each of user id,
    item id (integer ids; string ids take 4 bytes per character of the longest), timestamp and
    rating; 1 for a label column; 8 for an integer behaviour (4 per character for strings); an
    8-byte object pointer plus the value's object for each item side column (as before); plus
    one batch (for CSV a frame of all its columns as text). For integer ids, timestamp and
    rating that is 32 bytes a row (33 with the label derived at the end: 165 MB for 5M rows).
    Joining a column's batches frees each part as it is copied, so the peak is about one column
    more.

    The result does not depend on ``batch_rows``: it is what reading the whole table at once
    gives. Ids are integers only if every batch's are (``"007"`` anywhere makes the column
    strings); text timestamps are numbers or ISO date-times for the whole column (when batches
    disagree, the column is read a second time as date-times); vocabularies are over the whole
    column. A bad value raises :class:`DataError` naming the file and, for CSV, the first bad
    line of the file, for parquet the row (1-based over the whole table; for a dataset folder
    the file of the row and the row within it too). With several bad values, the one reported is
    the first of the first batch that has any.
    """
    if (isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer))
            or batch_rows < 1):
        raise InputError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    batch_rows = int(batch_rows)
    if path.is_dir() and fmt == "csv":
        found = sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise DataError(f"expected one .csv file in this folder, found {len(found)}", path=str(path))
        path = found[0]
    display = str(path)
    mapping = parse_columns(columns)
    if fmt == "csv":
        header = read_header(path, display)
    else:
        ds, fragments = _open_parquet(path, display)
        header = list(ds.schema.names)
    if mapping is None:
        mapping = _default_mapping(header)
    missing = sorted({c for c in mapping.values() if c not in header})
    if missing:
        raise DataError(f"missing column(s) {missing}; the file has {header}", path=display)
    kinds: dict[str, Any] = {}
    kind_of = {"user": "id", "item": "id", "timestamp": "time", "rating": "float",
               "label": "label", "behavior": "str"}
    for k, c in mapping.items():
        kinds[c] = kind_of.get(k, "any")
    in_folder = fmt != "csv" and path.is_dir()
    starts: list[int] = []  # first row (over the whole table) of each parquet file read
    files: list[str] = []

    def fail(cause: str, column: str, bad_row: int | None) -> None:
        if fmt == "csv":
            raise_named(path, display, header=header, columns=kinds, cause=cause)
        where, file = "", display
        if bad_row is not None:
            where = f" (row {bad_row + 1})"
            if in_folder and starts:
                k = bisect.bisect_right(starts, bad_row) - 1
                file = files[k]
                where = (f" (row {bad_row - starts[k] + 1} of this file, "
                         f"row {bad_row + 1} of the dataset)")
        raise DataError(f"column {column!r}: {cause}{where}", path=file)

    def batches(cols: dict[str, Any]) -> Iterator[tuple[pd.DataFrame, str]]:
        if fmt == "csv":
            for df in read_named(path, display, columns=cols, chunksize=batch_rows):
                yield df, display
        else:
            yield from _parquet_batches(ds, fragments, list(cols), batch_rows)

    ts_col = mapping["timestamp"]
    parts: dict[str, list[Any]] = {k: [] for k in ("timestamp", "user", "item", "rating",
                                                   "behavior", "label")}
    side_keys = [k for k in mapping if k not in STANDARD_KEYS]
    side_parts: dict[str, list[np.ndarray]] = {k: [] for k in side_keys}
    ts_modes: set[bool] = set()  # text timestamps: read as numbers (False) / date-times (True)
    first_text_row: int | None = None  # the first timestamp that is not a number
    n = trimmed = 0  # rows read so far, and when the heap was last trimmed
    for df, file in batches(kinds):
        if len(df) == 0:
            continue
        if not files or files[-1] != file:
            starts.append(n)
            files.append(file)
        if fmt != "csv":
            for c in mapping.values():
                if kinds[c] != "any" and df[c].isna().any():
                    fail("missing value", c, n + _first_true(df[c].isna()))

        col = df[ts_col]
        try:
            ts, as_dates = _unix_seconds(col)
        except _OutOfRange as e:
            fail("timestamp out of range (|t| > 2**53 seconds)", ts_col, n + e.row)
        if as_dates and first_text_row is None:
            first_text_row = n + _first_true(pd.to_numeric(col, errors="coerce").isna())
        if ts is None:
            row = first_text_row  # as reading at once names it: the first text that is no number
            if row is None:  # a typed column: an infinite value
                num = pd.to_numeric(col, errors="coerce").to_numpy(np.float64, na_value=np.nan)
                row = n + _first_true(~np.isfinite(num))
            fail(_NOT_TIME, ts_col, row)
        if as_dates is not None:
            ts_modes.add(as_dates)
        parts["timestamp"].append(_own(ts))
        del col, ts

        for key in ("user", "item"):
            c = df[mapping[key]]
            if c.dtype.kind == "u" and c.max() > np.iinfo(np.int64).max:
                fail(f"{key} ids beyond the int64 range", mapping[key],
                     n + int(np.flatnonzero(c.to_numpy() > np.iinfo(np.int64).max)[0]))
        for key in ("user", "item"):
            part = _id_part(df[mapping[key]])
            if key == "item" and part[0] == "int" and part[1].min() < 0:
                # an integer column stays integers: refused now (text ids are checked at the
                # end, once the column is known to be integers)
                fail("item ids must be non-negative integers or strings", mapping["item"],
                     n + int(np.flatnonzero(part[1] < 0)[0]))
            parts[key].append(part)
        if "rating" in mapping:
            rs = pd.to_numeric(df[mapping["rating"]], errors="coerce")
            na = rs.isna().to_numpy(dtype=bool)
            if na.any():
                fail("rating is not a number", mapping["rating"], n + int(np.flatnonzero(na)[0]))
            parts["rating"].append(_own(rs.to_numpy(dtype=np.float64)))
        if "behavior" in mapping:
            bs = df[mapping["behavior"]]
            if bs.dtype.kind in "iu":
                parts["behavior"].append(_own(bs.to_numpy(dtype=np.int64)))
            else:
                parts["behavior"].append(bs.astype(str).str.strip().to_numpy(dtype=str))
        if "label" in mapping:
            lab, bad = _labels01(df[mapping["label"]])
            if lab is None:
                fail("label must be 0 or 1", mapping["label"], n + bad)
            parts["label"].append(_own(lab))
        for k in side_keys:
            side_parts[k].append(_own(df[mapping[k]].to_numpy()))
        n += len(df)
        del df
        if n - trimmed >= 1_000_000:
            trim_heap()
            trimmed = n
    if n == 0:
        raise DataError("no interactions (empty table)", path=display)

    if len(ts_modes) > 1:
        # numbers in some batches, date-times in others: the whole column reads as date-times
        # (as it does when read at once), so those numbers must be date-times too
        parts["timestamp"] = []
        for df, _ in batches({ts_col: kinds[ts_col]}):
            if len(df) == 0:
                continue
            ts, _ = _unix_seconds(df[ts_col], dates=True)
            if ts is None:
                fail(_NOT_TIME, ts_col, first_text_row)
            parts["timestamp"].append(_own(ts))
    ts = _concat(parts.pop("timestamp"), np.int64)
    user = _join_ids(parts.pop("user"))
    item = _join_ids(parts.pop("item"))
    if item.dtype.kind in "iu" and item.min() < 0:
        fail("item ids must be non-negative integers or strings", mapping["item"],
             int(np.flatnonzero(item < 0)[0]))
    d: dict[str, Any] = {}
    rating = _concat(parts.pop("rating"), np.float64) if "rating" in mapping else None
    behaviour = None
    if "behavior" in mapping:
        behaviour = _concat(parts.pop("behavior"))
        if behaviour.dtype.kind in "iu":
            vocab: list[Any] = [int(v) for v in np.unique(behaviour)]
        else:
            vocab = [str(v) for v in np.unique(behaviour)]
        d.update(kind="behavior", values=behaviour, value_vocab=vocab)
    elif rating is not None:
        d.update(kind="rating", values=rating, value_vocab=[float(v) for v in np.unique(rating)])
    if "label" in mapping:
        d.update(label=_concat(parts.pop("label"), np.int8),
                 label_rule=f"label column {mapping['label']!r}")
    elif rating is not None:
        d.update(label=(rating >= 4).astype(np.int8), label_rule="rating >= 4")
    elif behaviour is not None and set(d["value_vocab"]) <= set(F.TAOBAO_BEHAVIOURS):
        d.update(label=np.isin(behaviour, POSITIVE_BEHAVIOURS).astype(np.int8),
                 label_rule="behavior in {cart, fav, buy}")
    else:
        d.update(label=np.ones(n, dtype=np.int8),
                 label_rule="implicit feedback: every interaction is a positive")
    side = {k: _concat(side_parts.pop(k)) for k in side_keys}
    return RawData(
        user=user,
        item=item,
        timestamp=ts,
        item_row_fields=side,
        files=[path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()),
        display=display,
        **d,
    )


# ----------------------------------------------------------------------------- registry
PathLoader = Callable[..., RawData]

PATH_DATASETS = ("ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest", "ml-latest-small", "taobao",
                 "csv", "parquet")
KNOWN_DATASETS = ("ml-100k", *PATH_DATASETS)


def load_path_dataset(name: str, path: Path, columns: Any, progress: bool) -> RawData:
    if name in ("ml-1m", "ml-10m"):
        raw = load_movielens_dat(path, name)
    elif name in ("ml-20m", "ml-25m", "ml-latest", "ml-latest-small"):
        raw = load_movielens_csv(path, name)
    elif name == "taobao":
        raw = load_taobao(path, progress=progress)
    elif name in ("csv", "parquet"):
        raw = load_generic(path, name, columns)
    else:  # pragma: no cover - guarded by the caller
        raise AssertionError(name)
    if not raw.files:
        raw.files = [path]
    return raw


def file_signature(files: list[Path]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append({"path": os.path.abspath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out
