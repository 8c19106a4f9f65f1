"""User-state stores for the server: where encoded users (:class:`~srp4ctr.engine.UserCache`)
are kept between requests.

One interface, two implementations: :class:`MemoryStore` (in-process, ``cachetools.TTLCache``
bounded in bytes, with a TTL) and :class:`RedisStore` (a Redis server shared by every worker and
host; caches as safetensors bytes, :meth:`UserCache.to_bytes
<srp4ctr.engine.UserCache.to_bytes>`, with a TTL). A store never raises on the request path: an
unreachable Redis, a timeout or a damaged entry is logged, counted (``errors``) and reported as
a miss, so the server encodes the user itself.

Keys (:func:`state_key`) carry the model fingerprint, the user id and the sha256 of the encoded
history (every token the model sees, user features included): a changed history, another model
or another user can never read a stale state; the TTL bounds how long an entry lives.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from srp4ctr.errors import InputError

__all__ = ["MemoryStore", "RedisStore", "StateStore", "history_version", "state_key"]

log = logging.getLogger("srp4ctr.server")


def history_version(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex, 32 characters) of an encoded history: every array the model reads, by name,
    dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def state_key(prefix: str, fingerprint: str, user_id: Any, version: str) -> str:
    """``prefix:model:user:history-version`` (the user id as its repr, so 7 and "7" differ)."""
    return f"{prefix}:{fingerprint[:16]}:{user_id!r}:{version}"


class StateStore:
    """Where encoded users live between requests. ``get`` returns None on a miss (or any
    failure), ``put`` returns whether it stored the cache; neither raises."""

    name = "none"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = self.errors = self.puts = 0

    def get(self, key: str):
        return None

    def put(self, key: str, cache) -> bool:
        return False

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def stats(self) -> dict[str, Any]:
        return {"store": self.name, "hits": self.hits, "misses": self.misses,
                "errors": self.errors, "puts": self.puts}


class MemoryStore(StateStore):
    """In-process LRU with a TTL (``cachetools.TTLCache``), bounded by the caches' bytes."""

    name = "memory"

    def __init__(self, max_bytes: int = 256 << 20, ttl_s: float = 3600.0):
        from cachetools import TTLCache

        super().__init__()
        if max_bytes < 1 or ttl_s <= 0:
            raise InputError("a memory store needs max_bytes >= 1 and ttl_s > 0")
        self._cache = TTLCache(maxsize=int(max_bytes), ttl=float(ttl_s),
                               getsizeof=lambda c: max(1, c.nbytes))

    def get(self, key: str):
        with self._lock:
            c = self._cache.get(key)
        self._count("hits" if c is not None else "misses")
        return c

    def put(self, key: str, cache) -> bool:
        if cache.nbytes > self._cache.maxsize:
            return False
        with self._lock:
            self._cache[key] = cache
        self._count("puts")
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


class RedisStore(StateStore):
    """Caches as safetensors bytes in Redis, with a TTL; any Redis failure is a miss.

    ``url``: ``redis://host:port/db``; ``timeout_s`` bounds every call (connect, get, set), so an
    outage costs a request at most that long before it encodes the user itself.
    """

    name = "redis"

    def __init__(self, url: str, ttl_s: float = 3600.0, timeout_s: float = 0.05,
                 device: Any = None):
        import redis

        super().__init__()
        if ttl_s <= 0 or timeout_s <= 0:
            raise InputError("a Redis store needs ttl_s > 0 and timeout_s > 0")
        self.url, self.ttl_ms = url, int(ttl_s * 1000)
        self._device = device
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                            socket_connect_timeout=timeout_s,
                                            health_check_interval=0)

    def get(self, key: str):
        from srp4ctr.engine import UserCache

        try:
            data = self._client.get(key)
        except Exception as e:  # noqa: BLE001 - any client failure degrades to a miss
            log.warning("redis get failed (%s): encoding instead", e)
            self._count("errors")
            return None
        if data is None:
            self._count("misses")
            return None
        try:
            cache = UserCache.from_bytes(data, device=self._device, where=f"redis {key}")
        except InputError as e:
            log.warning("redis entry unusable (%s): encoding instead", e)
            self._count("errors")
            return None
        self._count("hits")
        return cache

    def put(self, key: str, cache) -> bool:
        try:
            self._client.set(key, cache.to_bytes(), px=self.ttl_ms)
        except Exception as e:  # noqa: BLE001
            log.warning("redis set failed (%s): not stored", e)
            self._count("errors")
            return False
        self._count("puts")
        return True

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:  # noqa: BLE001
            return False
