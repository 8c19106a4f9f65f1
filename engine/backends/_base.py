"""The backend protocol, the registry and the one resolution rule (see the package docstring)."""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from srp4ctr.errors import InputError
from srp4ctr.kernels import BackendUnavailableError

from ..cache import UserCache
from ..config import DEFAULT_TILE, EngineConfig
from ..folded import FoldedModel

__all__ = ["BACKENDS", "BackendOptions", "Scorer", "UserSide", "UserTensors", "explain_backend",
           "intra_op_threads", "register", "resolve_backend", "resolve_user_side"]


@dataclass(frozen=True)
class BackendOptions:
    """What a backend takes from the resolved :class:`~srp4ctr.engine.EngineConfig`."""

    threads: int | None = None
    user_threads: int | None = None
    isa: str = "auto"
    tile: int = DEFAULT_TILE

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> BackendOptions:
        return cls(threads=cfg.threads, user_threads=cfg.user_threads, isa=cfg.isa or "auto",
                   tile=cfg.tile or DEFAULT_TILE)

    def call_threads(self, user_side: bool = False) -> int | None:
        """Threads of one call (None: the calling thread's torch count, unchanged)."""
        if user_side and self.user_threads is not None:
            return self.user_threads
        return self.threads

    def pool_threads(self, user_side: bool = False) -> int:
        """Threads of one C++ call: :meth:`call_threads`, else torch's count now."""
        n = self.call_threads(user_side)
        return n if n is not None else torch.get_num_threads()


class UserTensors(NamedTuple):
    """One user's user-side output (tensors on the engine's device, any float dtype)."""

    k: torch.Tensor  # [NL, n, H, Dh] (NL = 0 without a tower)
    v: torch.Tensor
    head_user: torch.Tensor  # [h1]
    qtokens: torch.Tensor | None  # [M, d]
    pooled: torch.Tensor | None  # [d]


_THREADS = threading.local()


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run the block with at most ``n`` torch intra-op threads on the calling thread (``None``:
    unchanged) and restore that thread's count afterwards.

    Torch keeps the count per thread once a thread has used it (OpenMP builds); a
    ``set_num_threads`` call also sets the default that threads pick up on their first parallel
    op. So the block lowers only the calling thread's count, each thread restores its own, and a
    thread that starts using torch while another is inside the block may start with ``n``.
    Nested blocks on one thread: the outermost one rules.
    """
    depth = getattr(_THREADS, "depth", 0)
    saved = torch.get_num_threads()
    change = n is not None and depth == 0 and n < saved
    _THREADS.depth = depth + 1
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        _THREADS.depth = depth
        if change:
            torch.set_num_threads(saved)


class Scorer(abc.ABC):
    """The candidate side on one kind of hardware: (user caches, internal item ids) -> logits.

    ``item_ids`` are int64 internal ids on the engine's device (``counts[b]`` of them per user b,
    one user after another); every tensor of the caches is on that device in the engine's dtype.
    Scorers hold no mutable state outside a lock, so the engine may call them from many threads.
    """

    name: ClassVar[str] = "base"
    #: whether the scorer reads the folded first-layer query table (else it is not built)
    uses_q0: ClassVar[bool] = True
    #: whether the scorer itself refuses caches holding NaN / inf (with a CacheError) before it
    #: scores, so the engine need not check them first
    checks_finite: ClassVar[bool] = False

    def __init__(self, folded: FoldedModel, options: BackendOptions | None = None):
        self.folded = folded
        self.options = options or BackendOptions()

    @classmethod
    def hardware_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot score on ``device`` in ``dtype`` at all (None: it can)."""
        return None

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot score on ``device`` in ``dtype`` here: :meth:`hardware_reason`
        or a missing build (the C++ extension). None: it can."""
        return cls.hardware_reason(device, dtype)

    @classmethod
    def slower_than_torch_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why ``auto`` should not pick this backend here although it can run: where the
        benchmarks measure it slower than the torch backend (None: it is not)."""
        return None

    @abc.abstractmethod
    def score_one(self, cache: UserCache, item_ids: torch.Tensor) -> torch.Tensor:
        """Logits of ``item_ids`` (internal ids, [C]) for one user, in the engine's dtype."""

    @abc.abstractmethod
    def score_many(self, caches: Sequence[UserCache], item_ids: torch.Tensor,
                   counts: Sequence[int]) -> torch.Tensor:
        """Logits of the concatenated ``item_ids``; user i owns the next ``counts[i]``."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}


class UserSide(abc.ABC):
    """The user side on one kind of hardware: a model batch of B users -> B :class:`UserTensors`.

    ``batch`` is the right-padded training layout (``hist_item [B, L]``, ``hist_len [B]``, the
    behaviour and user fields) on the engine's device.
    """

    name: ClassVar[str] = "base"

    def __init__(self, model, options: BackendOptions | None = None):
        self.model = model
        self.options = options or BackendOptions()

    @classmethod
    def unavailable_reason(cls, model, device: torch.device) -> str | None:
        """Why this user side cannot encode ``model``'s users on ``device`` (None: it can)."""
        return None

    @classmethod
    def slower_than_torch_reason(cls, model, device: torch.device) -> str | None:
        """Why ``auto`` should not pick this user side here although it can run (None: it is
        not measured slower than the torch one)."""
        return None

    @abc.abstractmethod
    def encode(self, batch: Mapping[str, torch.Tensor]) -> list[UserTensors]:
        """One :class:`UserTensors` per user of ``batch``, each cut to its real length."""

    def describe(self) -> dict[str, Any]:
        return {"user_side": self.name}


