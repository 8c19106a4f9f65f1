"""``prepare``: raw data -> a cached :class:`PreparedDataset` (built once, then reused)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from srp4ctr.data import download as D
from srp4ctr.data import features as F
from srp4ctr.data.dataset import (
    FORMAT_VERSION,
    SPLIT_RULE,
    PreparedDataset,
    load_prepared,
)
from srp4ctr.data.loaders import (
    KNOWN_DATASETS,
    PATH_DATASETS,
    RawData,
    Side,
    file_signature,
    load_ml100k_members,
    load_path_dataset,
    parse_columns,
)
from srp4ctr.errors import DataError, InputError, UnknownDatasetError

log = logging.getLogger(__name__)

ENV_DATA_DIR = "SRP4CTR_DATA_DIR"
_STALE_TMP_S = 6 * 3600


def default_data_dir() -> Path:
    """``$SRP4CTR_DATA_DIR``, else the platform's user cache folder for srp4ctr."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("srp4ctr"))


def _log(progress: bool, msg: str) -> None:
    if progress:
        log.info(msg)


# ----------------------------------------------------------------------------- building
def _align(side: Side, uniq_raw: np.ndarray, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Side fields for raw ids ``uniq_raw`` (internal ids 1..n), as tables with n + 2 rows
    (item) or n + 1 rows (user; caller trims)."""
    keys = side.raw_ids
    idx = np.searchsorted(keys, uniq_raw)
    idx_c = np.minimum(idx, max(keys.size - 1, 0))
    found = (idx < keys.size) & (keys[idx_c] == uniq_raw) if keys.size else np.zeros(n, bool)
    out = {}
    for f, vals in side.fields.items():
        tbl = np.zeros((n + 2, *vals.shape[1:]), dtype=np.int64)
        body = np.full((n, *vals.shape[1:]), 0, dtype=np.int64)
        if f not in side.multi:
            body[:] = side.missing.get(f, 0)
        if keys.size:
            body[found] = vals[idx_c[found]]
        tbl[1 : n + 1] = body
        if f in side.multi:  # keep only as many columns as the included items need
            width = int((tbl != 0).sum(axis=1).max()) if tbl.size else 0
            tbl = tbl[:, : max(width, 1)].copy()
        out[f] = tbl
    return out, found


def _row_field_table(
    values: np.ndarray, item_inv: np.ndarray, ts: np.ndarray, n_items: int
) -> tuple[np.ndarray, list[str]]:
    """Per-row side values -> per-item token (value at the item's earliest interaction)."""
    order = np.lexsort((ts, item_inv))
    it = item_inv[order]
    first = np.ones(it.size, dtype=bool)
    first[1:] = it[1:] != it[:-1]
    per_item = values[order[first]]  # one per item, items in internal order
    codes, uniques = pd.factorize(pd.Series(per_item), sort=True, use_na_sentinel=True)
    tbl = np.zeros(n_items + 2, dtype=np.int64)
    tbl[1 : n_items + 1] = codes.astype(np.int64) + 1  # NaN -> -1 -> 0
    return tbl, ["<pad>", *[str(u) for u in uniques.tolist()]]


def _factorize(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct ids, int32 index of each id among them): ``np.unique(ids,
    return_inverse=True)``, through a presence table instead of a sort when the ids are
    non-negative integers of a modest range (a 100M-row log: seconds and 1 byte per possible id
    instead of a 100M-element argsort)."""
    if ids.dtype.kind in "iu" and ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo >= 0 and hi < max(4 * ids.size, 1 << 24):
            present = np.zeros(hi + 1, dtype=bool)
            present[ids] = True
            uniq = np.flatnonzero(present).astype(ids.dtype)
            rank = np.cumsum(present, dtype=np.int32)
            rank -= 1
            return uniq, rank[ids]
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, inv.reshape(-1).astype(np.int32)


#: rows per step when computing behaviour tokens (whole users; bounds the int64 temporaries)
_TOKEN_BLOCK = 1 << 23


def _behaviour_tokens(ts: np.ndarray, values: np.ndarray | None, raw: RawData,
                      offsets: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`~srp4ctr.data.features.behaviour_features` of the user-grouped rows, computed
    block by block of whole users into arrays of the smallest unsigned dtype that holds each
    field's vocabulary (the same tokens as one call)."""
    n = ts.shape[0]
    cuts = offsets[np.searchsorted(offsets, np.arange(_TOKEN_BLOCK, n, _TOKEN_BLOCK))]
    cuts = np.unique(np.concatenate([[0], cuts, [n]]))
    sizes = {"gap": F.GAP_VOCAB, "hour": F.HOUR_VOCAB, "weekday": F.WEEKDAY_VOCAB}
    if raw.kind is not None:
        sizes[raw.kind] = len(raw.value_vocab) + 1
    out: dict[str, np.ndarray] = {}
    for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        lo, hi = np.searchsorted(offsets, [a, b])
        part = F.behaviour_features(
            ts[a:b], None if values is None else values[a:b], kind=raw.kind,
            vocab=raw.value_vocab, offsets=offsets[lo : hi + 1] - a, encoded=raw.values_encoded)
        for f, v in part.items():
            if f not in out:
                dt = next(t for t in (np.uint8, np.uint16, np.uint32)
                          if sizes[f] - 1 <= np.iinfo(t).max)
                out[f] = np.empty(n, dtype=dt)
            out[f][a:b] = v
    return out


def _json_value(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def build(
    raw: RawData,
    name: str,
    *,
    max_len: int = 200,
    source: dict | None = None,
    consume: bool = False,
) -> PreparedDataset:
    """Turn :class:`RawData` into a :class:`PreparedDataset` (writes nothing). With
    ``consume``, the raw arrays are released as soon as they are used (``raw`` is spent)."""
    n_rows = int(raw.user.shape[0])
    if n_rows == 0:
        raise DataError("no interactions (empty dataset)", path=raw.display or None)
    uniq_u, u_inv = _factorize(raw.user)
    uniq_i, i_inv = _factorize(raw.item)
    if consume:  # free the raw ids early (large datasets)
        raw.user = raw.item = None  # type: ignore[assignment]
    n_users, n_items = int(uniq_u.size), int(uniq_i.size)
    ts_raw = raw.timestamp.astype(np.int64, copy=False)
    # per-row item fields (a value per item at its earliest interaction) before the main sort,
    # so that the raw arrays can go as soon as they are sorted
    row_tables: dict[str, tuple[np.ndarray, list[str]]] = {}
    for f in list(raw.item_row_fields):
        row_tables[f] = _row_field_table(raw.item_row_fields[f], i_inv, ts_raw, n_items)
        if consume:
            raw.item_row_fields[f] = None  # type: ignore[assignment]
    # internal item ids follow raw-id order, so (user, timestamp, internal item) is the contract's
    # (user, timestamp, raw item id); lexsort is stable, so full ties keep file order
    order = np.lexsort((i_inv, ts_raw, u_inv))
    user = u_inv[order]
    user += 1
    del u_inv
    item = i_inv[order]
    item += 1
    del i_inv
    ts = ts_raw[order]
    del ts_raw
    label = raw.label[order].astype(np.int8)
    values = raw.values[order] if raw.values is not None else None
    if consume:
        raw.timestamp = raw.label = raw.values = None  # type: ignore[assignment]
    del order
    counts = np.bincount(user, minlength=n_users + 1)[1:].astype(np.int64)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # split by position within the user: runs of 0s, 1s, 2s per user (no per-row temporaries)
    tr_end, va_end = F.split_rule_positions(counts)
    runs = np.stack([tr_end, va_end - tr_end, counts - va_end], axis=1).reshape(-1)
    split = np.repeat(np.tile(np.array([0, 1, 2], dtype=np.int8), n_users), runs)
    del runs

    behaviour = _behaviour_tokens(ts, values, raw, offsets)
    del values

    item_table: dict[str, np.ndarray] = {}
    vocab: dict[str, int] = {"item": n_items + 2}
    field_values: dict[str, list[str]] = {}
    multi: list[str] = []
    if raw.item_side is not None:
        tables, _ = _align(raw.item_side, uniq_i, n_items)
        for f, t in tables.items():
            item_table[f] = t
            vocab[f] = int(raw.item_side.vocab[f])
            if f in raw.item_side.labels:
                field_values[f] = raw.item_side.labels[f]
        multi = [f for f in raw.item_side.multi if f in item_table]
    for f, (t, labels) in row_tables.items():
        item_table[f] = t
        vocab[f] = max(len(labels), 2)  # at least padding + one value, even if all missing
        field_values[f] = labels
    behaviour_fields = list(behaviour)
    if raw.kind is not None:
        vocab[raw.kind] = len(raw.value_vocab) + 1
    vocab.update(gap=F.GAP_VOCAB, hour=F.HOUR_VOCAB, weekday=F.WEEKDAY_VOCAB)
    user_table: dict[str, np.ndarray] = {}
    if raw.user_side is not None:
        tables, _ = _align(raw.user_side, uniq_u, n_users)
        for f, t in tables.items():
            user_table[f] = t[: n_users + 1]
            vocab[f] = int(raw.user_side.vocab[f])
            if f in raw.user_side.labels:
                field_values[f] = raw.user_side.labels[f]

    if uniq_i.dtype.kind in "iu":
        item_raw = np.concatenate([[-1], uniq_i.astype(np.int64)])
    else:
        item_raw = np.concatenate([np.array([""], dtype=uniq_i.dtype), uniq_i]).astype(str)
    if uniq_u.dtype.kind in "iu":
        user_raw = np.concatenate([[-1], uniq_u.astype(np.int64)])
    else:
        user_raw = np.concatenate([np.array([""], dtype=uniq_u.dtype), uniq_u]).astype(str)

    config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "label_rule": raw.label_rule,
        "split_rule": SPLIT_RULE,
        "gap_rule": F.GAP_RULE,
        "year_rule": F.YEAR_RULE if "year" in item_table else None,
        "behaviour_kind": raw.kind,
        "behaviour_values": [_json_value(v) for v in raw.value_vocab] if raw.value_vocab else None,
        "source": {k: v for k, v in (source or {}).items() if k in ("dataset", "columns", "wheel_sha256")},
    }
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": n_rows,
        "oov_item": n_items + 1,
        "item_fields": ["item", *item_table],
        "behaviour_fields": behaviour_fields,
        "multi_fields": multi,
        "user_fields": list(user_table),
        "vocab": vocab,
        "behaviour_kind": raw.kind,
        "behaviour_values": config["behaviour_values"],
        "label_rule": raw.label_rule,
        "split_rule": SPLIT_RULE,
        "split_counts": {},
        "gap_rule": F.GAP_RULE,
        "year_rule": config["year_rule"],
        "field_values": field_values,
        "raw_id_dtype": {"item": "int" if item_raw.dtype.kind in "iu" else "str",
                         "user": "int" if user_raw.dtype.kind in "iu" else "str"},
        "max_len": int(max_len),
        "source": source or {},
        "config": config,
        "created_unix": int(time.time()),
    }
    ds = PreparedDataset(
        name=name,
        user=user,
        item=item,
        timestamp=ts,
        label=label,
        split=split,
        user_offsets=offsets,
        behaviour=behaviour,
        item_table=item_table,
        user_table=user_table,
        item_raw=item_raw,
        user_raw=user_raw,
        meta=meta,
        max_len=max_len,
    )
    meta["split_counts"] = ds.split_counts()
    ds.fingerprint = ds.compute_fingerprint()
    meta["fingerprint"] = ds.fingerprint
    return ds


# ----------------------------------------------------------------------------- caching
def _cache_key(name: str, path: Path | None, columns: dict | None) -> str:
    if path is None:
        return name
    ident = json.dumps({"path": os.path.abspath(path), "columns": columns}, sort_keys=True)
    return f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` folder to ``final`` (replacing an older one)."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists():
            raise
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _clean_stale(data_dir: Path, key: str) -> None:
    now = time.time()
    for p in data_dir.glob(f".{key}.*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _sources_unchanged(meta: dict) -> bool:
    files = (meta.get("source") or {}).get("files") or []
    for f in files:
        try:
            st = os.stat(f["path"])
        except OSError:
            return False
        if st.st_size != f["size"] or st.st_mtime_ns != f["mtime_ns"]:
            return False
    return True


def prepare(
    dataset: str,
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    columns: Any = None,
    force: bool = False,
    progress: bool = True,
    max_len: int = 200,
) -> PreparedDataset:
    """Prepare ``dataset`` (see :mod:`srp4ctr.data`) into the cache and return it.

    ``dataset``: ``ml-100k`` (downloaded through pip; ``path`` may point at the recbole wheel),
    or one of ``ml-1m``, ``ml-10m``, ``ml-20m``, ``ml-25m``, ``taobao``, ``csv``, ``parquet``,
    which read ``path`` (a file or its folder). ``columns``: the column mapping of ``csv`` /
    ``parquet`` (dict, JSON, or ``"user=uid,item=iid,timestamp=ts,..."``).
    ``data_dir``: the cache (default ``$SRP4CTR_DATA_DIR``, else the user cache folder);
    the result lives in ``<data_dir>/<dataset>[-<hash of path and columns>]/``. A valid cache
    is reused unless ``force``; a build writes into a temporary folder renamed into place at
    the end, so a failure never leaves a half-written cache. ``max_len``: the default history
    length of the returned dataset (``encode_user_history``); it does not change the arrays.
    """
    if not isinstance(dataset, str):
        raise InputError(f"dataset must be a name, got {type(dataset).__name__}")
    name = dataset.strip().lower()
    if name not in KNOWN_DATASETS:
        raise UnknownDatasetError(
            f"unknown dataset {dataset!r}; known: {', '.join(KNOWN_DATASETS)}"
        )
    if int(max_len) < 1:
        raise InputError("max_len must be >= 1")
    mapping = None
    if name in ("csv", "parquet"):
        mapping = parse_columns(columns)
    elif columns is not None and str(columns).strip():
        raise InputError(f"columns= applies to the csv and parquet datasets only, not {name}")
    src_path: Path | None = None
    if path is not None:
        src_path = Path(path).expanduser()
        if not src_path.exists():
            raise DataError("path does not exist", path=str(src_path))
    elif name in PATH_DATASETS:
        raise InputError(f"dataset {name} is read from files you bring: give path= (--path)")

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder: {e}", path=str(root)) from None
    key = _cache_key(name, src_path if name != "ml-100k" else None, mapping)
    final = root / key

    if final.exists() and not force:
        try:
            ds = load_prepared(final, max_len=max_len)
        except DataError as e:
            _log(progress, f"cache at {final} unusable ({e}); rebuilding")
        else:
            if ds.name == name and _sources_unchanged(ds.meta):
                ds.from_cache = True
                return ds
            _log(progress, f"source files changed since {final} was built; rebuilding")

    _clean_stale(root, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is not
        t0 = time.perf_counter()
        if name == "ml-100k":
            if src_path is not None and src_path.is_dir():
                src_path = src_path / D.WHEEL_NAME
            wheel_cached = (root / "downloads" / D.WHEEL_NAME).is_file()
            if src_path is None and not wheel_cached and not os.environ.get(D.ENV_WHEEL):
                _log(progress, f"downloading {D.WHEEL_REQUIREMENT} (MovieLens-100k) with pip")
            wheel = D.fetch_wheel(root / "downloads", local=src_path)
            raw = load_ml100k_members(D.read_members(wheel), wheel.name)
            source = {"dataset": name, "wheel": wheel.name, "wheel_sha256": D.WHEEL_SHA256}
        else:
            _log(progress, f"reading {name} from {src_path}")
            raw = load_path_dataset(name, src_path, mapping, progress)
            source = {
                "dataset": name,
                "path": os.path.abspath(src_path),
                "columns": mapping,
                "files": file_signature(raw.files),
            }
        ds = build(raw, name, max_len=max_len, source=source, consume=True)
        del raw
        ds.save(tmp)
        _publish(tmp, final)
        _log(progress, f"prepared {name} in {time.perf_counter() - t0:.1f}s -> {final}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # hand back the memory-mapped copy: the built arrays are freed, what this process reads
    # next shares its pages with every other process that loads the folder
    fingerprint = ds.fingerprint
    del ds
    ds = load_prepared(final, verify=False, max_len=max_len)
    if ds.fingerprint != fingerprint:  # pragma: no cover - written just above
        raise DataError("the prepared folder changed while it was published", path=str(final))
    ds.from_cache = False
    return ds
