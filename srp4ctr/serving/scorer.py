"""The torch-free scorer: an ONNX export folder served by ONNX Runtime or OpenVINO and numpy.

Raw histories and candidate ids are encoded by the data pipeline's own code
(:meth:`PreparedDataset.encode_user_history <srp4ctr.data.PreparedDataset.encode_user_history>`
and ``encode_items`` over the folder's serving tables) and checked by the engine's input rules
(:mod:`srp4ctr.serving.inputs`), so the same input gets the same result or the same error here as
from :class:`srp4ctr.engine.Engine`. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from srp4ctr._files import sha256_file
from srp4ctr.errors import CacheError, CheckpointError, DataError, InputError

from .inputs import as_history_dict, encode_candidates, encode_history
from .runtime import PRECISIONS, RUNTIMES, open_session

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "Scorer", "UserCache", "read_export_manifest"]

#: the export folder this runtime reads (written by ``srp4ctr export-onnx``)
MANIFEST_FORMAT = "srp4ctr-onnx"
MANIFEST_VERSION = 2  # 2: serving tables instead of items.npz / users.npz, scorer_multi.onnx
_DTYPES = {"float32": np.float32, "int64": np.int64}
#: scorer_multi compares every candidate with every K/V row of its call: calls are cut so that
#: candidates x rows stays under this (a few tens of MB of scores per head)
MULTI_PAIRS = 1 << 22


@dataclass
class UserCache:
    """One user's encoder outputs, in :class:`srp4ctr.engine.UserCache`'s layout (numpy).

    ``k``, ``v``: ``[NL, n, H, Dh]`` float32 (n may be 0: an empty history; None without
    cross-attention layers); ``head_user``: ``[h1]``; ``qtokens``: ``[M, d]`` or None;
    ``pooled``: ``[d]`` or None; ``fingerprint``: the model that built it; ``user_id``: the
    raw user id it was encoded with (None: no user features).
    """

    k: np.ndarray | None
    v: np.ndarray | None
    head_user: np.ndarray
    qtokens: np.ndarray | None
    pooled: np.ndarray | None
    fingerprint: str
    user_id: Any = None

    @property
    def length(self) -> int:
        """History positions the cache holds."""
        return 0 if self.k is None else int(self.k.shape[1])


def read_export_manifest(folder: Path) -> dict[str, Any]:
    """``manifest.json`` of an export folder, checked for format and version."""
    path = folder / "manifest.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: not an srp4ctr ONNX export")
    if m.get("format_version") != MANIFEST_VERSION:
        raise CheckpointError(f"{path}: export format version {m.get('format_version')!r}, this "
                              f"srp4ctr reads {MANIFEST_VERSION}; export the model again")
    return m


class Scorer:
    """The three graphs of one export folder (user encoder, scorer, multi-user scorer) in one
    runtime, with the folder's serving tables. Build with :meth:`load`.

    Attributes:
        manifest: the folder's ``manifest.json``.
        fingerprint: the model's identity (caches carry it).
        dataset: the serving tables (id maps, feature tables, behaviour rules) as a
            :class:`~srp4ctr.data.PreparedDataset` view with no interactions.
        runtime, precision, threads: how the graphs run.
        max_len: histories are cut to their last ``max_len`` interactions.
    """

    def __init__(self, model_dir: str | os.PathLike, *, runtime: str = "onnxruntime",
                 threads: int | None = None, precision: str = "fp32",
                 providers: Sequence[str] | None = None, verify_files: bool = True):
        from srp4ctr.data.dataset import load_serving_tables

        if runtime not in RUNTIMES:
            raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not an export folder")
        m = read_export_manifest(self.model_dir)
        self.manifest = m
        self.fingerprint: str = m["model_fingerprint"]
        self.runtime, self.precision, self.threads = runtime, precision, threads
        dims = m["dims"]
        self.NL, self.H, self.Dh, self.h1 = dims["NL"], dims["H"], dims["Dh"], dims["h1"]
        self.max_len: int = int(m["history"]["max_len"])
        if verify_files:
            self._verify_files(m)
        try:
            self.dataset = load_serving_tables(self.model_dir, max_len=self.max_len)
        except DataError as e:
            raise CheckpointError(str(e)) from None
        if self.dataset.fingerprint != m["dataset"]["fingerprint"]:
            raise CheckpointError(f"{self.model_dir}: serving tables of another dataset than "
                                  "the manifest's")
        graphs = m["graphs"]
        self.enc_inputs = {i["name"]: i for i in graphs["user_encoder"]["inputs"]}
        self.enc_outputs = [o["name"] for o in graphs["user_encoder"]["outputs"]]
        self.sc_inputs = {i["name"]: i for i in graphs["scorer"]["inputs"]}
        self.user_fields = [n[5:] for n in self.enc_inputs if n.startswith("user_")]

        files = {role: self._member(g["file"]) for role, g in graphs.items()}
        if precision == "int8":
            int8 = (m.get("variants") or {}).get("int8")
            if not int8:
                raise InputError(f"{self.model_dir}: no int8 scorers (export with --int8)")
            files.update({role: self._member(g["file"]) for role, g in int8["graphs"].items()})

        def session(role: str):
            s = open_session(files[role], runtime, threads=threads,
                             precision=precision if role != "user_encoder" else
                             ("fp32" if precision == "int8" else precision),
                             providers=providers)
            want = {i["name"] for i in graphs[role]["inputs"]}
            if set(s.inputs) != want:
                raise CheckpointError(f"{self.model_dir}: {role} inputs {sorted(s.inputs)} "
                                      f"differ from the manifest's {sorted(want)}")
            return s

        self.encoder = session("user_encoder")
        self.scorer = session("scorer")
        self.multi = session("scorer_multi")
        self._warm_up()

    def _warm_up(self) -> None:
        """One call of each graph with every dynamic axis at 2, before any request.

        Besides taking the first-call cost off the first request, this avoids an OpenVINO
        (2026.4, CPU plugin) fault seen on an AVX2 EPYC: a compiled graph whose *first*
        inference has one K/V row (n = 1) returns wrong results (|dp| up to 0.06) for every
        later, longer history; after a first call with n = 2 every length is right
        (``tests/test_serving.py::test_openvino_first_call_with_one_row``).
        """
        n = 2
        feed = {name: np.zeros(n if len(spec["shape"]) else (), np.int64)
                for name, spec in self.enc_inputs.items()}
        feed["hist_len"] = np.asarray(n, np.int64)
        self.encoder.run(feed, self.enc_outputs)
        ids = np.asarray([1, self.dataset.oov_item], np.int64)
        hu = np.zeros(self.h1, np.float32)
        kv = np.zeros((self.NL, n, self.H, self.Dh), np.float32)
        feed = {"head_user": hu, "cand_item": ids}
        if self.NL:
            feed.update(k=kv, v=kv)
        self.scorer.run(feed, ["probs"])
        feed = {"head_user": np.stack([hu, hu]), "cand_item": np.concatenate([ids, ids]),
                "cand_offsets": np.asarray([0, 2, 4], np.int64)}
        if self.NL:
            both = np.concatenate([kv, kv], axis=1)
            feed.update(k=both, v=both, kv_offsets=np.asarray([0, n, 2 * n], np.int64))
        self.multi.run(feed, ["probs"])

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, runtime: str = "onnxruntime",
             threads: int | None = None, precision: str = "fp32",
             providers: Sequence[str] | None = None, verify_files: bool = True) -> Scorer:
        """The scorer of the export folder ``model_dir`` (``srp4ctr export-onnx``).

        Args:
            runtime: ``"onnxruntime"`` or ``"openvino"``.
            threads: intra-op threads of the runtime (None: its default).
            precision: ``"fp32"`` (equal to the engine within 1e-5), ``"bf16"`` (OpenVINO's
                bf16 inference precision; on a CPU without bf16 instructions it stays fp32) or
                ``"int8"`` (ONNX Runtime, the int8-quantised scorers of an export made with
                ``--int8``; the user encoder stays fp32).
            providers: ONNX Runtime execution providers (default CPU).
            verify_files: check every file's sha256 against the manifest.

        Raises:
            CheckpointError: not an export folder, another format version, a missing, truncated
                or replaced file.
            InputError: an unknown runtime or precision, a runtime that is not installed.
        """
        return cls(model_dir, runtime=runtime, threads=threads, precision=precision,
                   providers=providers, verify_files=verify_files)

    def _member(self, name: Any) -> Path:
        """The file ``name`` of the manifest inside the model folder: a plain file name, never
        a path that leads out of it (``../x``, ``/x``, a link pointing away)."""
        ok = isinstance(name, str) and name and name not in (".", "..") and \
            "/" not in name and "\\" not in name and "\0" not in name
        path = self.model_dir / name if ok else None
        if path is None or path.resolve().parent != self.model_dir.resolve():
            raise CheckpointError(f"{self.model_dir / 'manifest.json'}: file entry {name!r} is "
                                  "not a file of the export folder")
        return path

    def _verify_files(self, m: dict) -> None:
        entries = []
        for g in m["graphs"].values():
            entries.append((g["file"], g.get("sha256")))
            if g.get("external_data"):
                entries.append((g["external_data"]["file"], g["external_data"].get("sha256")))
        entries += [(name, rec.get("sha256")) for name, rec in m["tables"]["files"].items()]
        for variant in (m.get("variants") or {}).values():
            entries += [(g["file"], g.get("sha256")) for g in variant["graphs"].values()]
        for name, digest in entries:
            path = self._member(name)
            if not path.is_file():
                raise CheckpointError(f"{path}: missing")
            if sha256_file(path) != digest:
                raise CheckpointError(f"{path}: sha256 differs from the manifest (truncated or "
                                      "replaced)")

    def __repr__(self) -> str:
        return (f"Scorer(runtime={self.runtime!r}, precision={self.precision!r}, "
                f"dataset={self.dataset.name!r}, model={self.fingerprint[:12]})")

    def describe(self) -> dict[str, Any]:
        """What this scorer serves and how."""
        return {"model_fingerprint": self.fingerprint, "dataset": self.manifest["dataset"],
                "runtime": self.runtime, "precision": self.precision, "threads": self.threads,
                "max_len": self.max_len, "opset": self.manifest["opset"],
                "folder": str(self.model_dir)}

    # -------------------------------------------------------------------------- ids
    def encode_items(self, candidates: Any, strict: bool = False) -> np.ndarray:
        """Raw item ids -> internal ids (int64 [C]) as :meth:`Engine.encode_items
        <srp4ctr.engine.Engine.encode_items>` does (same errors)."""
        return encode_candidates(self.dataset, candidates, strict)

    # -------------------------------------------------------------------------- users
    def encode_history(self, history: Any, user_id: Any = None) -> dict[str, np.ndarray]:
        """A raw history -> the encoder's input arrays (n may be 0), by the pipeline's
        ``encode_user_history``; the user fields of an unknown or absent user are 0."""
        arrays = encode_history(self.dataset, history, user_id, max_len=self.max_len)
        out = {name: np.array(arrays[name], dtype=np.int64)
               for name in self.enc_inputs if name.startswith("hist_")}
        for f in self.user_fields:
            table = self.dataset.user_table[f]
            out[f"user_{f}"] = np.asarray(arrays.get(f"user_{f}", table[0]), dtype=np.int64)
        return out

    def check_encoder_feed(self, feed: Mapping[str, Any]) -> None:
        """Refuse (:class:`~srp4ctr.errors.InputError`) a feed that does not fit
        ``user_encoder.onnx``: names, dtypes, ranks, lengths, id ranges."""
        missing = set(self.enc_inputs) - set(feed)
        extra = set(feed) - set(self.enc_inputs)
        if missing or extra:
            raise InputError(f"encoder inputs: missing {sorted(missing)}, unexpected "
                             f"{sorted(extra)}")
        n = None
        for name, spec in self.enc_inputs.items():
            a = feed[name]
            if not isinstance(a, np.ndarray):
                raise InputError(f"{name} must be a numpy array, got {type(a).__name__}")
            if a.dtype != _DTYPES[spec["dtype"]]:
                raise InputError(f"{name} has dtype {a.dtype}, the graph takes {spec['dtype']}")
            if a.ndim != len(spec["shape"]):
                raise InputError(f"{name} has shape {a.shape}, the graph takes {spec['shape']}")
            if a.ndim == 1:
                if n is None:
                    n = a.shape[0]
                elif a.shape[0] != n:
                    raise InputError(f"{name} has {a.shape[0]} positions, hist_item {n}")
        if n is None or not 1 <= n <= self.max_len:
            raise InputError(f"history arrays must have 1..{self.max_len} positions, got {n} "
                             "(an empty history: one padding position, hist_len 0)")
        for name, spec in self.enc_inputs.items():
            lo, hi = spec["range"]
            hi = n if hi == "n" else hi
            a = feed[name]
            if a.size and (int(a.min()) < lo or int(a.max()) > hi):
                raise InputError(f"{name} holds values outside [{lo}, {hi}]: min "
                                 f"{int(a.min())}, max {int(a.max())}")

    def run_encoder(self, arrays: Mapping[str, np.ndarray], user_id: Any = None) -> UserCache:
        """Encoded history arrays (from :meth:`encode_history`; n may be 0) -> a cache."""
        feed = {name: arrays[name] for name in self.enc_inputs if name in arrays}
        n = int(np.asarray(arrays["hist_len"])) if "hist_len" in arrays else None
        if n == 0 and "hist_item" in feed and feed["hist_item"].shape == (0,):
            # an empty history: one padding position, exactly the batch the engine builds
            feed = {k: (np.zeros(1, np.int64) if k.startswith("hist_") and k != "hist_len"
                        else v) for k, v in feed.items()}
        self.check_encoder_feed(feed)
        out = dict(zip(self.enc_outputs, self.encoder.run(feed, self.enc_outputs)))
        length = int(feed["hist_len"])
        k = v = None
        if "k" in out:
            k = np.ascontiguousarray(out["k"][:, :length])
            v = np.ascontiguousarray(out["v"][:, :length])
        return UserCache(k=k, v=v, head_user=out["head_user"], qtokens=out.get("qtokens"),
                         pooled=out.get("pooled"), fingerprint=self.fingerprint,
                         user_id=user_id)

    def encode_user(self, history: Any, *, user_id: Any = None) -> UserCache:
        """Run the user side once: a raw history (a mapping or
        :class:`~srp4ctr.serving.History`, as for the engine) -> :class:`UserCache`."""
        d = as_history_dict(history, user_id)
        uid = d.get("user_id")
        return self.run_encoder(self.encode_history(d), user_id=uid)

    def encode_users(self, histories: Sequence[Any]) -> list[UserCache]:
        """:meth:`encode_user` for each history (every one is checked before any runs)."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise InputError("histories must be a sequence of histories")
        norm = [as_history_dict(h) for h in histories]
        arrays = [self.encode_history(d) for d in norm]
        return [self.run_encoder(a, user_id=d.get("user_id")) for a, d in zip(arrays, norm)]

    # -------------------------------------------------------------------------- scoring
    def check_cache(self, cache: Any) -> UserCache:
        """Refuse (:class:`~srp4ctr.errors.CacheError`) a cache that is not this model's or
        does not fit the scorer: type, fingerprint, dtypes, shapes, NaN/inf, length."""
        if not isinstance(cache, UserCache):
            raise CacheError(f"expected a srp4ctr.serving.UserCache, got {type(cache).__name__}")
        if cache.fingerprint != self.fingerprint:
            raise CacheError(f"the cache was built by model {str(cache.fingerprint)[:12]}…, "
                             f"this folder serves model {self.fingerprint[:12]}…; encode the "
                             "user again")
        tensors = {"head_user": (cache.head_user, (self.h1,))}
        if self.NL:
            tensors["k"], tensors["v"] = (cache.k, None), (cache.v, None)
        for name, (t, want) in tensors.items():
            if not isinstance(t, np.ndarray):
                raise CacheError(f"cache.{name} must be a numpy array, got {type(t).__name__}")
            if t.dtype != np.float32:
                raise CacheError(f"cache.{name} has dtype {t.dtype}, the scorer takes float32")
            if want is not None and t.shape != want:
                raise CacheError(f"cache.{name} has shape {t.shape}, the scorer takes "
                                 f"{list(want)}")
            if not np.isfinite(t).all():
                raise CacheError(f"cache.{name} holds NaN or inf")
        if self.NL:
            k, v = cache.k, cache.v
            if k.shape != v.shape:
                raise CacheError(f"cache k {k.shape} and v {v.shape} differ")
            want3 = (self.NL, self.H, self.Dh)
            if k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != want3:
                raise CacheError(f"cache k/v have shape {k.shape}, the scorer takes "
                                 f"[{self.NL}, n, {self.H}, {self.Dh}]")
            if k.shape[1] > self.max_len:
                raise CacheError(f"cache length {k.shape[1]} exceeds max_len {self.max_len}")
        return cache

    def _kv(self, cache: UserCache) -> tuple[np.ndarray, np.ndarray]:
        """The cache's K/V as the scorers take them: an empty history is one all-zero row (the
        softmax over one key is 1 and its value 0: the engine's zero attention output)."""
        if cache.k.shape[1] == 0:
            z = np.zeros((self.NL, 1, self.H, self.Dh), np.float32)
            return z, z
        return cache.k, cache.v

    def _check_ids(self, item_ids: Any) -> np.ndarray:
        if not isinstance(item_ids, np.ndarray):
            raise InputError(f"item ids must be a numpy array, got {type(item_ids).__name__}")
        if item_ids.dtype != np.int64:
            raise InputError(f"item ids have dtype {item_ids.dtype}, the scorer takes int64")
        if item_ids.ndim != 1:
            raise InputError(f"item ids must be one-dimensional, got shape {item_ids.shape}")
        if item_ids.size:
            lo, hi = self.sc_inputs["cand_item"]["range"]
            if int(item_ids.min()) < lo or int(item_ids.max()) > hi:
                raise InputError(f"internal item ids must lie in [{lo}, {hi}], got min "
                                 f"{int(item_ids.min())}, max {int(item_ids.max())}")
        return item_ids

    def score_ids(self, cache: UserCache, item_ids: Any, *, logits: bool = False) -> np.ndarray:
        """Probabilities (or logits) float32 [C] of internal item ids (int64 [C], values
        1..n_items + 1)."""
        self.check_cache(cache)
        item_ids = self._check_ids(item_ids)
        if item_ids.size == 0:
            return np.zeros(0, np.float32)
        feed = {"head_user": cache.head_user, "cand_item": item_ids}
        if self.NL:
            feed["k"], feed["v"] = self._kv(cache)
        return self.scorer.run(feed, ["logits" if logits else "probs"])[0]

    def score(self, cache: UserCache, candidates: Any, strict: bool = False, *,
              logits: bool = False) -> np.ndarray:
        """Click probabilities float32 [C] of raw candidate ids, in their order; as
        :meth:`Engine.score <srp4ctr.engine.Engine.score>` (same rules and errors).

        Raises:
            CacheError: a cache of another model, or that does not fit.
            UnknownItemError: an unknown id with ``strict``.
            InputError: malformed candidate ids.
        """
        self.check_cache(cache)
        return self.score_ids(cache, self.encode_items(candidates, strict), logits=logits)

    def score_many(self, caches: Sequence[UserCache], candidate_lists: Sequence[Any],
                   strict: bool = False, *, logits: bool = False) -> list[np.ndarray]:
        """:meth:`score` for many users: ``caches[b]`` with ``candidate_lists[b]``, batched into
        ``scorer_multi.onnx`` calls (jagged, offsets per user) of at most
        :data:`MULTI_PAIRS` candidate x K/V-row pairs. Every input is checked before any
        work. Returns one float32 array per user, equal to :meth:`score` of that user."""
        if isinstance(caches, UserCache) or not isinstance(caches, Sequence):
            raise InputError("score_many takes a sequence of caches (use score for one user)")
        if isinstance(candidate_lists, (str, bytes)) or not isinstance(candidate_lists, Sequence):
            raise InputError("candidate_lists must be a sequence of candidate id lists")
        if len(caches) != len(candidate_lists):
            raise InputError(f"{len(caches)} caches but {len(candidate_lists)} candidate lists")
        checked = [self.check_cache(c) for c in caches]
        ids = [self.encode_items(c, strict) for c in candidate_lists]
        out: list[np.ndarray] = [np.zeros(0, np.float32) for _ in checked]
        name = "logits" if logits else "probs"
        group: list[int] = []

        def rows(b: int) -> int:
            return max(1, checked[b].length) if self.NL else 1

        def flush() -> None:
            if not group:
                return
            counts = [ids[b].shape[0] for b in group]
            feed = {"head_user": np.stack([checked[b].head_user for b in group]),
                    "cand_item": np.concatenate([ids[b] for b in group]),
                    "cand_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}
            if self.NL:
                kv = [self._kv(checked[b]) for b in group]
                feed["k"] = np.concatenate([k for k, _ in kv], axis=1)
                feed["v"] = np.concatenate([v for _, v in kv], axis=1)
                feed["kv_offsets"] = np.concatenate(
                    [[0], np.cumsum([k.shape[1] for k, _ in kv])]).astype(np.int64)
            res = self.multi.run(feed, [name])[0]
            for b, part in zip(group, np.split(res, np.cumsum(counts)[:-1])):
                out[b] = part
            group.clear()

        cands = n_rows = 0
        for b in range(len(checked)):
            C = ids[b].shape[0]
            if C == 0:
                continue
            if C * rows(b) > MULTI_PAIRS:  # one big list: this user alone, in the scorer
                out[b] = self.score_ids(checked[b], ids[b], logits=logits)
                continue
            if group and (cands + C) * (n_rows + rows(b)) > MULTI_PAIRS:
                flush()
                cands = n_rows = 0
            group.append(b)
            cands += C
            n_rows += rows(b)
        flush()
        return out
