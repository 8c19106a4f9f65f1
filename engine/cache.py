"""The per-user state of folded inference: :class:`UserCache`, its file format, and a byte-bounded
LRU store of caches (:class:`UserCacheStore`).

Layout of a cache (also the inputs of an exported candidate-scorer graph), for a model with
``NL`` tower layers, ``H`` heads of width ``Dh`` (``d = H * Dh``), ``M`` Q-Former queries and a
head whose first hidden layer has ``h1`` units, for a history of valid length ``n``:

==============  =====================  =========================================================
name            shape                  what
==============  =====================  =========================================================
``k``           ``[NL, n, H, Dh]``     each FG-BERT layer's keys of the real positions (no padding)
``v``           ``[NL, n, H, Dh]``     each layer's values
``head_user``   ``[h1]``               the head's first layer on the user part, bias included
``qtokens``     ``[M, d]``             the Q-Former tokens (absent without a Q-Former)
``pooled``      ``[d]``                mean final state (only the ``use_xattn=False`` ablation)
==============  =====================  =========================================================

``head_user`` already holds everything the candidate side needs from ``qtokens`` / ``pooled``;
those are kept for inspection and for downstream models. Every tensor shares one dtype and device.
Without a candidate tower (``use_xattn=False``) ``NL`` is 0.

Files: safetensors with the tensors above and string metadata ``format``
(``srp4ctr-user-cache``), ``format_version``, ``model_fingerprint``, ``dtype``, ``length``,
``n_layers``, ``n_heads``, ``head_dim``, ``shapes`` (JSON), ``user_id`` (JSON) and ``sha256``
over every other metadata entry and the tensor bytes, so a truncated file, altered tensors or
altered metadata (another user id, another model) are refused with :class:`CacheError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import torch

from srp4ctr._fork import renew_lock_after_fork
from srp4ctr.errors import CacheError, InputError

__all__ = ["CACHE_FORMAT", "CACHE_FORMAT_VERSION", "UserCache", "UserCacheStore"]

CACHE_FORMAT = "srp4ctr-user-cache"
CACHE_FORMAT_VERSION = 2  # 2: the sha256 covers the metadata too
_META_KEYS = frozenset({"format", "format_version", "model_fingerprint", "dtype", "length",
                        "n_layers", "n_heads", "head_dim", "shapes", "user_id", "sha256"})
_OPTIONAL = ("qtokens", "pooled")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class UserCache:
    """One user's cached state: per-layer K/V, the Q-Former tokens and the head's user block.

    Built by :meth:`Engine.encode_user <srp4ctr.engine.Engine.encode_user>`; scored by
    :meth:`Engine.score <srp4ctr.engine.Engine.score>`. See the module docstring for the layout.
    The tensors are never modified by the engine; a cache is safe to score from many threads.

    Attributes:
        k, v: ``[n_layers, length, n_heads, head_dim]``.
        head_user: ``[h1]``.
        qtokens: ``[n_queries, d_model]`` or None.
        pooled: ``[d_model]`` or None.
        fingerprint: the fingerprint of the model that built it (its weights' sha256).
        user_id: the raw user id it was built for, if known (JSON-able), else None.
    """

    def __init__(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        head_user: torch.Tensor,
        qtokens: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        *,
        fingerprint: str,
        user_id: Any = None,
    ):
        for name, t, ndim in (("k", k, 4), ("v", v, 4), ("head_user", head_user, 1),
                              ("qtokens", qtokens, 2), ("pooled", pooled, 1)):
            if t is None and name in _OPTIONAL:
                continue
            if not isinstance(t, torch.Tensor):
                raise CacheError(f"UserCache.{name} must be a tensor, got {type(t).__name__}")
            if t.dim() != ndim:
                raise CacheError(
                    f"UserCache.{name} must have {ndim} dims, got shape {tuple(t.shape)}"
                )
            if t.dtype not in _DTYPES.values():
                raise CacheError(f"UserCache.{name} has dtype {t.dtype}, expected a float dtype")
            if t.dtype != k.dtype or t.device != k.device:
                raise CacheError(
                    f"UserCache.{name} is {t.dtype} on {t.device}, k is {k.dtype} on {k.device}"
                )
        if v.shape != k.shape:
            raise CacheError(f"UserCache: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise CacheError("UserCache needs the fingerprint of the model that built it")
        self.k = k
        self.v = v
        self.head_user = head_user
        self.qtokens = qtokens
        self.pooled = pooled
        self.fingerprint = fingerprint
        self.user_id = user_id

    # ----------------------------------------------------------------------------- shape
    @property
    def length(self) -> int:
        """Valid history length n (0 for an empty history)."""
        return int(self.k.shape[1])

    @property
    def n_layers(self) -> int:
        return int(self.k.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.k.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.k.shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor, in the file's layout (optional entries only when present)."""
        out = {"k": self.k, "v": self.v, "head_user": self.head_user}
        for name in _OPTIONAL:
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (k, v), each ``[length, n_heads, head_dim]`` (views)."""
        return self.k[layer], self.v[layer]

    def __repr__(self) -> str:
        return (
            f"UserCache(length={self.length}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
            f"head_dim={self.head_dim}, dtype={_dtype_name(self.dtype)}, device={self.device}, "
            f"nbytes={self.nbytes}, model={self.fingerprint[:12]})"
        )

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> UserCache:
        """A copy on ``device`` / in ``dtype`` (self when nothing changes)."""
        if (device is None or torch.device(device) == self.device) and (
            dtype is None or dtype == self.dtype
        ):
            return self
        moved = {n: t.to(device=device, dtype=dtype) for n, t in self.tensors().items()}
        return UserCache(**moved, fingerprint=self.fingerprint, user_id=self.user_id)

    # ----------------------------------------------------------------------------- checks
    def check_finite(self) -> None:
        """Raise :class:`CacheError` if any tensor holds NaN or inf.

        Checked on every call: tensors may be written in place through views that no version
        counter sees (numpy arrays sharing their memory), so nothing is remembered.
        """
        tensors = self.tensors()
        # One fp32 sum per tensor: NaN and inf propagate through it, and it costs a few µs where
        # isfinite() on every tensor costs a pass and an allocation each. (A sum overflows fp32
        # only for values ~1e33, which no working model produces: refusing them is right too.)
        sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors.values()])
        if not bool(torch.isfinite(sums).all()):
            for name, t in tensors.items():
                if not bool(torch.isfinite(t).all()):
                    raise CacheError(f"UserCache.{name} holds NaN or inf")
            raise CacheError("UserCache holds values too large to be finite when summed")

    def _digest(self, meta: dict[str, str]) -> str:
        """sha256 of the metadata entries ``meta`` (all but ``sha256``) and the tensors."""
        h = hashlib.sha256()
        h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"},
                            sort_keys=True).encode())
        for name, t in sorted(self.tensors().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{_dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy())  # hashed in place: no copy
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        """The string metadata written with the tensors."""
        meta = {
            "format": CACHE_FORMAT,
            "format_version": str(CACHE_FORMAT_VERSION),
            "model_fingerprint": self.fingerprint,
            "dtype": _dtype_name(self.dtype),
            "length": str(self.length),
            "n_layers": str(self.n_layers),
            "n_heads": str(self.n_heads),
            "head_dim": str(self.head_dim),
            "shapes": json.dumps({n: list(t.shape) for n, t in self.tensors().items()},
                                 sort_keys=True),
            "user_id": json.dumps(self.user_id),
        }
        meta["sha256"] = self._digest(meta)
        return meta

    # ----------------------------------------------------------------------------- files
    def to_bytes(self) -> bytes:
        """The cache as safetensors bytes (the file format of :meth:`save`): for a shared store
        such as Redis. Refuses (:class:`CacheError`) NaN/inf or a user id that is not
        JSON-able."""
        from safetensors.torch import save

        self.check_finite()
        try:
            meta = self.metadata()
        except TypeError as e:
            raise CacheError(f"UserCache.user_id must be JSON-able to be saved ({e})") from None
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in self.tensors().items()}
        return save(tensors, metadata=meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to ``path`` (safetensors), atomically (temporary file + rename).

        Refuses (:class:`CacheError`) a cache holding NaN/inf or a user id that is not JSON-able.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"path must be a path, got {type(path).__name__}")
        data = self.to_bytes()
        path = Path(path)
        if path.is_dir():
            raise CacheError(f"{path}: is a directory, not a cache file path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise CacheError(f"{path}: cannot write the cache there ({e.strerror or e})") \
                from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise CacheError(f"{path}: cannot write the cache ({e.strerror or e})") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *,
             device: torch.device | str | None = None) -> UserCache:
        """Read a cache written by :meth:`save`, on ``device`` (default CPU). The file format
        alone is checked here; :meth:`Engine.load_cache <srp4ctr.engine.Engine.load_cache>` also
        checks that the cache comes from the engine's model.

        Raises:
            CacheError: missing, truncated or altered file, another format, NaN/inf.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"path must be a path, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            raise CacheError(f"{path}: is a directory, not a cache file")
        if not path.is_file():
            raise CacheError(f"{path}: no such cache file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CacheError(f"{path}: not a readable cache file ({e})") from None
        return cls.from_bytes(data, device=device, where=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, *, device: torch.device | str | None = None,
                   where: str = "cache bytes") -> UserCache:
        """The cache of :meth:`to_bytes` (or of a file written by :meth:`save`); every check of
        :meth:`load` (format, version, metadata, shapes, sha256 of the tensors, NaN/inf)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"expected bytes, got {type(data).__name__}")
            data = bytes(data)
            n = int.from_bytes(data[:8], "little")
            if len(data) < 8 or n <= 0 or 8 + n > len(data):
                raise ValueError("truncated safetensors header")
            header = json.loads(data[8 : 8 + n])  # the format's documented JSON header
            meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
            tensors = load(data)
        except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
            raise CacheError(f"{where}: not a readable cache ({e})") from None
        if meta.get("format") != CACHE_FORMAT:
            raise CacheError(f"{where}: not a srp4ctr user cache")
        if meta.get("format_version") != str(CACHE_FORMAT_VERSION):
            raise CacheError(
                f"{where}: cache format version {meta.get('format_version')}, this engine reads "
                f"{CACHE_FORMAT_VERSION}"
            )
        try:
            shapes = json.loads(meta["shapes"])
            user_id = json.loads(meta["user_id"])
            fingerprint = meta["model_fingerprint"]
            dtype = _DTYPES[meta["dtype"]]
            length = int(meta["length"])
            digest = meta["sha256"]
        except (KeyError, ValueError, TypeError) as e:
            raise CacheError(f"{where}: incomplete cache metadata ({e})") from None
        if set(tensors) != set(shapes) or not {"k", "v", "head_user"} <= set(tensors):
            raise CacheError(f"{where}: tensors {sorted(tensors)} do not match the metadata")
        for name, t in tensors.items():
            if list(t.shape) != shapes[name] or t.dtype != dtype:
                raise CacheError(
                    f"{where}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, metadata says "
                    f"{meta['dtype']} {shapes[name]}"
                )
        cache = cls(**tensors, fingerprint=fingerprint, user_id=user_id)
        if cache.length != length:
            raise CacheError(f"{where}: length {cache.length} != metadata length {length}")
        if cache._digest(meta) != digest:
            raise CacheError(f"{where}: tensors or metadata do not match the stored sha256 "
                             "(corrupt or altered)")
        unknown = sorted(set(meta) - _META_KEYS)
        if unknown:
            raise CacheError(f"{where}: unknown cache metadata {unknown}")
        cache.check_finite()
        return cache.to(device=device) if device is not None else cache


class UserCacheStore:
    """A thread-safe LRU store of :class:`UserCache` objects keyed by user id, bounded in bytes.

    ``put`` evicts least-recently-used caches until the total :attr:`UserCache.nbytes` fits
    ``max_bytes``; a cache larger than ``max_bytes`` on its own is not stored. ``get`` marks an
    entry as recently used; ``in`` does not.

    Example::

        store = UserCacheStore(max_bytes=256 << 20)
        cache = store.get_or_encode(user_id, lambda: engine.encode_user(history))
        probs = engine.score(cache, candidates)
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InputError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        # user id -> (cache, its size when stored), LRU first: the sizes are accounted as
        # stored, whatever a caller later rebinds on its cache object
        self._entries: OrderedDict[Hashable, tuple[UserCache, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        renew_lock_after_fork(self)  # a thread of the parent may hold it at fork time
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def _check_key(user_id: Hashable) -> None:
        try:
            hash(user_id)
        except TypeError:
            raise InputError(f"user id {user_id!r} is not hashable") from None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, user_id: Hashable) -> bool:
        self._check_key(user_id)
        with self._lock:
            return user_id in self._entries

    @property
    def nbytes(self) -> int:
        """Total bytes of the stored caches."""
        with self._lock:
            return self._nbytes

    def keys(self) -> list[Hashable]:
        """The stored user ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.keys())

    def get(self, user_id: Hashable, default: UserCache | None = None) -> UserCache | None:
        """The cache of ``user_id`` (now the most recently used), else ``default``."""
        self._check_key(user_id)
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is None:
                self.misses += 1
                return default
            self._entries.move_to_end(user_id)
            self.hits += 1
            return entry[0]

    def put(self, user_id: Hashable, cache: UserCache) -> bool:
        """Store ``cache`` under ``user_id`` (replacing any older one), evicting as needed.

        Returns False, storing nothing (and dropping an older entry of ``user_id``), when the
        cache alone is larger than ``max_bytes``.
        """
        self._check_key(user_id)
        if not isinstance(cache, UserCache):
            raise InputError(f"can only store a UserCache, got {type(cache).__name__}")
        size = cache.nbytes
        with self._lock:
            old = self._entries.pop(user_id, None)
            if old is not None:
                self._nbytes -= old[1]
            if size > self.max_bytes:
                return False
            while self._entries and self._nbytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._nbytes -= evicted
                self.evictions += 1
            self._entries[user_id] = (cache, size)
            self._nbytes += size
            return True

    def pop(self, user_id: Hashable, default: UserCache | None = None) -> UserCache | None:
        """Remove and return the cache of ``user_id`` (``default`` when absent)."""
        self._check_key(user_id)
        with self._lock:
            entry = self._entries.pop(user_id, None)
            if entry is None:
                return default
            self._nbytes -= entry[1]
            return entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def get_or_encode(self, user_id: Hashable, fn: Callable[[], UserCache]) -> UserCache:
        """The stored cache of ``user_id``, or ``fn()`` (stored, then returned) on a miss.

        ``fn`` runs outside the lock, so other users are served meanwhile; two threads missing
        the same user at once may both run it (the later result is kept).
        """
        cache = self.get(user_id)
        if cache is not None:
            return cache
        cache = fn()
        if not isinstance(cache, UserCache):
            raise InputError(f"get_or_encode: fn returned {type(cache).__name__}, not a UserCache")
        self.put(user_id, cache)
        return cache

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "nbytes": self._nbytes,
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}

    def __repr__(self) -> str:
        s = self.stats()
        return (f"UserCacheStore(entries={s['entries']}, nbytes={s['nbytes']}, "
                f"max_bytes={s['max_bytes']})")
