"""The prepared dataset: flat, user-grouped, time-ordered interaction arrays plus side tables.

See the package docstring of :mod:`srp4ctr.data` for the data contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from srp4ctr._files import sha256_file
from srp4ctr.data import features as F
from srp4ctr.errors import DataError, InputError

#: bump when the on-disk layout or any token rule changes; older caches are rebuilt
FORMAT_VERSION = 1

SPLIT_NAMES = ("train", "valid", "test")
SPLIT_RULE = (
    "per user, time order: positions p < floor(0.8 n) train, p < floor(0.9 n) valid, else test"
)

#: the storage: one ``<key>.npy`` per array in this folder, memory-mapped on load
ARRAYS_DIR = "arrays"
#: the storage before memory-mapping (one npz, read whole): still read, never written
ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"
#: the dtype each per-row array is stored and held in (behaviour tokens: the smallest unsigned
#: integer type that holds them); the fingerprint hashes every array in its canonical dtype
ROW_DTYPES = {"user": np.int32, "item": np.int32, "timestamp": np.int64, "label": np.int8,
              "split": np.int8, "user_offsets": np.int64}
_HASH_BLOCK = 1 << 22  # elements per step when hashing
_COUNT_BLOCK = 1 << 23  # rows per step when counting

#: the serving tables of a dataset (no interactions): what a model bundle or an ONNX export
#: carries so that raw histories and candidate ids can be encoded without the training data
SERVING_FORMAT = "srp4ctr-serving-tables"
SERVING_VERSION = 1
SERVING_META_FILE = "serving.json"
SERVING_ARRAYS_FILE = "serving.npz"
_SERVING_PREFIXES = ("item_table__", "user_table__")


def _compact(a: np.ndarray) -> np.ndarray:
    """Smallest unsigned dtype for non-negative int arrays (storage only)."""
    if a.dtype.kind not in "iu" or a.size == 0:
        return a
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        return a
    for dt in (np.uint8, np.uint16, np.uint32):
        if hi <= np.iinfo(dt).max:
            return a.astype(dt)
    return a


def split_index(split: str | int) -> int:
    """"train"/"valid"/"test" (or 0/1/2; "validation" too) -> 0/1/2."""
    if isinstance(split, (int, np.integer)) and not isinstance(split, bool):
        if int(split) in (0, 1, 2):
            return int(split)
    elif isinstance(split, str):
        s = split.lower()
        if s == "validation":
            s = "valid"
        if s in SPLIT_NAMES:
            return SPLIT_NAMES.index(s)
    raise InputError(f"split must be one of {SPLIT_NAMES} (or 0, 1, 2), got {split!r}")


def _int_keys(flat: np.ndarray, what: str, negative: bool = False) -> np.ndarray:
    """Raw integer ids as int64 keys; :class:`InputError` for booleans, non-numbers, fractions,
    NaN, values outside int64 (which would wrap onto other ids) and, unless ``negative``,
    negatives."""
    kind = flat.dtype.kind
    if kind == "b" or kind not in "iuf":
        raise InputError(f"{what} ids must be integers, got dtype {flat.dtype}")
    if kind == "f":
        if not np.all(np.isfinite(flat)) or np.any(flat != np.floor(flat)):
            raise InputError(f"{what} ids must be integers (got non-integer values, e.g. "
                             f"{flat[~np.isfinite(flat) | (flat != np.floor(flat))][:3].tolist()})")
        if np.any(np.abs(flat) >= 2.0**63):
            raise InputError(f"{what} ids out of the int64 range")
    elif kind == "u" and np.any(flat > np.iinfo(np.int64).max):
        raise InputError(f"{what} ids out of the int64 range, e.g. "
                         f"{flat[flat > np.iinfo(np.int64).max][:3].tolist()}")
    if not negative and np.any(flat < 0):
        raise InputError(f"{what} ids must be non-negative, got {flat[flat < 0][:5].tolist()}")
    return flat.astype(np.int64)


class PreparedDataset:
    """A prepared dataset (see :mod:`srp4ctr.data` for the contract of every attribute).

    Built by :func:`srp4ctr.data.prepare`, loaded by :func:`srp4ctr.data.load_prepared`.
    ``path`` is its cache folder (None if never saved), ``from_cache`` tells whether this object
    was loaded from an existing cache rather than built.
    """

    def __init__(
        self,
        *,
        name: str,
        user: np.ndarray,
        item: np.ndarray,
        timestamp: np.ndarray,
        label: np.ndarray,
        split: np.ndarray,
        user_offsets: np.ndarray,
        behaviour: dict[str, np.ndarray],
        item_table: dict[str, np.ndarray],
        user_table: dict[str, np.ndarray],
        item_raw: np.ndarray,
        user_raw: np.ndarray,
        meta: dict[str, Any],
        max_len: int = 200,
    ):
        self.name = name
        self.user = np.ascontiguousarray(user, dtype=np.int32)
        self.item = np.ascontiguousarray(item, dtype=np.int32)
        self.timestamp = np.ascontiguousarray(timestamp, dtype=np.int64)
        self.label = np.ascontiguousarray(label, dtype=np.int8)
        self.split = np.ascontiguousarray(split, dtype=np.int8)
        self.user_offsets = np.ascontiguousarray(user_offsets, dtype=np.int64)
        # compact unsigned tokens stay as they are (a memory-mapped file is not copied)
        self.behaviour = {k: _tokens(v) for k, v in behaviour.items()}
        self.item_table = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in item_table.items()}
        self.user_table = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in user_table.items()}
        self.item_raw = item_raw
        self.user_raw = user_raw
        self.meta = meta
        self.n_users = int(meta["n_users"])
        self.n_items = int(meta["n_items"])
        self.item_fields: list[str] = list(meta["item_fields"])
        self.behaviour_fields: list[str] = list(meta["behaviour_fields"])
        self.multi_fields: list[str] = list(meta["multi_fields"])
        self.user_fields: list[str] = list(meta["user_fields"])
        self.vocab: dict[str, int] = {k: int(v) for k, v in meta["vocab"].items()}
        self.kind: str | None = meta.get("behaviour_kind")
        self.value_vocab: list[Any] | None = meta.get("behaviour_values")
        self.fingerprint: str = meta.get("fingerprint", "")
        self.max_len = int(max_len)
        self.path: Path | None = None
        self.from_cache = False

    # ----------------------------------------------------------------------------- basics
    @property
    def n_interactions(self) -> int:
        return int(self.item.shape[0])

    @property
    def cache_dir(self) -> Path | None:
        """The cache folder this dataset lives in (same as ``path``)."""
        return self.path

    @property
    def oov_item(self) -> int:
        """The out-of-vocabulary item id used at serving time (``n_items + 1``)."""
        return self.n_items + 1

    def __len__(self) -> int:
        return self.n_interactions

    def __repr__(self) -> str:
        return (
            f"PreparedDataset({self.name!r}, n_users={self.n_users}, n_items={self.n_items}, "
            f"n_interactions={self.n_interactions})"
        )

    def user_rows(self, u: int) -> slice:
        """Rows of internal user ``u`` (1-based) in the flat arrays."""
        if not 1 <= int(u) <= self.n_users:
            raise InputError(f"user id {u} out of range 1..{self.n_users}")
        return slice(int(self.user_offsets[u - 1]), int(self.user_offsets[u]))

    def seq_lengths(self) -> np.ndarray:
        """Interactions per user, int64[n_users] (user u at index u - 1)."""
        return np.diff(self.user_offsets)

    def split_ends(self) -> tuple[np.ndarray, np.ndarray]:
        """Per user (index u - 1): first row of the validation part and of the test part."""
        n = self.seq_lengths()
        tr, va = F.split_rule_positions(n)
        start = self.user_offsets[:-1]
        return start + tr, start + va

    def training_counts(self, sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
        """How often each value of each field of ``sizes`` (field -> vocabulary size: ``"item"``,
        an item-table field or a behaviour field) occurs in the training split, int64 [size];
        counted over blocks of rows, so a 100M-row dataset makes no 100M-row temporaries."""
        counts = {f: np.zeros(int(n), dtype=np.int64) for f, n in sizes.items()}
        for a in range(0, self.n_interactions, _COUNT_BLOCK):
            b = min(a + _COUNT_BLOCK, self.n_interactions)
            train = self.split[a:b] == 0
            items = self.item[a:b][train]
            for f, c in counts.items():
                if f == "item":
                    ids = items
                elif f in self.item_table:  # (a multi-valued field: each of its values)
                    ids = self.item_table[f][items].reshape(-1)
                elif f in self.behaviour:
                    ids = self.behaviour[f][a:b][train]
                else:
                    raise InputError(f"training_counts: no field {f!r} in {self.name}")
                c += np.bincount(ids, minlength=c.size)[: c.size]
        return counts

    def split_counts(self) -> dict[str, int]:
        c = np.bincount(self.split, minlength=3)
        return {name: int(c[i]) for i, name in enumerate(SPLIT_NAMES)}

    def summary(self) -> dict[str, Any]:
        """Statistics of the dataset as a JSON-able dict."""
        n = self.seq_lengths()
        splits = self.split_counts()
        pos = {}
        for i, name in enumerate(SPLIT_NAMES):
            m = self.split == i
            pos[name] = round(float(self.label[m].mean()), 6) if m.any() else None
        return {
            "dataset": self.name,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_interactions": self.n_interactions,
            "positive_rate": round(float(self.label.mean()), 6) if self.n_interactions else None,
            "seq_len": {
                "min": int(n.min()),
                "median": float(np.median(n)),
                "mean": round(float(n.mean()), 4),
                "max": int(n.max()),
            },
            "splits": splits,
            "split_positive_rate": pos,
            "item_fields": self.item_fields,
            "behaviour_fields": self.behaviour_fields,
            "multi_fields": self.multi_fields,
            "user_fields": self.user_fields,
            "vocab": dict(self.vocab),
            "label_rule": self.meta.get("label_rule"),
            "split_rule": self.meta.get("split_rule"),
            "fingerprint": self.fingerprint,
            "warnings": self.warnings(),
            "cache_path": str(self.path) if self.path is not None else None,
            "from_cache": bool(self.from_cache),
        }

    def warnings(self) -> list[str]:
        """What will stop or mislead training on this dataset (empty when nothing)."""
        out = []
        if self.n_interactions and self.label.min() == self.label.max():
            out.append(
                f"every label is {int(self.label[0])} (label rule: {self.meta.get('label_rule')})"
                ": click-only data; fine-tune CTR models with sampled negatives "
                "(--negatives uni100)")
        return out

    # ----------------------------------------------------------------------------- serving
    def behaviour_features(self, timestamps: Any, values: Any = None) -> dict[str, np.ndarray]:
        """:func:`srp4ctr.data.features.behaviour_features` with this dataset's value field.

        ``timestamps`` / ``values``: one user's interactions in time order; values are raw
        ratings (MovieLens) or behaviour types (``"pv"``...), as in the source data.
        """
        return F.behaviour_features(
            timestamps,
            values if self.kind is not None else None,
            kind=self.kind,
            vocab=self.value_vocab,
        )

    def _raw_is_int(self) -> bool:
        return self.item_raw.dtype.kind in "iu"

    def encode_items(self, raw_ids: Any, strict: bool = False) -> np.ndarray:
        """Raw item ids -> internal ids (int64, same shape).

        Unknown ids map to ``n_items + 1`` (the OOV id), or raise :class:`InputError` when
        ``strict``. Negative or non-integer ids always raise :class:`InputError` (for datasets
        whose raw item ids are strings, ids are compared as strings).
        """
        arr = np.asarray(raw_ids)
        shape = arr.shape
        flat = arr.reshape(-1)
        known = self.item_raw[1:]
        if self._raw_is_int():
            if flat.size == 0:
                return np.zeros(shape, dtype=np.int64)
            keys = _int_keys(flat, "item")
        else:
            if flat.dtype.kind in "iuf" and flat.size and not np.all(flat >= 0):
                raise InputError("item ids must be non-negative (and not NaN)")
            keys = flat.astype(str)
            if flat.size == 0:
                return np.zeros(shape, dtype=np.int64)
        idx = np.searchsorted(known, keys)
        idx_c = np.minimum(idx, max(len(known) - 1, 0))
        found = (idx < len(known)) & (known[idx_c] == keys)
        if strict and not found.all():
            raise InputError(f"unknown item id(s) {keys[~found][:5].tolist()}")
        out = np.where(found, idx_c + 1, self.oov_item).astype(np.int64)
        return out.reshape(shape)

    def encode_users(self, raw_ids: Any) -> np.ndarray:
        """Raw user ids -> internal ids 1..n_users, 0 for unknown users (int64)."""
        arr = np.asarray(raw_ids)
        flat = arr.reshape(-1)
        known = self.user_raw[1:]
        if flat.size == 0:
            return np.zeros(arr.shape, dtype=np.int64)
        if self.user_raw.dtype.kind in "iu":
            keys = _int_keys(flat, "user", negative=True)  # raw user ids may be negative
        else:
            keys = flat.astype(str)
        idx = np.searchsorted(known, keys)
        idx_c = np.minimum(idx, max(len(known) - 1, 0))
        found = (idx < len(known)) & (known[idx_c] == keys)
        return np.where(found, idx_c + 1, 0).astype(np.int64).reshape(arr.shape)

    def item_features(self, item_ids: Any) -> dict[str, np.ndarray]:
        """Item fields of internal item ids: ``{"item": ids, <field>: item_table[field][ids]}``."""
        ids = np.asarray(item_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > self.n_items + 1):
            raise InputError(f"internal item ids must lie in 0..{self.n_items + 1}")
        out = {"item": ids}
        for f, t in self.item_table.items():
            out[f] = t[ids]
        return out

    def encode_user_history(
        self, history: Mapping[str, Any], max_len: int | None = None
    ) -> dict[str, np.ndarray]:
        """A raw user history -> the model's input arrays, exactly as in training.

        ``history`` holds equal-length sequences ``"item_id"`` and ``"timestamp"`` (unix
        seconds) and, if this dataset has a value field, ``"rating"`` or ``"behavior"``
        (``self.kind``); optionally ``"user_id"`` (a raw user id). Interactions are ordered by
        (timestamp, raw item id) (stable), behaviour fields computed over the whole history,
        and the last ``max_len`` (default ``self.max_len``) kept.

        Returns ``hist_item`` (unknown items -> ``n_items + 1``), ``hist_<f>`` for each
        behaviour field (int64 [n]), ``hist_len`` (int64 scalar array) and, with ``user_id``,
        ``user`` (0 if unknown) and ``user_<f>`` for each user field.
        """
        if not isinstance(history, Mapping):
            raise InputError("history must be a mapping with 'item_id' and 'timestamp'")
        for key in ("item_id", "timestamp"):
            if key not in history:
                raise InputError(f"history lacks {key!r}")
        max_len = self.max_len if max_len is None else int(max_len)
        if max_len < 1:
            raise InputError("max_len must be >= 1")
        items = np.asarray(history["item_id"]).reshape(-1)
        ts = F._as_int_timestamps(history["timestamp"])
        if items.shape[0] != ts.shape[0]:
            raise InputError(f"{items.shape[0]} item ids but {ts.shape[0]} timestamps")
        values = None
        if self.kind is not None:
            key = self.kind
            alt = {"behavior": "behaviour", "behaviour": "behavior"}.get(key)
            if key in history:
                values = history[key]
            elif alt is not None and alt in history:
                values = history[alt]
            else:
                raise InputError(f"history lacks {self.kind!r} (this dataset's behaviour value)")
            values = np.asarray(values).reshape(-1)
            if values.shape[0] != ts.shape[0]:
                raise InputError(f"{ts.shape[0]} timestamps but {values.shape[0]} {key} values")
        ids = self.encode_items(items, strict=False)
        if self._raw_is_int():
            rawkey = items.astype(np.int64) if items.size else np.zeros(0, np.int64)
        else:
            rawkey = np.unique(items.astype(str), return_inverse=True)[1].reshape(-1)
        order = np.lexsort((rawkey, ts))
        ts = ts[order]
        ids = ids[order]
        if values is not None:
            values = values[order]
        beh = self.behaviour_features(ts, values)
        keep = slice(max(0, ts.shape[0] - max_len), ts.shape[0])
        out: dict[str, np.ndarray] = {"hist_item": ids[keep]}
        for f in self.behaviour_fields:
            out[f"hist_{f}"] = beh[f][keep]
        out["hist_len"] = np.asarray(out["hist_item"].shape[0], dtype=np.int64)
        if "user_id" in history:
            u = int(self.encode_users(np.asarray([history["user_id"]]))[0])
            out["user"] = np.asarray(u, dtype=np.int64)
            for f, t in self.user_table.items():
                out[f"user_{f}"] = np.asarray(t[u], dtype=np.int64)
        return out

    def serving_view(self, max_len: int | None = None) -> PreparedDataset:
        """A copy that keeps only what serving needs (id maps, vocabularies, item and user
        tables, behaviour-value rules), not the interaction arrays; same fingerprint."""
        empty32, empty64 = np.zeros(0, np.int32), np.zeros(0, np.int64)
        view = PreparedDataset(
            name=self.name, user=empty32, item=empty32, timestamp=empty64,
            label=np.zeros(0, np.int8), split=np.zeros(0, np.int8),
            user_offsets=np.zeros(1, np.int64),
            behaviour={f: empty64 for f in self.behaviour},
            item_table=self.item_table, user_table=self.user_table,
            item_raw=self.item_raw, user_raw=self.user_raw, meta=self.meta,
            max_len=self.max_len if max_len is None else max_len,
        )
        view.fingerprint = self.fingerprint
        view.path = self.path
        return view

    # ----------------------------------------------------------------------------- storage
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array under its storage key, as held (the fingerprint hashes each in its
        canonical dtype: int64 for behaviour tokens and tables)."""
        out: dict[str, np.ndarray] = {
            "user": self.user,
            "item": self.item,
            "timestamp": self.timestamp,
            "label": self.label,
            "split": self.split,
            "user_offsets": self.user_offsets,
            "item_raw": self.item_raw,
            "user_raw": self.user_raw,
        }
        for f in sorted(self.behaviour):
            out[f"behaviour__{f}"] = self.behaviour[f]
        for f in sorted(self.item_table):
            out[f"item_table__{f}"] = self.item_table[f]
        for f in sorted(self.user_table):
            out[f"user_table__{f}"] = self.user_table[f]
        return out

    def compute_fingerprint(self) -> str:
        """sha256 of every array (key, canonical dtype, shape, bytes) and the preparation
        config. Arrays are hashed block by block, so a memory-mapped dataset is not copied."""
        h = hashlib.sha256()
        for k, a in self.arrays().items():
            canon = _canonical_dtype(k, a)
            h.update(f"{k}|{canon.str}|{a.shape}|".encode())
            flat = a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
            for s in range(0, flat.size, _HASH_BLOCK):
                block = np.ascontiguousarray(flat[s : s + _HASH_BLOCK], dtype=canon)
                h.update(memoryview(block).cast("B"))
        h.update(json.dumps(self.meta.get("config", {}), sort_keys=True).encode())
        return h.hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``arrays/<key>.npy`` (one file per array, memory-mappable: per-row arrays in
        :data:`ROW_DTYPES`, behaviour tokens and tables in their smallest unsigned dtype) and
        ``meta.json`` into ``directory`` (which must exist)."""
        d = Path(directory)
        folder = d / ARRAYS_DIR
        folder.mkdir(exist_ok=True)
        arrays = self.arrays()
        for k, a in arrays.items():
            if k not in ROW_DTYPES and a.dtype.kind != "u":
                a = _compact(a)
            # each file written beside, then renamed over the old one: saving a dataset into
            # the folder it is memory-mapped from leaves the mapped files intact
            tmp = folder / f"{k}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(a), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / f"{k}.npy")
        for p in folder.glob("*.npy"):  # an earlier save's arrays that this one lacks
            if p.stem not in arrays:
                p.unlink()
        meta = dict(self.meta)
        meta["fingerprint"] = self.fingerprint
        meta["storage"] = ARRAYS_DIR
        meta["arrays"] = sorted(arrays)
        with open(d / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())


def _tokens(v: np.ndarray) -> np.ndarray:
    """Behaviour tokens: unsigned integer arrays as they are, anything else as int64."""
    v = np.asarray(v)
    if v.dtype.kind == "u":
        return np.ascontiguousarray(v)
    return np.ascontiguousarray(v, dtype=np.int64)


def _canonical_dtype(key: str, a: np.ndarray) -> np.dtype:
    """The dtype ``key`` is hashed in: :data:`ROW_DTYPES`, int64 for tokens and tables, the
    array's own for raw ids."""
    if key in ROW_DTYPES:
        return np.dtype(ROW_DTYPES[key])
    if key.startswith(("behaviour__", "item_table__", "user_table__")):
        return np.dtype(np.int64)
    return a.dtype


