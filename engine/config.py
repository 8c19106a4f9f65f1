"""How an :class:`~srp4ctr.engine.Engine` serves: one dataclass, resolved once at load.

::

    cfg = EngineConfig(backend="cpp", dtype="bfloat16", threads=2)
    engine = Engine.load("runs/ctr", config=cfg)              # or Engine.load(path, threads=2)
    engine.describe()["config"]                               # the resolved values

Precedence of every field: an explicit value (constructor argument or ``Engine.load(**overrides)``)
> its environment variable (below; the only place the engine reads the environment) > the default.

==========================  ====================================================================
environment variable        field it sets when the field is left at ``None``
==========================  ====================================================================
``SRP4CTR_THREADS``         ``threads``
``SRP4CTR_CPP_ISA``         ``isa`` (``auto``, ``amx``, ``avx512``, ``avx2``, ``neon``, ``generic``)
``SRP4CTR_CPP_TILE``        ``tile``
==========================  ====================================================================

Invalid values, from either source, raise :class:`~srp4ctr.errors.InputError` naming the field
(and the variable).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from srp4ctr.errors import InputError

__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEFAULT_MAX_TABLE_BYTES",
    "DEFAULT_TILE",
    "ENV",
    "EngineConfig",
    "as_device",
    "as_dtype",
]

#: working memory of one scoring chunk, per device type. On CPU a small budget keeps a chunk's
#: scores and FFN activations in the caches: ≈ 800 candidates at history 200, d = 64, measured
#: 1.2-1.5x faster than one 4096-candidate pass with 1 or 2 threads (400-2000 are all close);
#: on a GPU larger chunks keep the launches few.
DEFAULT_MAX_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 512 << 20}
#: per-item tables larger than this are not built (rows are then computed per request)
DEFAULT_MAX_TABLE_BYTES = 1 << 30
#: C++ candidates per work item (every register block height of the kernels divides it)
DEFAULT_TILE = 48
#: the scoring backends, in the one vocabulary every layer uses
BACKEND_NAMES = ("auto", "torch", "triton", "cpp")
ISAS = ("auto", "amx", "avx512", "avx2", "neon", "generic")
#: field -> the environment variable that overrides its default
ENV = {"threads": "SRP4CTR_THREADS", "isa": "SRP4CTR_CPP_ISA", "tile": "SRP4CTR_CPP_TILE"}

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def as_dtype(dtype: Any) -> torch.dtype:
    """A scoring precision from a torch dtype or its name (``"bf16"``, ``"float32"``...)."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.strip().lower().replace("torch.", "")]
    raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


