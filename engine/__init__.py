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
  block; ``save`` / ``load`` (safetensors, checked). Layout in :mod:`srp4ctr.engine.cache`.
- :class:`UserCacheStore` — thread-safe LRU of caches bounded in bytes.
- :class:`History` — a raw user history.
- Backends (:mod:`srp4ctr.engine.backends`): ``torch`` (reference, folded item tables),
  ``triton`` (fused kernels on CUDA), ``cpp`` (slot for the C++ CPU path; not built yet).

Importing this package never imports triton nor touches a GPU.
"""

from srp4ctr.errors import CacheError, CheckpointError, InputError, UnknownItemError
from srp4ctr.kernels import BackendUnavailableError

from .backends import (
    BACKENDS,
    CppBackend,
    ScoringBackend,
    TorchBackend,
    TritonBackend,
    resolve_backend,
)
from .cache import CACHE_FORMAT, CACHE_FORMAT_VERSION, UserCache, UserCacheStore
from .engine import DEFAULT_MAX_CHUNK_BYTES, Engine, model_fingerprint
from .folded import FoldedModel
from .inputs import History

__all__ = [
    "BACKENDS",
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_MAX_CHUNK_BYTES",
    "BackendUnavailableError",
    "CacheError",
    "CheckpointError",
    "CppBackend",
    "Engine",
    "FoldedModel",
    "History",
    "InputError",
    "ScoringBackend",
    "TorchBackend",
    "TritonBackend",
    "UnknownItemError",
    "UserCache",
    "UserCacheStore",
    "model_fingerprint",
    "resolve_backend",
]