@dataclass(frozen=True)
class _Entry:
    scorer: type[Scorer]
    user_side: type[UserSide]
    needs_extension: bool


#: name -> (scorer, user side); filled by the backend modules through :func:`register`
BACKENDS: dict[str, _Entry] = {}


def register(name: str, scorer: type[Scorer], user_side: type[UserSide], *,
             needs_extension: bool = False) -> None:
    """Make ``name`` a backend (its module calls this once)."""
    BACKENDS[name] = _Entry(scorer, user_side, needs_extension)


def _name(kind: str, name: Any) -> str:
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in ("auto", *BACKENDS):
        raise InputError(f"unknown engine {kind} {name!r}; expected one of auto, "
                         f"{', '.join(BACKENDS)}")
    return key


def _extension_missing() -> bool:
    from srp4ctr._ext import unavailable_reason

    return unavailable_reason() is not None


def resolve_backend(name: str, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> type[Scorer]:
    """The scorer class for ``name`` (``auto``, ``torch``, ``triton`` or ``cpp``) on ``device``
    in ``dtype``; the rule is the package docstring's."""
    return explain_backend(name, device, dtype)[0]


def explain_backend(name: str, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> tuple[type[Scorer], str]:
    """:func:`resolve_backend` and, in words, why that backend."""
    from srp4ctr._ext import warn_fallback

    key = _name("backend", name)
    if key == "auto":
        cand = BACKENDS["triton" if device.type == "cuda" else "cpp"]
        reason = cand.scorer.unavailable_reason(device, dtype)
        if reason is None:
            slow = cand.scorer.slower_than_torch_reason(device, dtype)
            if slow is None:
                return cand.scorer, f"auto: {cand.scorer.name} runs here ({device.type}, " \
                                    f"{str(dtype).replace('torch.', '')})"
            return BACKENDS["torch"].scorer, f"auto: torch, because {slow}"
        if _falls_back(cand, device, dtype):
            warn_fallback(f"backend='auto' on {device.type}")
        return BACKENDS["torch"].scorer, f"auto: torch, because {reason}"
    entry = BACKENDS[key]
    reason = entry.scorer.unavailable_reason(device, dtype)
    if reason is None:
        return entry.scorer, f"{key}: asked for"
    if _falls_back(entry, device, dtype):
        warn_fallback(f"backend={key!r}")
        return BACKENDS["torch"].scorer, f"{key} asked for, torch because {reason}"
    raise BackendUnavailableError(reason)


def _falls_back(entry: _Entry, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the only thing missing is the C++ extension's build."""
    return (entry.needs_extension and _extension_missing()
            and entry.scorer.hardware_reason(device, dtype) is None)


def resolve_user_side(name: str, model, device: torch.device,
                      scorer: type[Scorer]) -> type[UserSide]:
    """The user-side class for ``name``: ``auto`` is the scoring backend's own user side where it
    can encode ``model`` on ``device`` and is not measured slower than torch's, else torch; a backend name must be able to (else
    :class:`BackendUnavailableError` says why)."""
    key = _name("user_side", name)
    torch_side = BACKENDS["torch"].user_side
    if key == "auto":
        own = BACKENDS[scorer.name].user_side
        if own.unavailable_reason(model, device) is None and \
                own.slower_than_torch_reason(model, device) is None:
            return own
        return torch_side
    cls = BACKENDS[key].user_side
    reason = cls.unavailable_reason(model, device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return cls