def _read_npy_dir(folder: Path, mmap: bool, keys: list[str] | None = None
                  ) -> dict[str, np.ndarray]:
    """The ``<key>.npy`` of ``folder`` for each of ``keys`` (the list ``meta.json`` records;
    None, in folders written before it did: every file), no pickles, memory-mapped read-only
    with ``mmap``; :class:`DataError` naming the file if one is missing or unreadable."""
    out: dict[str, np.ndarray] = {}
    paths = sorted(folder.glob("*.npy")) if keys is None else [folder / f"{k}.npy" for k in keys]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{ARRAYS_DIR}/{p.name} missing", path=str(p))
        try:
            out[p.stem] = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"unreadable {ARRAYS_DIR}/{p.name}: {e}", path=str(p)) from None
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file (no pickles); :class:`DataError` naming it if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"unreadable {path.name}: {e}", path=str(path)) from None


def _prefixed(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays whose storage key starts with ``prefix``, under the rest of the key."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def save_serving_tables(ds: PreparedDataset, directory: str | os.PathLike) -> list[str]:
    """Write ``ds``'s serving tables into ``directory`` (which must exist): ``serving.npz`` (raw
    item and user ids, item and user feature tables) and ``serving.json`` (the dataset's meta:
    vocabularies, fields, behaviour-value rules, fingerprint; and the npz's sha256). Returns
    the names of the files written. Read back with :func:`load_serving_tables`."""
    d = Path(directory)
    arrays: dict[str, np.ndarray] = {"item_raw": np.asarray(ds.item_raw),
                                     "user_raw": np.asarray(ds.user_raw)}
    for f in sorted(ds.item_table):
        arrays[f"item_table__{f}"] = _compact(ds.item_table[f])
    for f in sorted(ds.user_table):
        arrays[f"user_table__{f}"] = _compact(ds.user_table[f])
    for k, a in arrays.items():
        if a.dtype.kind == "O":
            arrays[k] = a.astype(str)
    npz = d / SERVING_ARRAYS_FILE
    with open(npz, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    doc = {"format": SERVING_FORMAT, "format_version": SERVING_VERSION, "name": ds.name,
           "fingerprint": ds.fingerprint, "max_len": int(ds.max_len),
           "arrays": {"file": SERVING_ARRAYS_FILE, "sha256": sha256_file(npz),
                      "bytes": npz.stat().st_size},
           "meta": {**ds.meta, "fingerprint": ds.fingerprint}}
    with open(d / SERVING_META_FILE, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return [SERVING_META_FILE, SERVING_ARRAYS_FILE]


def load_serving_tables(directory: str | os.PathLike,
                        max_len: int | None = None) -> PreparedDataset:
    """The serving view (:meth:`PreparedDataset.serving_view`) stored in ``directory`` by
    :func:`save_serving_tables`: it encodes histories and item ids exactly as the full dataset
    does, and has its fingerprint, but holds no interactions.

    Raises :class:`DataError` naming the file: missing, unreadable, of another format or
    version, or an npz whose sha256 is not the one recorded (truncated or replaced).
    """
    d = Path(directory)
    mpath, apath = d / SERVING_META_FILE, d / SERVING_ARRAYS_FILE
    for p in (mpath, apath):
        if not p.is_file():
            raise DataError("missing (not a folder with serving tables)", path=str(p))
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable: {e}", path=str(mpath)) from None
    if not isinstance(doc, dict) or doc.get("format") != SERVING_FORMAT:
        raise DataError(f"not a {SERVING_FORMAT} file", path=str(mpath))
    if doc.get("format_version") != SERVING_VERSION:
        raise DataError(f"format version {doc.get('format_version')!r}, this srp4ctr reads "
                        f"{SERVING_VERSION}", path=str(mpath))
    want = (doc.get("arrays") or {}).get("sha256") if isinstance(doc.get("arrays"), dict) else None
    if sha256_file(apath) != want:
        raise DataError(f"sha256 does not match {SERVING_META_FILE} (truncated or replaced)",
                        path=str(apath))
    arr = _read_npz(apath)

    def pick(prefix: str) -> dict[str, np.ndarray]:
        return _prefixed(arr, prefix)

    meta = doc.get("meta")
    try:
        if not isinstance(meta, dict):
            raise KeyError("meta")
        empty32, empty64 = np.zeros(0, np.int32), np.zeros(0, np.int64)
        ds = PreparedDataset(
            name=str(doc["name"]), user=empty32, item=empty32, timestamp=empty64,
            label=np.zeros(0, np.int8), split=np.zeros(0, np.int8),
            user_offsets=np.zeros(1, np.int64),
            behaviour={f: empty64 for f in meta["behaviour_fields"]},
            item_table=pick("item_table__"), user_table=pick("user_table__"),
            item_raw=arr["item_raw"], user_raw=arr["user_raw"], meta=meta,
            max_len=int(doc["max_len"]) if max_len is None else max_len,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"serving tables lack or garble {e}", path=str(d)) from None
    if ds.item_raw.shape[0] != ds.n_items + 1 or ds.user_raw.shape[0] != ds.n_users + 1:
        raise DataError("id maps do not match the item and user counts", path=str(apath))
    ds.fingerprint = str(doc["fingerprint"])
    ds.path = d
    return ds


def load_prepared(
    directory: str | os.PathLike, *, verify: bool = True, max_len: int | None = None,
    mmap: bool = True,
) -> PreparedDataset:
    """Load a prepared dataset folder (``arrays/*.npy`` + ``meta.json``).

    With ``mmap`` (the default) the per-row arrays are memory-mapped read-only: processes that
    load the same folder (DDP ranks, data-loader workers) share its pages instead of each
    holding a copy, and only the pages a process reads are resident. A folder written before
    memory-mapping (``arrays.npz``) is still read, whole. Raises :class:`DataError` if the
    folder is missing, truncated, from another format version, or (with ``verify``) its arrays
    do not match the stored fingerprint.
    """
    d = Path(directory)
    mpath = d / META_FILE
    npy_dir, npz = d / ARRAYS_DIR, d / ARRAYS_FILE
    if not mpath.is_file() or not (npy_dir.is_dir() or npz.is_file()):
        raise DataError(f"not a prepared dataset ({ARRAYS_DIR}/ or {ARRAYS_FILE}, and "
                        f"{META_FILE}, missing)", path=str(d))
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable meta.json: {e}", path=str(mpath)) from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"prepared with format version {meta.get('format_version') if isinstance(meta, dict) else '?'}"
            f", this srp4ctr reads {FORMAT_VERSION}; prepare it again",
            path=str(d),
        )
    if meta.get("storage") == ARRAYS_DIR:
        if not npy_dir.is_dir():
            raise DataError(f"{ARRAYS_DIR}/ missing", path=str(d))
        keys = meta.get("arrays")
        if keys is not None and not (isinstance(keys, list)
                                     and all(isinstance(k, str) and k.isidentifier()
                                             for k in keys)):
            raise DataError("meta.json: 'arrays' is not a list of array names", path=str(mpath))
        arr = _read_npy_dir(npy_dir, mmap, keys)
    else:
        arr = _read_npz(npz)

    def pick(prefix: str) -> dict[str, np.ndarray]:
        return _prefixed(arr, prefix)

    try:
        ds = PreparedDataset(
            name=meta["name"],
            user=arr["user"],
            item=arr["item"],
            timestamp=arr["timestamp"],
            label=arr["label"],
            split=arr["split"],
            user_offsets=arr["user_offsets"],
            behaviour=pick("behaviour__"),
            item_table=pick("item_table__"),
            user_table=pick("user_table__"),
            item_raw=np.asarray(arr["item_raw"]),
            user_raw=np.asarray(arr["user_raw"]),
            meta=meta,
            max_len=meta.get("max_len", 200) if max_len is None else max_len,
        )
    except KeyError as e:
        raise DataError(f"prepared dataset lacks {e}", path=str(d)) from None
    except (ValueError, TypeError) as e:  # a garbled .npy np.load let through, or meta value
        raise DataError(f"prepared dataset garbled: {e}", path=str(d)) from None
    if verify and ds.compute_fingerprint() != meta.get("fingerprint"):
        raise DataError("arrays do not match the stored fingerprint (corrupted cache)", path=str(d))
    ds.path = d
    return ds