def as_device(device: Any) -> torch.device:
    """A serving device (``cpu`` or an available ``cuda`` device, with its index)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"not a device: {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device='cuda' was asked for but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise InputError(f"the engine runs on 'cpu' or 'cuda', got {device!r}")
    return dev


def _positive_int(name: str, val: Any, source: str = "") -> int:
    if isinstance(val, str) and source:  # from the environment
        try:
            val = int(val.strip())
        except ValueError:
            raise InputError(f"{source}={val!r}: {name} must be a positive integer") from None
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        where = f" (from {source})" if source else ""
        raise InputError(f"{name} must be a positive int, got {val!r}{where}")
    return val


def _choice(name: str, val: Any, choices: tuple[str, ...], source: str = "") -> str:
    key = val.strip().lower() if isinstance(val, str) else None
    if key not in choices:
        where = f" (from {source})" if source else ""
        raise InputError(f"unknown engine {name} {val!r}{where}; expected one of "
                         f"{', '.join(choices)}")
    return key


@dataclass(frozen=True)
class EngineConfig:
    """Every serving choice of an engine.

    Attributes:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``...).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpp"``; the rule is in
            :func:`srp4ctr.engine.backends.resolve_backend`.
        dtype: the scoring precision: ``float32`` (exact), ``float16`` or ``bfloat16``.
        user_side: who encodes users: ``"auto"`` (the backend's own user side where it can serve
            the model, else torch), ``"torch"`` (the model's forward) or a backend name that must
            then serve it (``"cpp"``: the C++ encoder; ``"triton"``: torch layers with the
            Q-Former's cross-attention on the ``query_pool`` kernel).
        threads: the one thread setting of a serving call: the C++ pool's threads (both sides),
            and on CPU the most torch intra-op threads a call runs with (the calling thread's
            count is lowered for the call, never raised, and restored). ``None``: the calling
            thread's torch count, unchanged (``SRP4CTR_THREADS`` overrides).
        user_threads: the same for the user side alone (``None``: ``threads``). With passive
            OpenMP waiting one user's ~40 small torch ops each wake the other threads: history
            200, d = 64, 2 threads measured 4.8 ms against 1.65 ms with ``user_threads=1``.
        isa: the C++ instruction set: ``auto`` (the fastest the CPU has), ``amx`` (bf16 only),
            ``avx512``, ``avx2`` (with FMA), ``neon`` (aarch64), ``generic`` (``SRP4CTR_CPP_ISA``
            overrides).
        tile: C++ candidates per work item (default 48; ``SRP4CTR_CPP_TILE`` overrides).
        max_chunk_bytes, chunk_size: the working-memory budget of one scoring chunk (default
            :data:`DEFAULT_MAX_CHUNK_BYTES` of the device type), or a fixed number of candidates
            per chunk. Results do not depend on them beyond fp32 rounding.
        fold_items: build the per-item tables (``"auto"``: when they fit ``max_table_bytes``).
        max_table_bytes: the budget of the per-item tables.
    """

    device: Any = "cpu"
    backend: str = "auto"
    dtype: Any = "float32"
    user_side: str = "auto"
    threads: int | None = None
    user_threads: int | None = None
    isa: str | None = None
    tile: int | None = None
    max_chunk_bytes: int | None = None
    chunk_size: int | None = None
    fold_items: bool | str = "auto"
    max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with ``changes``; unknown names raise :class:`InputError`."""
        unknown = sorted(set(changes) - set(self.fields()))
        if unknown:
            raise InputError(f"unknown engine option(s) {', '.join(unknown)}; expected "
                             f"{', '.join(self.fields())}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def make(cls, config: EngineConfig | Mapping[str, Any] | None = None,
             **overrides: Any) -> EngineConfig:
        """``config`` (a config, a mapping of fields, or None) with ``overrides`` applied."""
        if config is None:
            base = cls()
        elif isinstance(config, EngineConfig):
            base = config
        elif isinstance(config, Mapping):
            base = cls().replace(**dict(config))
        else:
            raise InputError(f"config must be an EngineConfig or a mapping, got "
                             f"{type(config).__name__}")
        return base.replace(**overrides) if overrides else base

    def resolved(self, environ: Mapping[str, str] | None = None) -> EngineConfig:
        """Every field checked and given its value: environment overrides applied, device and
        dtype normalised, the tile and chunk budget filled in. Raises :class:`InputError`."""
        env = os.environ if environ is None else environ
        device = as_device(self.device)
        dtype = as_dtype(self.dtype)
        backend = _choice("backend", self.backend, BACKEND_NAMES)
        user_side = _choice("user_side", self.user_side, BACKEND_NAMES)
        threads, isa, tile = self.threads, self.isa, self.tile
        if threads is None and env.get(ENV["threads"], "").strip():
            threads = _positive_int("threads", env[ENV["threads"]], ENV["threads"])
        if isa is None and env.get(ENV["isa"], "").strip():
            isa = _choice("isa", env[ENV["isa"]], ISAS, ENV["isa"])
        if tile is None and env.get(ENV["tile"], "").strip():
            tile = _positive_int("tile", env[ENV["tile"]], ENV["tile"])
        isa = "auto" if isa is None else _choice("isa", isa, ISAS)
        tile = DEFAULT_TILE if tile is None else _positive_int("tile", tile)
        if tile > 1024:
            raise InputError(f"tile must be at most 1024, got {tile}")
        for name, val in (("threads", threads), ("user_threads", self.user_threads),
                          ("chunk_size", self.chunk_size),
                          ("max_chunk_bytes", self.max_chunk_bytes),
                          ("max_table_bytes", self.max_table_bytes)):
            if val is not None:
                _positive_int(name, val)
        if not (isinstance(self.fold_items, bool) or self.fold_items == "auto"):
            raise InputError(f"fold_items must be True, False or 'auto', got {self.fold_items!r}")
        chunk = (DEFAULT_MAX_CHUNK_BYTES[device.type] if self.max_chunk_bytes is None
                 else self.max_chunk_bytes)
        return dataclasses.replace(self, device=device, dtype=dtype, backend=backend,
                                   user_side=user_side, threads=threads, isa=isa, tile=tile,
                                   max_chunk_bytes=chunk)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able values (devices and dtypes by name)."""
        out = {}
        for name in self.fields():
            val = getattr(self, name)
            if isinstance(val, (torch.device, torch.dtype)):
                val = str(val).replace("torch.", "")
            out[name] = val
        return out
