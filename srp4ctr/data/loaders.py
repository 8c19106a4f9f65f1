"""Readers of the supported raw formats into one intermediate form, :class:`RawData`.

Every reader returns raw ids, unix-second timestamps, the behaviour value (rating or behaviour
type), the label, and the side tables; :mod:`srp4ctr.data.pipeline` turns that into a
:class:`~srp4ctr.data.dataset.PreparedDataset`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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

    def cat(n: str, dt: Any) -> np.ndarray:
        parts = cols.pop(n)
        if not parts:
            return np.zeros(0, dtype=dt)
        if dt is None:
            dt = np.result_type(*[p.dtype for p in parts])
        out = np.concatenate(parts).astype(dt, copy=False)
        parts.clear()
        return out

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


def _ids(s: pd.Series) -> np.ndarray:
    """Raw ids: int64 when every value is an integer, else strings."""
    if s.dtype.kind in "iu":
        return s.to_numpy(dtype=np.int64)
    if s.dtype.kind == "f":
        a = s.to_numpy(dtype=np.float64)
        if np.all(a == np.floor(a)):
            return a.astype(np.int64)
    if s.dtype.kind in "OUT" or str(s.dtype) in ("str", "string"):
        num = pd.to_numeric(s, errors="coerce")
        if not num.isna().any():
            a = num.to_numpy(dtype=np.float64)
            if np.all(a == np.floor(a)) and np.all(np.abs(a) < 2**53):
                strs = s.astype(str).str.strip()
                # keep string ids when the integer form would change them ("007" -> 7)
                if (strs == pd.Series(a.astype(np.int64), index=s.index).astype(str)).all():
                    return a.astype(np.int64)
    return s.astype(str).to_numpy(dtype=str)


class _OutOfRange(ValueError):
    """A timestamp beyond :data:`~srp4ctr.data.features.MAX_ABS_TIMESTAMP` at ``row``."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


