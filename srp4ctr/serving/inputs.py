"""What callers hand a scorer: raw user histories and raw candidate ids, checked and normalised.

Shared by the engine (:mod:`srp4ctr.engine`) and the torch-free runtime
(:mod:`srp4ctr.serving`), so both refuse the same input with the same
:class:`~srp4ctr.errors.InputError` before any model work starts. numpy only: torch tensors
are recognised by their type's module and converted through ``.numpy()``, without importing
torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from srp4ctr.errors import InputError

__all__ = ["History", "as_history_dict", "as_raw_ids", "is_tensor"]


@dataclass
class History:
    """One user's raw behaviour, in the dataset's own terms.

    ``item_id``: raw item ids (MovieLens movie ids, Taobao item ids, ...); ``timestamp``: unix
    seconds (or ISO date-time strings where the dataset took those); ``rating`` (MovieLens) or
    ``behavior`` (Taobao ``"pv"``/``"cart"``/``"fav"``/``"buy"``): the dataset's behaviour value,
    one per interaction; ``user_id``: the raw user id, to look up the user's features (``None``:
    no user features, as for an unknown user). Order does not matter: interactions are sorted by
    (timestamp, raw item id) exactly as in training.
    """

    item_id: Sequence[Any]
    timestamp: Sequence[Any]
    rating: Sequence[Any] | None = None
    behavior: Sequence[Any] | None = None
    user_id: Any = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "timestamp": self.timestamp}
        if self.rating is not None:
            out["rating"] = self.rating
        if self.behavior is not None:
            out["behavior"] = self.behavior
        if self.user_id is not None:
            out["user_id"] = self.user_id
        return out


_SEQUENCE_KEYS = ("item_id", "timestamp", "rating", "behavior", "behaviour")


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (checked by its type's module: torch is not
    imported)."""
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _check_dense(t: Any, what: str) -> None:
    """A tensor whose values can be read: strided (not sparse) and with data (not on the meta
    device)."""
    if str(getattr(t, "layout", "torch.strided")) != "torch.strided":
        raise InputError(f"{what} must be a dense tensor, got layout {t.layout}")
    if getattr(getattr(t, "device", None), "type", None) == "meta":
        raise InputError(f"{what} is a meta tensor (no data)")


def as_history_dict(history: Any, user_id: Any = None) -> dict[str, Any]:
    """A :class:`History` or mapping -> the dict ``PreparedDataset.encode_user_history`` takes.

    Every per-interaction entry must be one-dimensional; ``user_id`` (if given) overrides the
    history's own.
    """
    if isinstance(history, History):
        d = history.to_dict()
    elif isinstance(history, Mapping):
        d = dict(history)
    else:
        raise InputError(
            "history must be a srp4ctr.engine.History or a mapping with 'item_id' and "
            f"'timestamp' (and the dataset's behaviour value), got {type(history).__name__}"
        )
    for key in _SEQUENCE_KEYS:
        if key not in d:
            continue
        value = d[key]
        if isinstance(value, (str, bytes)):
            raise InputError(f"history[{key!r}] must be a sequence, got a string")
        if is_tensor(value):
            _check_dense(value, f"history[{key!r}]")
            value = value.detach().cpu().numpy()
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:  # ragged nested lists
            raise InputError(f"history[{key!r}] is not a flat sequence ({e})") from None
        if arr.ndim != 1:
            raise InputError(
                f"history[{key!r}] must be one-dimensional, got shape {tuple(arr.shape)}"
            )
        if arr.dtype == object:
            raise InputError(f"history[{key!r}] mixes types or holds None")
        d[key] = arr
    if user_id is not None:
        d["user_id"] = user_id
    if "user_id" in d and d["user_id"] is None:
        del d["user_id"]
    if "user_id" in d:
        d["user_id"] = _check_user_id(d["user_id"])
    return d


def _check_user_id(uid: Any) -> Any:
    """One raw user id: an integer (or an integral float), a string or bytes; never a bool, a
    fraction, NaN or a container."""
    if is_tensor(uid):
        _check_dense(uid, "user_id")
        if uid.numel() != 1:
            raise InputError(f"user_id must be one id, got a tensor of shape {tuple(uid.shape)}")
        uid = uid.item()
    if isinstance(uid, np.ndarray):
        if uid.ndim != 0:
            raise InputError(f"user_id must be one id, got an array of shape {uid.shape}")
        uid = uid.item()
    if isinstance(uid, np.generic):
        uid = uid.item()
    if isinstance(uid, bool):
        raise InputError("user_id must be an id, got a bool")
    if isinstance(uid, float):
        if not np.isfinite(uid) or uid != int(uid):
            raise InputError(f"user_id must be an integer id, got {uid!r}")
        return int(uid)
    if not isinstance(uid, (int, str, bytes)):
        raise InputError(f"user_id must be an integer or string id, got "
                         f"{type(uid).__name__}")
    return uid


