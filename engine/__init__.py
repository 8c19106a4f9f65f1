"""srp4ctr.engine: folded-inference serving of a fine-tuned SRP4CTR model.

::

    from srp4ctr.engine import Engine, UserCacheStore

    engine = Engine.load("runs/srp4ctr", data_dir="data")   # a fine-tuning checkpoint
    cache = engine.encode_user({"item_id": [1193, 661], "rating": [5, 3],
                                "timestamp": [978300760, 978302109]})
    probs = engine.score(cache, [914, 3408, 2355])          # float32 [3]
    many = engine.score_many([cache, other], [[914], [3408, 2355]])

- :class:`Engine` — ``load`` / ``from_model``, ``encode_user`` (FG-BERT once per request ->
  :class:`UserCache`), ``score`` (thousands of candidates against the cache, in chunks under a
  memory budget), ``score_many`` (many users, jagged), ``describe``.
- :class:`UserCache` — per-layer K/V of the real positions, Q-Former tokens, the head's user
  block; ``save`` / ``Engine.load_cache`` (safetensors, checked). Layout in
  :mod:`srp4ctr.engine.cache`.
- :class:`UserCacheStore` — thread-safe LRU of caches bounded in bytes.
- :class:`History` — a raw user history.
- :class:`EngineConfig` — every serving choice (device, dtype, backend, user side, threads, the
  C++ instruction set and tile, chunk and table budgets), resolved once; ``Engine.load(path,
  config, **overrides)``; the environment variables it honours are listed in
  :mod:`srp4ctr.engine.config`.
- Backends (:mod:`srp4ctr.engine.backends`, one module each): ``torch`` (the reference),
  ``triton`` (fused kernels on CUDA), ``cpp`` (the C++ CPU path); each has a candidate scorer and
  a user side, and one rule picks them (``auto``).

Importing this package never imports triton nor touches a GPU.
"""

from srp4ctr.errors import CacheError, CheckpointError, InputError, UnknownItemError
from srp4ctr.kernels import BackendUnavailableError

from .backends import (
    BACKENDS,
    BackendOptions,
    CppBackend,
    Scorer,
    TorchBackend,
    TritonBackend,
    UserSide,
    resolve_backend,
    resolve_user_side,
)
from .cache import CACHE_FORMAT, CACHE_FORMAT_VERSION, UserCache, UserCacheStore
from .config import DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_TABLE_BYTES, EngineConfig
from .engine import Engine
from .folded import FoldedModel
from .inputs import History
from .loading import model_fingerprint

__all__ = [
    "BACKENDS",
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEFAULT_MAX_TABLE_BYTES",
    "BackendOptions",
    "BackendUnavailableError",
    "CacheError",
    "CheckpointError",
    "CppBackend",
    "Engine",
    "EngineConfig",
    "FoldedModel",
    "History",
    "InputError",
    "Scorer",
    "TorchBackend",
    "TritonBackend",
    "UnknownItemError",
    "UserCache",
    "UserCacheStore",
    "UserSide",
    "model_fingerprint",
    "resolve_backend",
    "resolve_user_side",
]