def _unix_seconds(s: pd.Series) -> np.ndarray | None:
    """Timestamps as int64 unix seconds, or None if some value is neither number nor date."""
    if isinstance(s.dtype, pd.DatetimeTZDtype) or s.dtype.kind == "M":
        t = pd.to_datetime(s, utc=True)
        if t.isna().any():
            return None
        return ((t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    if s.dtype.kind in "iu":
        a = s.to_numpy()
        if a.size and np.any(np.abs(a.astype(np.float64)) > F.MAX_ABS_TIMESTAMP):
            raise _OutOfRange(int(np.flatnonzero(np.abs(a.astype(np.float64))
                                                 > F.MAX_ABS_TIMESTAMP)[0]))
        return a.astype(np.int64)
    if s.dtype.kind == "f":
        a = s.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(a)):
            return None
        if a.size and np.any(np.abs(a) > F.MAX_ABS_TIMESTAMP):
            raise _OutOfRange(int(np.flatnonzero(np.abs(a) > F.MAX_ABS_TIMESTAMP)[0]))
        return np.floor(a).astype(np.int64)
    num = pd.to_numeric(s, errors="coerce")
    if not num.isna().any():
        return _unix_seconds(num)
    try:
        t = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")
    except (ValueError, TypeError):
        return None
    if t.isna().any():
        return None
    return _unix_seconds(t)


def _labels01(s: pd.Series) -> np.ndarray | None:
    if s.dtype.kind == "b":
        return s.to_numpy(dtype=np.int8)
    if s.dtype.kind not in "iuf":
        low = s.astype(str).str.strip().str.lower()
        low = low.replace({"true": "1", "false": "0"})
        s = pd.to_numeric(low, errors="coerce")
    a = s.to_numpy(dtype=np.float64)
    if not np.all((a == 0) | (a == 1)):
        return None
    return a.astype(np.int8)


def load_generic(path: Path, fmt: str, columns: Any) -> RawData:
    """A generic interaction table (CSV with a header, or parquet) and a column mapping."""
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
        try:
            import pyarrow.dataset as pads
        except ImportError:  # pragma: no cover
            raise InputError("reading parquet needs pyarrow: pip install 'srp4ctr[parquet]'") from None
        try:
            header = list(pads.dataset(str(path), format="parquet").schema.names)
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"cannot read parquet: {e}", path=display) from None
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

    def fail(cause: str, column: str, bad_row: int | None) -> None:
        if fmt == "csv":
            raise_named(path, display, header=header, columns=kinds, cause=cause)
        where = f" (row {bad_row + 1})" if bad_row is not None else ""
        raise DataError(f"column {column!r}: {cause}{where}", path=display)

    if fmt == "csv":
        df = read_named(path, display, columns=kinds)
    else:
        try:
            df = pd.read_parquet(path, columns=list(dict.fromkeys(mapping.values())))
        except Exception as e:
            raise DataError(f"cannot read parquet: {e}", path=display) from None
        for k, c in mapping.items():
            if kinds[c] != "any" and df[c].isna().any():
                fail("missing value", c, int(np.flatnonzero(df[c].isna().to_numpy())[0]))
    if len(df) == 0:
        raise DataError("no interactions (empty table)", path=display)

    try:
        ts = _unix_seconds(df[mapping["timestamp"]])
    except _OutOfRange as e:
        fail("timestamp out of range (|t| > 2**53 seconds)", mapping["timestamp"], e.row)
    if ts is None:
        col = df[mapping["timestamp"]]
        num = pd.to_numeric(col, errors="coerce")
        fail("timestamp is neither a number nor an ISO date-time", mapping["timestamp"],
             int(np.flatnonzero(num.isna().to_numpy())[0]) if num.isna().any() else None)
    for key in ("user", "item"):
        col = df[mapping[key]]
        if col.dtype.kind == "u" and len(col) and col.max() > np.iinfo(np.int64).max:
            fail(f"{key} ids beyond the int64 range", mapping[key],
                 int(np.flatnonzero(col.to_numpy() > np.iinfo(np.int64).max)[0]))
    user = _ids(df[mapping["user"]])
    item = _ids(df[mapping["item"]])
    if item.dtype.kind in "iu" and item.size and item.min() < 0:
        fail("item ids must be non-negative integers or strings", mapping["item"],
             int(np.flatnonzero(item < 0)[0]))
    d: dict[str, Any] = {}
    rating = None
    if "rating" in mapping:
        rs = pd.to_numeric(df[mapping["rating"]], errors="coerce")
        if rs.isna().any():
            fail("rating is not a number", mapping["rating"], int(np.flatnonzero(rs.isna().to_numpy())[0]))
        rating = rs.to_numpy(dtype=np.float64)
    behaviour = None
    if "behavior" in mapping:
        bs = df[mapping["behavior"]]
        if bs.dtype.kind in "iu":
            behaviour = bs.to_numpy(dtype=np.int64)
            vocab: list[Any] = [int(v) for v in np.unique(behaviour)]
        else:
            behaviour = bs.astype(str).str.strip().to_numpy(dtype=str)
            vocab = [str(v) for v in np.unique(behaviour)]
        d.update(kind="behavior", values=behaviour, value_vocab=vocab)
    elif rating is not None:
        d.update(kind="rating", values=rating, value_vocab=[float(v) for v in np.unique(rating)])
    if "label" in mapping:
        lab = _labels01(df[mapping["label"]])
        if lab is None:
            fail("label must be 0 or 1", mapping["label"], None)
        d.update(label=lab, label_rule=f"label column {mapping['label']!r}")
    elif rating is not None:
        d.update(label=(rating >= 4).astype(np.int8), label_rule="rating >= 4")
    elif behaviour is not None and set(d["value_vocab"]) <= set(F.TAOBAO_BEHAVIOURS):
        d.update(label=np.isin(behaviour, POSITIVE_BEHAVIOURS).astype(np.int8),
                 label_rule="behavior in {cart, fav, buy}")
    else:
        d.update(label=np.ones(len(df), dtype=np.int8),
                 label_rule="implicit feedback: every interaction is a positive")
    side = {k: df[c].to_numpy() for k, c in mapping.items() if k not in STANDARD_KEYS}
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
