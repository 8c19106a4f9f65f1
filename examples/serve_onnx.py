"""Serve an exported SRP4CTR model with ONNX Runtime and numpy only.

Neither torch nor srp4ctr is imported (directly or indirectly): this file is all a serving
process needs besides ``numpy`` and ``onnxruntime``, and the folder written by
``srp4ctr export-onnx`` (or ``srp4ctr.engine.onnx_export.export_onnx``).

Command line::

    python examples/serve_onnx.py --model-dir runs/srp4ctr-onnx \\
        --history history.json --candidates 1193,661,914 [--top 2] [--threads 2] [--oov]

``history.json`` is one user's raw interactions, as the engine takes them::

    {"item_id": [1193, 661], "timestamp": [978300760, 978302109], "rating": [5, 3],
     "user_id": 1}

(``rating`` for MovieLens; ``behavior`` — ``"pv"``, ``"cart"``... — for Taobao-style data;
``user_id`` optional.) It prints one JSON object with the probabilities in candidate order.

As a library::

    from serve_onnx import OnnxServer

    server = OnnxServer("runs/srp4ctr-onnx", threads=2)
    cache = server.encode_user(history)          # user_encoder.onnx, once per request
    probs = server.score(cache, [1193, 661, 914])  # scorer.onnx: float32 [3]

What happens before ONNX Runtime is called (the rules are in the folder's ``manifest.json``):

- Raw histories become the encoder's inputs exactly as the data pipeline builds them
  (``PreparedDataset.encode_user_history``): interactions sorted by (timestamp, raw item id),
  stable; raw item ids mapped through ``items.npz`` (unknown ones become the out-of-vocabulary
  item, as in the engine); the behaviour fields re-implemented below in a few lines of numpy
  from the rules of ``srp4ctr/data/features.py`` (behaviour value -> token, time-gap bucket, UTC
  hour, weekday; the constants come from the manifest); the last ``max_len`` interactions kept;
  the user's features looked up in ``users.npz``. ``tests/test_onnx.py`` checks these
  arrays equal the pipeline's on many histories.
- An empty history is run through the encoder as one padding position with ``hist_len = 0``
  (the batch the engine builds for it); its cache has no K/V rows, and the scorer, which takes
  n >= 1 rows, is given one all-zero K/V row: softmax over one key is exactly 1 and the value is
  0, so the attention output is exactly the zero the engine uses for an empty history.
- Every input is checked against the manifest and refused with :class:`ServingInputError`
  (a ``ValueError``) naming the problem: wrong dtype (no silent casts), wrong rank or shape,
  ``k``/``v`` shapes that differ or do not fit the model, a cache of another model, NaN/inf,
  ids out of range, negative or non-integer raw ids, unknown raw candidate ids (unless
  ``strict=False``: then they are scored as the OOV item, like ``Engine.score``).
- An empty candidate list returns an empty array without calling the scorer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FORMAT = "srp4ctr-onnx"
MANIFEST_VERSION = 1
_DTYPES = {"float32": np.float32, "int64": np.int64}

__all__ = ["OnnxServer", "ServingInputError", "UnknownItemError", "UserCache", "main"]


class ServingInputError(ValueError):
    """Input that does not fit the exported model (raised before ONNX Runtime is called)."""


class UnknownItemError(ServingInputError):
    """A raw candidate id the dataset does not know (with ``strict=True``)."""


@dataclass
class UserCache:
    """One user's encoder outputs, in :class:`srp4ctr.engine.UserCache`'s layout.

    ``k``, ``v``: ``[NL, n, H, Dh]`` float32 (n may be 0: an empty history); ``head_user``:
    ``[h1]``; ``qtokens``: ``[M, d]`` or None; ``pooled``: ``[d]`` or None; ``fingerprint``: the
    model that built it.
    """

    k: np.ndarray | None
    v: np.ndarray | None
    head_user: np.ndarray
    qtokens: np.ndarray | None
    pooled: np.ndarray | None
    fingerprint: str

    @property
    def length(self) -> int:
        return 0 if self.k is None else int(self.k.shape[1])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# raw values -> tokens (numpy re-implementation of srp4ctr/data/features.py, tested equal)


def _as_int_timestamps(ts: Any) -> np.ndarray:
    """Unix seconds as int64 (floats floored; numeric strings parsed)."""
    a = np.asarray(ts).reshape(-1)
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a.dtype.kind == "b":
        raise ServingInputError("timestamps must be integers (unix seconds), got bool")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise ServingInputError("timestamps contain NaN or inf")
        return np.floor(a).astype(np.int64)
    try:
        return _as_int_timestamps(a.astype(np.float64))
    except (TypeError, ValueError):
        raise ServingInputError(f"timestamps must be numbers (unix seconds), got {a.dtype}") \
            from None


def _value_tokens(values: np.ndarray, vocab: list) -> np.ndarray:
    """Raw behaviour values -> tokens 1..len(vocab) (token = index + 1)."""
    if values.size == 0:
        return np.zeros(0, np.int64)
    if isinstance(vocab[0], str):
        table = {v: i + 1 for i, v in enumerate(vocab)}
        tok = np.array([table.get(str(x), 0) for x in values.tolist()], dtype=np.int64)
        if (tok == 0).any():
            bad = sorted({str(x) for x, t in zip(values.tolist(), tok) if t == 0})[:5]
            raise ServingInputError(f"unknown behaviour value(s) {bad}; known: {vocab}")
        return tok
    try:
        v = values.astype(np.float64)
    except (TypeError, ValueError):
        raise ServingInputError(f"behaviour values must be numbers, got {values.dtype}") from None
    if not np.all(np.isfinite(v)):
        raise ServingInputError("behaviour values contain NaN or inf")
    voc = np.asarray(vocab, dtype=np.float64)
    idx = np.minimum(np.searchsorted(voc, v), len(voc) - 1)
    bad = voc[idx] != v
    if bad.any():
        raise ServingInputError(f"unknown value(s) {np.unique(v[bad])[:5].tolist()}; "
                                f"known: {vocab}")
    return idx.astype(np.int64) + 1


def _time_tokens(ts: np.ndarray, gap: Mapping[str, int]) -> dict[str, np.ndarray]:
    """gap / hour / weekday tokens of one user's time-ordered unix seconds."""
    n = ts.shape[0]
    out = np.full(n, gap["zero"], dtype=np.int64)
    if n:
        d = np.diff(ts, prepend=ts[0])
        if np.any(d < 0):
            raise ServingInputError("timestamps must be non-decreasing")
        pos = d > 0
        _, e = np.frexp(d[pos].astype(np.float64))  # d = m * 2**e, m in [0.5, 1): floor(log2 d)
        out[pos] = gap["log_base"] + np.minimum(e.astype(np.int64) - 1, gap["max_log2"])
        out[0] = gap["first"]
    return {"gap": out,
            "hour": (ts // 3600) % 24 + 1,              # UTC hour + 1
            "weekday": (ts // 86400 + 3) % 7 + 1}       # 1970-01-01 was a Thursday; Monday = 1


def _check_1d(name: str, value: Any) -> np.ndarray:
    if isinstance(value, (str, bytes)):
        raise ServingInputError(f"history[{name!r}] must be a sequence, got a string")
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ServingInputError(f"history[{name!r}] is not a flat sequence ({e})") from None
    if a.ndim != 1:
        raise ServingInputError(f"history[{name!r}] must be one-dimensional, got shape {a.shape}")
    if a.dtype == object:
        raise ServingInputError(f"history[{name!r}] mixes types or holds None")
    return a


# ------------------------------------------------------------------------------------------
# the server


class OnnxServer:
    """Both graphs of one export folder in ONNX Runtime, with the folder's id maps and rules.

    Args:
        model_dir: the folder written by the export (``manifest.json`` and the files it names).
        threads: ONNX Runtime intra-op threads (None: its default).
        providers: ONNX Runtime execution providers (default ``["CPUExecutionProvider"]``).
        verify_files: check every file's sha256 against the manifest when loading.
    """

    def __init__(self, model_dir: str | os.PathLike, *, threads: int | None = None,
                 providers: list[str] | None = None, verify_files: bool = True):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        m = self._read_manifest(self.model_dir)
        self.manifest = m
        self.fingerprint: str = m["model_fingerprint"]
        dims = m["dims"]
        self.NL, self.H, self.Dh, self.h1 = dims["NL"], dims["H"], dims["Dh"], dims["h1"]
        self.max_len: int = m["history"]["max_len"]
        items = m["items"]
        self.n_items, self.oov_item = int(items["n_items"]), int(items["oov_item"])
        self.string_ids = items["raw_id_kind"] == "str"
        graphs = m["graphs"]
        if verify_files:
            self._verify_files(m)
        with np.load(self.model_dir / items["file"], allow_pickle=False) as z:
            self._item_known = z["item_raw"][1:]  # sorted; internal id = index + 1
        self.users = m.get("users")
        if self.users:
            with np.load(self.model_dir / self.users["file"], allow_pickle=False) as z:
                self._user_known = z["user_raw"][1:]
                self._user_table = {f: z[f"user_table__{f}"] for f in self.users["fields"]}
        hist = m["history"]
        self.kind: str | None = hist["behaviour_kind"]
        self.value_vocab: list | None = hist["behaviour_values"]
        self.gap_rule: dict = hist["gap"]
        self.enc_inputs = {i["name"]: i for i in graphs["user_encoder"]["inputs"]}
        self.enc_outputs = [o["name"] for o in graphs["user_encoder"]["outputs"]]
        self.sc_inputs = {i["name"]: i for i in graphs["scorer"]["inputs"]}

        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = providers or ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(self.model_dir / graphs["user_encoder"]["file"]),
                                            opts, providers=providers)
        self.scorer = ort.InferenceSession(str(self.model_dir / graphs["scorer"]["file"]),
                                           opts, providers=providers)
        for sess, spec in ((self.encoder, self.enc_inputs), (self.scorer, self.sc_inputs)):
            got = {i.name for i in sess.get_inputs()}
            if got != set(spec):
                raise ServingInputError(f"{self.model_dir}: graph inputs {sorted(got)} differ from "
                                        f"the manifest's {sorted(spec)}")

    # -------------------------------------------------------------------------- folder
    @staticmethod
    def _read_manifest(folder: Path) -> dict:
        path = folder / "manifest.json"
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ServingInputError(f"{path}: not a readable manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise ServingInputError(f"{path}: not an srp4ctr ONNX export")
        if m.get("format_version") != MANIFEST_VERSION:
            raise ServingInputError(f"{path}: format version {m.get('format_version')}, this "
                                    f"server reads {MANIFEST_VERSION}")
        return m

    def _verify_files(self, m: dict) -> None:
        entries = [m["items"]] + ([m["users"]] if m.get("users") else [])
        for g in m["graphs"].values():
            entries.append(g)
            if g.get("external_data"):
                entries.append(g["external_data"])
        for e in entries:
            path = self.model_dir / e["file"]
            if not path.is_file():
                raise ServingInputError(f"{path}: missing")
            if e.get("sha256") and _sha256(path) != e["sha256"]:
                raise ServingInputError(f"{path}: sha256 differs from the manifest (truncated or "
                                        "replaced)")

    # -------------------------------------------------------------------------- ids
    def _raw_ids(self, raw: Any, what: str) -> np.ndarray:
        if isinstance(raw, (str, bytes)):
            raise ServingInputError(f"{what} must be a sequence of ids, got a string")
        seq = raw if isinstance(raw, np.ndarray) else list(raw)
        if not isinstance(seq, np.ndarray) and any(isinstance(x, (bool, np.bool_)) for x in seq):
            raise ServingInputError(f"{what}: ids must be integers, got a bool")
        try:
            a = np.asarray(seq)
        except (TypeError, ValueError) as e:
            raise ServingInputError(f"{what} are not a flat sequence of ids ({e})") from None
        if a.ndim != 1:
            raise ServingInputError(f"{what} must be one-dimensional, got shape {a.shape}")
        if a.size == 0:
            return a
        if a.dtype.kind in "bcO":
            raise ServingInputError(f"{what}: ids must be integers, got dtype {a.dtype}")
        if self.string_ids:
            if a.dtype.kind in "iuf" and not np.all(a >= 0):
                raise ServingInputError(f"{what}: ids must be non-negative (and not NaN)")
            return a.astype(str)
        if a.dtype.kind not in "iuf":
            raise ServingInputError(f"{what}: ids must be integers, got dtype {a.dtype}")
        if a.dtype.kind == "f":
            if not np.all(np.isfinite(a)) or np.any(a != np.floor(a)):
                raise ServingInputError(f"{what}: ids must be integers (got non-integer values)")
            if np.any(np.abs(a) > 2**62):
                raise ServingInputError(f"{what}: ids out of the int64 range")
        if np.any(a < 0):
            raise ServingInputError(f"{what}: ids must be non-negative, got "
                                    f"{a[a < 0][:5].tolist()}")
        return a.astype(np.int64)

    @staticmethod
    def _lookup(known: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.searchsorted(known, keys)
        idx_c = np.minimum(idx, max(len(known) - 1, 0))
        found = (idx < len(known)) & (known[idx_c] == keys) if len(known) else \
            np.zeros(keys.shape, bool)
        return idx_c + 1, found

    def _user_index(self, user_id: Any) -> int:
        """Internal id of a raw user id, 0 (no user features) when unknown."""
        key = np.asarray([user_id])
        if key.dtype.kind == "O" or key.ndim != 1:
            raise ServingInputError(f"user_id must be one id, got {user_id!r}")
        if self.users["raw_id_kind"] == "str":
            key = key.astype(str)
        elif key.dtype.kind == "b" or key.dtype.kind not in "iuf":
            raise ServingInputError(f"user ids must be integers, got {user_id!r}")
        else:
            key = key.astype(np.int64)
        pos, found = self._lookup(self._user_known, key)
        return int(pos[0]) if found[0] else 0

    def encode_items(self, raw_ids: Any, *, strict: bool = True) -> np.ndarray:
        """Raw item ids -> internal ids (int64 [C]). Unknown ids raise :class:`UnknownItemError`
        with ``strict``, else map to the OOV item ``n_items + 1``; negative, fractional, boolean
        ids (or strings, for integer-id data) always raise :class:`ServingInputError`."""
        keys = self._raw_ids(raw_ids, "candidates")
        if keys.size == 0:
            return np.zeros(0, np.int64)
        ids, found = self._lookup(self._item_known, keys)
        if strict and not found.all():
            raise UnknownItemError(f"{int((~found).sum())} unknown item id(s), e.g. "
                                   f"{keys[~found][:5].tolist()} (strict; pass strict=False or "
                                   "--oov to score them as the out-of-vocabulary item)")
        return np.where(found, ids, self.oov_item).astype(np.int64)

    # -------------------------------------------------------------------------- histories
    def encode_history(self, history: Mapping[str, Any],
                       user_id: Any = None) -> dict[str, np.ndarray]:
        """A raw history -> the encoder's input arrays, as ``encode_user_history`` builds them:
        ``hist_item``, ``hist_<f>`` (int64 [n]), ``hist_len`` (int64 scalar) and ``user_<f>``
        (int64 scalars) for the user fields the model uses. n may be 0."""
        if not isinstance(history, Mapping):
            raise ServingInputError("history must be a mapping with 'item_id' and 'timestamp'")
        for key in ("item_id", "timestamp"):
            if key not in history:
                raise ServingInputError(f"history lacks {key!r}")
        items = _check_1d("item_id", history["item_id"])
        ts = _as_int_timestamps(_check_1d("timestamp", history["timestamp"]))
        if items.shape[0] != ts.shape[0]:
            raise ServingInputError(f"{items.shape[0]} item ids but {ts.shape[0]} timestamps")
        values = None
        if self.kind is not None:
            alt = {"behavior": "behaviour", "behaviour": "behavior"}.get(self.kind)
            key = self.kind if self.kind in history else alt if alt in history else None
            if key is None:
                raise ServingInputError(f"history lacks {self.kind!r} (this dataset's behaviour "
                                        "value)")
            values = _check_1d(key, history[key])
            if values.shape[0] != ts.shape[0]:
                raise ServingInputError(f"{ts.shape[0]} timestamps but {values.shape[0]} "
                                        f"{key} values")
        keys = self._raw_ids(items, "history item ids")
        if keys.size:
            ids, found = self._lookup(self._item_known, keys)
            ids = np.where(found, ids, self.oov_item).astype(np.int64)
            rawkey = keys if not self.string_ids else np.unique(keys, return_inverse=True)[1]
        else:
            ids, rawkey = np.zeros(0, np.int64), np.zeros(0, np.int64)
        order = np.lexsort((rawkey.reshape(-1), ts))
        ts, ids = ts[order], ids[order]
        fields = _time_tokens(ts, self.gap_rule)
        if values is not None:
            fields[self.kind] = _value_tokens(values[order], self.value_vocab)
        start = max(0, ts.shape[0] - self.max_len)
        out = {"hist_item": ids[start:], "hist_len": np.asarray(ids.shape[0] - start, np.int64)}
        for name in self.enc_inputs:
            if name.startswith("hist_") and name not in out:
                out[name] = np.ascontiguousarray(fields[name[5:]][start:], dtype=np.int64)
        if self.users:
            uid = history.get("user_id") if user_id is None else user_id
            u = 0 if uid is None else self._user_index(uid)
            for f in self.users["fields"]:
                out[f"user_{f}"] = np.asarray(self._user_table[f][u], dtype=np.int64)
        return out

    def check_encoder_feed(self, feed: Mapping[str, Any]) -> None:
        """Refuse (:class:`ServingInputError`) a feed that does not fit ``user_encoder.onnx``."""
        missing = set(self.enc_inputs) - set(feed)
        extra = set(feed) - set(self.enc_inputs)
        if missing or extra:
            raise ServingInputError(f"encoder inputs: missing {sorted(missing)}, unexpected "
                                    f"{sorted(extra)}")
        n = None
        for name, spec in self.enc_inputs.items():
            a = feed[name]
            if not isinstance(a, np.ndarray):
                raise ServingInputError(f"{name} must be a numpy array, got {type(a).__name__}")
            if a.dtype != _DTYPES[spec["dtype"]]:
                raise ServingInputError(f"{name} has dtype {a.dtype}, the graph takes "
                                        f"{spec['dtype']}")
            if a.ndim != len(spec["shape"]):
                raise ServingInputError(f"{name} has shape {a.shape}, the graph takes "
                                        f"{spec['shape']}")
            if a.ndim == 1:
                if n is None:
                    n = a.shape[0]
                elif a.shape[0] != n:
                    raise ServingInputError(f"{name} has {a.shape[0]} positions, hist_item {n}")
        if not 1 <= n <= self.max_len:
            raise ServingInputError(f"history arrays must have 1..{self.max_len} positions, got "
                                    f"{n} (an empty history: one padding position, hist_len 0)")
        for name, spec in self.enc_inputs.items():
            lo, hi = spec["range"]
            hi = n if hi == "n" else hi
            a = feed[name]
            if a.size and (int(a.min()) < lo or int(a.max()) > hi):
                raise ServingInputError(f"{name} holds values outside [{lo}, {hi}]: min "
                                        f"{int(a.min())}, max {int(a.max())}")

    def run_encoder(self, arrays: Mapping[str, np.ndarray]) -> UserCache:
        """Encoded history arrays (from :meth:`encode_history`; n may be 0) -> a cache."""
        feed = {name: arrays[name] for name in self.enc_inputs if name in arrays}
        n = int(np.asarray(arrays["hist_len"])) if "hist_len" in arrays else None
        if n == 0 and "hist_item" in feed and feed["hist_item"].shape == (0,):
            # empty history: one padding position, exactly the batch the engine builds
            feed = {k: (np.zeros(1, np.int64) if k.startswith("hist_") and k != "hist_len"
                        else v) for k, v in feed.items()}
        self.check_encoder_feed(feed)
        out = dict(zip(self.enc_outputs, self.encoder.run(self.enc_outputs, feed)))
        length = int(feed["hist_len"])
        k = v = None
        if "k" in out:
            k = np.ascontiguousarray(out["k"][:, :length])
            v = np.ascontiguousarray(out["v"][:, :length])
        return UserCache(k=k, v=v, head_user=out["head_user"], qtokens=out.get("qtokens"),
                         pooled=out.get("pooled"), fingerprint=self.fingerprint)

    def encode_user(self, history: Mapping[str, Any], user_id: Any = None) -> UserCache:
        """Run the user side once: raw history -> :class:`UserCache`."""
        return self.run_encoder(self.encode_history(history, user_id))

    # -------------------------------------------------------------------------- scoring
    def check_cache(self, cache: Any) -> None:
        """Refuse (:class:`ServingInputError`) a cache that does not fit ``scorer.onnx``."""
        if not isinstance(cache, UserCache):
            raise ServingInputError(f"expected a UserCache, got {type(cache).__name__}")
        if cache.fingerprint != self.fingerprint:
            raise ServingInputError(f"the cache was built by model {str(cache.fingerprint)[:12]}…, "
                                    f"this folder serves model {self.fingerprint[:12]}…")
        tensors = {"head_user": (cache.head_user, (self.h1,))}
        if self.NL:
            for name in ("k", "v"):
                t = getattr(cache, name)
                tensors[name] = (t, None)
        for name, (t, want) in tensors.items():
            if not isinstance(t, np.ndarray):
                raise ServingInputError(f"cache.{name} must be a numpy array, got "
                                        f"{type(t).__name__}")
            if t.dtype != np.float32:
                raise ServingInputError(f"cache.{name} has dtype {t.dtype}, the scorer takes "
                                        "float32")
            if want is not None and t.shape != want:
                raise ServingInputError(f"cache.{name} has shape {t.shape}, the scorer takes "
                                        f"{list(want)}")
            if not np.isfinite(t).all():
                raise ServingInputError(f"cache.{name} holds NaN or inf")
        if self.NL:
            k, v = cache.k, cache.v
            if k.shape != v.shape:
                raise ServingInputError(f"cache k {k.shape} and v {v.shape} differ")
            want = (self.NL, self.H, self.Dh)
            if k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != want:
                raise ServingInputError(f"cache k/v have shape {k.shape}, the scorer takes "
                                        f"[{self.NL}, n, {self.H}, {self.Dh}]")
            if k.shape[1] > self.max_len:
                raise ServingInputError(f"cache length {k.shape[1]} exceeds max_len "
                                        f"{self.max_len}")

    def score_ids(self, cache: UserCache, item_ids: Any, *, logits: bool = False) -> np.ndarray:
        """Probabilities (or logits) float32 [C] of internal item ids (int64 [C], values
        1..n_items + 1)."""
        self.check_cache(cache)
        if not isinstance(item_ids, np.ndarray):
            raise ServingInputError(f"item ids must be a numpy array, got "
                                    f"{type(item_ids).__name__}")
        if item_ids.dtype != np.int64:
            raise ServingInputError(f"item ids have dtype {item_ids.dtype}, the scorer takes "
                                    "int64")
        if item_ids.ndim != 1:
            raise ServingInputError(f"item ids must be one-dimensional, got shape "
                                    f"{item_ids.shape}")
        if item_ids.size == 0:
            return np.zeros(0, np.float32)
        lo, hi = self.sc_inputs["cand_item"]["range"]
        if int(item_ids.min()) < lo or int(item_ids.max()) > hi:
            raise ServingInputError(f"internal item ids must lie in [{lo}, {hi}], got min "
                                    f"{int(item_ids.min())}, max {int(item_ids.max())}")
        feed = {"head_user": cache.head_user, "cand_item": item_ids}
        if self.NL:
            k, v = cache.k, cache.v
            if k.shape[1] == 0:  # empty history: one all-zero key/value row (see the docstring)
                k = v = np.zeros((self.NL, 1, self.H, self.Dh), np.float32)
            feed.update(k=k, v=v)
        return self.scorer.run(["logits" if logits else "probs"], feed)[0]

    def score(self, cache: UserCache, candidates: Any, *, strict: bool = True,
              logits: bool = False) -> np.ndarray:
        """Click probabilities float32 [C] of raw candidate ids, in their order."""
        self.check_cache(cache)
        return self.score_ids(cache, self.encode_items(candidates, strict=strict), logits=logits)


# ------------------------------------------------------------------------------------------
# command line


def _parse_candidates(text: str, string_ids: bool) -> list:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if string_ids:
        return parts
    out = []
    for p in parts:
        try:
            out.append(int(p))
        except ValueError:
            raise ServingInputError(f"--candidates: {p!r} is not an integer id") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Score candidates for one user with an exported "
                                 "SRP4CTR model (ONNX Runtime + numpy; no torch).")
    ap.add_argument("--model-dir", required=True, help="folder written by srp4ctr export-onnx")
    ap.add_argument("--history", required=True,
                    help="JSON file of the user's raw history (item_id, timestamp, rating or "
                    "behavior, optional user_id)")
    ap.add_argument("--candidates", required=True, help="raw item ids, comma-separated")
    ap.add_argument("--top", type=int, default=None, help="also list the top K candidates")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--oov", action="store_true",
                    help="score unknown candidate ids as the out-of-vocabulary item instead of "
                    "failing")
    args = ap.parse_args(argv)
    try:
        server = OnnxServer(args.model_dir, threads=args.threads)
        with open(args.history, encoding="utf-8") as f:
            history = json.load(f)
        cands = _parse_candidates(args.candidates, server.string_ids)
        t0 = time.perf_counter()
        cache = server.encode_user(history)
        t1 = time.perf_counter()
        probs = server.score(cache, cands, strict=not args.oov)
        t2 = time.perf_counter()
    except (ServingInputError, OSError, json.JSONDecodeError) as e:
        print(f"serve_onnx: error: {e}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "model_fingerprint": server.fingerprint,
        "history_length": cache.length,
        "candidates": cands,
        "probs": [float(p) for p in probs],
        "ms": {"encode_user": 1e3 * (t1 - t0), "score": 1e3 * (t2 - t1)},
    }
    if args.top:
        order = np.argsort(-probs, kind="stable")[: args.top]
        result["top"] = [{"item_id": cands[i], "prob": float(probs[i])} for i in order]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
