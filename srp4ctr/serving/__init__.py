"""Torch-free serving of an exported SRP4CTR model: numpy and ONNX Runtime (or OpenVINO).

::

    from srp4ctr.serving import Scorer

    scorer = Scorer.load("runs/srp4ctr-onnx", runtime="onnxruntime", threads=2)
    cache = scorer.encode_user({"item_id": [1193, 661], "timestamp": [978300760, 978302109],
                                "rating": [5, 3]})
    probs = scorer.score(cache, [1193, 661, 914])          # numpy float32 [3]
    many = scorer.score_many([cache, other], [[1, 2], [3]])  # one scorer_multi call

The folder is what ``srp4ctr export-onnx`` writes (the graphs, ``manifest.json`` and the
dataset's serving tables). Raw input goes through the same code as in the engine: the data
pipeline's ``encode_user_history`` / ``encode_items`` over the serving tables, and the input
rules of :mod:`srp4ctr.serving.inputs` (which the engine imports too), so the same input gives
the same errors (:class:`~srp4ctr.errors.InputError`, ``UnknownItemError``, ``CacheError``)
and, within 1e-5, the same probabilities. Importing this package, or using it, never imports
torch.
"""

from __future__ import annotations

from srp4ctr.errors import CacheError, CheckpointError, InputError, UnknownItemError

from .inputs import History

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "CacheError",
    "CheckpointError",
    "History",
    "InputError",
    "Scorer",
    "UnknownItemError",
    "UserCache",
]

_LAZY = {"Scorer": "scorer", "UserCache": "scorer", "RUNTIMES": "runtime",
         "PRECISIONS": "runtime"}


def __getattr__(name: str):
    # the scorer (and its runtimes) load only when asked for: the engine imports .inputs alone
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