def as_raw_ids(candidates: Any, *, string_ids: bool = False) -> np.ndarray:
    """Candidate ids (list, tuple, numpy array or tensor) -> a 1-D numpy array of raw ids.

    Rejects anything that is not one-dimensional, booleans, complex numbers, None and mixed
    types. Values (negative, fractional, NaN, unknown) are checked by the dataset's
    ``encode_items``. ``string_ids``: the dataset's raw item ids are strings.
    """
    if is_tensor(candidates):
        _check_dense(candidates, "candidates")
        if candidates.dim() != 1:
            raise InputError(
                f"candidates must be a 1-D tensor of item ids, got shape {tuple(candidates.shape)}"
            )
        if candidates.is_complex() or str(candidates.dtype) == "torch.bool":
            raise InputError(f"candidate ids must be integers, got dtype {candidates.dtype}")
        t = candidates.detach()
        if t.is_floating_point() and str(t.dtype) != "torch.float64":
            t = t.double()  # numpy has no bfloat16; fractions are checked in float64
        return t.cpu().numpy()
    if isinstance(candidates, (str, bytes)):
        raise InputError("candidates must be a sequence of item ids, got a string")
    if isinstance(candidates, (Mapping, set, frozenset)):
        # a dict iterates its keys and a set has no order: the probabilities would not line up
        raise InputError(f"candidates must be an ordered sequence of item ids (list, tuple, "
                         f"array or tensor), got a {type(candidates).__name__}")
    if isinstance(candidates, np.ndarray):
        arr = candidates
    else:
        if not isinstance(candidates, (Sequence, range)) and not hasattr(candidates, "__iter__"):
            raise InputError(
                f"candidates must be a list, numpy array or tensor of item ids, got "
                f"{type(candidates).__name__}"
            )
        seq = candidates if isinstance(candidates, (list, tuple, range)) else list(candidates)
        try:
            arr = np.asarray(seq)
        except (ValueError, TypeError) as e:
            raise InputError(f"candidates are not a flat sequence of ids ({e})") from None
        # np.asarray([True, 2]) silently gives [1, 2]: booleans are never ids
        if arr.dtype.kind in "iuf" and any(isinstance(x, (bool, np.bool_)) for x in seq):
            raise InputError("candidate ids must be integers, got a bool")
    if arr.ndim != 1:
        raise InputError(f"candidates must be one-dimensional, got shape {tuple(arr.shape)}")
    kind = arr.dtype.kind
    if kind == "b" or kind == "c":
        raise InputError(f"candidate ids must be integers, got dtype {arr.dtype}")
    if kind == "O":
        raise InputError("candidate ids mix types or hold None")
    if not string_ids and kind in "USV":
        raise InputError(f"candidate ids must be integers, got dtype {arr.dtype}")
    return arr


def encode_history(ds: Any, history: Any, user_id: Any = None, *,
                   max_len: int | None = None) -> dict[str, np.ndarray]:
    """A raw history -> the model's input arrays through the dataset's own
    ``encode_user_history`` (the function training built its samples with); anything it cannot
    take becomes :class:`~srp4ctr.errors.InputError`."""
    d = as_history_dict(history, user_id)
    try:
        return ds.encode_user_history(d, max_len=max_len)
    except InputError:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(f"invalid history: {e}") from None


def encode_candidates(ds: Any, candidates: Any, strict: bool = False) -> np.ndarray:
    """Raw candidate ids -> internal ids (int64 [C]) through the dataset's ``encode_items``.

    Unknown ids become the out-of-vocabulary item ``n_items + 1``, or raise
    :class:`~srp4ctr.errors.UnknownItemError` when ``strict``; malformed ids (negative,
    fractional, NaN, booleans, strings for integer-id data, not 1-D) always raise
    :class:`~srp4ctr.errors.InputError`.
    """
    from srp4ctr.errors import UnknownItemError

    raw = as_raw_ids(candidates, string_ids=ds.item_raw.dtype.kind not in "iu")
    ids = ds.encode_items(raw, strict=False)
    if strict:
        unknown = ids == ds.oov_item
        if unknown.any():
            shown = raw[unknown][:5].tolist()
            raise UnknownItemError(
                f"{int(unknown.sum())} unknown item id(s), e.g. {shown} (strict=True)")
    return np.ascontiguousarray(ids, dtype=np.int64)
